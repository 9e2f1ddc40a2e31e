//! Postern tunnel benchmarks, each against a direct loopback connection:
//!
//! - `throughput`: single-stream bulk transfer, client → target and
//!   target → client (GB/s, 1 GB = 10^9 bytes);
//! - `rtt`: 64-byte ping-pong round trips through an echo target (p50/p99);
//! - `setup`: new-tunnel latency, connect to the inlet → first echo byte back
//!   (p50/p99), sequential;
//! - `pgbench`: PostgreSQL's own `pgbench -S` (select-only) with 1 client,
//!   8 clients (`-j 2`), and a new connection per transaction (`-C`).
//!
//! By default the relay, outlet and inlet run as three separate `postern`
//! processes (the binary Cargo builds beside this benchmark), as they would in
//! a deployment; `--inproc` runs them instead on one tokio runtime (2 worker
//! threads) inside this process. The clients and the echo/sink target are
//! plain blocking sockets on threads of this process; PostgreSQL is a
//! throwaway cluster (`tests/support/pg.rs`). Everything listens on
//! 127.0.0.1 only, and every run is bounded (socket timeouts, fixed sizes or
//! durations, a watchdog that stops the `postern` processes if this one dies).
//!
//! ```text
//! cargo bench --bench tunnel                       # everything (~3 minutes)
//! cargo bench --bench tunnel -- --quick            # smaller sizes (~1 minute)
//! cargo bench --bench tunnel -- throughput rtt     # a subset
//! cargo bench --bench tunnel -- --inproc setup     # in-process nodes
//! POSTERN_BENCH=pgbench POSTERN_BENCH_QUICK=1 cargo bench --bench tunnel
//! ```
//!
//! Results are printed as a table and written as Markdown to
//! `target/postern-bench/tunnel-<mode>.md` (or `--out FILE`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/pg.rs"]
#[allow(dead_code)]
mod pg;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use postern_identity::{keyfile, Identity};
use postern_node::{Inlet, InletConfig, NodeHandle, Outlet, OutletConfig, RelayEndpoint, Target};
use postern_policies::AllowList;
use postern_relay::{Relay, RelayConfig};
use tokio_util::sync::CancellationToken;

/// Client and target I/O buffer for bulk transfers.
const CHUNK: usize = 256 * 1024;
/// Payload of one ping-pong round trip.
const PING: usize = 64;
/// No single socket operation of the benchmark may block longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Start-up limit for relay, outlet and inlet.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Background load (in cores) above which a measurement is flagged.
const BUSY_CORES: f64 = 0.25;

// ----- options ----------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Bench {
    Throughput,
    Rtt,
    Setup,
    Pgbench,
    Memory,
}

impl Bench {
    const ALL: [Bench; 5] = [
        Bench::Throughput,
        Bench::Rtt,
        Bench::Setup,
        Bench::Memory,
        Bench::Pgbench,
    ];

    fn parse(s: &str) -> Option<Vec<Bench>> {
        Some(match s {
            "all" => Bench::ALL.to_vec(),
            "throughput" | "tput" | "bulk" => vec![Bench::Throughput],
            "rtt" | "latency" | "pingpong" | "ping-pong" => vec![Bench::Rtt],
            "setup" | "connect" => vec![Bench::Setup],
            "pgbench" | "pg" => vec![Bench::Pgbench],
            "memory" | "idle" | "mem" => vec![Bench::Memory],
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Relay, outlet and inlet as three `postern` processes.
    Process,
    /// All three on one tokio runtime inside the benchmark process.
    InProc,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Process => "process",
            Mode::InProc => "inproc",
        }
    }
}

#[derive(Debug)]
struct Opts {
    mode: Mode,
    quick: bool,
    benches: BTreeSet<Bench>,
    /// Bytes per throughput run.
    bytes: u64,
    /// Throughput runs per direction and path (the median is reported).
    runs: usize,
    rtt_iters: usize,
    setup_iters: usize,
    /// Idle tunnels held open for the memory row.
    idle_tunnels: usize,
    pg_secs: u32,
    pg_scale: u32,
    /// Wait (bounded) for background load to settle before each section.
    wait_quiet: bool,
    out: Option<PathBuf>,
}

const USAGE: &str = "\
usage: cargo bench --bench tunnel -- [BENCH...] [OPTIONS]

BENCH: throughput | rtt | setup | memory | pgbench | all (default: all); also
       POSTERN_BENCH=throughput,rtt
OPTIONS:
  --quick            smaller sizes and shorter runs (POSTERN_BENCH_QUICK=1)
  --inproc           relay/outlet/inlet in this process, one tokio runtime
  --process          relay/outlet/inlet as 3 postern processes (default)
                     (POSTERN_BENCH_MODE=inproc|process)
  --bytes=MB         megabytes (10^6) per throughput run [2000; quick 500]
  --runs=N           throughput runs per direction, median reported [3; quick 1]
  --rtt-iters=N      ping-pong round trips [20000; quick 3000]
  --setup-iters=N    sequential tunnel set-ups [500; quick 100]
  --idle-tunnels=N   idle tunnels held open for the memory row [4000; quick
                     1000] (each costs the benchmark 2 descriptors and a
                     thread, the relay 2 descriptors: mind `ulimit -n`)
  --pgbench-secs=N   duration of each pgbench run [10; quick 4]
  --pgbench-scale=N  pgbench -i scale factor [10]
  --no-wait          do not wait for the machine to be quiet before a section
  --out=FILE         Markdown results file [target/postern-bench/tunnel-<mode>.md]
  POSTERN_BIN=PATH   postern binary to run (default: the one Cargo built)";

impl Opts {
    fn parse() -> Result<Opts> {
        let env_flag = |name: &str| {
            std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
        };
        let mut quick = env_flag("POSTERN_BENCH_QUICK");
        let mut mode = match std::env::var("POSTERN_BENCH_MODE").as_deref() {
            Ok("inproc" | "in-process") => Mode::InProc,
            Ok("process" | "") | Err(_) => Mode::Process,
            Ok(other) => bail!("POSTERN_BENCH_MODE={other:?}: use inproc or process"),
        };
        let mut benches = BTreeSet::new();
        if let Ok(list) = std::env::var("POSTERN_BENCH") {
            for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let parsed = Bench::parse(name)
                    .ok_or_else(|| anyhow!("POSTERN_BENCH: unknown benchmark {name:?}"))?;
                benches.extend(parsed);
            }
        }
        let mut numbers: Vec<(String, u64)> = Vec::new();
        let mut wait_quiet = true;
        let mut out = None;
        let mut cli_benches = BTreeSet::new();
        // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
        // binary without it, and then it is a smoke test: every benchmark,
        // tiny sizes, checking only that the harness and the tunnel work.
        let mut smoke = true;
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--bench" => smoke = false,
                "--quick" => quick = true,
                "--inproc" | "--in-process" => mode = Mode::InProc,
                "--process" => mode = Mode::Process,
                "--no-wait" => wait_quiet = false,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                _ if arg.starts_with("--out=") => out = Some(PathBuf::from(&arg[6..])),
                _ if arg.starts_with("--") && arg.contains('=') => {
                    let (key, value) = arg[2..].split_once('=').unwrap_or_default();
                    let value = value
                        .parse::<u64>()
                        .with_context(|| format!("{arg}: expected a number\n{USAGE}"))?;
                    numbers.push((key.to_owned(), value));
                }
                _ if arg.starts_with('-') => bail!("unknown option {arg:?}\n{USAGE}"),
                _ => {
                    for name in arg.split(',').filter(|s| !s.is_empty()) {
                        let parsed = Bench::parse(name)
                            .ok_or_else(|| anyhow!("unknown benchmark {name:?}\n{USAGE}"))?;
                        cli_benches.extend(parsed);
                    }
                }
            }
        }
        if !cli_benches.is_empty() {
            benches = cli_benches;
        }
        if benches.is_empty() {
            benches.extend(Bench::ALL);
        }
        let mut opts = Opts {
            mode,
            quick,
            benches,
            bytes: if quick { 500_000_000 } else { 2_000_000_000 },
            runs: if quick { 1 } else { 3 },
            rtt_iters: if quick { 3_000 } else { 20_000 },
            setup_iters: if quick { 100 } else { 500 },
            idle_tunnels: if quick { 1_000 } else { 4_000 },
            pg_secs: if quick { 4 } else { 10 },
            pg_scale: 10,
            wait_quiet,
            out,
        };
        if smoke {
            opts.quick = true;
            opts.bytes = 20_000_000;
            opts.runs = 1;
            opts.rtt_iters = 200;
            opts.setup_iters = 20;
            opts.idle_tunnels = 20;
            opts.pg_secs = 1;
            opts.pg_scale = 1;
            opts.wait_quiet = false;
            if opts.out.is_none() {
                opts.out = Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-smoke.md"));
            }
        }
        for (key, value) in numbers {
            let usize_value = usize::try_from(value)?.max(1);
            match key.as_str() {
                "bytes" => opts.bytes = value.max(1) * 1_000_000,
                "runs" => opts.runs = usize_value,
                "rtt-iters" => opts.rtt_iters = usize_value,
                "setup-iters" => opts.setup_iters = usize_value,
                "idle-tunnels" => opts.idle_tunnels = usize_value,
                "pgbench-secs" => opts.pg_secs = u32::try_from(value)?.max(1),
                "pgbench-scale" => opts.pg_scale = u32::try_from(value)?.max(1),
                _ => bail!("unknown option --{key}\n{USAGE}"),
            }
        }
        Ok(opts)
    }
}

// ----- CPU accounting from /proc ---------------------------------------------------

/// `utime stime cutime cstime ppid comm` of a process (or thread) stat file.
#[derive(Debug, Default, Clone, Copy)]
struct ProcStat {
    ppid: u32,
    /// utime + stime, in clock ticks.
    own: u64,
    /// cutime + cstime: children that have been waited for.
    children: u64,
}

fn read_stat(path: &Path) -> Option<ProcStat> {
    let text = fs::read_to_string(path).ok()?;
    // The command name may contain spaces and parentheses: fields follow the
    // last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        ppid: u32::try_from(num(1)?).ok()?,
        own: num(11)? + num(12)?,
        children: num(13)? + num(14)?,
    })
}

fn pid_cpu(pid: u32) -> u64 {
    read_stat(Path::new(&format!("/proc/{pid}/stat"))).map_or(0, |s| s.own)
}

/// (busy, total) clock ticks summed over all CPUs, from `/proc/stat`.
fn system_cpu() -> (u64, u64) {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Ticks per second for `/proc` CPU times.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU ticks of the threads of this process named `name`.
fn threads_cpu(name: &str) -> u64 {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|t| read_stat(&t.path().join("stat")))
        .map(|s| s.own)
        .sum()
}

/// CPU ticks of a PostgreSQL server: the postmaster, its live children, and
/// the children it has reaped (backends of closed connections).
fn pg_tree_cpu(postmaster: u32) -> u64 {
    let Some(master) = read_stat(Path::new(&format!("/proc/{postmaster}/stat"))) else {
        return 0;
    };
    let mut sum = master.own + master.children;
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let is_pid = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
            if !is_pid {
                continue;
            }
            if let Some(s) = read_stat(&entry.path().join("stat")) {
                if s.ppid == postmaster {
                    sum += s.own;
                }
            }
        }
    }
    sum
}

fn postmaster_pid(pg: &pg::TempPg) -> Option<u32> {
    fs::read_to_string(pg.data_dir().join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// A point-in-time reading of every CPU consumer we care about.
#[derive(Debug, Clone)]
struct CpuSnapshot {
    at: Instant,
    sys_busy: u64,
    /// This process, including waited-for children (pgbench runs).
    this: u64,
    /// Postern roles: separate processes, or the runtime threads in-process.
    postern: Vec<(&'static str, u64)>,
    postgres: u64,
}

/// Average cores used by each consumer between two snapshots.
#[derive(Debug, Clone)]
struct CpuUsage {
    wall: Duration,
    parts: Vec<(String, f64)>,
    others: f64,
}

impl CpuSnapshot {
    fn take(stack: Option<&Stack>, postmaster: Option<u32>) -> CpuSnapshot {
        let (sys_busy, _) = system_cpu();
        let this = read_stat(Path::new("/proc/self/stat")).map_or(0, |s| s.own + s.children);
        CpuSnapshot {
            at: Instant::now(),
            sys_busy,
            this,
            postern: stack.map(Stack::cpu).unwrap_or_default(),
            postgres: postmaster.map_or(0, pg_tree_cpu),
        }
    }

    fn usage_since(&self, before: &CpuSnapshot, in_process: bool) -> CpuUsage {
        let wall = self.at - before.at;
        let secs = wall.as_secs_f64().max(1e-6);
        let cores = |ticks: u64| ticks as f64 / clock_ticks() / secs;
        let mut parts = Vec::new();
        let mut ours = 0u64;
        let mut postern_in_this = 0u64;
        for ((role, now), (_, then)) in self.postern.iter().zip(&before.postern) {
            let d = now.saturating_sub(*then);
            parts.push(((*role).to_owned(), cores(d)));
            if in_process {
                postern_in_this += d;
            } else {
                ours += d;
            }
        }
        let this = self.this.saturating_sub(before.this);
        ours += this;
        parts.push((
            "bench clients+target".to_owned(),
            cores(this.saturating_sub(postern_in_this)),
        ));
        let pg = self.postgres.saturating_sub(before.postgres);
        ours += pg;
        parts.push(("postgres".to_owned(), cores(pg)));
        let busy = self.sys_busy.saturating_sub(before.sys_busy);
        CpuUsage {
            wall,
            parts,
            others: cores(busy.saturating_sub(ours)),
        }
    }
}

/// Cores used by processes other than ours, over `over`.
fn background_load(stack: Option<&Stack>, postmaster: Option<u32>, over: Duration) -> f64 {
    let before = CpuSnapshot::take(stack, postmaster);
    std::thread::sleep(over);
    let after = CpuSnapshot::take(stack, postmaster);
    after
        .usage_since(&before, stack.is_some_and(|s| s.mode() == Mode::InProc))
        .others
}

/// Waits (at most a minute) for the rest of the machine to go quiet; returns
/// the last background load seen.
fn settle(opts: &Opts, stack: Option<&Stack>, postmaster: Option<u32>) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let load = background_load(stack, postmaster, Duration::from_millis(700));
        if load < BUSY_CORES || !opts.wait_quiet || Instant::now() >= deadline {
            if load >= BUSY_CORES {
                eprintln!(
                    "  warning: other processes are using {load:.2} cores; numbers may be low"
                );
            }
            return load;
        }
        eprintln!("  waiting for the machine to be quiet (other processes use {load:.2} cores)…");
        std::thread::sleep(Duration::from_secs(2));
    }
}

// ----- the target: echo / sink / source on blocking threads ----------------------

/// A loopback server standing in for the database in the synthetic tests.
/// The first byte of each connection picks its behaviour:
/// - `E`: echo everything (the `E` itself included);
/// - `S`: sink: read to end of stream, then answer the byte count (u64 BE);
/// - `G` + u64 BE `n`: send `n` bytes, half-close, drain to end of stream.
fn start_target() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the target")?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("target-accept".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = std::thread::Builder::new()
                    .name("target-conn".into())
                    .spawn(move || {
                        let _ = serve_target(conn);
                    });
            }
        })?;
    Ok(addr)
}

fn serve_target(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut cmd = [0u8; 1];
    s.read_exact(&mut cmd)?;
    match cmd[0] {
        b'E' => {
            s.write_all(&cmd)?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n])?;
            }
        }
        b'S' => {
            let mut buf = vec![0u8; CHUNK];
            let mut count = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                count += n as u64;
            }
            s.write_all(&count.to_be_bytes())
        }
        b'G' => {
            let mut len = [0u8; 8];
            s.read_exact(&mut len)?;
            let mut left = u64::from_be_bytes(len);
            let buf = vec![0xa5u8; CHUNK];
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                s.write_all(&buf[..n])?;
                left -= n as u64;
            }
            s.shutdown(Shutdown::Write)?;
            while s.read(&mut [0u8; 64])? > 0 {}
            Ok(())
        }
        _ => Ok(()),
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Client → target: time from connect to the sink's byte count arriving.
fn upload(addr: SocketAddr, bytes: u64) -> Result<Duration> {
    let buf = vec![0x5au8; CHUNK];
    let started = Instant::now();
    let mut s = connect(addr)?;
    s.write_all(b"S")?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..n]).context("uploading")?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)
        .context("waiting for the sink's byte count")?;
    let elapsed = started.elapsed();
    let count = u64::from_be_bytes(count);
    ensure!(count == bytes, "the sink received {count} of {bytes} bytes");
    Ok(elapsed)
}

/// Target → client: time from connect to end of stream.
fn download(addr: SocketAddr, bytes: u64) -> Result<Duration> {
    let mut buf = vec![0u8; CHUNK];
    let started = Instant::now();
    let mut s = connect(addr)?;
    let mut req = [0u8; 9];
    req[0] = b'G';
    req[1..].copy_from_slice(&bytes.to_be_bytes());
    s.write_all(&req)?;
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).context("downloading")?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let elapsed = started.elapsed();
    ensure!(got == bytes, "received {got} of {bytes} bytes");
    Ok(elapsed)
}

/// Round-trip times of `n` 64-byte ping-pongs (after `warm` unrecorded ones).
fn ping_pong(addr: SocketAddr, warm: usize, n: usize) -> Result<Vec<Duration>> {
    let mut s = connect(addr)?;
    s.write_all(b"E")?;
    s.read_exact(&mut [0u8; 1])?;
    let ping = [0x42u8; PING];
    let mut pong = [0u8; PING];
    let mut rtts = Vec::with_capacity(n);
    for i in 0..warm + n {
        let t = Instant::now();
        s.write_all(&ping)?;
        s.read_exact(&mut pong)?;
        if i >= warm {
            rtts.push(t.elapsed());
        }
    }
    ensure!(pong == ping, "echo corrupted the payload");
    Ok(rtts)
}

/// Sequential new connections: connect → send one byte → its echo arrives.
fn setups(addr: SocketAddr, warm: usize, n: usize) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for i in 0..warm + n {
        let t = Instant::now();
        let mut s = connect(addr)?;
        s.write_all(b"E")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .with_context(|| format!("connection {i}: no echo"))?;
        let elapsed = t.elapsed();
        drop(s);
        if i >= warm {
            times.push(elapsed);
        }
    }
    Ok(times)
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

// ----- relay, outlet and inlet -----------------------------------------------------

/// One relay + outlet + inlet serving one service.
enum Stack {
    Process(ProcStack),
    InProc(InProcStack),
}

struct ProcStack {
    procs: Vec<(&'static str, Child, PathBuf)>,
    watchdog: Option<Child>,
    inlet: SocketAddr,
    /// Holds the identities and logs; removed on drop.
    home: tempfile::TempDir,
}

struct InProcStack {
    rt: Option<tokio::runtime::Runtime>,
    relay_stop: CancellationToken,
    relay_task: Option<tokio::task::JoinHandle<()>>,
    nodes: Vec<NodeHandle>,
    inlet: SocketAddr,
}

/// Thread name of the in-process runtime's workers.
const RT_THREAD: &str = "postern-rt";

fn postern_bin() -> PathBuf {
    std::env::var_os("POSTERN_BIN")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_postern")),
            PathBuf::from,
        )
}

impl Stack {
    fn start(mode: Mode, service: &str, target: SocketAddr) -> Result<Stack> {
        match mode {
            Mode::Process => ProcStack::start(service, target).map(Stack::Process),
            Mode::InProc => InProcStack::start(service, target).map(Stack::InProc),
        }
    }

    fn mode(&self) -> Mode {
        match self {
            Stack::Process(_) => Mode::Process,
            Stack::InProc(_) => Mode::InProc,
        }
    }

    fn inlet(&self) -> SocketAddr {
        match self {
            Stack::Process(p) => p.inlet,
            Stack::InProc(p) => p.inlet,
        }
    }

    fn cpu(&self) -> Vec<(&'static str, u64)> {
        match self {
            Stack::Process(p) => p
                .procs
                .iter()
                .map(|(role, child, _)| (*role, pid_cpu(child.id())))
                .collect(),
            Stack::InProc(_) => vec![("postern (all roles)", threads_cpu(RT_THREAD))],
        }
    }
}

impl ProcStack {
    fn start(service: &str, target: SocketAddr) -> Result<ProcStack> {
        let bin = postern_bin();
        ensure!(
            bin.is_file(),
            "postern binary not found at {} (build it with `cargo build --release`, or set POSTERN_BIN)",
            bin.display()
        );
        let home = tempfile::Builder::new()
            .prefix("postern-bench-")
            .tempdir()
            .context("creating a temporary POSTERN_HOME")?;
        let mut ids = Vec::new();
        for role in ["relay", "outlet", "inlet"] {
            let identity = Identity::generate();
            let path = home.path().join("identities").join(format!("{role}.key"));
            keyfile::write_new(&path, &identity)?;
            ids.push(identity.identifier().to_string());
        }
        let (relay_id, outlet_id, inlet_id) = (&ids[0], &ids[1], &ids[2]);
        let mut stack = ProcStack {
            procs: Vec::new(),
            watchdog: None,
            inlet: SocketAddr::from(([127, 0, 0, 1], 0)),
            home,
        };
        stack.spawn(
            &bin,
            "relay",
            &[
                "relay",
                "--identity",
                "relay",
                "--listen",
                "127.0.0.1:0",
                // Room for the memory row's idle tunnels (all from one
                // inlet identity and one address).
                "--max-tunnels",
                "50000",
                "--max-tunnels-per-node",
                "50000",
            ],
        )?;
        let relay_addr = stack.wait_for(0, |log| listening_on(log, "relay "))?;
        let relay_addr = relay_addr.to_string();
        let target = target.to_string();
        stack.spawn(
            &bin,
            "outlet",
            &[
                "outlet",
                "--identity",
                "outlet",
                "--relay",
                &relay_addr,
                "--relay-identity",
                relay_id,
                "--service",
                service,
                "--target",
                &target,
                "--allow",
                inlet_id,
                "--max-tunnels",
                "50000",
            ],
        )?;
        stack.spawn(
            &bin,
            "inlet",
            &[
                "inlet",
                "--identity",
                "inlet",
                "--relay",
                &relay_addr,
                "--relay-identity",
                relay_id,
                "--service",
                service,
                "--listen",
                "127.0.0.1:0",
                "--outlet-identity",
                outlet_id,
                "--max-tunnels",
                "50000",
            ],
        )?;
        stack.spawn_watchdog();
        stack.wait_for(1, |log| {
            log.contains("service registered at relay")
                .then_some(SocketAddr::from(([127, 0, 0, 1], 0)))
        })?;
        stack.inlet = stack.wait_for(2, |log| {
            log.contains("connected to relay")
                .then(|| listening_on(log, "inlet for service"))
                .flatten()
        })?;
        Ok(stack)
    }

    fn spawn(&mut self, bin: &Path, role: &'static str, args: &[&str]) -> Result<()> {
        let log_path = self.home.path().join(format!("{role}.log"));
        let log = File::create(&log_path)?;
        let child = Command::new(bin)
            .arg("--home")
            .arg(self.home.path())
            .args(args)
            .env_remove("POSTERN_IDENTITY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} {role}", bin.display()))?;
        self.procs.push((role, child, log_path));
        Ok(())
    }

    /// A shell in its own process group that stops the nodes if this
    /// process dies without running `Drop` (SIGKILL, abort).
    fn spawn_watchdog(&mut self) {
        const SCRIPT: &str = r#"bench=$1; shift
while [ -d "/proc/$bench" ]; do sleep 1; done
kill "$@" 2>/dev/null"#;
        let pids: Vec<String> = self
            .procs
            .iter()
            .map(|(_, c, _)| c.id().to_string())
            .collect();
        self.watchdog = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("postern-bench-watchdog")
            .arg(std::process::id().to_string())
            .args(&pids)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok();
    }

    /// Polls process `index`'s log until `found` extracts something.
    fn wait_for<T>(&mut self, index: usize, found: impl Fn(&str) -> Option<T>) -> Result<T> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let (role, child, log_path) = &mut self.procs[index];
            let log = fs::read_to_string(&*log_path).unwrap_or_default();
            if let Some(value) = found(&log) {
                return Ok(value);
            }
            if let Some(status) = child.try_wait()? {
                bail!("postern {role} exited ({status}) during start-up; its log:\n{log}");
            }
            if Instant::now() >= deadline {
                bail!("postern {role} not ready within {READY_TIMEOUT:?}; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The address in a `<prefix>… listening on <addr>` line.
fn listening_on(log: &str, prefix: &str) -> Option<SocketAddr> {
    log.lines().filter(|l| l.starts_with(prefix)).find_map(|l| {
        l.split(" listening on ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

impl Drop for ProcStack {
    fn drop(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        // Inlet first, relay last: a graceful SIGTERM each, then SIGKILL.
        for (_, child, _) in self.procs.iter_mut().rev() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(6);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::env::var_os("POSTERN_BENCH_KEEP_LOGS").is_some() {
            let kept = self.home.path().to_path_buf();
            eprintln!("  (logs kept in {})", kept.display());
            // Leak the directory on purpose.
            let home = std::mem::replace(
                &mut self.home,
                tempfile::tempdir().expect("temporary directory"),
            );
            let _ = home.keep();
        }
    }
}

impl InProcStack {
    fn start(service: &str, target: SocketAddr) -> Result<InProcStack> {
        // The `postern` binary's runtime: multi-threaded, one worker per core.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(RT_THREAD)
            .enable_all()
            .build()?;
        let (relay_identity, outlet_identity, inlet_identity) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let (outlet_id, inlet_id) = (outlet_identity.identifier(), inlet_identity.identifier());
        let relay = rt.block_on(Relay::bind(
            relay_identity,
            RelayConfig::new(SocketAddr::from(([127, 0, 0, 1], 0))),
        ))?;
        let endpoint = RelayEndpoint::new(relay.local_addr()?.to_string(), relay.identifier());
        let relay_stop = CancellationToken::new();
        let relay_task = rt.spawn(relay.run(relay_stop.clone()));
        let mut stack = InProcStack {
            rt: None,
            relay_stop,
            relay_task: Some(relay_task),
            nodes: Vec::new(),
            inlet: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let started: Result<()> = rt.block_on(async {
            let service: postern_identity::wire::ServiceName = service.parse()?;
            let outlet_cfg = OutletConfig::new(
                endpoint.clone(),
                service.clone(),
                Target::Tcp(target.to_string()),
                AllowList::new([inlet_id]),
            );
            let mut outlet = Outlet::start(outlet_identity, outlet_cfg)?;
            outlet.wait_ready(READY_TIMEOUT).await?;
            stack.nodes.push(outlet);
            let inlet_cfg = InletConfig::new(
                endpoint,
                service,
                SocketAddr::from(([127, 0, 0, 1], 0)),
                outlet_id,
            );
            let mut inlet = Inlet::start(inlet_identity, inlet_cfg).await?;
            inlet.wait_ready(READY_TIMEOUT).await?;
            stack.inlet = inlet.local_addr().context("inlet has no address")?;
            stack.nodes.push(inlet);
            Ok(())
        });
        stack.rt = Some(rt);
        started.map(|()| stack)
    }
}

impl Drop for InProcStack {
    fn drop(&mut self) {
        let Some(rt) = self.rt.take() else { return };
        let nodes = std::mem::take(&mut self.nodes);
        let relay_task = self.relay_task.take();
        let relay_stop = self.relay_stop.clone();
        rt.block_on(async move {
            for node in nodes.into_iter().rev() {
                let _ = tokio::time::timeout(Duration::from_secs(10), node.shutdown()).await;
            }
            relay_stop.cancel();
            if let Some(task) = relay_task {
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            }
        });
        rt.shutdown_timeout(Duration::from_secs(5));
    }
}

// ----- results ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Met,
    Missed,
    /// No target for this row.
    Info,
}

#[derive(Debug)]
struct Row {
    name: String,
    direct: String,
    tunnel: String,
    relative: String,
    target: String,
    verdict: Verdict,
}

#[derive(Debug)]
struct CpuRow {
    name: String,
    usage: CpuUsage,
}

#[derive(Debug, Default)]
struct Report {
    rows: Vec<Row>,
    cpu: Vec<CpuRow>,
    notes: Vec<String>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        name: impl Into<String>,
        direct: impl Into<String>,
        tunnel: impl Into<String>,
        relative: impl Into<String>,
        target: impl Into<String>,
        verdict: Verdict,
    ) {
        let row = Row {
            name: name.into(),
            direct: direct.into(),
            tunnel: tunnel.into(),
            relative: relative.into(),
            target: target.into(),
            verdict,
        };
        println!(
            "  => {}: direct {}, postern {} ({}) {}",
            row.name,
            row.direct,
            row.tunnel,
            row.relative,
            match row.verdict {
                Verdict::Met => format!("[target {} met]", row.target),
                Verdict::Missed => format!("[target {} MISSED]", row.target),
                Verdict::Info => String::new(),
            }
        );
        self.rows.push(row);
    }

    fn cpu(&mut self, name: impl Into<String>, usage: CpuUsage) {
        let name = name.into();
        let parts: Vec<String> = usage
            .parts
            .iter()
            .map(|(what, cores)| format!("{what} {cores:.2}"))
            .collect();
        println!(
            "     cores used over {:.1}s: {}, other processes {:.2}",
            usage.wall.as_secs_f64(),
            parts.join(", "),
            usage.others
        );
        self.cpu.push(CpuRow { name, usage });
    }

    fn table(&self) -> Vec<Vec<String>> {
        let mut t = vec![vec![
            "Benchmark".to_owned(),
            "Direct".to_owned(),
            "Through Postern".to_owned(),
            "Postern vs direct".to_owned(),
            "Target".to_owned(),
            "Status".to_owned(),
        ]];
        for r in &self.rows {
            t.push(vec![
                r.name.clone(),
                r.direct.clone(),
                r.tunnel.clone(),
                r.relative.clone(),
                r.target.clone(),
                match r.verdict {
                    Verdict::Met => "met".to_owned(),
                    Verdict::Missed => "**MISSED**".to_owned(),
                    Verdict::Info => "—".to_owned(),
                },
            ]);
        }
        t
    }

    fn cpu_table(&self) -> Vec<Vec<String>> {
        let Some(first) = self.cpu.first() else {
            return Vec::new();
        };
        let mut header = vec!["Through Postern".to_owned(), "wall".to_owned()];
        header.extend(first.usage.parts.iter().map(|(w, _)| w.clone()));
        header.push("other processes".to_owned());
        let mut t = vec![header];
        for r in &self.cpu {
            let mut line = vec![
                r.name.clone(),
                format!("{:.1} s", r.usage.wall.as_secs_f64()),
            ];
            line.extend(r.usage.parts.iter().map(|(_, c)| format!("{c:.2}")));
            line.push(format!("{:.2}", r.usage.others));
            t.push(line);
        }
        t
    }
}

fn markdown_table(t: &[Vec<String>]) -> String {
    let mut s = String::new();
    for (i, row) in t.iter().enumerate() {
        let _ = writeln!(s, "| {} |", row.join(" | "));
        if i == 0 {
            let _ = writeln!(s, "|{}", "---|".repeat(row.len()));
        }
    }
    s
}

fn text_table(t: &[Vec<String>]) -> String {
    let cols = t.first().map_or(0, Vec::len);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            t.iter()
                .map(|r| r.get(c).map_or(0, |v| v.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for (i, row) in t.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&width)
            .map(|(v, w)| format!("{v:<w$}", w = *w))
            .collect();
        let _ = writeln!(s, "  {}", cells.join("  ").trim_end());
        if i == 0 {
            let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
            let _ = writeln!(s, "  {}", rule.join("  "));
        }
    }
    s
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn verdict(ok: bool) -> Verdict {
    if ok {
        Verdict::Met
    } else {
        Verdict::Missed
    }
}

// ----- the benchmarks --------------------------------------------------------------

fn bench_throughput(
    opts: &Opts,
    stack: &Stack,
    target: SocketAddr,
    report: &mut Report,
) -> Result<()> {
    let gb = opts.bytes as f64 / 1e9;
    println!(
        "\n== throughput: {gb:.2} GB per run, {} run(s) per direction and path",
        opts.runs
    );
    type Transfer = fn(SocketAddr, u64) -> Result<Duration>;
    let directions: [(&str, Transfer); 2] = [
        ("Throughput client → target", upload),
        ("Throughput target → client", download),
    ];
    for (name, transfer) in directions {
        settle(opts, Some(stack), None);
        let mut direct = Vec::new();
        for run in 1..=opts.runs {
            let rate = gb / transfer(target, opts.bytes)?.as_secs_f64();
            println!("  {name}, direct, run {run}: {rate:.2} GB/s");
            direct.push(rate);
        }
        let before = CpuSnapshot::take(Some(stack), None);
        let mut tunnel = Vec::new();
        for run in 1..=opts.runs {
            let rate = gb / transfer(stack.inlet(), opts.bytes)?.as_secs_f64();
            println!("  {name}, postern, run {run}: {rate:.2} GB/s");
            tunnel.push(rate);
        }
        let usage =
            CpuSnapshot::take(Some(stack), None).usage_since(&before, stack.mode() == Mode::InProc);
        let spread = |v: &[f64]| {
            if v.len() < 2 {
                String::new()
            } else {
                let (lo, hi) = v
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
                format!(" ({lo:.2}–{hi:.2})")
            }
        };
        let (spread_d, spread_t) = (spread(&direct), spread(&tunnel));
        let (d, t) = (median(direct), median(tunnel));
        report.row(
            name,
            format!("{d:.2} GB/s{spread_d}"),
            format!("{t:.2} GB/s{spread_t}"),
            format!("{:.0}%", 100.0 * t / d),
            "≥ 1.0 GB/s",
            verdict(t >= 1.0),
        );
        report.cpu(name, usage);
    }
    Ok(())
}

fn bench_rtt(opts: &Opts, stack: &Stack, target: SocketAddr, report: &mut Report) -> Result<()> {
    let warm = (opts.rtt_iters / 10).max(100);
    println!(
        "\n== ping-pong: {} round trips of {PING} bytes on one connection (after {warm} warm-up)",
        opts.rtt_iters
    );
    settle(opts, Some(stack), None);
    let mut direct = ping_pong(target, warm, opts.rtt_iters)?;
    let before = CpuSnapshot::take(Some(stack), None);
    let mut tunnel = ping_pong(stack.inlet(), warm, opts.rtt_iters)?;
    let usage =
        CpuSnapshot::take(Some(stack), None).usage_since(&before, stack.mode() == Mode::InProc);
    direct.sort();
    tunnel.sort();
    let (d50, d99) = (percentile(&direct, 50.0), percentile(&direct, 99.0));
    let (t50, t99) = (percentile(&tunnel, 50.0), percentile(&tunnel, 99.0));
    let ratio = |t: Duration, d: Duration| t.as_secs_f64() / d.as_secs_f64().max(1e-9);
    report.row(
        "RTT 64 B p50",
        fmt_dur(d50),
        fmt_dur(t50),
        format!("{:.1}×", ratio(t50, d50)),
        "≤ 3× direct",
        verdict(ratio(t50, d50) <= 3.0),
    );
    report.row(
        "RTT 64 B p99",
        fmt_dur(d99),
        fmt_dur(t99),
        format!("{:.1}×", ratio(t99, d99)),
        "—",
        Verdict::Info,
    );
    report.cpu("RTT 64 B", usage);
    Ok(())
}

fn bench_setup(opts: &Opts, stack: &Stack, target: SocketAddr, report: &mut Report) -> Result<()> {
    let warm = (opts.setup_iters / 20).max(5);
    println!(
        "\n== tunnel set-up: {} sequential connections, connect → first echo byte (after {warm} warm-up)",
        opts.setup_iters
    );
    settle(opts, Some(stack), None);
    let mut direct = setups(target, warm, opts.setup_iters)?;
    let before = CpuSnapshot::take(Some(stack), None);
    let mut tunnel = setups(stack.inlet(), warm, opts.setup_iters)?;
    let usage =
        CpuSnapshot::take(Some(stack), None).usage_since(&before, stack.mode() == Mode::InProc);
    direct.sort();
    tunnel.sort();
    let (d50, d99) = (percentile(&direct, 50.0), percentile(&direct, 99.0));
    let (t50, t99) = (percentile(&tunnel, 50.0), percentile(&tunnel, 99.0));
    let ratio = |t: Duration, d: Duration| t.as_secs_f64() / d.as_secs_f64().max(1e-9);
    report.row(
        "Setup p50",
        fmt_dur(d50),
        fmt_dur(t50),
        format!("{:.0}×", ratio(t50, d50)),
        "≤ 2 ms",
        verdict(t50 <= Duration::from_millis(2)),
    );
    report.row(
        "Setup p99",
        fmt_dur(d99),
        fmt_dur(t99),
        format!("{:.0}×", ratio(t99, d99)),
        "—",
        Verdict::Info,
    );
    report.cpu(format!("Setup ×{}", opts.setup_iters), usage);
    Ok(())
}

/// Resident memory of process `pid`, in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Memory per idle open tunnel: each process's resident memory before and
/// after `idle_tunnels` tunnels are opened (one echo each) and left idle.
fn bench_memory(opts: &Opts, stack: &Stack, report: &mut Report) -> Result<()> {
    let Stack::Process(procs) = stack else {
        println!("\n== memory per idle tunnel: process mode only (one process per role); skipped");
        return Ok(());
    };
    let n = opts.idle_tunnels;
    println!("\n== memory per idle tunnel: {n} tunnels opened, one echo each, then idle");
    let rss = || -> Vec<(&'static str, u64)> {
        procs
            .procs
            .iter()
            .map(|(role, child, _)| (*role, rss_kib(child.id()).unwrap_or(0)))
            .collect()
    };
    // Warm the allocators and the spare connections first.
    drop(setups(stack.inlet(), 5, 0)?);
    std::thread::sleep(Duration::from_millis(500));
    let before = rss();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = connect(stack.inlet())?;
        s.write_all(b"E")?;
        s.read_exact(&mut [0u8; 1])
            .with_context(|| format!("idle tunnel {i}: no echo"))?;
        held.push(s);
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = rss();
    drop(held);
    for ((role, b), (_, a)) in before.iter().zip(&after) {
        let per = a.saturating_sub(*b) as f64 / n as f64;
        let (name, limit) = match *role {
            "relay" => ("Relay memory per idle tunnel", 16.0),
            other => (
                if other == "inlet" {
                    "Inlet memory per idle tunnel"
                } else {
                    "Outlet memory per idle tunnel"
                },
                32.0,
            ),
        };
        report.row(
            format!("{name} ({n} open)"),
            "—",
            format!("{per:.1} KiB"),
            format!("{b} → {a} KiB RSS"),
            format!("≤ {limit:.0} KiB"),
            verdict(per <= limit),
        );
    }
    Ok(())
}

#[derive(Debug)]
struct PgbenchRun {
    tps: f64,
    latency_ms: Option<f64>,
    failed: u64,
}

fn run_pgbench(bin: &Path, addr: SocketAddr, args: &[&str], secs: u32) -> Result<PgbenchRun> {
    let out = Command::new(bin)
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-U", pg::PG_SUPERUSER, "-n", "-T", &secs.to_string()])
        .args(args)
        .arg("postgres")
        .env("LC_ALL", "C")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .stdin(Stdio::null())
        .output()
        .context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "pgbench {args:?} against {addr} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let value = |prefix: &str| -> Option<f64> {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let tps = value("tps = ").ok_or_else(|| anyhow!("no tps in pgbench output:\n{stdout}"))?;
    Ok(PgbenchRun {
        tps,
        latency_ms: value("latency average = "),
        failed: value("number of failed transactions: ").map_or(0, |f| f as u64),
    })
}

fn bench_pgbench(opts: &Opts, report: &mut Report) -> Result<()> {
    let bin = pg::pg_bin("pgbench").ok_or_else(|| {
        anyhow!("pgbench not found: run scripts/setup.sh as root (Debian's postgresql package)")
    })?;
    println!(
        "\n== pgbench: starting a throwaway PostgreSQL, pgbench -i -s {} (direct)",
        opts.pg_scale
    );
    let pg = pg::TempPg::start()?;
    let init = Command::new(&bin)
        .args(["-i", "-q", "-s", &opts.pg_scale.to_string()])
        .args(["-h", "127.0.0.1", "-p", &pg.port().to_string()])
        .args(["-U", pg::PG_SUPERUSER, "postgres"])
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .context("running pgbench -i")?;
    ensure!(
        init.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let postmaster = postmaster_pid(&pg);
    let stack = Stack::start(opts.mode, "pg", pg.addr())?;
    type Case = (
        &'static str,
        &'static str,
        &'static [&'static str],
        Option<f64>,
    );
    let cases: [Case; 4] = [
        (
            "pgbench -S, 1 client",
            "-c 1",
            &["-S", "-c", "1", "-j", "1"],
            Some(0.70),
        ),
        (
            "pgbench -S, 8 clients",
            "-c 8 -j 2",
            &["-S", "-c", "8", "-j", "2"],
            Some(0.80),
        ),
        (
            "pgbench -S -C, 1 client",
            "-C -c 1",
            &["-S", "-C", "-c", "1", "-j", "1"],
            None,
        ),
        (
            "pgbench -S -C, 8 clients",
            "-C -c 8 -j 2",
            &["-S", "-C", "-c", "8", "-j", "2"],
            None,
        ),
    ];
    for (name, flags, args, goal) in cases {
        settle(opts, Some(&stack), postmaster);
        let direct = run_pgbench(&bin, pg.addr(), args, opts.pg_secs)?;
        println!(
            "  {name} ({flags} -T {}), direct: {:.0} tps, latency {:.3} ms",
            opts.pg_secs,
            direct.tps,
            direct.latency_ms.unwrap_or(f64::NAN)
        );
        let before = CpuSnapshot::take(Some(&stack), postmaster);
        let tunnel = run_pgbench(&bin, stack.inlet(), args, opts.pg_secs)?;
        let usage = CpuSnapshot::take(Some(&stack), postmaster)
            .usage_since(&before, stack.mode() == Mode::InProc);
        println!(
            "  {name} ({flags} -T {}), postern: {:.0} tps, latency {:.3} ms",
            opts.pg_secs,
            tunnel.tps,
            tunnel.latency_ms.unwrap_or(f64::NAN)
        );
        if direct.failed + tunnel.failed > 0 {
            report.notes.push(format!(
                "{name}: failed transactions: direct {}, postern {}",
                direct.failed, tunnel.failed
            ));
        }
        let share = tunnel.tps / direct.tps;
        let lat = |r: &PgbenchRun| {
            r.latency_ms
                .map_or(String::new(), |l| format!(", {l:.3} ms"))
        };
        report.row(
            name,
            format!("{:.0} tps{}", direct.tps, lat(&direct)),
            format!("{:.0} tps{}", tunnel.tps, lat(&tunnel)),
            format!("{:.0}%", 100.0 * share),
            goal.map_or("—".to_owned(), |g| {
                format!("≥ {:.0}% of direct", g * 100.0)
            }),
            goal.map_or(Verdict::Info, |g| verdict(share >= g)),
        );
        report.cpu(name, usage);
    }
    drop(stack);
    drop(pg);
    Ok(())
}

// ----- machine description -----------------------------------------------------------

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn machine() -> Vec<(String, String)> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "?".into())
    };
    let aes = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "aes"));
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb: f64 = m
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "?".into());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    vec![
        ("CPUs (nproc)".into(), cpus.to_string()),
        (
            "CPU model".into(),
            format!(
                "{} (family {}, model {}; AES-NI {})",
                field("model name"),
                field("cpu family"),
                field("model\t"),
                if aes { "yes" } else { "no" }
            ),
        ),
        ("Memory".into(), mem),
        (
            "Kernel".into(),
            command_line("uname", &["-sr"]).unwrap_or_else(|| "?".into()),
        ),
        (
            "rustc".into(),
            command_line("rustc", &["--version"]).unwrap_or_else(|| "?".into()),
        ),
    ]
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn default_out(mode: Mode) -> PathBuf {
    // The benchmark runs from <target>/release/deps/.
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .filter(|t| t.join("CACHEDIR.TAG").exists())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target
        .join("postern-bench")
        .join(format!("tunnel-{}.md", mode.name()))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let opts = Opts::parse()?;
    let started = Instant::now();
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let load_start = loadavg();
    println!(
        "postern tunnel benchmarks: mode {}, {}{:?}",
        opts.mode.name(),
        if opts.quick { "quick, " } else { "" },
        opts.benches
    );
    if opts.mode == Mode::Process {
        println!("  postern binary: {}", postern_bin().display());
    }
    let idle = background_load(None, None, Duration::from_secs(1));
    println!("  load average {load_start}; other processes use {idle:.2} cores");

    let mut report = Report::default();
    let synthetic = [Bench::Throughput, Bench::Rtt, Bench::Setup, Bench::Memory]
        .iter()
        .any(|b| opts.benches.contains(b));
    if synthetic {
        let target = start_target()?;
        let stack = Stack::start(opts.mode, "bench", target)?;
        println!("  target {target}, inlet {}", stack.inlet());
        if opts.benches.contains(&Bench::Throughput) {
            bench_throughput(&opts, &stack, target, &mut report)?;
        }
        if opts.benches.contains(&Bench::Rtt) {
            bench_rtt(&opts, &stack, target, &mut report)?;
        }
        if opts.benches.contains(&Bench::Setup) {
            bench_setup(&opts, &stack, target, &mut report)?;
        }
        if opts.benches.contains(&Bench::Memory) {
            bench_memory(&opts, &stack, &mut report)?;
        }
    }
    if opts.benches.contains(&Bench::Pgbench) {
        bench_pgbench(&opts, &mut report)?;
    }
    let load_end = loadavg();

    let mut md = String::new();
    let _ = writeln!(
        md,
        "### {date}: {} mode{}\n",
        opts.mode.name(),
        if opts.quick { ", quick" } else { "" }
    );
    for (k, v) in machine() {
        let _ = writeln!(md, "- {k}: {v}");
    }
    let _ = writeln!(
        md,
        "- Nodes: {}",
        match opts.mode {
            Mode::Process =>
                "relay, outlet and inlet as three `postern` processes (release build, default logging)",
            Mode::InProc =>
                "relay, outlet and inlet in the benchmark process on one tokio runtime (2 workers), no log subscriber",
        }
    );
    let _ = writeln!(
        md,
        "- Sizes: throughput {:.2} GB × {} run(s) per direction (median; range in parentheses), \
         {} ping-pongs, {} set-ups, pgbench -T {} on scale {}",
        opts.bytes as f64 / 1e9,
        opts.runs,
        opts.rtt_iters,
        opts.setup_iters,
        opts.pg_secs,
        opts.pg_scale
    );
    let _ = writeln!(
        md,
        "- Load: average {load_start} at start, {load_end} at end; other processes used {idle:.2} cores before start; total run {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(md, "\n{}", markdown_table(&report.table()));
    if !report.cpu.is_empty() {
        let _ = writeln!(
            md,
            "CPU during the Postern runs, in cores (CPU-seconds per second of wall time; the machine has {}):\n\n{}",
            std::thread::available_parallelism().map_or(0, usize::from),
            markdown_table(&report.cpu_table())
        );
    }
    for note in &report.notes {
        let _ = writeln!(md, "- Note: {note}");
    }

    println!("\n{}", text_table(&report.table()));
    if !report.cpu.is_empty() {
        println!("CPU during the Postern runs (cores):\n");
        println!("{}", text_table(&report.cpu_table()));
    }
    let out = opts.out.clone().unwrap_or_else(|| default_out(opts.mode));
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    println!("Markdown results written to {}", out.display());
    let missed = report
        .rows
        .iter()
        .filter(|r| r.verdict == Verdict::Missed)
        .count();
    if missed > 0 {
        println!("{missed} target(s) missed.");
    }
    Ok(())
}
