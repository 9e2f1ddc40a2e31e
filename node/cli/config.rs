//! Merges flags with an optional TOML file into validated library configs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use postern_identity::credential::SignedCredential;
use postern_identity::wire::ServiceName;
use postern_identity::{Identifier, Identity};
use postern_node::{AttributeRule, InletConfig, OutletConfig, RelayEndpoint, Trust, TrustAnchor};
use postern_policies::audit::{AuditLog, AuditOptions};
use postern_policies::{AllowList, LivePolicies, PolicyError};
use postern_relay::RelayConfig;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::args::{
    parse_duration, parse_relay_endpoint, Common, InletArgs, NodeLifecycleFlags, OutletArgs,
    RelayArgs, RelayFlags, TrustFlags,
};

const DEFAULT_RELAY_LISTEN: &str = "0.0.0.0:4000";
const DEFAULT_INLET_LISTEN: &str = "127.0.0.1:15432";

/// `relay` section keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    identity: Option<String>,
    listen: Option<SocketAddr>,
    handshake_timeout: Option<String>,
    max_connections: Option<usize>,
    max_pending_handshakes: Option<usize>,
    max_pending_per_source: Option<usize>,
    max_tunnels: Option<usize>,
    max_tunnels_per_node: Option<usize>,
    max_connections_per_source: Option<usize>,
    max_pending_opens_per_node: Option<usize>,
    max_pending_opens_per_source: Option<usize>,
    opens_per_second_per_node: Option<u32>,
    max_services_per_session: Option<usize>,
    policies: Option<PathBuf>,
    #[serde(default)]
    precheck_connect: bool,
    #[serde(default)]
    trust_authorities: Vec<String>,
    max_revocation_staleness: Option<String>,
    audit_log: Option<PathBuf>,
    audit_fail_closed: Option<bool>,
}

/// `outlet` file keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutletFile {
    identity: Option<String>,
    relay: Option<String>,
    relay_identity: Option<Identifier>,
    service: Option<ServiceName>,
    target: Option<String>,
    #[serde(default)]
    allow: Vec<Identifier>,
    #[serde(default)]
    allow_attributes: Vec<String>,
    policies: Option<PathBuf>,
    #[serde(default)]
    service_attributes: BTreeMap<String, String>,
    audit_log: Option<PathBuf>,
    audit_fail_closed: Option<bool>,
    #[serde(default)]
    trust_authorities: Vec<String>,
    max_revocation_staleness: Option<String>,
    credential: Option<PathBuf>,
    #[serde(default)]
    fallback_relays: Vec<String>,
    max_tunnels: Option<usize>,
    idle_timeout: Option<String>,
    drain_grace: Option<String>,
}

/// `inlet` file keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InletFile {
    identity: Option<String>,
    relay: Option<String>,
    relay_identity: Option<Identifier>,
    service: Option<ServiceName>,
    listen: Option<SocketAddr>,
    outlet_identity: Option<Identifier>,
    #[serde(default)]
    dangerous_allow_non_loopback: bool,
    #[serde(default)]
    require_outlet_attributes: Vec<String>,
    #[serde(default)]
    trust_authorities: Vec<String>,
    max_revocation_staleness: Option<String>,
    credential: Option<PathBuf>,
    #[serde(default)]
    fallback_relays: Vec<String>,
    max_tunnels: Option<usize>,
    idle_timeout: Option<String>,
    drain_grace: Option<String>,
}

/// Failover, limit and lifecycle keys shared by the outlet and inlet files.
struct LifecycleFile {
    fallback_relays: Vec<String>,
    max_tunnels: Option<usize>,
    idle_timeout: Option<String>,
    drain_grace: Option<String>,
}

/// What [`lifecycle`] resolved from flags and file.
struct Lifecycle {
    fallback_relays: Vec<RelayEndpoint>,
    max_tunnels: usize,
    idle_timeout: Option<Duration>,
    drain_grace: Option<Duration>,
}

impl Lifecycle {
    /// Puts the idle timeout and drain grace into a node's time limits.
    fn apply_timeouts(&self, timeouts: &mut postern_node::Timeouts) {
        timeouts.tunnel_idle = self.idle_timeout;
        if let Some(grace) = self.drain_grace {
            timeouts.drain_grace = grace;
        }
    }
}

fn file_duration(key: &str, value: Option<String>) -> Result<Option<Duration>> {
    value
        .map(|v| parse_duration(&v).map_err(|e| anyhow!("config key `{key}`: {e}")))
        .transpose()
}

/// Flags win over the file, key by key (a repeated flag replaces the list).
fn lifecycle(flags: NodeLifecycleFlags, file: LifecycleFile) -> Result<Lifecycle> {
    let fallback_relays = if flags.fallback_relay.is_empty() {
        file.fallback_relays
            .iter()
            .map(|r| {
                parse_relay_endpoint(r).map_err(|e| anyhow!("config key `fallback_relays`: {e}"))
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        flags.fallback_relay
    };
    let max_tunnels = flags
        .max_tunnels
        .or(file.max_tunnels)
        .unwrap_or(postern_node::DEFAULT_MAX_TUNNELS);
    if max_tunnels == 0 {
        return Err(anyhow!(
            "--max-tunnels (or `max_tunnels`) must be at least 1"
        ));
    }
    let idle_timeout = match flags.idle_timeout {
        Some(d) => Some(d),
        None => file_duration("idle_timeout", file.idle_timeout)?,
    }
    .filter(|d| !d.is_zero());
    let drain_grace = match flags.drain_grace {
        Some(d) => Some(d),
        None => file_duration("drain_grace", file.drain_grace)?,
    };
    Ok(Lifecycle {
        fallback_relays,
        max_tunnels,
        idle_timeout,
        drain_grace,
    })
}

/// Reads a TOML config file of type `T`.
pub fn read_file<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    parse_file(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// Parses TOML config text.
/// Parses a TOML config text. The error is one line: what is wrong and
/// where (line and column), without echoing the text itself.
pub fn parse_file<T: DeserializeOwned>(text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        // The message may quote a value of any length.
        let what = elide(
            &e.message().split_whitespace().collect::<Vec<_>>().join(" "),
            300,
        );
        match e.span().and_then(|span| text.get(..span.start)) {
            Some(before) => {
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                anyhow!("line {line}, column {column}: {what}")
            }
            None => anyhow!("{what}"),
        }
    })
}

fn required<T>(value: Option<T>, flag: &str, key: &str) -> Result<T> {
    value.ok_or_else(|| {
        anyhow!("missing {flag} (or `{key} = ...` in the --config file); see --help")
    })
}

/// Longest file name component, and longest path, the file system takes.
const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4096;

/// `text`, or its start and end around an ellipsis when it is longer than
/// `max` characters, so that an error message stays one short line.
fn elide(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        return text.to_owned();
    }
    let half = max / 2;
    let head: String = text.chars().take(half).collect();
    let tail: String = text.chars().skip(count - half).collect();
    format!("{head}…{tail} ({} bytes)", text.len())
}

/// The identity to run as: a name or a key file path that can exist.
fn identity_name(common: &Common, file: Option<String>) -> Result<String> {
    let name = common
        .identity
        .clone()
        .or(file)
        .unwrap_or_else(|| postern_identity::keyfile::DEFAULT_NAME.to_owned());
    let too_long = name.len() > PATH_MAX
        || Path::new(&name)
            .components()
            .any(|c| c.as_os_str().len() > NAME_MAX);
    if too_long {
        return Err(anyhow!(
            "identity {:?} is too long to be a name or a key file path (at most {NAME_MAX} bytes per name, {PATH_MAX} in all)",
            elide(&name, 60)
        ));
    }
    Ok(name)
}

fn relay_endpoint(
    flags: RelayFlags,
    address: Option<String>,
    identifier: Option<Identifier>,
) -> Result<RelayEndpoint> {
    let address = required(flags.relay.or(address), "--relay", "relay")?;
    let identifier = required(
        flags.relay_identity.or(identifier),
        "--relay-identity",
        "relay_identity",
    )?;
    Ok(RelayEndpoint::new(address, identifier))
}

pub struct Relay {
    pub identity: String,
    /// Its `audit` is still `None`: `main` opens the log once the identity
    /// (the checkpoint signer) is loaded ([`AuditSettings::open`]).
    pub relay: RelayConfig,
    pub audit: Option<AuditSettings>,
}

pub fn relay(args: RelayArgs) -> Result<Relay> {
    let file: RelayFile = read_file(args.common.config.as_deref())?;
    let listen = match args.listen.or(file.listen) {
        Some(addr) => addr,
        None => DEFAULT_RELAY_LISTEN
            .parse()
            .context("default relay address")?,
    };
    let mut relay = RelayConfig::new(listen);
    let limits = args.limits;
    if let Some(timeout) = limits.handshake_timeout {
        relay.handshake_timeout = timeout;
    } else if let Some(timeout) = file_duration("handshake_timeout", file.handshake_timeout)? {
        relay.handshake_timeout = timeout;
    }
    let counts = [
        (
            &mut relay.max_connections,
            limits.max_connections.or(file.max_connections),
            "max_connections",
        ),
        (
            &mut relay.max_pending_handshakes,
            limits
                .max_pending_handshakes
                .or(file.max_pending_handshakes),
            "max_pending_handshakes",
        ),
        (
            &mut relay.max_pending_per_source,
            limits
                .max_pending_per_source
                .or(file.max_pending_per_source),
            "max_pending_per_source",
        ),
        (
            &mut relay.max_tunnels,
            limits.max_tunnels.or(file.max_tunnels),
            "max_tunnels",
        ),
        (
            &mut relay.max_tunnels_per_node,
            limits.max_tunnels_per_node.or(file.max_tunnels_per_node),
            "max_tunnels_per_node",
        ),
        (
            &mut relay.max_connections_per_source,
            limits
                .max_connections_per_source
                .or(file.max_connections_per_source),
            "max_connections_per_source",
        ),
        (
            &mut relay.max_pending_opens_per_node,
            limits
                .max_pending_opens_per_node
                .or(file.max_pending_opens_per_node),
            "max_pending_opens_per_node",
        ),
        (
            &mut relay.max_pending_opens_per_source,
            limits
                .max_pending_opens_per_source
                .or(file.max_pending_opens_per_source),
            "max_pending_opens_per_source",
        ),
        (
            &mut relay.max_services_per_session,
            limits
                .max_services_per_session
                .or(file.max_services_per_session),
            "max_services_per_session",
        ),
    ];
    for (field, value, key) in counts {
        match value {
            Some(0) => return Err(anyhow!("`{key}` must be at least 1")),
            Some(n) => *field = n,
            None => {}
        }
    }
    match limits
        .opens_per_second_per_node
        .or(file.opens_per_second_per_node)
    {
        Some(0) => return Err(anyhow!("`opens_per_second_per_node` must be at least 1")),
        Some(rate) => {
            relay.opens_per_second_per_node = rate;
            relay.open_burst_per_node = rate;
        }
        None => {}
    }
    if relay.handshake_timeout.is_zero() {
        return Err(anyhow!("`handshake_timeout` must be longer than zero"));
    }
    let anchors = anchors(args.trust_authority, file.trust_authorities)?;
    relay.authorities = anchors.iter().map(|a| a.authority).collect();
    relay.authority_services = anchors
        .into_iter()
        .map(|a| (a.authority, a.service))
        .collect();
    if let Some(bound) = staleness(args.max_revocation_staleness, file.max_revocation_staleness)? {
        relay.max_revocation_staleness = bound;
    }
    relay.policies = load_policies(args.policies.or(file.policies), "relay")?;
    relay.precheck_connect = args.precheck_connect || file.precheck_connect;
    if relay.precheck_connect && relay.policies.is_none() {
        return Err(anyhow!(
            "`precheck_connect` needs policies to decide with: add --policies DIR (or `policies` in the file)"
        ));
    }
    let audit = AuditSettings::resolve(
        args.audit_log.or(file.audit_log),
        args.audit_fail_closed,
        file.audit_fail_closed,
    )?;
    Ok(Relay {
        identity: identity_name(&args.common, file.identity)?,
        relay,
        audit,
    })
}

/// Where `postern enroll` stores the credential of identity `name`.
pub fn credential_path(home: &Path, name: &str) -> PathBuf {
    let file = Path::new(name)
        .file_stem()
        .map_or_else(|| name.to_owned(), |s| s.to_string_lossy().into_owned());
    home.join("credentials").join(format!("{file}.cred"))
}

/// Trusted authorities and the credential to present (and the file it came
/// from, where renewals are saved): flags win over the file; the credential
/// defaults to the one `postern enroll` stored.
/// The trust anchors from the flags, else from the file's
/// `trust_authorities` (`P…` or `P…@SERVICE`).
fn anchors(flags: Vec<TrustAnchor>, file: Vec<String>) -> Result<Vec<TrustAnchor>> {
    if !flags.is_empty() {
        return Ok(flags);
    }
    file.iter()
        .map(|text| {
            text.parse()
                .map_err(|e: String| anyhow!("config key `trust_authorities`: {e}"))
        })
        .collect()
}

/// `max_revocation_staleness` from the flag, else from the file.
fn staleness(flag: Option<Duration>, file: Option<String>) -> Result<Option<Duration>> {
    match flag {
        Some(bound) => Ok(Some(bound)),
        None => file_duration("max_revocation_staleness", file),
    }
}

fn trust(
    home: &Path,
    flags: &TrustFlags,
    file_authorities: Vec<String>,
    file_staleness: Option<String>,
    file_credential: Option<PathBuf>,
    identity: &str,
) -> Result<(Trust, Option<PathBuf>)> {
    let mut trust = Trust::with_anchors(anchors(flags.trust_authority.clone(), file_authorities)?);
    if let Some(bound) = staleness(flags.max_revocation_staleness, file_staleness)? {
        trust = trust.with_max_staleness(bound);
    }
    let (path, explicit) = match flags.credential.clone().or(file_credential) {
        Some(path) => (path, true),
        None => (credential_path(home, identity), false),
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let credential = SignedCredential::decode(&bytes).with_context(|| {
                format!("credential file {} is not a Postern credential; enroll again with `postern enroll`", path.display())
            })?;
            trust = trust.with_credential(credential);
            return Ok((trust, Some(path)));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {}
        Err(e) => {
            return Err(anyhow!(
                "cannot read credential file {}: {e}",
                path.display()
            ))
        }
    }
    Ok((trust, None))
}

/// Loads a policy directory; invalid policies stop the node from starting,
/// with Cedar's diagnostics.
fn load_policies(dir: Option<PathBuf>, role: &str) -> Result<Option<Arc<LivePolicies>>> {
    let Some(dir) = dir else { return Ok(None) };
    match LivePolicies::load(&dir) {
        Ok(policies) => Ok(Some(Arc::new(policies))),
        Err(PolicyError::Invalid(diagnostics)) => Err(anyhow!(
            "the policies in {} are invalid, so the {role} does not start (check them with `postern policy validate {}`):\n{diagnostics}",
            dir.display(),
            dir.display()
        )),
        Err(e) => Err(anyhow!("cannot load the policies for the {role}: {e}")),
    }
}

/// Where a relay or outlet audits, and whether it fails closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub path: PathBuf,
    pub fail_closed: bool,
}

impl AuditSettings {
    /// The flags win over the file; fail-closed needs a log.
    fn resolve(
        path: Option<PathBuf>,
        flag_fail_closed: bool,
        file_fail_closed: Option<bool>,
    ) -> Result<Option<Self>> {
        let fail_closed = flag_fail_closed || file_fail_closed.unwrap_or(false);
        match path {
            Some(path) => Ok(Some(AuditSettings { path, fail_closed })),
            None if fail_closed => Err(anyhow!(
                "--audit-fail-closed (or `audit_fail_closed`) needs an audit log: add --audit-log FILE (or `audit_log = ...`)"
            )),
            None => Ok(None),
        }
    }

    /// Opens (creating if needed) the audit log, its checkpoints signed by
    /// `signer` (the node's identity).
    pub fn open(settings: Option<&Self>, signer: Identity) -> Result<Option<Arc<AuditLog>>> {
        let Some(settings) = settings else {
            return Ok(None);
        };
        let options = AuditOptions::default()
            .with_signer(signer)
            .with_fail_closed(settings.fail_closed);
        let log = AuditLog::open_with(&settings.path, options)
            .map_err(|e| anyhow!("cannot open the audit log: {e}"))?;
        Ok(Some(Arc::new(log)))
    }
}

/// `NAME=VALUE` rules from flags, else from the file key `key`.
fn rules(flags: Vec<AttributeRule>, file: &[String], key: &str) -> Result<Vec<AttributeRule>> {
    if !flags.is_empty() {
        return Ok(flags);
    }
    file.iter()
        .map(|r| {
            r.parse()
                .map_err(|e: String| anyhow!("config key `{key}`: {e}"))
        })
        .collect()
}

pub struct Outlet {
    pub identity: String,
    /// Its `audit` is still `None`: `main` opens the log once the identity
    /// (the checkpoint signer) is loaded ([`AuditSettings::open`]).
    pub outlet: OutletConfig,
    pub audit: Option<AuditSettings>,
}

pub fn outlet(home: &Path, args: OutletArgs) -> Result<Outlet> {
    let file: OutletFile = read_file(args.common.config.as_deref())?;
    let relay = relay_endpoint(args.relay, file.relay, file.relay_identity)?;
    let service = required(args.service.or(file.service), "--service", "service")?;
    let target = match (args.target, file.target) {
        (Some(t), _) => t,
        (None, Some(t)) => t
            .parse()
            .map_err(|e: String| anyhow!("config key `target`: {e}"))?,
        (None, None) => required(None, "--target", "target")?,
    };
    let allow = if args.allow.is_empty() {
        file.allow
    } else {
        args.allow
    };
    let allow_attributes = rules(args.allow_attr, &file.allow_attributes, "allow_attributes")?;
    let service_attributes = if args.service_attr.is_empty() {
        file.service_attributes
    } else {
        args.service_attr
            .into_iter()
            .map(|r| (r.name, r.value))
            .collect()
    };
    let identity = identity_name(&args.common, file.identity)?;
    let (trust, credential_file) = trust(
        home,
        &args.trust,
        file.trust_authorities,
        file.max_revocation_staleness,
        file.credential,
        &identity,
    )?;
    let life = lifecycle(
        args.lifecycle,
        LifecycleFile {
            fallback_relays: file.fallback_relays,
            max_tunnels: file.max_tunnels,
            idle_timeout: file.idle_timeout,
            drain_grace: file.drain_grace,
        },
    )?;
    let mut outlet = OutletConfig::new(relay, service, target, AllowList::new(allow))
        .with_fallback_relays(life.fallback_relays.clone());
    outlet.max_tunnels = life.max_tunnels;
    life.apply_timeouts(&mut outlet.timeouts);
    outlet.allow_attributes = allow_attributes;
    outlet.trust = Arc::new(trust);
    outlet.credential_file = credential_file;
    outlet.policies = load_policies(args.policies.or(file.policies), "outlet")?;
    if outlet.policies.is_some() && !(outlet.allow.is_empty() && outlet.allow_attributes.is_empty())
    {
        return Err(anyhow!(
            "--policies replaces --allow and --allow-attr: write those rules as policies instead, e.g. permit(principal == Identity::\"P…\", action == Action::\"connect\", resource);"
        ));
    }
    outlet.service_attributes = service_attributes;
    let audit = AuditSettings::resolve(
        args.audit_log.or(file.audit_log),
        args.audit_fail_closed,
        file.audit_fail_closed,
    )?;
    Ok(Outlet {
        identity,
        outlet,
        audit,
    })
}

pub struct Inlet {
    pub identity: String,
    pub inlet: InletConfig,
}

pub fn inlet(home: &Path, args: InletArgs) -> Result<Inlet> {
    let file: InletFile = read_file(args.common.config.as_deref())?;
    let relay = relay_endpoint(args.relay, file.relay, file.relay_identity)?;
    let service = required(args.service.or(file.service), "--service", "service")?;
    let listen = match args.listen.or(file.listen) {
        Some(addr) => addr,
        None => DEFAULT_INLET_LISTEN
            .parse()
            .context("default inlet address")?,
    };
    let outlet = required(
        args.outlet_identity.or(file.outlet_identity),
        "--outlet-identity",
        "outlet_identity",
    )?;
    let life = lifecycle(
        args.lifecycle,
        LifecycleFile {
            fallback_relays: file.fallback_relays,
            max_tunnels: file.max_tunnels,
            idle_timeout: file.idle_timeout,
            drain_grace: file.drain_grace,
        },
    )?;
    let mut inlet = InletConfig::new(relay, service, listen, outlet)
        .with_fallback_relays(life.fallback_relays.clone());
    inlet.max_tunnels = life.max_tunnels;
    life.apply_timeouts(&mut inlet.timeouts);
    inlet.dangerous_allow_non_loopback =
        args.dangerous_allow_non_loopback || file.dangerous_allow_non_loopback;
    inlet.require_outlet_attributes = rules(
        args.require_outlet_attr,
        &file.require_outlet_attributes,
        "require_outlet_attributes",
    )?;
    let identity = identity_name(&args.common, file.identity)?;
    let (trust, credential_file) = trust(
        home,
        &args.trust,
        file.trust_authorities,
        file.max_revocation_staleness,
        file.credential,
        &identity,
    )?;
    inlet.trust = Arc::new(trust);
    inlet.credential_file = credential_file;
    Ok(Inlet { identity, inlet })
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_node::Target;

    #[test]
    fn long_values_are_elided_in_errors() {
        assert_eq!(elide("short", 10), "short");
        let long = format!("unix:/{}", "a".repeat(5000));
        let shown = elide(&long, 60);
        assert!(
            shown.starts_with("unix:/aaa") && shown.ends_with("aaa (5006 bytes)"),
            "{shown}"
        );
        assert!(shown.chars().count() < 100);
        let err = parse_file::<RelayFile>(&format!("max_tunnels = \"{}\"", "x".repeat(100_000)))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("line 1, column 15: invalid type") && err.len() < 500,
            "{err}"
        );
        let common = Common {
            config: None,
            identity: Some(long),
        };
        let err = identity_name(&common, None).unwrap_err().to_string();
        assert!(err.contains("too long") && err.len() < 300, "{err}");
        let ok = Common {
            config: None,
            identity: Some("/etc/postern/relay.key".into()),
        };
        assert_eq!(identity_name(&ok, None).unwrap(), "/etc/postern/relay.key");
    }

    #[test]
    fn fail_closed_needs_an_audit_log() {
        let err = AuditSettings::resolve(None, true, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs an audit log") && err.contains("--audit-log"),
            "{err}"
        );
        assert_eq!(
            AuditSettings::resolve(None, false, Some(false)).unwrap(),
            None
        );
        let from_file = AuditSettings::resolve(Some("/a.jsonl".into()), false, Some(true)).unwrap();
        assert_eq!(
            from_file,
            Some(AuditSettings {
                path: "/a.jsonl".into(),
                fail_closed: true
            })
        );
    }

    /// Every fixture under `tests/config/valid/<role>-*.toml` parses and every
    /// one under `tests/config/invalid/` is refused with a message.
    #[test]
    fn fixtures() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config");
        let mut seen = 0;
        for (dir, should_parse) in [("valid", true), ("invalid", false)] {
            let entries = std::fs::read_dir(root.join(dir)).expect("fixture dir");
            for entry in entries {
                let path = entry.expect("entry").path();
                let text = std::fs::read_to_string(&path).expect("read");
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_owned();
                let result = if name.starts_with("relay") {
                    parse_file::<RelayFile>(&text).map(|_| ())
                } else if name.starts_with("outlet") {
                    parse_file::<OutletFile>(&text).and_then(|f| match f.target {
                        Some(t) => t.parse::<Target>().map(|_| ()).map_err(|e| anyhow!(e)),
                        None => Ok(()),
                    })
                } else if name.starts_with("inlet") {
                    parse_file::<InletFile>(&text).map(|_| ())
                } else {
                    panic!("fixture {name} must start with relay, outlet or inlet");
                };
                match (should_parse, result) {
                    (true, Err(e)) => panic!("{name} should parse: {e:#}"),
                    (false, Ok(())) => panic!("{name} should be refused"),
                    (false, Err(e)) => assert!(!e.to_string().is_empty()),
                    (true, Ok(())) => {}
                }
                seen += 1;
            }
        }
        assert!(seen >= 6, "expected fixtures, found {seen}");
    }
}
