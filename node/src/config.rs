use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use postern_identity::wire::ServiceName;
use postern_identity::Identifier;
use postern_policies::audit::AuditLog;
use postern_policies::{AllowList, LivePolicies};

use crate::trust::{AttributeRule, Trust};

/// A relay to dial and the identity it must prove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayEndpoint {
    /// `host:port`; resolved at every connection attempt.
    pub address: String,
    /// The relay's identifier, pinned: any other identity is refused.
    pub identifier: Identifier,
}

impl RelayEndpoint {
    /// A relay at `address` that must prove `identifier`.
    pub fn new(address: impl Into<String>, identifier: Identifier) -> Self {
        RelayEndpoint {
            address: address.into(),
            identifier,
        }
    }
}

/// What an outlet connects each tunnel to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TCP `host:port`, normally on loopback.
    Tcp(String),
    /// A Unix domain socket path, for servers with no TCP port at all.
    Unix(PathBuf),
}

impl FromStr for Target {
    type Err = String;

    /// `unix:/path` or an absolute path is a Unix socket; anything else must
    /// be `host:port`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(Target::Unix(PathBuf::from(s)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => Ok(Target::Tcp(s.to_owned())),
            _ => Err(format!(
                "{s:?} is not a target: use host:port (e.g. 127.0.0.1:5432) or a Unix socket path (e.g. unix:/var/run/postgresql/.s.PGSQL.5432)"
            )),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(addr) => f.write_str(addr),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Time limits shared by inlets and outlets.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// Dialling the relay or the target.
    pub connect: Duration,
    /// Any handshake (hop, attach, end-to-end).
    pub handshake: Duration,
    /// Interval between heartbeats on the hop channel.
    pub heartbeat: Duration,
    /// A relay silent for this long is considered gone.
    pub dead_after: Duration,
    /// First reconnection delay; doubles up to `reconnect_max`, with jitter.
    pub reconnect_min: Duration,
    /// Longest reconnection delay.
    pub reconnect_max: Duration,
    /// Authenticated data connections kept dialled ahead of need, so that a
    /// new tunnel skips the TCP and Noise handshakes with the relay (0: dial
    /// each one when needed).
    pub spare_connections: usize,
    /// A spare data connection older than this is replaced (the relay closes
    /// idle ones after 120 s by default).
    pub spare_max_age: Duration,
    /// A tunnel that carries no byte in either direction for this long is
    /// closed, and both ends log why. `None` (the default) keeps idle tunnels
    /// open: database sessions and pools often sit idle for hours.
    pub tunnel_idle: Option<Duration>,
    /// On a graceful stop ([`crate::NodeHandle::drain`]), how long open
    /// tunnels may keep running before they are closed.
    pub drain_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
            heartbeat: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
            reconnect_min: Duration::from_millis(100),
            // Short enough that a restarted relay sees its outlets again
            // within a few seconds; jitter spreads the reconnections.
            reconnect_max: Duration::from_secs(2),
            spare_connections: 2,
            spare_max_age: Duration::from_secs(90),
            tunnel_idle: None,
            drain_grace: Duration::from_secs(30),
        }
    }
}

/// Default for [`OutletConfig::max_tunnels`] and [`InletConfig::max_tunnels`].
pub const DEFAULT_MAX_TUNNELS: usize = 1_024;

/// `first`, then the fallbacks: the order in which a node tries relays.
fn relay_order(first: &RelayEndpoint, fallbacks: &[RelayEndpoint]) -> Vec<RelayEndpoint> {
    std::iter::once(first.clone())
        .chain(fallbacks.iter().cloned())
        .collect()
}

/// Everything an outlet needs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutletConfig {
    /// The relay to register at.
    pub relay: RelayEndpoint,
    /// The service name to register.
    pub service: ServiceName,
    /// Where each tunnel is connected.
    pub target: Target,
    /// Identities that may connect, whatever their credentials.
    pub allow: AllowList,
    /// Attributes that admit an inlet presenting a valid credential with all
    /// of them (from an authority in `trust`). With `allow` empty too, the
    /// outlet admits nobody.
    pub allow_attributes: Vec<AttributeRule>,
    /// Authorities trusted, the outlet's own credential, revocations.
    pub trust: Arc<Trust>,
    /// Cedar policies deciding `connect` for every tunnel (default deny),
    /// instead of `allow` and `allow_attributes` (which must then be empty).
    pub policies: Option<Arc<LivePolicies>>,
    /// The service's attributes, as policies see them (`resource.env`).
    pub service_attributes: BTreeMap<String, String>,
    /// Where access decisions and tunnel ends are audited, if anywhere.
    pub audit: Option<Arc<AuditLog>>,
    /// Where the credential in `trust` is saved each time the outlet renews
    /// it (mode 0600), so that a restart presents the fresh one.
    pub credential_file: Option<PathBuf>,
    /// Relays to fail over to, in order, when `relay` cannot be reached or
    /// its session ends. Inlets of this service should list the same relays.
    pub fallback_relays: Vec<RelayEndpoint>,
    /// Most tunnels served at once; further inlets are told the outlet is
    /// at its limit (their tunnel is closed with a reason, nothing else is
    /// disturbed).
    pub max_tunnels: usize,
    /// Time limits.
    pub timeouts: Timeouts,
}

impl OutletConfig {
    /// An outlet configuration with default time limits.
    pub fn new(
        relay: RelayEndpoint,
        service: ServiceName,
        target: Target,
        allow: AllowList,
    ) -> Self {
        OutletConfig {
            relay,
            service,
            target,
            allow,
            allow_attributes: Vec::new(),
            trust: Arc::new(Trust::default()),
            policies: None,
            service_attributes: BTreeMap::new(),
            audit: None,
            credential_file: None,
            fallback_relays: Vec::new(),
            max_tunnels: DEFAULT_MAX_TUNNELS,
            timeouts: Timeouts::default(),
        }
    }

    /// The same configuration with `relays` to fail over to, in order.
    pub fn with_fallback_relays(mut self, relays: impl IntoIterator<Item = RelayEndpoint>) -> Self {
        self.fallback_relays = relays.into_iter().collect();
        self
    }

    /// Every relay, in the order they are tried: `relay` first.
    pub fn relays(&self) -> Vec<RelayEndpoint> {
        relay_order(&self.relay, &self.fallback_relays)
    }
}

/// Everything an inlet needs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InletConfig {
    /// The relay to open tunnels through.
    pub relay: RelayEndpoint,
    /// The service to reach.
    pub service: ServiceName,
    /// Local address to listen on (loopback unless explicitly allowed).
    pub listen: SocketAddr,
    /// The outlet identity that must answer; any other is refused.
    pub outlet: Identifier,
    /// Listening on a non-loopback address exposes the tunnel to the local
    /// network; refused unless this is set.
    pub dangerous_allow_non_loopback: bool,
    /// Authorities trusted (an outlet's credential, if it presents one, must
    /// be valid), the inlet's own credential, revocations.
    pub trust: Arc<Trust>,
    /// Attributes the outlet's credential must carry (from an authority in
    /// `trust`), beyond being the pinned `outlet` identity: for example
    /// `service=db-prod`, so that only an outlet the authority vouches for
    /// as serving it is accepted.
    pub require_outlet_attributes: Vec<AttributeRule>,
    /// Relays to fail over to, in order, when `relay` cannot be reached or
    /// its session ends. The outlet should list the same relays.
    pub fallback_relays: Vec<RelayEndpoint>,
    /// Where the credential in `trust` is saved each time the inlet renews
    /// it (mode 0600), so that a restart presents the fresh one.
    pub credential_file: Option<PathBuf>,
    /// Most client connections tunnelled at once; further clients are
    /// refused (reset at once, with a logged reason).
    pub max_tunnels: usize,
    /// Time limits.
    pub timeouts: Timeouts,
}

impl InletConfig {
    /// An inlet configuration with default time limits, listening on `listen`.
    pub fn new(
        relay: RelayEndpoint,
        service: ServiceName,
        listen: SocketAddr,
        outlet: Identifier,
    ) -> Self {
        InletConfig {
            relay,
            service,
            listen,
            outlet,
            dangerous_allow_non_loopback: false,
            trust: Arc::new(Trust::default()),
            require_outlet_attributes: Vec::new(),
            fallback_relays: Vec::new(),
            credential_file: None,
            max_tunnels: DEFAULT_MAX_TUNNELS,
            timeouts: Timeouts::default(),
        }
    }

    /// The same configuration with `relays` to fail over to, in order.
    pub fn with_fallback_relays(mut self, relays: impl IntoIterator<Item = RelayEndpoint>) -> Self {
        self.fallback_relays = relays.into_iter().collect();
        self
    }

    /// Every relay, in the order they are tried: `relay` first.
    pub fn relays(&self) -> Vec<RelayEndpoint> {
        relay_order(&self.relay, &self.fallback_relays)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "127.0.0.1:5432".parse(),
            Ok(Target::Tcp("127.0.0.1:5432".into()))
        );
        assert_eq!(
            "localhost:5432".parse(),
            Ok(Target::Tcp("localhost:5432".into()))
        );
        assert_eq!("[::1]:5432".parse(), Ok(Target::Tcp("[::1]:5432".into())));
        assert_eq!(
            "unix:/run/pg/.s.PGSQL.5432".parse(),
            Ok(Target::Unix("/run/pg/.s.PGSQL.5432".into()))
        );
        assert_eq!("/tmp/s".parse(), Ok(Target::Unix("/tmp/s".into())));
        for bad in ["", "5432", "host:", ":5432", "host:0", "host:99999"] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }
}
