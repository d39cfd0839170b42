//! Managed mode's PostgreSQL killed with SIGKILL under load, twice: pgetcd restarts
//! it by itself, writes and watches resume, every acknowledged write survives with its
//! revision, the revision space has no holes or repeats, and every watcher sees every
//! revision exactly once, in order.
//!
//! pgetcd runs as the binary (its own process, its own managed cluster under a
//! temporary `--data-dir`), so killing the postmaster cannot disturb this process and
//! its log can be read back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use pgetcd_proto::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest};
use pgetcd_testkit::Clients;
use pgetcd_testkit::watch::TestWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Concurrent writers.
const WRITERS: usize = 4;
/// Postmaster kills during the load.
const KILLS: usize = 2;
/// Longest a kill may keep writes (and /health) down.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// Load before the first kill, between kills and after the last recovery.
const LOAD_BETWEEN: Duration = Duration::from_secs(3);
/// A put that takes longer counts as failed (outcome unknown).
const PUT_TIMEOUT: Duration = Duration::from_secs(10);

/// The pgetcd process; killed (with its Postgres, by the parent-death signal) when a
/// failed assertion unwinds past it.
struct Pgetcd(Child);

impl Drop for Pgetcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The postmaster pid from the first line of `postmaster.pid`, if the file is there.
fn postmaster_pid(cluster: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(cluster.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// GET /health on `addr`: true when it says `"health":"true"`.
async fn healthy(addr: &str) -> bool {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        Some(String::from_utf8_lossy(&body).contains("\"health\":\"true\""))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), get).await,
        Ok(Some(true))
    )
}

/// What the writers saw.
#[derive(Default)]
struct Log {
    /// Acknowledged puts: key → revision.
    acked: BTreeMap<String, i64>,
    /// Keys whose put failed or timed out: may or may not have been applied.
    unknown: BTreeSet<String>,
    /// When each put was acknowledged.
    ack_times: Vec<Instant>,
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The last lines of pgetcd's log, for failure messages.
fn log_tail(path: &Path) -> String {
    let text = log_text(path);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_managed_postgres_is_restarted_and_loses_no_acknowledged_write_or_event() {
    kill_postmaster_under_load("supervised", &[]).await;
}

/// The same with the replication stream as the only source of watch events: the
/// feed must resume the stream from its slot after each restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_managed_postgres_is_restarted_and_the_wal_watch_feed_resumes() {
    kill_postmaster_under_load("supervised-wal", &["--watch-source", "wal"]).await;
}

/// Starts pgetcd (with `args`) in managed mode, runs the write load with two watchers,
/// kills the postmaster [`KILLS`] times, and checks everything.
async fn kill_postmaster_under_load(name: &str, args: &[&str]) {
    let started = Instant::now();
    let dir: PathBuf =
        std::env::temp_dir().join(format!("pgetcd-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data_dir = dir.join("data");
    // /tmp is open to others, so even as root the cluster lives under the data dir.
    let cluster = data_dir.join("postgres");
    let log_path = dir.join("pgetcd.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let port = pgetcd_localpg::free_port().unwrap();
    let metrics_port = pgetcd_localpg::free_port().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{metrics_port}");
    let child = Command::new(env!("CARGO_BIN_EXE_pgetcd"))
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--listen-client-urls", &url])
        .args(["--listen-metrics-urls", &format!("http://{metrics}")])
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let mut pgetcd = Pgetcd(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Some(status) = pgetcd.0.try_wait().unwrap() {
            panic!(
                "pgetcd exited before serving: {status}\n{}",
                log_tail(&log_path)
            );
        }
        assert!(Instant::now() < deadline, "pgetcd did not listen in 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{name}: pgetcd serving after {:?}", started.elapsed());

    // Managed Postgres must keep acknowledged commits across a crash.
    let socket = data_dir.join("run");
    let (pg, conn) = tokio_postgres::connect(
        &format!("host={} port=5432 user=postgres", socket.display()),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    for (name, want) in [
        ("fsync", "on"),
        ("synchronous_commit", "on"),
        ("full_page_writes", "on"),
    ] {
        let row = pg.query_one(&format!("SHOW {name}"), &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), want, "managed PostgreSQL {name}");
    }
    drop(pg);
    let _ = conn.await;

    let c = Clients::connect(&url).await;
    let start = c.clone().revision().await;
    // One watcher from revision 1, one from the current revision on.
    let mut watchers = Vec::new();
    for start_revision in [1, 0] {
        let w = TestWatch::open(&url).await;
        let created = w
            .create(WatchCreateRequest {
                key: Bytes::from_static(b"s/"),
                range_end: Bytes::from_static(b"s0"),
                start_revision,
                ..Default::default()
            })
            .await;
        watchers.push((w, created.watch_id));
    }

    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (mut c, log, stop) = (c.clone(), log.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            // Every attempt writes a key of its own, so a failed put that was applied
            // after all can never be mistaken for an acknowledged one.
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("s/{w}/{i}");
                i += 1;
                let put = c.kv.put(PutRequest {
                    key: Bytes::from(key.clone()),
                    value: Bytes::from(key.clone()),
                    ..Default::default()
                });
                match tokio::time::timeout(PUT_TIMEOUT, put).await {
                    Ok(Ok(r)) => {
                        let rev = r.into_inner().header.unwrap().revision;
                        let mut log = log.lock();
                        assert!(log.acked.insert(key, rev).is_none());
                        log.ack_times.push(Instant::now());
                    }
                    Ok(Err(_)) | Err(_) => {
                        log.lock().unknown.insert(key);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }

    tokio::time::sleep(LOAD_BETWEEN).await;
    let mut killed = Vec::new();
    for kill in 0..KILLS {
        let pid = postmaster_pid(&cluster).expect("postmaster.pid");
        assert!(!killed.contains(&pid), "postmaster {pid} was killed before");
        let acked_before = log.lock().acked.len();
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -9 {pid}");
        let at = Instant::now();
        killed.push(pid);
        println!(
            "{name}: kill {kill}: SIGKILL to postmaster {pid} after {acked_before} acknowledged puts"
        );
        // Recovered: a put acknowledged after the kill, and /health true again.
        let mut saw_unhealthy = false;
        loop {
            let written = log.lock().ack_times.iter().any(|t| *t > at);
            let health = healthy(&metrics).await;
            saw_unhealthy |= !health;
            if written && health {
                break;
            }
            assert!(
                at.elapsed() < RECOVERY_LIMIT,
                "kill {kill}: writes or /health did not recover within {RECOVERY_LIMIT:?} \
                 (a put acknowledged since: {written}, healthy: {health})\n{}",
                log_tail(&log_path)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let new_pid = postmaster_pid(&cluster);
        println!(
            "{name}: kill {kill}: recovered in {:?} (unhealthy seen: {saw_unhealthy}, new postmaster {new_pid:?})",
            at.elapsed()
        );
        assert!(
            new_pid.is_some_and(|p| p != pid),
            "a new postmaster runs after kill {kill}"
        );
        tokio::time::sleep(LOAD_BETWEEN).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let mut c = c.clone();
    let log = std::mem::take(&mut *log.lock());
    // Every acknowledged write is readable with its acknowledged revision; what else
    // is there comes from a put whose outcome was unknown.
    let all =
        c.kv.range(RangeRequest {
            key: Bytes::from_static(b"s/"),
            range_end: Bytes::from_static(b"s0"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let last = all.header.as_ref().unwrap().revision;
    println!(
        "{name}: {} acknowledged puts, {} failed, revisions {}..={last}",
        log.acked.len(),
        log.unknown.len(),
        start + 1
    );
    assert!(log.acked.len() > 100, "the load ran");
    let stored: BTreeMap<String, i64> = all
        .kvs
        .iter()
        .map(|kv| {
            assert_eq!(kv.key, kv.value, "value written with the key");
            (String::from_utf8(kv.key.to_vec()).unwrap(), kv.mod_revision)
        })
        .collect();
    for (key, rev) in &log.acked {
        assert_eq!(
            stored.get(key),
            Some(rev),
            "acknowledged {key}@{rev} is readable with its revision"
        );
    }
    for key in stored.keys().filter(|k| !log.acked.contains_key(*k)) {
        assert!(log.unknown.contains(key), "{key} was never written");
    }
    // Each revision was made by exactly one put: contiguous, no duplicates.
    let mut revs: Vec<i64> = stored.values().copied().collect();
    revs.sort_unstable();
    assert_eq!(
        revs,
        (start + 1..=last).collect::<Vec<_>>(),
        "revisions {}..={last} contiguous, each once",
        start + 1
    );

    // Every watcher saw every revision exactly once, in order, with the stored key.
    let by_rev: BTreeMap<i64, &String> = stored.iter().map(|(k, r)| (*r, k)).collect();
    for (n, (w, id)) in watchers.iter().enumerate() {
        w.wait_progress(last).await;
        assert!(
            w.error.lock().is_none(),
            "watcher {n}: {:?}",
            w.error.lock()
        );
        let responses = w.responses();
        assert!(
            !responses.iter().any(|r| r.canceled),
            "watcher {n} was cancelled"
        );
        let events: Vec<(i64, String)> = responses
            .iter()
            .filter(|r| r.watch_id == *id)
            .flat_map(|r| r.events.iter())
            .filter(|e| e.kv.as_ref().unwrap().mod_revision <= last)
            .map(|e| {
                let kv = e.kv.as_ref().unwrap();
                (kv.mod_revision, String::from_utf8(kv.key.to_vec()).unwrap())
            })
            .collect();
        let want: Vec<(i64, String)> = by_rev.iter().map(|(r, k)| (*r, (*k).clone())).collect();
        assert_eq!(
            events.len(),
            want.len(),
            "watcher {n}: {} events for {} revisions",
            events.len(),
            want.len()
        );
        assert!(events == want, "watcher {n}: events differ from the store");
    }

    // The log tells of each death and each restart.
    let text = log_text(&log_path);
    for line in text.lines().filter(|l| {
        [
            "managed PostgreSQL",
            "commit outcome resolved",
            "watch feed streaming",
            "lock file",
        ]
        .iter()
        .any(|m| l.contains(m))
    }) {
        println!("{name}: log: {line}");
    }
    let deaths = text
        .matches("managed PostgreSQL exited; restarting")
        .count();
    let restarts = text.matches("managed PostgreSQL restarted").count();
    assert!(
        deaths >= KILLS && restarts >= KILLS,
        "{deaths} deaths and {restarts} restarts logged for {KILLS} kills\n{}",
        log_tail(&log_path)
    );

    // A clean shutdown stops the supervisor before Postgres: nothing is restarted, and
    // the postmaster removed its pid file on the way out.
    let _ = Command::new("kill").arg(pgetcd.0.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = pgetcd.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "pgetcd did not stop in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = log_text(&log_path);
    assert!(
        status.success(),
        "pgetcd stopped cleanly: {status}\n{}",
        log_tail(&log_path)
    );
    assert_eq!(
        text.matches("managed PostgreSQL restarted").count(),
        restarts,
        "no restart during shutdown\n{}",
        log_tail(&log_path)
    );
    assert!(
        !cluster.join("postmaster.pid").exists(),
        "PostgreSQL stopped with pgetcd"
    );
    println!("{name}: done in {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}
