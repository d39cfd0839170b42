//! Three pgetcd processes on one keyspace under write load: the writer is killed with
//! SIGKILL five times (`PGETCD_HA_KILLS`; and restarted, as a follower), then paused with SIGSTOP until
//! another instance takes over and resumed. Every acknowledged write must be there at
//! its revision, revisions must be unique, and the paused writer must answer nothing
//! stale and commit nothing once resumed. Prints the take-over times.
//!
//! A watcher on every instance follows the whole test, as an etcd client does: when its
//! instance is killed it reconnects to the same instance once it serves again and
//! resumes from the last revision it saw + 1. Every write of the test is a put under
//! [`PREFIX`] (the load's clients overwrite [`LOAD_KEYS`] keys), so each watcher
//! must see every revision of the keyspace exactly once, in order, each event equal to
//! the write acknowledged at its revision, with the key's previous version as prev_kv.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use pgetcd_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseTimeToLiveRequest, MemberListRequest, PutRequest, RangeRequest,
    StatusRequest, WatchCreateRequest, WatchRequest, cluster_client::ClusterClient,
    kv_client::KvClient, lease_client::LeaseClient, maintenance_client::MaintenanceClient,
    watch_client::WatchClient, watch_request::RequestUnion,
};
use pgetcd_proto::mvccpb::{Event, KeyValue, event::EventType};
use pgetcd_testkit::{fresh_keyspace, postgres_url};
use tonic::transport::{Channel, Endpoint};

/// Prints a step of the test with the wall clock (UTC, as in pgetcd's logs), to line
/// it up with the processes' logs when something fails.
fn timeline(what: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let secs = now.as_secs() % 86_400;
    println!(
        "{:02}:{:02}:{:02}.{:03} {what}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_millis()
    );
}

struct Instance {
    name: String,
    url: String,
    metrics: u16,
    child: Option<Child>,
}

impl Instance {
    /// Starts the process; with `PGETCD_HA_LOGS=dir`, its info log is appended to
    /// `dir/<name>.log` (else only warnings, dropped).
    fn start(&mut self, keyspace: &str) {
        let (level, out) = match std::env::var_os("PGETCD_HA_LOGS") {
            Some(dir) => {
                let path = std::path::Path::new(&dir).join(format!("{}.log", self.name));
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap();
                ("info", Stdio::from(file))
            }
            None => ("warn", Stdio::null()),
        };
        timeline(&format!("{} starts", self.name));
        let child = Command::new(env!("CARGO_BIN_EXE_pgetcd"))
            .args(["--name", &self.name])
            .args(["--postgres-url", &postgres_url()])
            .args(["--keyspace", keyspace])
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", self.metrics),
            ])
            .args(["--read-pool-size", "2"])
            .env("PGETCD_LOG", level)
            .stdin(Stdio::null())
            .stdout(out)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn signal(&self, sig: &str) {
        timeline(&format!(
            "{} gets SIG{}",
            self.name,
            sig.trim_start_matches('-')
        ));
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.pid());
    }

    fn kill(&mut self) {
        self.signal("-KILL");
        let _ = self.child.take().unwrap().wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(3))
        .connect_lazy()
}

async fn wait_serving(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = KvClient::new(channel(url))
            .range(RangeRequest {
                key: Bytes::from_static(b"/"),
                serializable: true,
                ..Default::default()
            })
            .await;
        if r.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "{url} did not serve: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The name of the instance that writes now, as `url`'s instance sees it.
async fn writer_name(url: &str) -> Option<String> {
    let status = MaintenanceClient::new(channel(url))
        .status(StatusRequest::default())
        .await
        .ok()?
        .into_inner();
    let members = ClusterClient::new(channel(url))
        .member_list(MemberListRequest::default())
        .await
        .ok()?
        .into_inner()
        .members;
    members
        .into_iter()
        .find(|m| m.id == status.leader && status.leader != 0)
        .map(|m| m.name)
}

/// Every key of the test is under this prefix.
const PREFIX: &[u8] = b"/ha/";
/// The end of [`PREFIX`]'s range.
const PREFIX_END: &[u8] = b"/ha0";
/// The load puts these many keys in turn, so most puts overwrite a key (prev_kv).
const LOAD_KEYS: usize = 10;
/// Concurrent clients of the load.
const LOAD_WORKERS: usize = 4;

/// Acknowledged writes by revision: key and value.
type Acked = Arc<Mutex<BTreeMap<i64, (Bytes, Bytes)>>>;

/// Records an acknowledged put; a revision acknowledged twice fails the test.
fn ack(acked: &Acked, rev: i64, key: Bytes, value: Bytes) {
    if let Some(before) = acked.lock().insert(rev, (key.clone(), value)) {
        panic!("revision {rev} acknowledged twice: {before:?} and {key:?}");
    }
}

/// [`LOAD_WORKERS`] clients put round-robin over `urls` until `stop`, each put a new
/// value of one of [`LOAD_KEYS`] keys; records what was acknowledged, and when the last
/// acknowledgement came. Returns every (value, key) sent, acknowledged or not (a put
/// that failed may still have committed).
async fn load(
    urls: Vec<String>,
    acked: Acked,
    last_ack: Arc<Mutex<Instant>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> BTreeMap<Bytes, Bytes> {
    let sent: Arc<Mutex<BTreeMap<Bytes, Bytes>>> = Arc::default();
    let workers: Vec<_> = (0..LOAD_WORKERS)
        .map(|w| {
            let clients: Vec<KvClient<Channel>> =
                urls.iter().map(|u| KvClient::new(channel(u))).collect();
            let (acked, last_ack, stop, sent) =
                (acked.clone(), last_ack.clone(), stop.clone(), sent.clone());
            tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = i * LOAD_WORKERS + w;
                    let key = Bytes::from(format!("/ha/load/{:02}", n % LOAD_KEYS));
                    let value = Bytes::from(format!("v{n}"));
                    sent.lock().insert(value.clone(), key.clone());
                    let mut c = clients[n % clients.len()].clone();
                    let r = c
                        .put(PutRequest {
                            key: key.clone(),
                            value: value.clone(),
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(resp) => {
                            ack(
                                &acked,
                                resp.into_inner().header.unwrap().revision,
                                key,
                                value,
                            );
                            *last_ack.lock() = Instant::now();
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    std::mem::take(&mut *sent.lock())
}

/// The TTL of the lease kept alive across the pause (seconds).
/// Long enough that the keepalives, which go on to the paused instance only (as a
/// client pinned to one endpoint), reach the new writer through it within a TTL of the
/// take-over on a loaded machine: the instance must first resume, find itself fenced
/// and follow.
const LEASE_TTL: i64 = 10;

use pgetcd_testkit::keepalive::{KeepAlives, keep_alive};

/// What one instance's watcher saw.
#[derive(Default)]
struct Seen {
    events: Vec<Event>,
    /// Streams that failed or ended once open.
    broken: usize,
    /// Attempts to open a stream again (the instance may still be down).
    reconnects: usize,
    /// Responses no watcher of this test may get (cancels).
    failures: Vec<String>,
}

impl Seen {
    fn last_revision(&self) -> Option<i64> {
        self.events
            .last()
            .map(|e| e.kv.as_ref().unwrap().mod_revision)
    }
}

/// Watches [`PREFIX`] with prev_kv on `url` from `start` until `stop`, as an etcd client
/// does: a stream that fails (its instance was killed) is opened again on the same
/// instance, once it serves, from the last revision seen + 1.
async fn watcher(
    url: String,
    start: i64,
    seen: Arc<Mutex<Seen>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let endpoint = Endpoint::from_shared(url.clone())
        .unwrap()
        .connect_timeout(Duration::from_millis(500));
    let mut first = true;
    loop {
        if !first {
            seen.lock().reconnects += 1;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        first = false;
        let from = seen.lock().last_revision().map_or(start, |r| r + 1);
        let Ok(ch) = endpoint.connect().await else {
            continue;
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: Bytes::from_static(PREFIX),
                range_end: Bytes::from_static(PREFIX_END),
                start_revision: from,
                prev_kv: true,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut client = WatchClient::new(ch).max_decoding_message_size(usize::MAX);
        let call = client.watch(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut inbound = tokio::select! {
            r = call => match r {
                Ok(s) => s.into_inner(),
                Err(_) => continue,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        loop {
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Ok(Some(resp)) = msg else {
                seen.lock().broken += 1;
                break;
            };
            let mut s = seen.lock();
            if resp.canceled {
                s.failures.push(format!(
                    "watch from {from} cancelled: compact_revision {}, reason {:?}",
                    resp.compact_revision, resp.cancel_reason
                ));
                return;
            }
            s.events.extend(resp.events);
        }
        // The request stream stays open until the response stream ended.
        drop(tx);
    }
}

/// Fails the check it is in with a message, unless `cond`.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Checks one watcher's events: every revision in `first..=last` exactly once, in
/// order; each a put under [`PREFIX`] equal to the write acknowledged at its revision
/// (else to a value the load sent), with the key's previous version as prev_kv. The
/// first thing wrong, if any.
fn check_history(
    seen: &Seen,
    first: i64,
    last: i64,
    acked: &BTreeMap<i64, (Bytes, Bytes)>,
    sent: &BTreeMap<Bytes, Bytes>,
) -> Result<(), String> {
    ensure!(seen.failures.is_empty(), "{:?}", seen.failures);
    let mut latest: BTreeMap<Bytes, KeyValue> = BTreeMap::new();
    let mut want = first;
    for e in &seen.events {
        let kv = e.kv.as_ref().unwrap();
        let rev = kv.mod_revision;
        ensure!(rev == want, "event at revision {rev}, expected {want}");
        want += 1;
        ensure!(e.r#type == EventType::Put as i32, "revision {rev}: {e:?}");
        ensure!(kv.key.starts_with(PREFIX), "revision {rev}: {kv:?}");
        match acked.get(&rev) {
            Some((key, value)) => ensure!(
                (&kv.key, &kv.value) == (key, value),
                "revision {rev} is {kv:?}, not the acknowledged write {key:?} = {value:?}"
            ),
            // Not acknowledged (the put failed, its outcome unknown, or a probe whose
            // answer was lost): it must be a put the test sent.
            None => ensure!(
                sent.get(&kv.value) == Some(&kv.key) || kv.key.starts_with(b"/ha/probe/"),
                "revision {rev}: a write nobody sent: {kv:?}"
            ),
        }
        let prev = latest.insert(kv.key.clone(), kv.clone());
        ensure!(
            e.prev_kv == prev,
            "prev_kv at revision {rev} is {:?}, the key's previous event {prev:?}",
            e.prev_kv
        );
        match prev {
            Some(p) => ensure!(
                kv.version == p.version + 1 && kv.create_revision == p.create_revision,
                "revision {rev}: {kv:?} after {p:?}"
            ),
            None => ensure!(
                kv.version == 1 && kv.create_revision == rev,
                "revision {rev}: {kv:?} is the key's first event"
            ),
        }
    }
    ensure!(
        want - 1 == last,
        "events end at {}, expected {last}",
        want - 1
    );
    Ok(())
}

/// The current revision as `url`'s instance answers a linearizable read, retried.
async fn current_revision(url: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = KvClient::new(channel(url))
            .range(RangeRequest {
                key: Bytes::from_static(PREFIX),
                count_only: true,
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => return r.into_inner().header.unwrap().revision,
            Err(e) => assert!(Instant::now() < deadline, "{url}: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `seen` got every event up to `revision` (30 s at most).
async fn wait_seen(who: &str, seen: &Mutex<Seen>, revision: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        {
            let s = seen.lock();
            assert!(s.failures.is_empty(), "{who}: {:?}", s.failures);
            if s.last_revision().unwrap_or(0) >= revision {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{who}: events stop at {:?}, expected up to {revision} ({} reconnects)",
                s.last_revision(),
                s.reconnects
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_killed_five_times_and_paused_once_loses_nothing() {
    let keyspace = fresh_keyspace();
    let mut instances: Vec<Instance> = (0..3)
        .map(|i| Instance {
            name: format!("n{i}"),
            url: format!("http://127.0.0.1:{}", pgetcd_localpg::free_port().unwrap()),
            metrics: pgetcd_localpg::free_port().unwrap(),
            child: None,
        })
        .collect();
    for inst in &mut instances {
        inst.start(&keyspace);
        wait_serving(&inst.url).await;
    }
    let urls: Vec<String> = instances.iter().map(|i| i.url.clone()).collect();
    // A watcher on every instance from the start (the keyspace is empty, at revision 1).
    assert_eq!(current_revision(&urls[0]).await, 1);
    let (stop_watchers, stop_rx) = tokio::sync::watch::channel(false);
    let seen: Vec<Arc<Mutex<Seen>>> = urls.iter().map(|_| Arc::default()).collect();
    let watchers: Vec<_> = urls
        .iter()
        .zip(&seen)
        .map(|(u, s)| tokio::spawn(watcher(u.clone(), 1, s.clone(), stop_rx.clone())))
        .collect();
    let acked: Acked = Arc::default();
    let last_ack = Arc::new(Mutex::new(Instant::now()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load_task = tokio::spawn(load(
        urls.clone(),
        acked.clone(),
        last_ack.clone(),
        stop.clone(),
    ));

    let mut take_overs = Vec::new();
    // PGETCD_HA_KILLS=N kills the writer N times instead (to measure the distribution).
    let kills: usize = std::env::var("PGETCD_HA_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    for round in 0..kills {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let name = writer_name(&urls[round % 3]).await.expect("a writer");
        let victim = instances.iter().position(|i| i.name == name).unwrap();
        let killed = Instant::now();
        instances[victim].kill();
        // Until a write sent after the kill, through a surviving instance, is
        // acknowledged.
        let survivor = &instances[(victim + 1) % 3].url;
        let mut kv = KvClient::new(channel(survivor));
        let probe = Bytes::from(format!("/ha/probe/{round}"));
        let took = loop {
            let r = kv
                .put(PutRequest {
                    key: probe.clone(),
                    value: Bytes::from_static(b"v"),
                    ..Default::default()
                })
                .await;
            if let Ok(resp) = r {
                let rev = resp.into_inner().header.unwrap().revision;
                ack(&acked, rev, probe, Bytes::from_static(b"v"));
                timeline(&format!(
                    "round {round}: probe acknowledged at revision {rev}"
                ));
                break killed.elapsed();
            }
            assert!(
                killed.elapsed() < Duration::from_secs(15),
                "round {round}: no take-over"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        take_overs.push(took);
        instances[victim].start(&keyspace);
        wait_serving(&instances[victim].url).await;
    }

    // Pause the writer until another instance writes, then resume it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let name = writer_name(&urls[0]).await.expect("a writer");
    let paused = instances.iter().position(|i| i.name == name).unwrap();
    // A lease (no keys, so no revision) kept alive on a stream to the writer, opened
    // before the pause and used on after it resumed, as by a client on that endpoint.
    let lease = LeaseClient::new(channel(&instances[paused].url))
        .lease_grant(LeaseGrantRequest {
            ttl: LEASE_TTL,
            id: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let keep_alives: KeepAlives = Arc::default();
    let (stop_keeper, stop_rx) = tokio::sync::watch::channel(false);
    let keeper = tokio::spawn(keep_alive(
        instances[paused].url.clone(),
        lease,
        keep_alives.clone(),
        stop_rx,
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    instances[paused].signal("-STOP");
    let stopped_at = Instant::now();
    let before = acked.lock().len();
    loop {
        if *last_ack.lock() > stopped_at + Duration::from_millis(100) && acked.lock().len() > before
        {
            break;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(15),
            "no take-over from a paused writer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let other = (paused + 1) % 3;
    let mut kv_other = KvClient::new(channel(&instances[other].url));
    let fresh = loop {
        let r = kv_other
            .put(PutRequest {
                key: Bytes::from_static(b"/ha/fresh"),
                value: Bytes::from_static(b"after the pause"),
                ..Default::default()
            })
            .await;
        match r {
            Ok(resp) => {
                let rev = resp.into_inner().header.unwrap().revision;
                ack(
                    &acked,
                    rev,
                    Bytes::from_static(b"/ha/fresh"),
                    Bytes::from_static(b"after the pause"),
                );
                timeline(&format!("after the pause: /ha/fresh acknowledged at {rev}"));
                break rev;
            }
            Err(e) => {
                assert!(stopped_at.elapsed() < Duration::from_secs(20), "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    instances[paused].signal("-CONT");
    let resumed = Instant::now();
    // Straight after resuming: a linearizable read is refused or fresh, never stale.
    let got = KvClient::new(channel(&instances[paused].url))
        .range(RangeRequest {
            key: Bytes::from_static(b"/ha/fresh"),
            ..Default::default()
        })
        .await;
    match got {
        Ok(r) => {
            let r = r.into_inner();
            assert_eq!(
                r.kvs.len(),
                1,
                "a stale read from the resumed writer (revision {})",
                r.header.unwrap().revision
            );
            assert_eq!(r.kvs[0].mod_revision, fresh);
        }
        Err(status) => println!("resumed writer refused a linearizable read: {status:?}"),
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let sent = load_task.await.unwrap();
    let acked = acked.lock().clone();

    // Every watcher, resumed after each kill of its instance, saw every revision of the
    // keyspace once, in order, with the acknowledged values and their prev_kv.
    let mut last = 0;
    for inst in &instances {
        wait_serving(&inst.url).await;
        last = last.max(current_revision(&inst.url).await);
    }
    assert!(
        acked.last_key_value().is_some_and(|(rev, _)| *rev <= last),
        "an acknowledged revision above the current {last}"
    );
    for (inst, s) in instances.iter().zip(&seen) {
        wait_seen(&inst.name, s, last).await;
    }
    // Anything past the last revision would arrive now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_watchers.send(true);
    for w in watchers {
        w.await.unwrap();
    }
    let seen: Vec<Seen> = seen
        .into_iter()
        .map(|s| std::mem::take(&mut *s.lock()))
        .collect();
    let wrong: Vec<String> = instances
        .iter()
        .zip(&seen)
        .filter_map(|(inst, s)| {
            check_history(s, 2, last, &acked, &sent)
                .err()
                .map(|e| format!("watcher on {}: {e}", inst.name))
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    for s in &seen[1..] {
        assert!(
            s.events == seen[0].events,
            "the watchers saw different events"
        );
    }
    let broken: Vec<usize> = seen.iter().map(|s| s.broken).collect();
    let reconnects: Vec<usize> = seen.iter().map(|s| s.reconnects).collect();
    println!(
        "watchers: revisions 2..={last} ({} events each), streams broken {broken:?} times, \
         attempts to open them again {reconnects:?}",
        seen[0].events.len()
    );
    assert!(
        broken.iter().sum::<usize>() >= kills,
        "{kills} kills but the watchers' streams broke {broken:?} times"
    );

    // The history again, read by a new watcher from the start on every instance, and
    // every instance's keys are the last events' versions: nothing acknowledged is lost.
    let mut state: BTreeMap<Bytes, KeyValue> = BTreeMap::new();
    for e in &seen[0].events {
        let kv = e.kv.clone().unwrap();
        state.insert(kv.key.clone(), kv);
    }
    for inst in &instances {
        let again: Arc<Mutex<Seen>> = Arc::default();
        let (stop_again, stop_rx) = tokio::sync::watch::channel(false);
        let w = tokio::spawn(watcher(inst.url.clone(), 1, again.clone(), stop_rx));
        let who = format!("new watcher on {}", inst.name);
        wait_seen(&who, &again, last).await;
        let _ = stop_again.send(true);
        w.await.unwrap();
        let again = std::mem::take(&mut *again.lock());
        if let Err(e) = check_history(&again, 2, last, &acked, &sent) {
            panic!("{who}: {e}");
        }
        assert_eq!(again.broken, 0, "{who}");
        assert!(
            again.events == seen[0].events,
            "{who}: not the events seen live"
        );

        let kvs = KvClient::new(channel(&inst.url))
            .max_decoding_message_size(usize::MAX)
            .range(RangeRequest {
                key: Bytes::from_static(b"/"),
                range_end: Bytes::from_static(b"0"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .kvs;
        let found: BTreeMap<Bytes, KeyValue> =
            kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        assert!(
            found == state,
            "{}: the keys are not the last events",
            inst.name
        );
    }
    let n = acked.len();

    // Last (it waits): the lease is alive wherever it is asked, a whole TTL after the
    // resume, so the keepalives sent to the resumed (now following) instance reached the
    // writer. etcd forwards a keepalive to the leader; pgetcd ends a stream opened on the
    // writer once that instance follows, and the client's next stream is piped to the
    // writer.
    tokio::time::sleep_until((resumed + Duration::from_secs(LEASE_TTL as u64 + 1)).into()).await;
    let _ = stop_keeper.send(true);
    keeper.await.unwrap();
    let log = keep_alives.lock().clone();
    let answered: Vec<i64> = log
        .iter()
        .filter(|(at, _)| *at > resumed)
        .filter_map(|(_, r)| r.as_ref().ok().copied())
        .collect();
    for inst in &instances {
        let t = LeaseClient::new(channel(&inst.url))
            .lease_time_to_live(LeaseTimeToLiveRequest {
                id: lease,
                keys: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            t.ttl > 0,
            "the lease kept alive through {} (paused, resumed) is gone, asked through {} \
             (TTL {}); keepalives after the resume answered TTLs {answered:?}",
            instances[paused].name,
            inst.name,
            t.ttl
        );
    }
    take_overs.sort();
    println!(
        "take-over after SIGKILL of the writer, {} kills: min {:?}, p50 {:?}, max {:?}; {} writes acknowledged",
        take_overs.len(),
        take_overs[0],
        take_overs[take_overs.len() / 2],
        take_overs[take_overs.len() - 1],
        n
    );
    assert!(take_overs[take_overs.len() - 1] < Duration::from_secs(6));
}
