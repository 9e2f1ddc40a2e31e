//! Merges flags with an optional TOML file into validated library configs.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use postern_identity::wire::ServiceName;
use postern_identity::Identifier;
use postern_node::{InletConfig, OutletConfig, RelayEndpoint};
use postern_policies::AllowList;
use postern_relay::RelayConfig;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::args::{Common, InletArgs, OutletArgs, RelayArgs, RelayFlags};

const DEFAULT_RELAY_LISTEN: &str = "0.0.0.0:4000";
const DEFAULT_INLET_LISTEN: &str = "127.0.0.1:15432";

/// `relay` section keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    identity: Option<String>,
    listen: Option<SocketAddr>,
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
pub fn parse_file<T: DeserializeOwned>(text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| anyhow!("{}", e.to_string().trim_end()))
}

fn required<T>(value: Option<T>, flag: &str, key: &str) -> Result<T> {
    value.ok_or_else(|| {
        anyhow!("missing {flag} (or `{key} = ...` in the --config file); see --help")
    })
}

fn identity_name(common: &Common, file: Option<String>) -> String {
    common
        .identity
        .clone()
        .or(file)
        .unwrap_or_else(|| postern_identity::keyfile::DEFAULT_NAME.to_owned())
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
    pub relay: RelayConfig,
}

pub fn relay(args: RelayArgs) -> Result<Relay> {
    let file: RelayFile = read_file(args.common.config.as_deref())?;
    let listen = match args.listen.or(file.listen) {
        Some(addr) => addr,
        None => DEFAULT_RELAY_LISTEN
            .parse()
            .context("default relay address")?,
    };
    Ok(Relay {
        identity: identity_name(&args.common, file.identity),
        relay: RelayConfig::new(listen),
    })
}

pub struct Outlet {
    pub identity: String,
    pub outlet: OutletConfig,
}

pub fn outlet(args: OutletArgs) -> Result<Outlet> {
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
    Ok(Outlet {
        identity: identity_name(&args.common, file.identity),
        outlet: OutletConfig::new(relay, service, target, AllowList::new(allow)),
    })
}

pub struct Inlet {
    pub identity: String,
    pub inlet: InletConfig,
}

pub fn inlet(args: InletArgs) -> Result<Inlet> {
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
    let mut inlet = InletConfig::new(relay, service, listen, outlet);
    inlet.dangerous_allow_non_loopback =
        args.dangerous_allow_non_loopback || file.dangerous_allow_non_loopback;
    Ok(Inlet {
        identity: identity_name(&args.common, file.identity),
        inlet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_node::Target;

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
