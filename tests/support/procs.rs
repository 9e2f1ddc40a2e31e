//! Whole-process measurements and process-based set-ups for the resilience,
//! limits and soak tests.
//!
//! - [`rss_kib`] and [`fd_count`] read `/proc/<pid>/status` (`VmRSS`) and
//!   `/proc/<pid>/fd` of a child process.
//! - [`free_port`] picks a loopback port that is free now, for a relay that
//!   must come back on the same port after a restart.
//! - [`ProcStack`] runs the real `postern` binary three times (relay, outlet,
//!   inlet), each its own process, so memory and descriptors are per role.
//! - [`SourceServer`] is a TCP target that sends as many bytes as asked, as
//!   fast as the connection takes them, and counts what it managed to send.
//! - [`flood`] opens and immediately resets connections in a tight loop.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use postern_identity::Identifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::net::{relay_identifier_from, PosternHome, PosternProcess, READY_TIMEOUT};

/// Resident set size of process `pid`, in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS line in {path}"))?;
    line.split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("malformed {line:?}"))?
        .parse()
        .with_context(|| format!("parsing {line:?}"))
}

/// Number of open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .count())
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    let listener = StdListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Counts how many times `needle` occurs in `haystack`.
pub fn occurrences(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// Waits until `process` has printed `needle` at least `count` times.
pub async fn wait_for_count(
    process: &mut PosternProcess,
    needle: &str,
    count: usize,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if occurrences(&process.stderr(), needle) >= count {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{needle:?} was not printed {count} times within {timeout:?}; stderr:\n{}",
                process.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Flags for a `postern relay` on `listen`.
pub fn relay_args(listen: &str) -> Vec<String> {
    ["relay", "--identity", "relay", "--listen", listen]
        .map(String::from)
        .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A relay, an outlet and an inlet, each a real `postern` process, sharing
/// one temporary home with identities `relay`, `outlet` and `inlet`.
#[derive(Debug)]
pub struct ProcStack {
    /// The shared home.
    pub home: PosternHome,
    /// The relay process.
    pub relay: PosternProcess,
    /// The outlet process.
    pub outlet: PosternProcess,
    /// The inlet process.
    pub inlet: PosternProcess,
    /// Where the relay listens.
    pub relay_addr: SocketAddr,
    /// The relay's identifier.
    pub relay_id: Identifier,
    /// The outlet's identifier.
    pub outlet_id: Identifier,
    /// The inlet's identifier.
    pub inlet_id: Identifier,
    /// Where the inlet listens: connect clients here.
    pub inlet_addr: SocketAddr,
    /// The service name (`svc`).
    pub service: String,
}

impl ProcStack {
    /// Starts the relay on `relay_listen` (with `relay_extra` flags), an
    /// outlet for service `svc` → `target` (with `outlet_extra`), and an
    /// inlet on a random loopback port (with `inlet_extra`); returns once
    /// the outlet registered and the inlet connected.
    pub async fn start(
        relay_listen: &str,
        target: &str,
        relay_extra: &[&str],
        outlet_extra: &[&str],
        inlet_extra: &[&str],
    ) -> Result<Self> {
        let home = PosternHome::new()?;
        home.create_identity("relay")?;
        let outlet_id = home.create_identity("outlet")?;
        let inlet_id = home.create_identity("inlet")?;
        let mut args = relay_args(relay_listen);
        args.extend(relay_extra.iter().map(|s| s.to_string()));
        let mut relay = home.spawn(&strs(&args))?;
        let relay_addr = relay.wait_for_addr("listening on").await?;
        let relay_id = relay_identifier_from(&relay.stderr())?;
        let service = "svc".to_owned();
        let outlet = Self::spawn_outlet_with(
            &home,
            &relay_addr.to_string(),
            relay_id,
            inlet_id,
            target,
            outlet_extra,
        )?;
        let mut stack_outlet = outlet;
        stack_outlet
            .wait_for_stderr("service registered at relay", READY_TIMEOUT)
            .await?;
        let mut inlet = Self::spawn_inlet_with(
            &home,
            &relay_addr.to_string(),
            relay_id,
            outlet_id,
            "127.0.0.1:0",
            inlet_extra,
        )?;
        let inlet_addr = inlet.wait_for_addr("listening on").await?;
        inlet
            .wait_for_stderr("connected to relay", READY_TIMEOUT)
            .await?;
        Ok(ProcStack {
            home,
            relay,
            outlet: stack_outlet,
            inlet,
            relay_addr,
            relay_id,
            outlet_id,
            inlet_id,
            inlet_addr,
            service,
        })
    }

    /// Spawns `postern outlet` as identity `outlet` for service `svc`.
    pub fn spawn_outlet_with(
        home: &PosternHome,
        relay: &str,
        relay_id: Identifier,
        allow: Identifier,
        target: &str,
        extra: &[&str],
    ) -> Result<PosternProcess> {
        let mut args: Vec<String> = [
            "outlet",
            "--identity",
            "outlet",
            "--relay",
            relay,
            "--relay-identity",
            &relay_id.to_string(),
            "--service",
            "svc",
            "--target",
            target,
            "--allow",
            &allow.to_string(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        home.spawn(&strs(&args))
    }

    /// Spawns `postern inlet` as identity `inlet` for service `svc`.
    pub fn spawn_inlet_with(
        home: &PosternHome,
        relay: &str,
        relay_id: Identifier,
        outlet_id: Identifier,
        listen: &str,
        extra: &[&str],
    ) -> Result<PosternProcess> {
        let mut args: Vec<String> = [
            "inlet",
            "--identity",
            "inlet",
            "--relay",
            relay,
            "--relay-identity",
            &relay_id.to_string(),
            "--service",
            "svc",
            "--outlet-identity",
            &outlet_id.to_string(),
            "--listen",
            listen,
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        home.spawn(&strs(&args))
    }

    /// `[relay, outlet, inlet]` process ids.
    pub fn pids(&self) -> [u32; 3] {
        [self.relay.pid(), self.outlet.pid(), self.inlet.pid()]
    }

    /// `[relay, outlet, inlet]` resident set sizes in KiB.
    pub fn rss_kib(&self) -> Result<[u64; 3]> {
        let [r, o, i] = self.pids();
        Ok([rss_kib(r)?, rss_kib(o)?, rss_kib(i)?])
    }

    /// `[relay, outlet, inlet]` open file descriptors.
    pub fn fds(&self) -> Result<[usize; 3]> {
        let [r, o, i] = self.pids();
        Ok([fd_count(r)?, fd_count(o)?, fd_count(i)?])
    }

    /// Fails (with every process's stderr) if one of them exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        for (name, p) in [
            ("relay", &mut self.relay),
            ("outlet", &mut self.outlet),
            ("inlet", &mut self.inlet),
        ] {
            if !p.is_running() {
                bail!("the {name} exited; stderr:\n{}", p.stderr());
            }
            if p.stderr().contains("panicked") {
                bail!("the {name} panicked; stderr:\n{}", p.stderr());
            }
        }
        Ok(())
    }
}

/// Names of the three roles, in the order of [`ProcStack::pids`].
pub const ROLES: [&str; 3] = ["relay", "outlet", "inlet"];

// ----- a target that sends on request ---------------------------------------

/// A TCP server on a random loopback port. Each connection first sends an
/// 8-byte big-endian count; the server answers with that many bytes (a
/// repeating pattern) as fast as the connection accepts them, then closes.
#[derive(Debug)]
pub struct SourceServer {
    /// Where it listens.
    pub addr: SocketAddr,
    sent: Arc<AtomicU64>,
    per_connection: Arc<std::sync::Mutex<Vec<Arc<AtomicU64>>>>,
    task: JoinHandle<()>,
}

/// Byte `i` of every answer.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

impl SourceServer {
    /// Starts the server.
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sent = Arc::new(AtomicU64::new(0));
        let per_connection = Arc::new(std::sync::Mutex::new(Vec::new()));
        let counter = Arc::clone(&sent);
        let connections = Arc::clone(&per_connection);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                let mine = Arc::new(AtomicU64::new(0));
                connections
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Arc::clone(&mine));
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let mut len = [0u8; 8];
                    if stream.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let total = u64::from_be_bytes(len);
                    // Writes start at the right offset of a buffer one
                    // period longer than a write, so the pattern continues.
                    let long: Vec<u8> = (0..(64 * 1024 + 251) as u64).map(pattern_byte).collect();
                    let mut done = 0u64;
                    while done < total {
                        let offset = (done % 251) as usize;
                        let n = (total - done).min(64 * 1024) as usize;
                        match stream.write(&long[offset..offset + n]).await {
                            Ok(0) | Err(_) => return,
                            Ok(written) => {
                                done += written as u64;
                                counter.fetch_add(written as u64, Ordering::Relaxed);
                                mine.fetch_add(written as u64, Ordering::Relaxed);
                            }
                        }
                    }
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(SourceServer {
            addr,
            sent,
            per_connection,
            task,
        })
    }

    /// Bytes written to all connections so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes written so far to each connection, in the order they arrived.
    pub fn sent_per_connection(&self) -> Vec<u64> {
        self.per_connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for SourceServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Asks a [`SourceServer`] (through `addr`) for `len` bytes on a new
/// connection, and returns the connection.
pub async fn request_bytes(addr: SocketAddr, len: u64) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&len.to_be_bytes()).await?;
    Ok(stream)
}

/// Reads everything until EOF, checking the pattern; returns the count.
pub async fn read_pattern(stream: &mut TcpStream) -> Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut seen = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(seen);
        }
        for (i, b) in buf[..n].iter().enumerate() {
            if *b != pattern_byte(seen + i as u64) {
                bail!(
                    "byte {} is {b}, expected {}",
                    seen + i as u64,
                    pattern_byte(seen + i as u64)
                );
            }
        }
        seen += n as u64;
    }
}

// ----- connection flood -----------------------------------------------------

/// What [`flood`] did.
#[derive(Debug, Clone, Copy)]
pub struct FloodReport {
    /// Connections completed (connected, then reset by us).
    pub connected: u64,
    /// Connection attempts that failed (refused, timed out).
    pub failed: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
}

impl FloodReport {
    /// Completed connections per second.
    pub fn rate(&self) -> f64 {
        self.connected as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// From `threads` OS threads, opens up to `count` connections to `addr` in
/// all, each closed at once with a reset (zero linger, so no TIME_WAIT
/// piles up and no bytes are sent), stopping early after `budget`.
pub fn flood(addr: SocketAddr, count: u64, threads: usize, budget: Duration) -> FloodReport {
    let started = Instant::now();
    let deadline = started + budget;
    let next = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (next, connected, failed) = (
                Arc::clone(&next),
                Arc::clone(&connected),
                Arc::clone(&failed),
            );
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    if Instant::now() >= deadline {
                        break;
                    }
                    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(stream) => {
                            let _ =
                                socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                            drop(stream);
                            connected.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    FloodReport {
        connected: connected.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}
