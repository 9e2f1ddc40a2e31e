use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use postern_identity::wire::ServiceName;
use postern_identity::Identifier;
use postern_policies::AllowList;

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
        }
    }
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
    /// Who may connect. Empty admits nobody.
    pub allow: AllowList,
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
            timeouts: Timeouts::default(),
        }
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
            timeouts: Timeouts::default(),
        }
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
