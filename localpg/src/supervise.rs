//! The keeper: the thread that forks every postmaster of a cluster, waits for it and,
//! when supervised, restarts it after an exit nobody asked for.
//!
//! Protocol:
//! - One keeper thread per cluster forks every postmaster and lives until the last one
//!   is gone. The parent-death signal (SIGQUIT) fires when the *forking thread* ends,
//!   so a crashed pgetcd never leaves a Postgres behind, restarted ones included.
//! - The running postmaster's pid is published in [`Shared`] only while the child is
//!   unreaped: the keeper sees the exit with `waitid(WNOWAIT)`, clears the pid under
//!   the state lock, and only then reaps. Signals are sent under the same lock, so
//!   they never reach a recycled pid.
//! - [`Shared::stop`] sets `stopping` under that lock before it signals: from then on
//!   the keeper starts nothing and takes the next exit as the requested one. A stop
//!   during a back-off wakes the keeper at once. A clean shutdown therefore stops the
//!   supervisor before the postmaster, and never races a restart.
//! - Start-up: the first postmaster must accept connections, or the start fails; it is
//!   never restarted before that (a bad configuration fails loudly, not in a loop).
//! - After an unexpected exit (any signal, `kill -9` included, or any exit status):
//!   log it; back off ([`RestartPolicy`]: doubling, reset once a postmaster stayed up
//!   long enough); wait for the dead postmaster's children to exit; remove lock files
//!   whose pid is dead; start Postgres again (it runs crash recovery from its WAL) and
//!   log once it accepts connections. A failed restart is retried after the next
//!   back-off, until stopped.
//! - Why wait for the children: a backend of a killed postmaster keeps running (and
//!   can still commit, flushing WAL itself) until it notices the death, which idle
//!   ones do at once. Postgres refuses to start while any of them still holds the old
//!   shared memory, and a new postmaster must not run recovery beside them. Children
//!   are found by their working directory (Postgres runs in its data directory) and
//!   by the old segment's attach count; those still there after [`ORPHAN_GRACE`] are
//!   killed (the postmaster would have killed them in its own crash handling).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::Error;

/// How long the children of a dead postmaster get to exit on their own before they
/// are killed, and again after that before the restart attempt fails.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(5);
/// Polling interval while waiting for old children to exit.
const POLL: Duration = Duration::from_millis(20);
/// Polling interval while waiting for a postmaster to accept connections (each poll
/// runs `pg_isready`).
const READY_POLL: Duration = Duration::from_millis(50);

/// When a supervised cluster's postmaster is restarted after an unexpected exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Wait before the first restart after a death.
    pub initial_backoff: Duration,
    /// The wait doubles with each restart attempt up to this.
    pub max_backoff: Duration,
    /// A postmaster that stayed up this long resets the wait (and the attempt count).
    pub reset_after: Duration,
}

/// 100 ms doubling to 5 s, reset after 30 s up.
pub const DEFAULT_RESTART_POLICY: RestartPolicy = RestartPolicy {
    initial_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_secs(5),
    reset_after: Duration::from_secs(30),
};

impl Default for RestartPolicy {
    fn default() -> Self {
        DEFAULT_RESTART_POLICY
    }
}

/// Everything needed to start one postmaster.
pub(crate) struct Launch {
    /// The postmaster command (a fresh one each start).
    pub command: Box<dyn Fn() -> Result<Command, Error> + Send>,
    /// `pg_isready` with the cluster's socket, port and user.
    pub ready_check: Box<dyn Fn() -> Command + Send>,
    /// The data directory, resolved (what `/proc/<pid>/cwd` of its processes shows).
    pub data_dir: PathBuf,
    /// Lock files a dead postmaster leaves: the data directory's and the socket's.
    pub lock_files: Vec<PathBuf>,
    /// The server log (named in errors).
    pub log_file: PathBuf,
}

impl Launch {
    fn accepting(&self) -> bool {
        (self.ready_check)()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

#[derive(Default)]
struct State {
    /// The running, unreaped postmaster.
    pid: Option<u32>,
    /// The newest postmaster's pid.
    last_pid: u32,
    /// A stop was asked for: start nothing more.
    stopping: bool,
    /// The keeper is gone: no postmaster runs and none will.
    done: bool,
    /// Successful restarts.
    restarts: u64,
}

/// State shared by the keeper thread and the [`crate::LocalPostgres`] handle.
#[derive(Default)]
pub(crate) struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest postmaster's pid.
    pub fn pid(&self) -> u32 {
        self.lock().last_pid
    }

    /// How many times the postmaster was restarted.
    pub fn restarts(&self) -> u64 {
        self.lock().restarts
    }

    /// Sends `signal` to the running postmaster, if one runs.
    pub fn signal(&self, signal: i32) {
        let st = self.lock();
        if let Some(pid) = st.pid {
            send(pid, signal);
        }
    }

    /// Stops supervising, asks the postmaster for a fast shutdown and waits up to
    /// `limit` for the keeper to finish; then kills the postmaster.
    pub fn stop(&self, limit: Duration) {
        {
            let mut st = self.lock();
            st.stopping = true;
            if let Some(pid) = st.pid {
                send(pid, libc::SIGINT);
            }
        }
        self.changed.notify_all();
        if !self.wait_done(limit) {
            let st = self.lock();
            if let Some(pid) = st.pid {
                warn!(pid, "postgres did not stop in {limit:?}, killing it");
                send(pid, libc::SIGKILL);
            }
            drop(st);
            self.wait_done(Duration::from_secs(5));
        }
    }

    fn wait_done(&self, limit: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self
            .changed
            .wait_timeout_while(st, limit, |s| !s.done)
            .unwrap_or_else(|p| p.into_inner());
        st.done
    }

    fn stopping(&self) -> bool {
        self.lock().stopping
    }

    /// Sleeps `d` unless a stop comes first; false when stopping.
    fn pause(&self, d: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self
            .changed
            .wait_timeout_while(st, d, |s| !s.stopping)
            .unwrap_or_else(|p| p.into_inner());
        !st.stopping
    }

    /// Forks a postmaster and publishes its pid, unless stopping (None).
    fn spawn(&self, launch: &Launch) -> Result<Option<Child>, Error> {
        let mut st = self.lock();
        if st.stopping {
            return Ok(None);
        }
        let child = (launch.command)()?.spawn().map_err(|source| Error::Io {
            what: "starting postgres".into(),
            source,
        })?;
        st.pid = Some(child.id());
        st.last_pid = child.id();
        Ok(Some(child))
    }

    /// Unpublishes the exited `child`, then reaps it: its exit status.
    fn reap(&self, child: &mut Child) -> String {
        self.lock().pid = None;
        match child.wait() {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown ({e})"),
        }
    }

    /// Waits until `child` exits: its exit status.
    fn until_exit(&self, child: &mut Child) -> String {
        exited(child.id(), true);
        self.reap(child)
    }

    /// Waits until `child` accepts connections (Ok) or exits (its status).
    fn until_ready(&self, child: &mut Child, launch: &Launch) -> Result<(), String> {
        loop {
            if exited(child.id(), false) {
                return Err(self.reap(child));
            }
            if launch.accepting() {
                return Ok(());
            }
            thread::sleep(READY_POLL);
        }
    }
}

/// Marks the keeper done however it ends.
struct Done(Arc<Shared>);

impl Drop for Done {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.done = true;
        st.pid = None;
        drop(st);
        self.0.changed.notify_all();
    }
}

/// Starts the keeper thread: it forks the first postmaster and reports on `started`
/// once that accepts connections (or why not), then keeps (with `policy`, restarts)
/// it until stopped.
pub(crate) fn start_keeper(
    shared: Arc<Shared>,
    launch: Launch,
    policy: Option<RestartPolicy>,
    started: mpsc::Sender<Result<(), Error>>,
) -> Result<(), Error> {
    thread::Builder::new()
        .name("postgres-keeper".into())
        .spawn(move || {
            let done = Done(shared);
            keep(&done.0, &launch, policy, &started);
        })
        .map(|_| ())
        .map_err(|source| Error::Io {
            what: "spawning the postgres keeper thread".into(),
            source,
        })
}

fn keep(
    shared: &Shared,
    launch: &Launch,
    policy: Option<RestartPolicy>,
    started: &mpsc::Sender<Result<(), Error>>,
) {
    let mut child = match shared.spawn(launch) {
        Ok(Some(child)) => child,
        Ok(None) => {
            let _ = started.send(Err(Error::Command {
                what: "postgres".into(),
                detail: "stopped during start-up".into(),
            }));
            return;
        }
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    if let Err(status) = shared.until_ready(&mut child, launch) {
        let _ = started.send(Err(Error::Command {
            what: "postgres".into(),
            detail: format!(
                "exited during start-up ({status}); see its log at {}",
                launch.log_file.display()
            ),
        }));
        return;
    }
    let _ = started.send(Ok(()));
    let mut backoff = policy.map_or(Duration::ZERO, |p| p.initial_backoff);
    let mut attempt: u32 = 0;
    let mut up_since = Instant::now();
    loop {
        let pid = child.id();
        let status = shared.until_exit(&mut child);
        if shared.stopping() {
            info!(pid, %status, "postgres stopped");
            return;
        }
        let Some(policy) = policy else {
            warn!(pid, %status, "postgres exited");
            return;
        };
        warn!(pid, %status, "managed PostgreSQL exited; restarting");
        if up_since.elapsed() >= policy.reset_after {
            backoff = policy.initial_backoff;
            attempt = 0;
        }
        child = loop {
            if !shared.pause(backoff) {
                return;
            }
            backoff = (backoff * 2).min(policy.max_backoff);
            attempt = attempt.saturating_add(1);
            let restarted = clear_remains(shared, launch, pid).and_then(|()| shared.spawn(launch));
            match restarted {
                Ok(Some(mut c)) => match shared.until_ready(&mut c, launch) {
                    Ok(()) => {
                        shared.lock().restarts += 1;
                        info!(pid = c.id(), attempt, "managed PostgreSQL restarted");
                        break c;
                    }
                    Err(_) if shared.stopping() => return,
                    Err(status) => warn!(
                        pid = c.id(),
                        attempt,
                        %status,
                        "restarted PostgreSQL exited during start-up; retrying"
                    ),
                },
                Ok(None) => return,
                Err(e) => {
                    warn!(attempt, error = %e, "restarting managed PostgreSQL failed; retrying")
                }
            }
        };
        up_since = Instant::now();
    }
}

/// Waits for what a dead postmaster (`dead`) left running to go, then removes its
/// stale lock files.
fn clear_remains(shared: &Shared, launch: &Launch, dead: u32) -> Result<(), Error> {
    let segment = shared_memory_id(&launch.data_dir);
    let mut killed = false;
    let mut deadline = Instant::now() + ORPHAN_GRACE;
    loop {
        // Someone else started a postmaster here meanwhile: its processes are no
        // orphans to kill.
        if let Some(other) = live_postmaster(&launch.data_dir).filter(|p| *p != dead) {
            return Err(Error::Command {
                what: "postgres".into(),
                detail: format!(
                    "another postmaster (pid {other}) runs in {}",
                    launch.data_dir.display()
                ),
            });
        }
        let orphans = orphans(&launch.data_dir);
        let attached = segment.and_then(attach_count).unwrap_or(0);
        if orphans.is_empty() && attached == 0 {
            break;
        }
        if Instant::now() >= deadline {
            if killed {
                return Err(Error::Command {
                    what: "postgres".into(),
                    detail: format!(
                        "processes of the dead postmaster {dead} still run ({orphans:?}; {attached} attached to its shared memory)"
                    ),
                });
            }
            warn!(
                dead,
                ?orphans,
                "children of the dead postmaster still run after {ORPHAN_GRACE:?}; killing them"
            );
            for pid in &orphans {
                send(*pid, libc::SIGKILL);
            }
            killed = true;
            deadline = Instant::now() + ORPHAN_GRACE;
        }
        if !shared.pause(POLL) {
            return Ok(());
        }
    }
    for file in &launch.lock_files {
        remove_stale_lock(file, &launch.data_dir)?;
    }
    Ok(())
}

/// Removes the lock file `path` when the process it names is dead (or its pid was
/// recycled: it is not Postgres, or Postgres of another data directory), or it names
/// none (a postmaster killed while writing it). Called once no process of the
/// cluster in `data_dir` runs.
fn remove_stale_lock(path: &Path, data_dir: &Path) -> Result<(), Error> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Io {
                what: format!("reading {}", path.display()),
                source,
            });
        }
    };
    let pid = lock_file_pid(&text);
    if pid.is_some_and(|pid| is_postgres(pid) && runs_in(pid, data_dir) != Some(false)) {
        return Ok(());
    }
    match fs::remove_file(path) {
        Ok(()) => {
            info!(path = %path.display(), ?pid, "removed stale PostgreSQL lock file");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            what: format!("removing {}", path.display()),
            source,
        }),
    }
}

/// The pid a Postgres lock file names (its first line).
pub(crate) fn lock_file_pid(text: &str) -> Option<u32> {
    text.lines()
        .next()?
        .trim()
        .parse()
        .ok()
        .filter(|p: &u32| *p > 0)
}

/// The shared memory segment id in `postmaster.pid` (line 7: key and id).
pub(crate) fn lock_file_segment(text: &str) -> Option<i64> {
    text.lines().nth(6)?.split_whitespace().nth(1)?.parse().ok()
}

/// The pid `postmaster.pid` names, when it is a live Postgres running in `data_dir`.
fn live_postmaster(data_dir: &Path) -> Option<u32> {
    let pid = lock_file_pid(&fs::read_to_string(data_dir.join("postmaster.pid")).ok()?)?;
    (is_postgres(pid) && runs_in(pid, data_dir) == Some(true)).then_some(pid)
}

fn shared_memory_id(data_dir: &Path) -> Option<i64> {
    lock_file_segment(&fs::read_to_string(data_dir.join("postmaster.pid")).ok()?)
}

/// Processes attached to System V segment `id` (None when the segment is gone).
fn attach_count(id: i64) -> Option<u64> {
    segment_attach_count(&fs::read_to_string("/proc/sysvipc/shm").ok()?, id)
}

/// `nattch` of segment `id` in the text of /proc/sysvipc/shm.
pub(crate) fn segment_attach_count(table: &str, id: i64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1)?.parse::<i64>().ok()? == id)
            .then(|| f.get(6)?.parse().ok())
            .flatten()
    })
}

/// Whether `pid` is a live Postgres process.
fn is_postgres(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == "postgres")
}

/// Whether `pid` runs in `dir` (None when its working directory cannot be read).
fn runs_in(pid: u32, dir: &Path) -> Option<bool> {
    fs::read_link(format!("/proc/{pid}/cwd"))
        .ok()
        .map(|cwd| cwd == dir)
}

/// Live Postgres processes running in `data_dir`: the children of a postmaster of
/// this cluster (Postgres changes into its data directory).
fn orphans(data_dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| is_postgres(pid) && runs_in(pid, data_dir) == Some(true))
        .collect()
}

/// Whether our child `pid` has exited, leaving it unreaped; with `block`, waits.
/// A pid that is no child of ours any more counts as exited.
#[allow(unsafe_code)]
fn exited(pid: u32, block: bool) -> bool {
    let flags = libc::WEXITED | libc::WNOWAIT | if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: siginfo_t is a plain C struct for which all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid only writes into `info`, which outlives the call.
        let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
        if rc == 0 {
            // SAFETY: waitid succeeded, so `info` is initialised; with WNOHANG and no
            // exited child its pid stays 0.
            return unsafe { info.si_pid() } != 0;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return true;
        }
    }
}

/// Sends `signal` to `pid`, logging a failure.
pub(crate) fn send(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if rc != 0 {
        warn!(pid, signal, "kill failed: {}", io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_fields() {
        let pid_file = "4242\n/data\n1700000000\n5432\n/run\n\n  5432001     32769\nready   \n";
        assert_eq!(lock_file_pid(pid_file), Some(4242));
        assert_eq!(lock_file_segment(pid_file), Some(32769));
        assert_eq!(lock_file_pid(""), None);
        assert_eq!(lock_file_pid("0\n"), None);
        assert_eq!(lock_file_pid("garbage\n"), None);
        assert_eq!(lock_file_segment("4242\n/data\n"), None);
    }

    #[test]
    fn attach_counts() {
        let table = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n\
  10657863     262145   600                    56 22816 22826      3   101   104   101   104 1796170602 1796170605 1796170602                  4096                     0\n";
        assert_eq!(segment_attach_count(table, 262145), Some(3));
        assert_eq!(segment_attach_count(table, 1), None);
        assert_eq!(segment_attach_count("", 1), None);
    }

    #[test]
    fn stale_lock_files_are_removed() {
        let dir = std::env::temp_dir().join(format!("pgetcd-localpg-lock-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let stale = dir.join("stale.pid");
        // Not a Postgres process: this test binary.
        fs::write(&stale, format!("{}\n", std::process::id())).expect("write");
        remove_stale_lock(&stale, &dir).expect("remove");
        assert!(!stale.exists());
        let empty = dir.join("empty.pid");
        fs::write(&empty, "").expect("write");
        remove_stale_lock(&empty, &dir).expect("remove");
        assert!(!empty.exists());
        remove_stale_lock(&dir.join("missing.pid"), &dir).expect("missing is fine");
        let _ = fs::remove_dir_all(&dir);
    }
}
