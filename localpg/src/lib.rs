//! A local PostgreSQL cluster run as a child process: pgetcd's managed mode (no
//! `--postgres-url`) and every test's throwaway database.
//!
//! Protocol:
//! - Binaries come from `$PGETCD_PG_BINDIR`, else `pg_config --bindir`, else the newest
//!   `/usr/lib/postgresql/*/bin`. Missing binaries are one clear error naming the package.
//! - `initdb` runs once per data directory (trust auth, UTF8, C locale), then
//!   `wal_level=logical` and replication settings are written to `postgresql.conf`.
//! - Postgres refuses to run as root: when our euid is 0 the data directory is handed to
//!   the `postgres` user and every Postgres process runs with its uid and gid.
//! - The postmaster is forked from a dedicated keeper thread that lives as long as the
//!   child, with a parent-death signal (SIGQUIT), so a crashed or killed pgetcd never
//!   leaves an orphan Postgres behind. It runs in a process group of its own, so a
//!   terminal's Ctrl-C reaches only pgetcd, which stops it in order.
//! - [`LocalPostgres::start_supervised`] (managed mode) restarts a postmaster that
//!   exits unasked, with back-off ([`RestartPolicy`]); the protocol is at the top of
//!   `supervise.rs`. [`LocalPostgres::start`] (tests) never restarts.
//! - [`LocalPostgres::stop`] (and `Drop`) first stop the supervision, then ask for a
//!   fast shutdown (SIGINT) and wait for the postmaster to exit.
//! - Durability: the cluster keeps Postgres's defaults (`fsync`, `synchronous_commit`,
//!   `full_page_writes` on) unless [`Options::settings`] says otherwise, so a commit
//!   is on disk before it is acknowledged.

/// The keeper thread: start, wait, restart.
mod supervise;

pub use supervise::{DEFAULT_RESTART_POLICY, ORPHAN_GRACE, RestartPolicy};

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use thiserror::Error;
use tracing::info;

/// What can go wrong while running a local cluster.
#[derive(Debug, Error)]
pub enum Error {
    /// No Postgres server binaries were found.
    #[error(
        "PostgreSQL server binaries not found (looked at $PGETCD_PG_BINDIR, `pg_config --bindir` and /usr/lib/postgresql/*/bin): install them, e.g. `apt-get install postgresql`, or pass --postgres-url"
    )]
    BinariesNotFound,
    /// Running as root but there is no `postgres` user to run Postgres as.
    #[error(
        "running as root but there is no `postgres` user to run PostgreSQL as (Postgres refuses root): create one or run pgetcd as an ordinary user"
    )]
    NoPostgresUser,
    /// A command we ran failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// The command.
        what: String,
        /// Its output or exit status.
        detail: String,
    },
    /// Postgres did not become ready in time.
    #[error("PostgreSQL did not accept connections within {0:?}; see its log at {1}")]
    NotReady(Duration, PathBuf),
    /// A file system or process error.
    #[error("{what}")]
    Io {
        /// What we were doing.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// How to run a local cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// The cluster's data directory (created and initialised when missing or empty).
    pub data_dir: PathBuf,
    /// Directory for the unix socket (short path: sockets are limited to ~100 bytes).
    pub socket_dir: PathBuf,
    /// Port number; also names the unix socket.
    pub port: u16,
    /// Also listen on TCP 127.0.0.1 (tests); managed mode uses the unix socket only.
    pub listen_tcp: bool,
    /// Extra `name = value` settings appended to postgresql.conf at initdb time.
    pub settings: Vec<(String, String)>,
    /// Where the server log goes.
    pub log_file: PathBuf,
}

/// Settings every pgetcd cluster needs: logical decoding for the watch path.
pub fn required_settings() -> Vec<(String, String)> {
    [
        ("wal_level", "logical"),
        ("max_wal_senders", "20"),
        ("max_replication_slots", "20"),
        ("max_connections", "300"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// How long [`LocalPostgres::start`] waits for the first postmaster to accept
/// connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`LocalPostgres::stop`] waits for a fast shutdown before killing.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running local Postgres. Stops it on drop.
pub struct LocalPostgres {
    opts: Options,
    shared: Arc<supervise::Shared>,
    stopped: bool,
}

/// Whether this process runs with effective uid 0, the case where Postgres must run
/// as another user. Decided by the effective uid, never by `USER` (often unset in
/// containers, and wrong under sudo or setuid).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    euid == 0
}

/// uid and gid Postgres runs as when we are root (None when we are not: then it runs
/// as us). Files Postgres must own, such as a TLS key, go to this user.
pub fn postgres_user() -> Result<Option<(u32, u32)>, Error> {
    if !running_as_root() {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").map_err(io_err("reading /etc/passwd"))?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            let uid = f[2].parse().map_err(|_| Error::NoPostgresUser)?;
            let gid = f[3].parse().map_err(|_| Error::NoPostgresUser)?;
            return Ok(Some((uid, gid)));
        }
    }
    Err(Error::NoPostgresUser)
}

/// Finds the directory of the Postgres server binaries.
pub fn find_bindir() -> Result<PathBuf, Error> {
    let has_server = |d: &Path| d.join("postgres").is_file() && d.join("initdb").is_file();
    if let Some(d) = std::env::var_os("PGETCD_PG_BINDIR") {
        let d = PathBuf::from(d);
        if has_server(&d) {
            return Ok(d);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&d) {
            return Ok(d);
        }
    }
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, d)| d).ok_or(Error::BinariesNotFound)
}

/// Makes `path` (and its parents we create) owned by the postgres user when root.
fn hand_over(path: &Path, user: Option<(u32, u32)>) -> Result<(), Error> {
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(io_err(format!("chown {}", path.display())))?;
    }
    Ok(())
}

/// Whether a user other than the owner can traverse every ancestor of `path`
/// (each has the others-execute bit).
pub fn traversable_by_others(path: &Path) -> bool {
    let mut p = path;
    while let Some(parent) = p.parent() {
        match fs::metadata(parent) {
            Ok(m) => {
                if m.permissions().mode() & 0o001 == 0 {
                    return false;
                }
            }
            Err(_) => return false,
        }
        p = parent;
    }
    true
}

fn run(cmd: &mut Command, what: &str) -> Result<(), Error> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("starting {what}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            what: what.to_owned(),
            detail: format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Builds a fresh postmaster command for each start.
fn postmaster_command(
    bindir: &Path,
    opts: &Options,
    user: Option<(u32, u32)>,
    log: fs::File,
) -> Box<dyn Fn() -> Result<Command, Error> + Send> {
    let postgres = bindir.join("postgres");
    let opts = opts.clone();
    Box::new(move || {
        let mut cmd = Command::new(&postgres);
        cmd.arg("-D")
            .arg(&opts.data_dir)
            .arg("-p")
            .arg(opts.port.to_string())
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                opts.socket_dir.display()
            ))
            .arg("-c")
            .arg(format!(
                "listen_addresses={}",
                if opts.listen_tcp { "127.0.0.1" } else { "" }
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("log file"))?)
            .stderr(log.try_clone().map_err(io_err("log file"))?)
            // Its own process group: a terminal's SIGINT goes to pgetcd only, which
            // drains, then stops Postgres (and is no death to restart from).
            .process_group(0);
        as_user(&mut cmd, user);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe; it runs in the child
        // after fork (and after the uid change, which would otherwise clear it).
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    })
}

/// `pg_isready` for the cluster: exits 0 once it accepts connections.
fn ready_check(bindir: &Path, opts: &Options) -> Box<dyn Fn() -> Command + Send> {
    let pg_isready = bindir.join("pg_isready");
    let (socket_dir, port) = (opts.socket_dir.clone(), opts.port);
    Box::new(move || {
        let mut cmd = Command::new(&pg_isready);
        cmd.arg("-q")
            .arg("-h")
            .arg(&socket_dir)
            .arg("-p")
            .arg(port.to_string())
            .arg("-U")
            .arg("postgres");
        cmd
    })
}

impl LocalPostgres {
    /// Initialises (when needed) and starts the cluster, waiting until it accepts
    /// connections. A postmaster that exits later stays down.
    pub fn start(opts: Options) -> Result<Self, Error> {
        Self::launch(opts, None)
    }

    /// As [`start`](Self::start), then supervises the postmaster: when it exits
    /// without [`stop`](Self::stop) asking (a crash, `kill -9`), it is restarted as
    /// `policy` says, until stopped.
    pub fn start_supervised(opts: Options, policy: RestartPolicy) -> Result<Self, Error> {
        Self::launch(opts, Some(policy))
    }

    fn launch(opts: Options, policy: Option<RestartPolicy>) -> Result<Self, Error> {
        let bindir = find_bindir()?;
        let user = postgres_user()?;
        for dir in [&opts.data_dir, &opts.socket_dir] {
            fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
            hand_over(dir, user)?;
        }
        fs::set_permissions(&opts.data_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod data dir"))?;
        if !opts.data_dir.join("PG_VERSION").exists() {
            info!(data_dir = %opts.data_dir.display(), "initialising PostgreSQL cluster");
            run(
                as_user(
                    Command::new(bindir.join("initdb"))
                        .arg("-D")
                        .arg(&opts.data_dir)
                        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"]),
                    user,
                ),
                "initdb",
            )?;
            let mut conf = String::from("\n# added by pgetcd\n");
            for (k, v) in required_settings().iter().chain(opts.settings.iter()) {
                conf.push_str(&format!("{k} = '{v}'\n"));
            }
            let conf_path = opts.data_dir.join("postgresql.conf");
            let mut existing =
                fs::read_to_string(&conf_path).map_err(io_err("reading postgresql.conf"))?;
            existing.push_str(&conf);
            fs::write(&conf_path, existing).map_err(io_err("writing postgresql.conf"))?;
        }
        // A stale pid file from a killed postmaster does not block the start: Postgres
        // checks whether that pid still runs (a supervised restart also removes lock
        // files whose pid is dead).
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&opts.log_file)
            .map_err(io_err(format!("opening {}", opts.log_file.display())))?;
        hand_over(&opts.log_file, user)?;
        let launch = supervise::Launch {
            command: postmaster_command(&bindir, &opts, user, log),
            ready_check: ready_check(&bindir, &opts),
            // What /proc/<pid>/cwd shows for the cluster's processes.
            data_dir: opts
                .data_dir
                .canonicalize()
                .unwrap_or_else(|_| opts.data_dir.clone()),
            lock_files: vec![
                opts.data_dir.join("postmaster.pid"),
                opts.socket_dir.join(format!(".s.PGSQL.{}.lock", opts.port)),
            ],
            log_file: opts.log_file.clone(),
        };
        let shared = Arc::new(supervise::Shared::default());
        let (started_tx, started) = mpsc::channel();
        supervise::start_keeper(shared.clone(), launch, policy, started_tx)?;
        // From here on, dropping `pg` (on any error) stops whatever was started.
        let pg = LocalPostgres {
            opts,
            shared,
            stopped: false,
        };
        match started.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(pg),
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(Error::NotReady(START_TIMEOUT, pg.opts.log_file.clone()))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::Command {
                what: "postgres".into(),
                detail: "keeper thread died".into(),
            }),
        }
    }

    /// A libpq-style connection string for the superuser over the unix socket.
    pub fn connection_string(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={dbname}",
            self.opts.socket_dir.display(),
            self.opts.port
        )
    }

    /// A `postgres://` URL over TCP (only when started with `listen_tcp`).
    pub fn tcp_url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.opts.port)
    }

    /// The options it runs with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The newest postmaster's pid (a restart changes it).
    pub fn pid(&self) -> u32 {
        self.shared.pid()
    }

    /// How many times the supervision restarted the postmaster.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts()
    }

    /// Sends `signal` to the postmaster, if one runs.
    pub fn signal(&self, signal: i32) {
        self.shared.signal(signal);
    }

    /// Stops the supervision (nothing is restarted from here on), then a fast
    /// shutdown: waits up to [`STOP_TIMEOUT`] for the postmaster to exit, then kills
    /// it.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.shared.stop(STOP_TIMEOUT);
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Asks the kernel for a free TCP port on 127.0.0.1.
pub fn free_port() -> io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
