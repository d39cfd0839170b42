//! The supervision of a local cluster against a real Postgres: a postmaster killed
//! with SIGKILL is restarted (its orphaned children gone, its stale lock files
//! handled), a stop ends the supervision before the postmaster, and a stop during a
//! back-off restarts nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pgetcd_localpg::{LocalPostgres, Options, RestartPolicy, find_bindir, free_port};

fn options(name: &str) -> (PathBuf, Options) {
    let dir = std::env::temp_dir().join(format!("pgetcd-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let opts = Options {
        data_dir: dir.join("data"),
        socket_dir: dir.join("run"),
        port: free_port().unwrap(),
        listen_tcp: false,
        settings: vec![("fsync".into(), "off".into())],
        log_file: dir.join("postgres.log"),
    };
    (dir, opts)
}

fn accepting(opts: &Options) -> bool {
    Command::new(find_bindir().unwrap().join("pg_isready"))
        .arg("-q")
        .arg("-h")
        .arg(&opts.socket_dir)
        .arg("-p")
        .arg(opts.port.to_string())
        .status()
        .is_ok_and(|s| s.success())
}

/// Postgres processes whose working directory is `data_dir`.
fn cluster_processes(data_dir: &Path) -> Vec<u32> {
    let data_dir = data_dir.canonicalize().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end() == "postgres")
                && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == data_dir)
        })
        .collect()
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_postmaster_is_restarted_until_stopped() {
    let (dir, opts) = options("supervise");
    let mut pg = LocalPostgres::start_supervised(opts.clone(), RestartPolicy::default()).unwrap();
    for round in 1..=2 {
        let old = pg.pid();
        pg.signal(libc::SIGKILL);
        wait_until(Duration::from_secs(30), "restarted", || {
            pg.restarts() == round && accepting(&opts)
        });
        assert_ne!(pg.pid(), old, "a new postmaster");
        let pid_file = std::fs::read_to_string(opts.data_dir.join("postmaster.pid")).unwrap();
        assert_eq!(pid_file.lines().next(), Some(pg.pid().to_string().as_str()));
    }
    let log = std::fs::read_to_string(&opts.log_file).unwrap();
    assert!(
        log.contains("database system was interrupted") || log.contains("crash recovery"),
        "the restart ran crash recovery:\n{log}"
    );
    pg.stop();
    assert_eq!(pg.restarts(), 2, "no restart during stop");
    assert!(
        !opts.data_dir.join("postmaster.pid").exists(),
        "clean shutdown"
    );
    assert!(cluster_processes(&opts.data_dir).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stop_during_the_back_off_restarts_nothing() {
    let (dir, opts) = options("supervise-stop");
    let policy = RestartPolicy {
        initial_backoff: Duration::from_secs(10),
        ..RestartPolicy::default()
    };
    let mut pg = LocalPostgres::start_supervised(opts.clone(), policy).unwrap();
    pg.signal(libc::SIGKILL);
    wait_until(Duration::from_secs(10), "postmaster gone", || {
        !accepting(&opts)
    });
    let started = Instant::now();
    pg.stop();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "stop wakes the back-off"
    );
    assert_eq!(pg.restarts(), 0);
    // The killed postmaster's children leave by themselves; nothing new came up.
    wait_until(Duration::from_secs(10), "old children gone", || {
        cluster_processes(&opts.data_dir).is_empty()
    });
    assert!(!accepting(&opts));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unsupervised_postmaster_stays_down() {
    let (dir, opts) = options("unsupervised");
    let mut pg = LocalPostgres::start(opts.clone()).unwrap();
    pg.signal(libc::SIGKILL);
    wait_until(Duration::from_secs(10), "postmaster gone", || {
        !accepting(&opts)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!accepting(&opts));
    assert_eq!(pg.restarts(), 0);
    pg.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
