//! In-process and out-of-process Postern components for integration tests.
//!
//! - [`TestRelay`], [`TestNode`] (an outlet or an inlet) and [`Tunnel`] (a
//!   relay, an outlet and an inlet wired together) run inside the test
//!   process on random loopback ports, and stop when dropped.
//! - [`PosternHome`] and [`PosternProcess`] run the real `postern` binary as
//!   a child process with a temporary `POSTERN_HOME`, capture its stderr and
//!   kill it on drop.
//! - [`RecordingProxy`] sits between nodes and a relay and records every
//!   byte that passes in either direction.
//! - [`EchoServer`] is a small TCP target that echoes, and reports how each
//!   of its connections ended.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use postern_identity::wire::ServiceName;
use postern_identity::{Identifier, Identity};
use postern_node::{Inlet, InletConfig, NodeHandle, Outlet, OutletConfig, RelayEndpoint, Target};
use postern_policies::AllowList;
use postern_relay::{Relay, RelayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long helpers wait for a component to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A loopback address with a port the OS picks.
pub fn any_loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Parses a service name, panicking on a typo in the test.
pub fn service(name: &str) -> ServiceName {
    name.parse()
        .unwrap_or_else(|e| panic!("bad service name in test: {e}"))
}

// ----- in-process components ------------------------------------------------

/// A relay running on the current tokio runtime.
#[derive(Debug)]
pub struct TestRelay {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its identifier (what nodes pin).
    pub identifier: Identifier,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestRelay {
    /// A relay with a fresh identity and default settings.
    pub async fn start() -> Result<Self> {
        Self::start_with(Identity::generate(), |_| {}).await
    }

    /// A relay with `identity`; `tune` may adjust the configuration.
    pub async fn start_with(
        identity: Identity,
        tune: impl FnOnce(&mut RelayConfig),
    ) -> Result<Self> {
        let mut config = RelayConfig::new(any_loopback());
        tune(&mut config);
        let relay = Relay::bind(identity, config)
            .await
            .context("binding the relay")?;
        let addr = relay.local_addr()?;
        let identifier = relay.identifier();
        let stop = CancellationToken::new();
        let task = tokio::spawn(relay.run(stop.clone()));
        Ok(TestRelay {
            addr,
            identifier,
            stop,
            task: Some(task),
        })
    }

    /// The endpoint nodes dial: this relay's address and identifier.
    pub fn endpoint(&self) -> RelayEndpoint {
        RelayEndpoint::new(self.addr.to_string(), self.identifier)
    }

    /// The endpoint at another address (a proxy in front of this relay).
    pub fn endpoint_via(&self, addr: SocketAddr) -> RelayEndpoint {
        RelayEndpoint::new(addr.to_string(), self.identifier)
    }

    /// Stops the relay and waits for it.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An outlet or an inlet running on the current tokio runtime; stopped on
/// drop.
#[derive(Debug)]
pub struct TestNode {
    /// The node's identifier.
    pub identifier: Identifier,
    handle: Option<NodeHandle>,
    stop: CancellationToken,
}

impl TestNode {
    fn new(identifier: Identifier, handle: NodeHandle) -> Self {
        TestNode {
            identifier,
            stop: handle.stop_token(),
            handle: Some(handle),
        }
    }

    /// Starts an outlet as `identity`.
    pub fn outlet(identity: Identity, config: OutletConfig) -> Result<Self> {
        let identifier = identity.identifier();
        let handle = Outlet::start(identity, config).context("starting the outlet")?;
        Ok(Self::new(identifier, handle))
    }

    /// Starts an outlet for `service` → `target` at `relay`, admitting `allow`.
    pub fn simple_outlet(
        identity: Identity,
        relay: RelayEndpoint,
        service: &str,
        target: Target,
        allow: &[Identifier],
    ) -> Result<Self> {
        let config = OutletConfig::new(
            relay,
            self::service(service),
            target,
            AllowList::new(allow.iter().copied()),
        );
        Self::outlet(identity, config)
    }

    /// Starts an inlet as `identity`.
    pub async fn inlet(identity: Identity, config: InletConfig) -> Result<Self> {
        let identifier = identity.identifier();
        let handle = Inlet::start(identity, config)
            .await
            .context("starting the inlet")?;
        Ok(Self::new(identifier, handle))
    }

    /// Starts an inlet on a random loopback port for `service` at `relay`,
    /// expecting outlet `outlet`.
    pub async fn simple_inlet(
        identity: Identity,
        relay: RelayEndpoint,
        service: &str,
        outlet: Identifier,
    ) -> Result<Self> {
        let config = InletConfig::new(relay, self::service(service), any_loopback(), outlet);
        Self::inlet(identity, config).await
    }

    /// The node's handle.
    pub fn handle(&self) -> &NodeHandle {
        self.handle
            .as_ref()
            .unwrap_or_else(|| unreachable!("the handle is only taken by shutdown"))
    }

    /// The inlet's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.handle()
            .local_addr()
            .unwrap_or_else(|| panic!("an outlet has no listening address"))
    }

    /// Waits until the node reports `Ready`.
    pub async fn wait_ready(&mut self) -> Result<()> {
        let handle = self
            .handle
            .as_mut()
            .unwrap_or_else(|| unreachable!("the handle is only taken by shutdown"));
        handle
            .wait_ready(READY_TIMEOUT)
            .await
            .context("waiting for the node to become ready")
    }

    /// The node's current status, as text.
    pub fn status_text(&self) -> String {
        format!("{:?}", self.handle().status())
    }

    /// Stops the node and waits for its tasks.
    pub async fn shutdown(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().await;
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A relay, an outlet serving `service` → `target` and admitting the inlet,
/// and an inlet on a random loopback port, all ready.
#[derive(Debug)]
pub struct Tunnel {
    /// The relay.
    pub relay: TestRelay,
    /// The outlet.
    pub outlet: TestNode,
    /// The inlet.
    pub inlet: TestNode,
}

impl Tunnel {
    /// Starts all three and waits until both nodes are ready.
    pub async fn start(service: &str, target: Target) -> Result<Self> {
        let relay = TestRelay::start().await?;
        Self::start_at(relay, None, service, target).await
    }

    /// Starts an outlet and an inlet at `relay`; nodes dial `via` (a proxy)
    /// when given, else the relay itself.
    pub async fn start_at(
        relay: TestRelay,
        via: Option<SocketAddr>,
        service: &str,
        target: Target,
    ) -> Result<Self> {
        let endpoint = match via {
            Some(addr) => relay.endpoint_via(addr),
            None => relay.endpoint(),
        };
        let outlet_id = Identity::generate();
        let inlet_id = Identity::generate();
        let mut outlet = TestNode::simple_outlet(
            outlet_id,
            endpoint.clone(),
            service,
            target,
            &[inlet_id.identifier()],
        )?;
        outlet.wait_ready().await.context("outlet")?;
        let mut inlet =
            TestNode::simple_inlet(inlet_id, endpoint, service, outlet.identifier).await?;
        inlet.wait_ready().await.context("inlet")?;
        Ok(Tunnel {
            relay,
            outlet,
            inlet,
        })
    }

    /// The inlet's address: connect clients here.
    pub fn addr(&self) -> SocketAddr {
        self.inlet.addr()
    }

    /// Stops everything.
    pub async fn shutdown(self) {
        let Tunnel {
            relay,
            outlet,
            inlet,
        } = self;
        inlet.shutdown().await;
        outlet.shutdown().await;
        relay.shutdown().await;
    }
}

// ----- a TCP target ---------------------------------------------------------

/// How one connection to an [`EchoServer`] ended, seen from the server.
#[derive(Debug)]
pub enum ConnEnd {
    /// The client half-closed (read returned 0).
    Eof,
    /// A read failed (typically a reset).
    Error(std::io::ErrorKind),
}

/// A TCP server on a random loopback port that echoes every byte back, and
/// reports on a channel how each connection's reading side ended (with the
/// bytes it had received). After the client's EOF it half-closes too.
#[derive(Debug)]
pub struct EchoServer {
    /// Where it listens.
    pub addr: SocketAddr,
    ends: tokio::sync::Mutex<mpsc::UnboundedReceiver<(ConnEnd, Vec<u8>, Instant)>>,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// Starts the server.
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind(any_loopback()).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    let end = loop {
                        match stream.read(&mut buf).await {
                            Ok(0) => break ConnEnd::Eof,
                            Ok(n) => {
                                seen.extend_from_slice(&buf[..n]);
                                if let Err(e) = stream.write_all(&buf[..n]).await {
                                    break ConnEnd::Error(e.kind());
                                }
                            }
                            Err(e) => break ConnEnd::Error(e.kind()),
                        }
                    };
                    let _ = tx.send((end, seen, Instant::now()));
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(EchoServer {
            addr,
            ends: tokio::sync::Mutex::new(rx),
            task,
        })
    }

    /// The target for an outlet.
    pub fn target(&self) -> Target {
        Target::Tcp(self.addr.to_string())
    }

    /// Waits up to `timeout` for the next connection to end.
    pub async fn next_end(&self, timeout: Duration) -> Option<(ConnEnd, Vec<u8>, Instant)> {
        let mut rx = self.ends.lock().await;
        tokio::time::timeout(timeout, rx.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `data` and reads exactly as many bytes back (for echo targets).
pub async fn echo_round(stream: &mut TcpStream, data: &[u8]) -> Result<()> {
    stream.write_all(data).await?;
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
        .await
        .map_err(|_| anyhow!("no echo within 10 s"))??;
    if back != data {
        bail!("echo returned different bytes");
    }
    Ok(())
}

// ----- recording proxy ------------------------------------------------------

/// Every byte a [`RecordingProxy`] carried.
#[derive(Debug, Default)]
pub struct Recording {
    /// Node → relay.
    pub to_upstream: Vec<u8>,
    /// Relay → node.
    pub from_upstream: Vec<u8>,
    /// Connections accepted.
    pub connections: usize,
}

/// A TCP proxy on a random loopback port that forwards every connection to
/// `upstream` and records all bytes in both directions. Half-closes are
/// passed on; resets become closes.
#[derive(Debug)]
pub struct RecordingProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    recording: Arc<Mutex<Recording>>,
    task: JoinHandle<()>,
}

impl RecordingProxy {
    /// Starts forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(any_loopback()).await?;
        let addr = listener.local_addr()?;
        let recording = Arc::new(Mutex::new(Recording::default()));
        let rec = Arc::clone(&recording);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rec = Arc::clone(&rec);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    lock(&rec).connections += 1;
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pipe(cr, sw, Arc::clone(&rec), true);
                    let down = pipe(sr, cw, rec, false);
                    tokio::join!(up, down);
                });
            }
        });
        Ok(RecordingProxy {
            addr,
            recording,
            task,
        })
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> (Vec<u8>, Vec<u8>, usize) {
        let rec = lock(&self.recording);
        (
            rec.to_upstream.clone(),
            rec.from_upstream.clone(),
            rec.connections,
        )
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rec: Arc<Mutex<Recording>>,
    upstream: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut r = lock(&rec);
            let dest = if upstream {
                &mut r.to_upstream
            } else {
                &mut r.from_upstream
            };
            dest.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Whether `needle` occurs in `haystack`, ignoring ASCII case.
pub fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

// ----- the real binary ------------------------------------------------------

/// Path of the `postern` binary Cargo built for these tests.
pub fn postern_bin() -> &'static str {
    env!("CARGO_BIN_EXE_postern")
}

/// A temporary `POSTERN_HOME` for child processes.
#[derive(Debug)]
pub struct PosternHome {
    dir: tempfile::TempDir,
}

impl PosternHome {
    /// A fresh, empty home.
    pub fn new() -> Result<Self> {
        Ok(PosternHome {
            dir: tempfile::Builder::new().prefix("postern-home-").tempdir()?,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the key file of identity `name`.
    pub fn key_path(&self, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("identities")
            .join(format!("{name}.key"))
    }

    /// A `postern` command with this home and a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(postern_bin());
        cmd.args(args)
            .env("POSTERN_HOME", self.dir.path())
            .env_remove("POSTERN_IDENTITY")
            .env_remove("POSTERN_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `postern args…` to completion.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("running postern {args:?}"))
    }

    /// `postern enroll args…` with `ticket` in `POSTERN_TICKET`, the way
    /// automation gives it (a ticket on the command line is refused).
    pub fn enroll_with_ticket(&self, ticket: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec!["enroll"];
        all.extend_from_slice(args);
        self.command(&all)
            .env("POSTERN_TICKET", ticket)
            .output()
            .with_context(|| format!("running postern {all:?}"))
    }

    /// `postern identity create --name <name>`; returns the identifier.
    pub fn create_identity(&self, name: &str) -> Result<Identifier> {
        let out = self.run(&["identity", "create", "--name", name])?;
        if !out.status.success() {
            bail!(
                "identity create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8(out.stdout)?;
        text.trim()
            .parse()
            .map_err(|e| anyhow!("identity create printed {text:?}: {e}"))
    }

    /// Spawns `postern args…` in the background.
    pub fn spawn(&self, args: &[&str]) -> Result<PosternProcess> {
        PosternProcess::spawn(self.command(args), args)
    }
}

/// A running `postern` child process; its stderr is collected, and it is
/// killed (and reaped) on drop.
#[derive(Debug)]
pub struct PosternProcess {
    child: Child,
    stderr: Arc<Mutex<String>>,
    what: String,
}

impl PosternProcess {
    fn spawn(cmd: Command, args: &[&str]) -> Result<Self> {
        Self::from_command(cmd, format!("postern {}", args.join(" ")))
    }

    /// Spawns `cmd` (described as `what` in errors), collecting its stderr.
    pub fn from_command(mut cmd: Command, what: String) -> Result<Self> {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("stderr was not captured"))?;
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = lock(&sink);
                s.push_str(&line);
                s.push('\n');
            }
        });
        Ok(PosternProcess {
            child,
            stderr,
            what,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL: no goodbye to anyone) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until stderr contains `needle`; fails (with the stderr so far)
    /// after `timeout` or if the process exits first.
    pub async fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.stderr();
            if text.contains(needle) {
                return Ok(text);
            }
            if !self.is_running() {
                // Give the reader thread a moment to drain the pipe.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let text = self.stderr();
                if text.contains(needle) {
                    return Ok(text);
                }
                bail!(
                    "{} exited before printing {needle:?}; stderr:\n{text}",
                    self.what
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}; stderr:\n{text}",
                    self.what
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a line containing `marker` and parses the socket address
    /// that follows the last occurrence of `" on "` in it (as in
    /// "relay P… listening on 127.0.0.1:4000").
    pub async fn wait_for_addr(&mut self, marker: &str) -> Result<SocketAddr> {
        self.wait_for_addr_within(marker, READY_TIMEOUT).await
    }

    /// [`PosternProcess::wait_for_addr`], waiting up to `timeout`.
    pub async fn wait_for_addr_within(
        &mut self,
        marker: &str,
        timeout: Duration,
    ) -> Result<SocketAddr> {
        let text = self.wait_for_stderr(marker, timeout).await?;
        let line = text
            .lines()
            .find(|l| l.contains(marker))
            .ok_or_else(|| anyhow!("no line with {marker:?}"))?;
        let addr = line
            .rsplit(" on ")
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .ok_or_else(|| anyhow!("no address in {line:?}"))?;
        addr.parse()
            .with_context(|| format!("parsing the address in {line:?}"))
    }

    /// Waits until the process exits, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still running after {timeout:?}; stderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PosternProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The relay's identifier from its "relay P… listening on …" line.
pub fn relay_identifier_from(stderr: &str) -> Result<Identifier> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("relay P"))
        .ok_or_else(|| anyhow!("no \"relay P… listening\" line in:\n{stderr}"))?;
    line.split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("malformed line {line:?}"))?
        .parse()
        .map_err(|e| anyhow!("{line:?}: {e}"))
}

// ----- /proc inspection -----------------------------------------------------

/// One TCP or UDP socket of a process, from `/proc/<pid>/net/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcSocket {
    /// `tcp`, `tcp6`, `udp` or `udp6`.
    pub table: &'static str,
    /// Local address.
    pub local: SocketAddr,
    /// Remote address.
    pub remote: SocketAddr,
    /// Kernel state code (`0A` = LISTEN, `01` = ESTABLISHED).
    pub state: u8,
}

/// TCP state LISTEN.
pub const TCP_LISTEN: u8 = 0x0A;
/// TCP state ESTABLISHED.
pub const TCP_ESTABLISHED: u8 = 0x01;

/// Socket inodes among the open file descriptors of `pid`.
pub fn socket_inodes(pid: u32) -> Result<Vec<u64>> {
    let dir = format!("/proc/{pid}/fd");
    let mut inodes = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(entry) = entry else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            inodes.push(inode);
        }
    }
    Ok(inodes)
}

fn parse_hex_addr(field: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if v6 {
        let mut bytes = [0u8; 16];
        for (i, chunk) in bytes.chunks_mut(4).enumerate() {
            let word = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Some(SocketAddr::from((std::net::Ipv6Addr::from(bytes), port)))
    } else {
        let word = u32::from_str_radix(ip, 16).ok()?;
        Some(SocketAddr::from((
            std::net::Ipv4Addr::from(word.to_ne_bytes()),
            port,
        )))
    }
}

/// The TCP/UDP sockets (IPv4 and IPv6) that process `pid` holds open.
pub fn process_sockets(pid: u32) -> Result<Vec<ProcSocket>> {
    let inodes = socket_inodes(pid)?;
    let mut found = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {path}")),
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 {
                continue;
            }
            let Ok(inode) = cols[9].parse::<u64>() else {
                continue;
            };
            if inode == 0 || !inodes.contains(&inode) {
                continue;
            }
            let v6 = table.ends_with('6');
            let (Some(local), Some(remote), Ok(state)) = (
                parse_hex_addr(cols[1], v6),
                parse_hex_addr(cols[2], v6),
                u8::from_str_radix(cols[3], 16),
            ) else {
                bail!("unparseable line in {path}: {line}");
            };
            found.push(ProcSocket {
                table,
                local,
                remote,
                state,
            });
        }
    }
    Ok(found)
}

/// Number of open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A relay and an authority behind it (`authority run` with `extra` flags),
/// both running from `home`; returns them with the relay's address and
/// identifier.
pub async fn relay_and_authority(
    home: &PosternHome,
    extra: &[&str],
) -> Result<(PosternProcess, PosternProcess, String, String)> {
    let mut relay = home.spawn(&["relay", "--identity", "relay", "--listen", "127.0.0.1:0"])?;
    let relay_addr = relay.wait_for_addr("listening on").await?.to_string();
    let relay_id = relay_identifier_from(&relay.stderr())?.to_string();
    let mut args = vec![
        "authority",
        "run",
        "--relay",
        &relay_addr,
        "--relay-identity",
        &relay_id,
    ];
    args.extend_from_slice(extra);
    let mut authority = home.spawn(&args)?;
    authority
        .wait_for_stderr("authority registered at relay", Duration::from_secs(20))
        .await?;
    Ok((relay, authority, relay_addr, relay_id))
}

/// The service [`echo_nodes`] serves.
pub const SERVICE: &str = "limits";

/// Starts a relay process with `extra` flags; returns it and its endpoint.
pub async fn relay_process(extra: &[&str]) -> Result<(PosternHome, PosternProcess, RelayEndpoint)> {
    let home = PosternHome::new()?;
    home.create_identity("default")?;
    let mut args = vec!["relay", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut relay = home.spawn(&args)?;
    let addr = relay.wait_for_addr("listening on").await?;
    let id = relay_identifier_from(&relay.stderr())?;
    Ok((home, relay, RelayEndpoint::new(addr.to_string(), id)))
}

/// An outlet (→ `echo`, service [`SERVICE`]) admitting only the inlet, and
/// that inlet, at `relay`, tuned by the closures.
pub async fn echo_nodes(
    relay: &RelayEndpoint,
    echo: &EchoServer,
    tune_outlet: impl FnOnce(&mut OutletConfig),
    tune_inlet: impl FnOnce(&mut InletConfig),
) -> Result<(TestNode, TestNode)> {
    let (outlet_id, inlet_id) = (Identity::generate(), Identity::generate());
    let mut outlet_cfg = OutletConfig::new(
        relay.clone(),
        service(SERVICE),
        echo.target(),
        AllowList::new([inlet_id.identifier()]),
    );
    tune_outlet(&mut outlet_cfg);
    let mut inlet_cfg = InletConfig::new(
        relay.clone(),
        service(SERVICE),
        any_loopback(),
        outlet_id.identifier(),
    );
    tune_inlet(&mut inlet_cfg);
    let mut outlet = TestNode::outlet(outlet_id, outlet_cfg)?;
    outlet.wait_ready().await?;
    let mut inlet = TestNode::inlet(inlet_id, inlet_cfg).await?;
    inlet.wait_ready().await?;
    Ok((outlet, inlet))
}
