//! A throwaway PostgreSQL cluster per test.
//!
//! [`TempPg::start`] runs `initdb` into a fresh temporary directory and
//! starts a server listening on a random free loopback port and on a Unix
//! socket inside that directory. Dropping the [`TempPg`] stops the server
//! (`pg_ctl stop -m immediate`) and removes the directory, also when the
//! test panics. If the test process dies without unwinding (SIGKILL, abort,
//! a timeout), a small watchdog shell process notices within a second and
//! stops the server and removes the directory instead.
//!
//! The PostgreSQL binaries are looked up in this order:
//! 1. `$POSTERN_PG_BIN` (a directory containing `initdb`, `pg_ctl`, ...);
//! 2. the highest version under `/usr/lib/postgresql/*/bin` (Debian layout);
//! 3. `pg_config --bindir`, then `initdb` on `PATH`.
//!
//! `initdb` and `postgres` refuse to run as root, so when the tests run as
//! root the cluster directory is handed to the `postgres` system user and
//! the server tools are run through `runuser -u postgres --`.
//!
//! Run `scripts/setup.sh` (as root) to install everything this needs.

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Environment variable naming a directory with the PostgreSQL binaries.
pub const PG_BIN_ENV: &str = "POSTERN_PG_BIN";

/// The system user that owns the cluster when the tests run as root.
const PG_SYSTEM_USER: &str = "postgres";

/// The database superuser created by `initdb` (and used by the helpers).
pub const PG_SUPERUSER: &str = "postgres";

/// How many ports to try before giving up on a bind conflict.
const START_ATTEMPTS: usize = 3;

/// Linux `sun_path` is 108 bytes including the trailing NUL.
const MAX_SOCKET_PATH: usize = 107;

const SETUP_HINT: &str = "run `scripts/setup.sh` as root (it installs Debian's `postgresql` \
     package), or point $POSTERN_PG_BIN at a directory containing initdb and pg_ctl";

/// A PostgreSQL cluster living in a temporary directory, stopped and deleted
/// on drop.
#[derive(Debug)]
pub struct TempPg {
    bin_dir: PathBuf,
    /// `Some(path to runuser)` when the tools must run as the `postgres` user.
    runuser: Option<PathBuf>,
    port: u16,
    /// `listen_addresses` for the server (`127.0.0.1` unless started with
    /// [`TempPg::start_in_netns`]).
    listen_addresses: String,
    /// A network namespace (`ip netns`) the server runs in, if any.
    netns: Option<String>,
    running: bool,
    watchdog: Option<Child>,
    /// Declared last so it is removed only after `Drop::drop` stopped the
    /// server.
    dir: tempfile::TempDir,
}

impl TempPg {
    /// Create, initialise and start a fresh cluster. Blocking (runs `initdb`
    /// and `pg_ctl`, typically 1–3 s); from async code prefer
    /// [`TempPg::start_async`].
    pub fn start() -> Result<Self> {
        Self::start_with("127.0.0.1".to_owned(), None)
    }

    /// Like [`TempPg::start`], but the server runs inside network namespace
    /// `netns` (through `ip netns exec`; needs root) and listens on
    /// `listen` (addresses of that namespace) as well as on its Unix
    /// socket. `initdb`, `pg_ctl stop` and the watchdog run outside: they
    /// need no network.
    pub fn start_in_netns(netns: &str, listen: &[std::net::IpAddr]) -> Result<Self> {
        if listen.is_empty() {
            bail!("start_in_netns needs at least one address to listen on");
        }
        let addresses = listen
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        Self::start_with(addresses, Some(netns.to_owned()))
    }

    fn start_with(listen_addresses: String, netns: Option<String>) -> Result<Self> {
        let bin_dir = pg_bin_dir()?;
        let runuser = if running_as_root()? {
            Some(root_prerequisites()?)
        } else {
            None
        };

        let base = temp_base(runuser.is_some());
        let dir = tempfile::Builder::new()
            .prefix("postern-pg-")
            .tempdir_in(&base)
            .with_context(|| {
                format!(
                    "creating a temporary directory for PostgreSQL under {}",
                    base.display()
                )
            })?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", dir.path().display()))?;
        if dir.path().to_str().is_none_or(|p| p.contains('\'')) {
            bail!(
                "temporary directory {:?} is not usable for PostgreSQL (non-UTF-8 or contains a \
                 quote); set TMPDIR to a plain path such as /tmp",
                dir.path()
            );
        }

        // From here on, `Drop` cleans up whatever got started.
        let mut pg = TempPg {
            bin_dir,
            runuser,
            port: 0,
            listen_addresses,
            netns,
            running: false,
            watchdog: None,
            dir,
        };

        if pg.runuser.is_some() {
            let out = Command::new("chown")
                .arg("-R")
                .arg(format!("{PG_SYSTEM_USER}:{PG_SYSTEM_USER}"))
                .arg(pg.dir.path())
                .stdin(Stdio::null())
                .output()
                .context("running `chown` (coreutils) to hand the cluster dir to `postgres`")?;
            check_output(&out, "chown -R postgres:postgres <tempdir>")?;
        }

        pg.initdb()?;
        if pg.netns.is_some() {
            // Inside its own namespace the server is reachable only from the
            // test's other namespaces: let them in (as `127.0.0.1` is).
            let hba = pg.data_dir().join("pg_hba.conf");
            let mut text =
                fs::read_to_string(&hba).with_context(|| format!("reading {}", hba.display()))?;
            text.push_str("\nhost all all 0.0.0.0/0 trust\n");
            fs::write(&hba, text).with_context(|| format!("writing {}", hba.display()))?;
        }
        pg.start_with_port_retries()?;
        pg.spawn_watchdog();
        Ok(pg)
    }

    /// [`TempPg::start`] on tokio's blocking thread pool, so several
    /// clusters can be started concurrently from one test.
    pub async fn start_async() -> Result<Self> {
        tokio::task::spawn_blocking(Self::start)
            .await
            .context("the TempPg::start task panicked or was cancelled")?
    }

    /// TCP port the server listens on (on 127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// Directory holding the Unix socket (the server's `-k` directory).
    /// It is mode 0700 and, when running as root, owned by `postgres`.
    pub fn unix_socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Full path of the Unix socket: `<unix_socket_dir>/.s.PGSQL.<port>`.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join(format!(".s.PGSQL.{}", self.port))
    }

    /// The cluster's data directory (`<tempdir>/data`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The temporary directory holding everything (data, log, socket).
    pub fn root_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Contents of the server log so far (empty if unreadable); handy in
    /// assertion messages.
    pub fn log_contents(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Directory the PostgreSQL binaries were taken from.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// libpq-style connection string for superuser `postgres`, database
    /// `postgres`, trust auth. `host` may be an IP, a host name, or a Unix
    /// socket directory (an absolute path).
    pub fn connection_string(host: &str, port: u16) -> String {
        format!(
            "host={} port={port} user={PG_SUPERUSER} dbname=postgres",
            quote_conn_value(host)
        )
    }

    /// Connection string straight to this server over TCP.
    pub fn direct_connection_string(&self) -> String {
        Self::connection_string("127.0.0.1", self.port)
    }

    /// Connection string straight to this server over its Unix socket.
    pub fn socket_connection_string(&self) -> String {
        let dir = self.unix_socket_dir().to_string_lossy().into_owned();
        Self::connection_string(&dir, self.port)
    }

    /// Connect with tokio-postgres (no TLS) to `host:port` — e.g. a tunnel's
    /// local listener in front of this server — and spawn the connection
    /// task on the current tokio runtime.
    pub async fn connect_to(host: &str, port: u16) -> Result<tokio_postgres::Client> {
        connect_str(&Self::connection_string(host, port)).await
    }

    /// Connect directly (TCP, no tunnel) to this server.
    pub async fn connect_direct(&self) -> Result<tokio_postgres::Client> {
        connect_str(&self.direct_connection_string())
            .await
            .with_context(|| {
                format!(
                    "direct connection to TempPg on {}; server log:\n{}",
                    self.addr(),
                    self.log_contents()
                )
            })
    }

    /// Connect directly to this server over its Unix socket.
    pub async fn connect_socket(&self) -> Result<tokio_postgres::Client> {
        connect_str(&self.socket_connection_string()).await
    }

    /// Stop the server cleanly (`pg_ctl stop -m fast`: open connections are
    /// terminated, committed data is kept), leaving the data directory so
    /// [`TempPg::restart`] can bring it back on the same port. Useful for
    /// "backend went away" tests.
    pub fn stop(&mut self) -> Result<()> {
        self.stop_mode("fast")
    }

    /// Simulate a server crash (`pg_ctl stop -m immediate`). Because the
    /// cluster runs with `synchronous_commit=off`, transactions committed in
    /// the last few hundred milliseconds are lost on [`TempPg::restart`].
    pub fn crash(&mut self) -> Result<()> {
        self.stop_mode("immediate")
    }

    fn stop_mode(&mut self, mode: &str) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let out = self
            .pg_ctl(&["stop", "-m", mode, "-w", "-t", "60"])
            .output()
            .with_context(|| format!("running pg_ctl stop -m {mode}"))?;
        check_output(&out, &format!("pg_ctl stop -m {mode}"))?;
        self.running = false;
        Ok(())
    }

    /// Start the server again after [`TempPg::stop`] or [`TempPg::crash`],
    /// on the same port.
    pub fn restart(&mut self) -> Result<()> {
        if self.running {
            return Ok(());
        }
        match self.try_start_on(self.port) {
            Ok(()) => Ok(()),
            Err(StartError::PortInUse(e) | StartError::Other(e)) => {
                Err(e.context("restarting TempPg on its previous port"))
            }
        }
    }

    // ----- internals -------------------------------------------------------

    /// A command running `program` from the bin dir as the right user, in
    /// the cluster directory, with an English C locale for parseable output.
    fn pg_command(&self, program: &str) -> Command {
        let exe = self.bin_dir.join(program);
        let mut cmd = match &self.runuser {
            Some(runuser) => {
                let mut c = Command::new(runuser);
                c.arg("-u").arg(PG_SYSTEM_USER).arg("--").arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .stdin(Stdio::null());
        cmd
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D").arg(self.data_dir()).args(args);
        cmd
    }

    fn initdb(&self) -> Result<()> {
        let out = self
            .pg_command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                PG_SUPERUSER,
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .with_context(|| format!("running initdb from {}", self.bin_dir.display()))?;
        check_output(&out, "initdb").with_context(|| {
            format!(
                "initdb failed in {} ({SETUP_HINT})",
                self.dir.path().display()
            )
        })
    }

    fn start_with_port_retries(&mut self) -> Result<()> {
        let mut last_err = None;
        for attempt in 1..=START_ATTEMPTS {
            let port = free_loopback_port()?;
            match self.try_start_on(port) {
                Ok(()) => return Ok(()),
                Err(StartError::PortInUse(e)) => {
                    last_err = Some(e.context(format!(
                        "attempt {attempt}/{START_ATTEMPTS}: port {port} was taken"
                    )));
                }
                Err(StartError::Other(e)) => return Err(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow!("no start attempt made"))
            .context(format!(
                "PostgreSQL could not bind a free loopback port after {START_ATTEMPTS} attempts"
            )))
    }

    fn try_start_on(&mut self, port: u16) -> Result<(), StartError> {
        let log_path = self.log_path();
        let log_offset = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let socket_dir = self.dir.path().to_string_lossy().into_owned();
        let opts = format!(
            "-p {port} -c listen_addresses={} -k '{socket_dir}' -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
             -c shared_buffers=128MB",
            self.listen_addresses
        );
        self.port = port;
        // Even on failure pg_ctl may have left a postmaster (e.g. on timeout):
        // let Drop try to stop it.
        self.running = true;
        let mut start = self.pg_ctl(&["-l"]);
        start
            .arg(&log_path)
            .args(["-w", "-t", "60", "-o", &opts, "start"]);
        if let Some(netns) = &self.netns {
            // The postmaster inherits the namespace from pg_ctl.
            let mut wrapped = Command::new("ip");
            wrapped
                .args(["netns", "exec", netns])
                .arg(start.get_program())
                .args(start.get_args())
                .current_dir(self.dir.path())
                .env("LC_ALL", "C")
                .env_remove("PGDATA")
                .stdin(Stdio::null());
            start = wrapped;
        }
        let out = start
            .output()
            .map_err(|e| StartError::Other(anyhow!(e).context("running pg_ctl start")))?;
        if out.status.success() {
            return Ok(());
        }
        let log = fs::read(&log_path)
            .ok()
            .and_then(|b| b.get(log_offset as usize..).map(<[u8]>::to_vec))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        // Make sure nothing half-started lingers before a retry.
        self.stop_quietly();
        let err = anyhow!(
            "pg_ctl start on port {port} failed ({}).\npg_ctl output:\n{}\nserver log ({}):\n{}",
            out.status,
            output_text(&out),
            log_path.display(),
            log
        );
        if log.contains("Address already in use") || log.contains("could not bind") {
            Err(StartError::PortInUse(err))
        } else {
            Err(StartError::Other(err))
        }
    }

    /// Best-effort stop used by Drop and after failed starts.
    fn stop_quietly(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let pid_file = self.data_dir().join("postmaster.pid");
        if !pid_file.exists() {
            return;
        }
        let pid = read_postmaster_pid(&pid_file);
        let _ = self
            .pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Fallback: if the postmaster is still around, kill it outright.
        if let Some(pid) = pid {
            let proc_dir = PathBuf::from(format!("/proc/{pid}"));
            if proc_dir.exists() && pid_file.exists() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                let deadline = Instant::now() + Duration::from_secs(5);
                while proc_dir.exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Spawn `sh` in its own process group that waits for this test process
    /// to disappear and then stops the server and deletes the directory.
    /// Killed in Drop on the normal path. Best effort: failure to spawn only
    /// loses protection against the test process being killed.
    fn spawn_watchdog(&mut self) {
        const SCRIPT: &str = r#"pid=$1; dir=$2; shift 2
while [ -d "/proc/$pid" ]; do sleep 1; done
"$@" >/dev/null 2>&1
rm -rf -- "$dir"
"#;
        let stop = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("postern-pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(self.dir.path())
            .arg(stop.get_program())
            .args(stop.get_args())
            .env("LC_ALL", "C")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: a Ctrl-C to the test's group does not kill it.
            .process_group(0);
        self.watchdog = cmd.spawn().ok();
    }
}

impl Drop for TempPg {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        self.stop_quietly();
        // `self.dir` (TempDir) is dropped after this and removes everything.
    }
}

enum StartError {
    PortInUse(anyhow::Error),
    Other(anyhow::Error),
}

/// Path of a PostgreSQL program (`pgbench`, `psql`, `pg_isready`, ...) from
/// the same installation [`TempPg`] uses, falling back to `PATH`.
pub fn pg_bin(name: &str) -> Option<PathBuf> {
    if let Ok(dir) = pg_bin_dir() {
        let p = dir.join(name);
        if is_executable(&p) {
            return Some(p);
        }
    }
    find_on_path(name)
}

/// The directory holding `initdb`, `pg_ctl`, ... (cached per process).
pub fn pg_bin_dir() -> Result<PathBuf> {
    static BIN_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN_DIR
        .get_or_init(|| locate_bin_dir().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn locate_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(PG_BIN_ENV).filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        if is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl")) {
            return Ok(dir);
        }
        bail!(
            "${PG_BIN_ENV}={} does not contain executable `initdb` and `pg_ctl`; fix it or \
             unset it ({SETUP_HINT})",
            dir.display()
        );
    }

    let mut versions: Vec<(Vec<u32>, PathBuf)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let bin = entry.path().join("bin");
            if !is_executable(&bin.join("initdb")) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            if let Some(version) = version {
                versions.push((version, bin));
            }
        }
    }
    if let Some((_, bin)) = versions.into_iter().max() {
        return Ok(bin);
    }

    if let Some(pg_config) = find_on_path("pg_config") {
        if let Ok(out) = Command::new(&pg_config).arg("--bindir").output() {
            if out.status.success() {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl")) {
                    return Ok(dir);
                }
            }
        }
    }

    if let Some(initdb) = find_on_path("initdb") {
        // Resolve symlinks (e.g. /usr/local/bin/initdb -> .../15/bin/initdb)
        // so pg_ctl and postgres are found beside it.
        let real = fs::canonicalize(&initdb).unwrap_or(initdb);
        if let Some(dir) = real.parent() {
            if is_executable(&dir.join("pg_ctl")) {
                return Ok(dir.to_path_buf());
            }
        }
    }

    bail!(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in ${PG_BIN_ENV}, \
         /usr/lib/postgresql/*/bin, `pg_config --bindir` or PATH: {SETUP_HINT}"
    )
}

/// Whether the effective uid is 0, from `/proc/self/status`.
fn running_as_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status")
        .context("reading /proc/self/status to find the current uid (is /proc mounted?)")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .ok_or_else(|| anyhow!("no `Uid:` line in /proc/self/status"))?;
    // Uid: real effective saved fs
    let euid = line
        .split_whitespace()
        .nth(2)
        .ok_or_else(|| anyhow!("malformed line in /proc/self/status: {line:?}"))?;
    Ok(euid == "0")
}

/// Checks needed to run the server tools as `postgres`; returns `runuser`.
fn root_prerequisites() -> Result<PathBuf> {
    let known = Command::new("id")
        .args(["-u", PG_SYSTEM_USER])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !known {
        bail!(
            "running as root but there is no `{PG_SYSTEM_USER}` system user to run initdb/postgres \
             as: {SETUP_HINT}"
        );
    }
    find_on_path("runuser")
        .or_else(|| {
            ["/usr/sbin/runuser", "/sbin/runuser"]
                .iter()
                .map(PathBuf::from)
                .find(|p| is_executable(p))
        })
        .ok_or_else(|| {
            anyhow!(
                "running as root but `runuser` (util-linux) is not installed; it is needed to run \
                 initdb/postgres as `{PG_SYSTEM_USER}`: apt-get install util-linux"
            )
        })
}

/// Base directory for cluster dirs: `$TMPDIR` if usable, else `/tmp`.
///
/// Usable means the socket path fits in `sun_path` and, when the cluster is
/// owned by `postgres`, every ancestor is world-traversable.
fn temp_base(as_postgres: bool) -> PathBuf {
    let base = std::env::temp_dir();
    // "<base>/postern-pg-XXXXXX/.s.PGSQL.65535.lock"
    let fits =
        base.as_os_str().len() + "/postern-pg-XXXXXX/.s.PGSQL.65535.lock".len() <= MAX_SOCKET_PATH;
    let traversable = !as_postgres
        || base.ancestors().all(|a| {
            fs::metadata(a)
                .map(|m| m.permissions().mode() & 0o001 != 0)
                .unwrap_or(false)
        });
    if fits && traversable && base.is_dir() {
        base
    } else {
        PathBuf::from("/tmp")
    }
}

fn free_loopback_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("binding 127.0.0.1:0 to pick a free port for PostgreSQL")?;
    Ok(listener.local_addr()?.port())
}

async fn connect_str(conn: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting with tokio-postgres to `{conn}`"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("TempPg client connection ended with error: {e}");
        }
    });
    Ok(client)
}

/// Quote a libpq keyword/value connection-string value if needed.
fn quote_conn_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '\t', '\n']) {
        return v.to_string();
    }
    let mut s = String::with_capacity(v.len() + 2);
    s.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

fn read_postmaster_pid(pid_file: &Path) -> Option<u32> {
    fs::read_to_string(pid_file)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn output_text(out: &Output) -> String {
    let mut s = String::new();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stdout.trim().is_empty() {
        let _ = write!(s, "{}", stdout.trim_end());
    }
    if !stderr.trim().is_empty() {
        if !s.is_empty() {
            s.push('\n');
        }
        let _ = write!(s, "{}", stderr.trim_end());
    }
    s
}

fn check_output(out: &Output, what: &str) -> Result<()> {
    if out.status.success() {
        Ok(())
    } else {
        Err(anyhow!(
            "`{what}` failed ({}):\n{}",
            out.status,
            output_text(out)
        ))
    }
}
