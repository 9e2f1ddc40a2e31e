//! Network namespaces for tests that need a real network between machines:
//! [`Lab`] builds three namespaces (`db`, `relay`, `laptop`) joined by veth
//! pairs through the relay namespace, which routes between them. Every name
//! carries the test process id, so parallel runs never collide, and
//! everything is removed on drop (also on panic): processes still running
//! inside the namespaces are killed, then the namespaces are deleted (which
//! deletes their veth interfaces). Namespaces left behind by a test process
//! that was killed outright are removed by the next [`Lab::build`].
//!
//! Only addresses inside these namespaces are ever used. Needs root and
//! `ip` (iproute2); [`Lab::unavailable`] says why a test must skip.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::net::{PosternHome, PosternProcess};

/// Prefix of every namespace this module creates.
const PREFIX: &str = "pstn";

/// Address of the `db` namespace (on the db–relay link).
pub const DB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 1, 2);
/// Address of the `relay` namespace on the db–relay link.
pub const RELAY_DB_SIDE: Ipv4Addr = Ipv4Addr::new(10, 231, 1, 1);
/// Address of the `relay` namespace on the laptop–relay link.
pub const RELAY_LAPTOP_SIDE: Ipv4Addr = Ipv4Addr::new(10, 231, 2, 1);
/// Address of the `laptop` namespace.
pub const LAPTOP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 2, 2);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `ip args…`, failing with its output.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), output_text(&out));
    }
    Ok(())
}

/// Whether the effective uid is 0.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Kills every process in namespace `name`, then deletes it.
fn remove_namespace(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    // A killed process may take a moment to release the namespace.
    for _ in 0..20 {
        if ip(&["netns", "del", name]).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three namespaces and their links; removed on drop.
#[derive(Debug)]
pub struct Lab {
    /// The database's namespace (PostgreSQL, outlet, firewall).
    pub db: String,
    /// The relay's namespace (the router between the other two).
    pub relay: String,
    /// The laptop's namespace (inlet and client).
    pub laptop: String,
}

impl Lab {
    /// Why namespace tests cannot run here, if they cannot.
    pub fn unavailable() -> Option<String> {
        if !is_root() {
            return Some("not running as root (network namespaces need root)".into());
        }
        match Command::new("ip").args(["netns", "list"]).output() {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(format!(
                "`ip netns` does not work here: {}",
                output_text(&out)
            )),
            Err(e) => Some(format!(
                "`ip` (iproute2) is not installed ({e}); run scripts/setup.sh"
            )),
        }
    }

    /// Removes namespaces left by test processes that no longer exist.
    fn remove_stale() {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(pid) = name
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                remove_namespace(name);
            }
        }
    }

    /// Builds `db ─ relay ─ laptop`: the relay namespace routes between a
    /// 10.231.1.0/24 link to `db` and a 10.231.2.0/24 link to `laptop`.
    pub fn build() -> Result<Lab> {
        Self::remove_stale();
        let id = std::process::id();
        let lab = Lab {
            db: format!("{PREFIX}{id}-db"),
            relay: format!("{PREFIX}{id}-relay"),
            laptop: format!("{PREFIX}{id}-laptop"),
        };
        // From here on, drop cleans up whatever exists.
        for ns in [&lab.db, &lab.relay, &lab.laptop] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let short = id % 10_000_000;
        let (db_if, relay_db_if) = (format!("pv{short}d"), format!("pv{short}r"));
        let (laptop_if, relay_laptop_if) = (format!("pv{short}l"), format!("pv{short}s"));
        // Each pair is created with its ends already inside the namespaces.
        ip(&[
            "link",
            "add",
            &db_if,
            "netns",
            &lab.db,
            "type",
            "veth",
            "peer",
            "name",
            &relay_db_if,
            "netns",
            &lab.relay,
        ])?;
        ip(&[
            "link",
            "add",
            &laptop_if,
            "netns",
            &lab.laptop,
            "type",
            "veth",
            "peer",
            "name",
            &relay_laptop_if,
            "netns",
            &lab.relay,
        ])?;
        let addr = |ns: &str, dev: &str, a: Ipv4Addr| -> Result<()> {
            ip(&["-n", ns, "addr", "add", &format!("{a}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])
        };
        addr(&lab.db, &db_if, DB_ADDR)?;
        addr(&lab.relay, &relay_db_if, RELAY_DB_SIDE)?;
        addr(&lab.relay, &relay_laptop_if, RELAY_LAPTOP_SIDE)?;
        addr(&lab.laptop, &laptop_if, LAPTOP_ADDR)?;
        ip(&[
            "-n",
            &lab.db,
            "route",
            "add",
            "default",
            "via",
            &RELAY_DB_SIDE.to_string(),
        ])?;
        ip(&[
            "-n",
            &lab.laptop,
            "route",
            "add",
            "default",
            "via",
            &RELAY_LAPTOP_SIDE.to_string(),
        ])?;
        // The relay namespace routes, so the laptop *could* reach the
        // database directly: only the firewall stops it.
        lab.exec(&lab.relay, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        Ok(lab)
    }

    /// `ip netns exec ns program args…` (not yet run).
    pub fn command(&self, ns: &str, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `program args…` in `ns` to completion; fails with its output.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("nothing to run"))?;
        let out = self
            .command(ns, program, rest)
            .output()
            .with_context(|| format!("running {args:?} in {ns}"))?;
        if !out.status.success() {
            bail!(
                "{args:?} in {ns} failed ({}): {}",
                out.status,
                output_text(&out)
            );
        }
        Ok(out)
    }

    /// Loads an nftables ruleset into `ns`.
    pub fn nft(&self, ns: &str, ruleset: &str) -> Result<()> {
        let mut child = self
            .command(ns, "nft", &["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft (install nftables: scripts/setup.sh)")?;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("no stdin"))?
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft -f in {ns} failed: {}", output_text(&out));
        }
        Ok(())
    }

    /// Starts `postern args…` from `home` inside `ns`.
    pub fn spawn_postern(&self, ns: &str, home: &PosternHome, args: &[&str]) -> Result<NsProcess> {
        let inner = home.command(args);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(inner.get_program())
            .args(inner.get_args())
            .stdin(Stdio::null());
        for (key, value) in inner.get_envs() {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        PosternProcess::from_command(cmd, format!("postern {} (in {ns})", args.join(" ")))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.laptop, &self.db, &self.relay] {
            remove_namespace(ns);
        }
    }
}

/// A process started with `ip netns exec` (which execs the program, so its
/// pid is the program's own): the same wrapper as for any `postern` process.
pub type NsProcess = PosternProcess;
