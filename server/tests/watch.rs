//! Watch through a real gRPC client: a differential test against real etcd (same writes,
//! same watchers, identical event streams), many writers and watchers with exactly-once
//! delivery, and faults (walsender killed, pgetcd restarted) with nothing lost or
//! duplicated.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pgetcd_server::watch_feed::WatchSource;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchResponse,
    request_op::Request,
};
use pgetcd_proto::mvccpb::{Event, event::EventType};
use pgetcd_testkit::watch::TestWatch;
use pgetcd_testkit::{Clients, RealEtcd, TestServer, admin_client, test_config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_owned())
}

fn prefix_end(p: &str) -> Bytes {
    let mut v = p.as_bytes().to_vec();
    if let Some(l) = v.last_mut() {
        *l += 1;
    }
    Bytes::from(v)
}

fn put(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: b(k),
        value: b(v),
        ..Default::default()
    }
}

#[derive(Debug, Clone)]
enum Write {
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
}

async fn apply(c: &mut Clients, w: &Write) -> i64 {
    let h = match w.clone() {
        Write::Put(p) => c.kv.put(p).await.unwrap().into_inner().header,
        Write::Delete(d) => c.kv.delete_range(d).await.unwrap().into_inner().header,
        Write::Txn(t) => c.kv.txn(t).await.unwrap().into_inner().header,
    };
    h.unwrap().revision
}

struct Gen {
    rng: StdRng,
    /// The range of a watch of every key.
    every_key: (Bytes, Bytes),
}

impl Gen {
    fn key(&mut self) -> String {
        let p = ["a/", "b/", "c/"][self.rng.random_range(0..3)];
        format!("{p}{}", self.rng.random_range(0..6))
    }

    fn write(&mut self) -> Write {
        match self.rng.random_range(0..10) {
            0..=5 => Write::Put(put(
                &self.key(),
                &format!("v{}", self.rng.random_range(0..1000)),
            )),
            6 => Write::Delete(DeleteRangeRequest {
                key: b(&self.key()),
                ..Default::default()
            }),
            7 => {
                let p = ["a/", "b/", "c/"][self.rng.random_range(0..3)];
                Write::Delete(DeleteRangeRequest {
                    key: b(p),
                    range_end: prefix_end(p),
                    ..Default::default()
                })
            }
            _ => {
                let mut keys: Vec<String> = (0..3).map(|_| self.key()).collect();
                keys.sort();
                keys.dedup();
                let success = keys
                    .iter()
                    .map(|k| RequestOp {
                        request: Some(if self.rng.random_range(0..4) == 0 {
                            Request::RequestDeleteRange(DeleteRangeRequest {
                                key: b(k),
                                ..Default::default()
                            })
                        } else {
                            Request::RequestPut(put(k, "t"))
                        }),
                    })
                    .collect();
                Write::Txn(TxnRequest {
                    success,
                    ..Default::default()
                })
            }
        }
    }

    fn watch(&mut self, cur: i64, compact: i64) -> WatchCreateRequest {
        let (key, range_end) = match self.rng.random_range(0..4) {
            0 => (b(&self.key()), Bytes::new()),
            1 => {
                let p = ["a/", "b/", "c/"][self.rng.random_range(0..3)];
                (b(p), prefix_end(p))
            }
            2 => (b("a/3"), b("b/2")),
            _ => self.every_key.clone(),
        };
        let start_revision = match self.rng.random_range(0..10) {
            0..=3 => 0,
            4..=6 => self.rng.random_range(compact.max(1)..=cur.max(1)),
            7 if compact > 2 => self.rng.random_range(1..compact),
            _ => cur + self.rng.random_range(1..4),
        };
        let filters = match self.rng.random_range(0..8) {
            0 => vec![0],
            1 => vec![1],
            _ => vec![],
        };
        WatchCreateRequest {
            key,
            range_end,
            start_revision,
            prev_kv: self.rng.random_bool(0.5),
            filters,
            ..Default::default()
        }
    }
}

/// Per watcher: control responses (created / canceled / compacted) in order, and
/// events. Control responses of different watchers interleave with timing (etcd
/// cancels compacted watchers from a background loop), so they are compared per
/// watcher.
type Control = (bool, bool, i64, String, i64);
type Normalised = (BTreeMap<i64, Vec<Control>>, BTreeMap<i64, Vec<Event>>);

fn normalise(rs: &[WatchResponse]) -> Normalised {
    let mut control: BTreeMap<i64, Vec<Control>> = BTreeMap::new();
    let mut events: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
    // Progress answers (watch_id -1) are requested from pgetcd only.
    for r in rs
        .iter()
        .filter(|r| r.watch_id != -1 || r.created || r.canceled)
    {
        if r.created || r.canceled || r.compact_revision != 0 {
            let rev = if r.created {
                r.header.as_ref().map_or(0, |h| h.revision)
            } else {
                0
            };
            control.entry(r.watch_id).or_default().push((
                r.created,
                r.canceled,
                r.compact_revision,
                r.cancel_reason.clone(),
                rev,
            ));
        }
        events
            .entry(r.watch_id)
            .or_default()
            .extend(r.events.iter().cloned());
    }
    (control, events)
}

/// Both watch sources, one after the other (two reference etcds side by side would
/// load the machine enough to delay etcd's own deliveries past the comparison).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_identical_to_etcd() {
    watch_differential(WatchSource::Writer, false).await;
    watch_differential(WatchSource::Wal, false).await;
}

/// The same through a listener routing the prefix `zz/` (which the scenario never
/// writes) to another keyspace; a watch of every key there would span both, so the
/// scenario's is of every key below `zz/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_identical_to_etcd_through_a_routed_listener() {
    watch_differential(WatchSource::Writer, true).await;
}

async fn watch_differential(source: WatchSource, routed: bool) {
    let seed: u64 = std::env::var("PGETCD_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("watch differential: seed {seed} (PGETCD_DIFF_SEED={seed} reproduces)");
    let etcd = RealEtcd::start().await;
    let mut config = test_config();
    config.storage.history_partition_revisions = 40;
    config.watch.watch_source = source;
    let mut every_key = (Bytes::from_static(&[0]), Bytes::from_static(&[0]));
    if routed {
        pgetcd_testkit::route_to_new_keyspace(&mut config, "zz/", None);
        every_key.1 = Bytes::from_static(b"zz/");
    }
    let ours = TestServer::start(config).await;
    let urls = [etcd.url.clone(), ours.url()];
    let mut clients = [
        Clients::connect(&urls[0]).await,
        Clients::connect(&urls[1]).await,
    ];
    let mut streams = Vec::new();
    for url in &urls {
        streams.push([TestWatch::open(url).await, TestWatch::open(url).await]);
    }
    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed),
        every_key,
    };
    let mut cur = 1;
    let mut compact = 0;
    // (stream, watch id, op index at creation, when a past-revision watcher may be
    // canceled).
    let mut live: Vec<(usize, i64, usize, Instant)> = Vec::new();
    for i in 0..500 {
        if g.rng.random_range(0..12) == 0 {
            let req = g.watch(cur, compact);
            let s = g.rng.random_range(0..2);
            if std::env::var_os("PGETCD_TEST_TRACE").is_some() {
                eprintln!("watch on stream {s} at cur {cur}: {req:?}");
            }
            let mut ids = Vec::new();
            for pair in &streams {
                let created = pair[s].create(req.clone()).await;
                ids.push(created.watch_id);
            }
            assert_eq!(ids[0], ids[1], "watch ids differ (seed {seed})");
            // etcd catches a watcher from a past revision up from a background loop
            // that runs every 100 ms; canceled before that loop reached it, it never
            // sends the old events at all, while pgetcd sends them at once. Both are
            // etcd behaviour, so such a watcher is canceled only after etcd surely
            // caught it up.
            let past = req.start_revision != 0 && req.start_revision <= cur;
            let cancel_after = Instant::now()
                + if past {
                    Duration::from_secs(1)
                } else {
                    Duration::ZERO
                };
            live.push((s, ids[0], i, cancel_after));
        }
        if !live.is_empty() && g.rng.random_range(0..60) == 0 {
            let (s, id, created_at, cancel_after) = live.remove(g.rng.random_range(0..live.len()));
            // Cancel only watchers that are surely still alive on both (a compacted
            // start cancels a watcher shortly after its creation).
            let gone = (0..2).any(|e| {
                streams[e][s]
                    .responses()
                    .iter()
                    .any(|r| r.watch_id == id && r.canceled)
            });
            if i - created_at >= 20 && !gone {
                tokio::time::sleep_until(cancel_after.into()).await;
                for pair in &streams {
                    pair[s].cancel(id).await;
                }
            }
        }
        if i == 250 {
            // Let etcd finish catching up its unsynced watchers first: it cancels those
            // still catching up when compaction passes them, a timing we do not share.
            for w in streams.iter().flatten() {
                w.settle(Duration::from_millis(300), Duration::from_secs(10))
                    .await;
            }
            compact = cur - 15;
            for c in clients.iter_mut() {
                c.compact(compact, true).await;
            }
        }
        let w = g.write();
        let r0 = apply(&mut clients[0], &w).await;
        let r1 = apply(&mut clients[1], &w).await;
        assert_eq!(r0, r1, "revisions differ after {w:?} (seed {seed})");
        cur = r1;
    }
    // pgetcd promises through a progress answer that everything up to `cur` was sent
    // (a quiet period alone can end early when the machine is busy); etcd delivers
    // inside the write, so a quiet period suffices there.
    for w in &streams[1] {
        w.wait_progress(cur).await;
    }
    for w in streams.iter().flatten() {
        w.settle(Duration::from_millis(600), Duration::from_secs(20))
            .await;
    }
    // A loaded machine can hold either server's deliveries back past a quiet period:
    // give the counts a few more seconds to agree before comparing (a lost or extra
    // event still fails below).
    for extra in 0..10 {
        let counts = |w: &TestWatch| {
            let mut c: Vec<(i64, usize)> = all_events(w)
                .into_iter()
                .filter(|(_, evs)| !evs.is_empty())
                .map(|(id, evs)| (id, evs.len()))
                .collect();
            c.sort_unstable();
            c
        };
        let agree = (0..2).all(|s| counts(&streams[0][s]) == counts(&streams[1][s]));
        if agree {
            break;
        }
        println!("watch differential ({source:?}): event counts differ, waiting ({extra})");
        for w in streams.iter().flatten() {
            w.settle(Duration::from_secs(2), Duration::from_secs(6))
                .await;
        }
    }
    let mut total = 0;
    let [theirs, mine] = &streams[..] else {
        unreachable!("two endpoints")
    };
    for (s, (theirs, mine)) in theirs.iter().zip(mine.iter()).enumerate() {
        let mine_watch = mine;
        let want = normalise(&theirs.responses());
        let got = normalise(&mine.responses());
        for (id, want_c) in &want.0 {
            assert_eq!(
                got.0.get(id),
                Some(want_c),
                "stream {s} watch {id}: control responses differ (seed {seed})"
            );
        }
        assert_eq!(
            got.0.len(),
            want.0.len(),
            "stream {s}: watchers (seed {seed})"
        );
        if std::env::var_os("PGETCD_TEST_TRACE").is_some() {
            for (id, evs) in &want.1 {
                let n = got.1.get(id).map_or(0, |v| v.len());
                eprintln!("stream {s} watch {id}: etcd {} pgetcd {n}", evs.len());
                if n != evs.len() {
                    for r in streams[1][s]
                        .responses()
                        .iter()
                        .filter(|r| r.watch_id == *id)
                    {
                        eprintln!("   ours: {:?}", r);
                    }
                    for e in evs {
                        let kv = e.kv.as_ref().unwrap();
                        eprintln!(
                            "   etcd event type {} key {:?} rev {}",
                            e.r#type, kv.key, kv.mod_revision
                        );
                    }
                }
            }
        }
        for (id, evs) in &want.1 {
            let mine = got.1.get(id).cloned().unwrap_or_default();
            if mine.len() != evs.len() {
                // What each side answered for this watcher, to tell which one stalled.
                for (side, w) in [("etcd", theirs), ("pgetcd", mine_watch)] {
                    for r in w.responses().iter().filter(|r| r.watch_id == *id) {
                        eprintln!(
                            "{side} watch {id}: created {} canceled {} compact {} events {} header {:?}",
                            r.created,
                            r.canceled,
                            r.compact_revision,
                            r.events.len(),
                            r.header.as_ref().map(|h| h.revision)
                        );
                    }
                }
            }
            assert_eq!(
                mine.len(),
                evs.len(),
                "watch {id} on stream {s}: event count (seed {seed})"
            );
            assert_eq!(
                &mine, evs,
                "watch {id} on stream {s}: events differ (seed {seed})"
            );
            total += evs.len();
        }
        assert_eq!(
            got.1.len(),
            want.1.len(),
            "stream {s}: watchers with events (seed {seed})"
        );
        assert!(mine.error.lock().is_none());
    }
    println!(
        "watch differential: {total} events identical, final revision {cur}, compacted at {compact}"
    );
    assert!(total > 200, "the scenario must produce events ({total})");
    ours.stop().await;
}

fn key_of(e: &Event) -> Bytes {
    e.kv.as_ref().map(|kv| kv.key.clone()).unwrap_or_default()
}

fn rev_of(e: &Event) -> (i64, bool) {
    let kv = e.kv.as_ref().unwrap();
    (kv.mod_revision, e.r#type == EventType::Put as i32)
}

/// Replays events into a map of key -> (mod_revision, value).
fn replay(events: &[Event]) -> BTreeMap<Bytes, (i64, Bytes)> {
    let mut m = BTreeMap::new();
    for e in events {
        let kv = e.kv.as_ref().unwrap();
        if e.r#type == EventType::Put as i32 {
            m.insert(kv.key.clone(), (kv.mod_revision, kv.value.clone()));
        } else {
            m.remove(&kv.key);
        }
    }
    m
}

fn all_events(w: &TestWatch) -> HashMap<i64, Vec<Event>> {
    let mut m: HashMap<i64, Vec<Event>> = HashMap::new();
    for r in w.responses() {
        m.entry(r.watch_id).or_default().extend(r.events);
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writers_and_watchers_see_every_event_once_in_order() {
    writers_and_watchers(WatchSource::Writer, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writers_and_watchers_from_the_wal_alone() {
    writers_and_watchers(WatchSource::Wal, None).await;
}

/// No value cache: every prev_kv the writer hands over has lost its value and is read
/// back from Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writers_and_watchers_without_a_value_cache() {
    writers_and_watchers(WatchSource::Writer, Some(0)).await;
}

async fn writers_and_watchers(source: WatchSource, cache_bytes: Option<usize>) {
    let mut config = test_config();
    config.watch.watch_source = source;
    if let Some(bytes) = cache_bytes {
        config.engine.cache_bytes = bytes;
    }
    let srv = TestServer::start(config).await;
    let c = Clients::connect(&srv.url()).await;
    let mut watches = Vec::new();
    for s in 0..4 {
        let w = TestWatch::open(&srv.url()).await;
        // Per stream: every prefix, one single key, and everything.
        for p in ["w0/", "w1/", "w2/", "w3/"] {
            w.create(WatchCreateRequest {
                key: b(p),
                range_end: prefix_end(p),
                prev_kv: true,
                ..Default::default()
            })
            .await;
        }
        w.create(WatchCreateRequest {
            key: b(&format!("w{s}/k1")),
            ..Default::default()
        })
        .await;
        w.create(WatchCreateRequest {
            key: Bytes::from_static(&[0]),
            range_end: Bytes::from_static(&[0]),
            ..Default::default()
        })
        .await;
        watches.push(w);
    }
    let mut tasks = Vec::new();
    for wr in 0..4 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..120 {
                let key = format!("w{wr}/k{}", i % 7);
                if i % 11 == 10 {
                    c.kv.delete_range(DeleteRangeRequest {
                        key: b(&key),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                } else {
                    c.kv.put(put(&key, &format!("{i}"))).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let final_rev = c.clone().revision().await;
    // A progress answer promises every event up to its revision was sent.
    for w in &watches {
        w.wait_progress(final_rev).await;
    }
    for (s, w) in watches.iter().enumerate() {
        let per = all_events(w);
        let everything = &per[&5];
        let revs: Vec<i64> = everything.iter().map(|e| rev_of(e).0).collect();
        assert_eq!(
            revs,
            (2..=final_rev).collect::<Vec<_>>(),
            "stream {s}: all revisions once, in order"
        );
        for (i, p) in ["w0/", "w1/", "w2/", "w3/"].iter().enumerate() {
            let evs = &per[&(i as i64)];
            let expect: Vec<&Event> = everything
                .iter()
                .filter(|e| key_of(e).starts_with(p.as_bytes()))
                .collect();
            assert_eq!(evs.len(), expect.len(), "stream {s} prefix {p}");
            // prev_kv is the previous state of the key for every non-create event.
            let mut state: HashMap<Bytes, Bytes> = HashMap::new();
            for e in evs {
                let kv = e.kv.as_ref().unwrap();
                let prev = state.get(&kv.key).cloned();
                assert_eq!(
                    e.prev_kv.as_ref().map(|p| p.value.clone()),
                    prev,
                    "prev_kv at {}",
                    kv.mod_revision
                );
                if e.r#type == EventType::Put as i32 {
                    state.insert(kv.key.clone(), kv.value.clone());
                } else {
                    state.remove(&kv.key);
                }
            }
        }
        let single = &per[&4];
        assert!(single.iter().all(|e| key_of(e) == b(&format!("w{s}/k1"))));
        assert!(!single.is_empty());
        // Replaying the stream reproduces the final state.
        let mut c3 = c.clone();
        let all = c3
            .kv
            .range(pgetcd_proto::etcdserverpb::RangeRequest {
                key: Bytes::from_static(&[0]),
                range_end: Bytes::from_static(&[0]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let want: BTreeMap<Bytes, (i64, Bytes)> = all
            .kvs
            .into_iter()
            .map(|kv| (kv.key, (kv.mod_revision, kv.value)))
            .collect();
        assert_eq!(
            replay(everything),
            want,
            "stream {s}: replay reproduces the state"
        );
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_walsender_and_restart_lose_nothing() {
    // The replication stream alone carries the events here: its losses must not show.
    let mut config = test_config();
    config.watch.watch_source = WatchSource::Wal;
    let keyspace = config.storage.keyspace.clone();
    let srv = TestServer::start(config.clone()).await;
    let mut c = Clients::connect(&srv.url()).await;
    let w = TestWatch::open(&srv.url()).await;
    w.create(WatchCreateRequest {
        key: b("f/"),
        range_end: prefix_end("f/"),
        ..Default::default()
    })
    .await;
    let admin = admin_client().await;
    let mut acked = Vec::new();
    let mut kills = 0u64;
    for i in 0..300 {
        let r =
            c.kv.put(put(&format!("f/{}", i % 17), &format!("{i}")))
                .await
                .unwrap();
        acked.push(r.into_inner().header.unwrap().revision);
        if i % 60 == 30 {
            let n = admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE application_name = $1",
                    &[&format!("pgetcd-wal-{keyspace}")],
                )
                .await
                .unwrap();
            kills += n;
        }
    }
    assert!(kills > 0, "the walsender was found and killed");
    w.wait_progress(*acked.last().unwrap()).await;
    let revs: Vec<i64> = all_events(&w)[&0].iter().map(|e| rev_of(e).0).collect();
    assert_eq!(
        revs, acked,
        "every acknowledged write exactly once, in order, across {kills} walsender kills"
    );

    // Restart pgetcd; a client re-watches from its last revision + 1.
    let last = *acked.last().unwrap();
    let config = srv.stop().await;
    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    let w = TestWatch::open(&srv.url()).await;
    w.create(WatchCreateRequest {
        key: b("f/"),
        range_end: prefix_end("f/"),
        start_revision: last - 4,
        ..Default::default()
    })
    .await;
    let mut more = Vec::new();
    for i in 0..30 {
        let r = c.kv.put(put(&format!("f/{i}"), "after")).await.unwrap();
        more.push(r.into_inner().header.unwrap().revision);
    }
    w.wait_progress(*more.last().unwrap()).await;
    let revs: Vec<i64> = all_events(&w)[&0].iter().map(|e| rev_of(e).0).collect();
    let want: Vec<i64> = (last - 4..=last).chain(more.iter().copied()).collect();
    assert_eq!(
        revs, want,
        "after restart: history replay then live, no gap or duplicate"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_cancels_watches_from_compacted_revisions() {
    let srv = TestServer::start_default().await;
    let mut c = Clients::connect(&srv.url()).await;
    for i in 0..10 {
        c.kv.put(put("k", &format!("{i}"))).await.unwrap();
    }
    c.compact(8, false).await;
    let w = TestWatch::open(&srv.url()).await;
    let created = w
        .create(WatchCreateRequest {
            key: b("k"),
            start_revision: 3,
            ..Default::default()
        })
        .await;
    assert_eq!(created.watch_id, 0);
    w.settle(Duration::from_millis(200), Duration::from_secs(5))
        .await;
    let rs = w.responses();
    let cancel = rs.iter().find(|r| r.canceled).expect("compacted cancel");
    assert_eq!((cancel.watch_id, cancel.compact_revision), (0, 8));
    // From the compact revision itself it works.
    let ok = w
        .create(WatchCreateRequest {
            key: b("k"),
            start_revision: 8,
            ..Default::default()
        })
        .await;
    w.settle(Duration::from_millis(200), Duration::from_secs(5))
        .await;
    let evs = all_events(&w);
    let revs: Vec<i64> = evs[&ok.watch_id].iter().map(|e| rev_of(e).0).collect();
    assert_eq!(revs, vec![8, 9, 10, 11]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_recreated_and_the_gap_served_from_history() {
    let mut config = test_config();
    config.watch.watch_source = WatchSource::Wal;
    let keyspace = config.storage.keyspace.clone();
    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    let w = TestWatch::open(&srv.url()).await;
    w.create(WatchCreateRequest {
        key: b("g/"),
        range_end: prefix_end("g/"),
        ..Default::default()
    })
    .await;
    let admin = admin_client().await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let r = c.kv.put(put(&format!("g/{i}"), "before")).await.unwrap();
        acked.push(r.into_inner().header.unwrap().revision);
    }
    // Kill the walsender and drop the slot before the feed reconnects, then write
    // while no slot exists: those revisions are not in any replication stream. An open
    // transaction holding an xid makes the feed's slot re-creation wait (a logical slot
    // needs a snapshot without older running transactions) until we end it.
    let blocker = admin_client().await;
    blocker
        .batch_execute("BEGIN; SELECT txid_current();")
        .await
        .unwrap();
    let slot = format!("pgetcd_{keyspace}");
    let mut dropped = false;
    for _ in 0..200 {
        admin
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await
            .unwrap();
        if admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .is_ok()
        {
            dropped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(dropped, "could not drop the slot");
    for i in 0..20 {
        let r = c.kv.put(put(&format!("g/{i}"), "during")).await.unwrap();
        acked.push(r.into_inner().header.unwrap().revision);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    blocker.batch_execute("COMMIT").await.unwrap();
    let last = *acked.last().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let p = w.progress().await;
        if p.header.as_ref().unwrap().revision >= last {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "feed did not recover");
        // More writes let a recreated slot deliver something past the gap.
        let r = c.kv.put(put("g/after", "x")).await.unwrap();
        acked.push(r.into_inner().header.unwrap().revision);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = *acked.last().unwrap();
    w.wait_progress(last).await;
    let revs: Vec<i64> = all_events(&w)[&0].iter().map(|e| rev_of(e).0).collect();
    assert_eq!(
        revs, acked,
        "every acknowledged write once, in order, despite the lost slot"
    );
    srv.stop().await;
}

/// A watcher starting far back replays its history in chunks of revisions: every
/// event once, in order, with prev_kv, and no revision split across two responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_replays_in_chunks_without_splitting_revisions() {
    let ours = TestServer::start(test_config()).await;
    let mut c = Clients::connect(&ours.url()).await;
    let mut expected = 0usize;
    let mut last = 0;
    for i in 0..2500 {
        let w = if i % 50 == 0 {
            // A revision with many events: 40 keys in one txn.
            Write::Txn(TxnRequest {
                success: (0..40)
                    .map(|k| RequestOp {
                        request: Some(Request::RequestPut(put(&format!("h/{k:02}"), "t"))),
                    })
                    .collect(),
                ..Default::default()
            })
        } else {
            Write::Put(put(&format!("h/{:02}", i % 40), &format!("v{i}")))
        };
        expected += if i % 50 == 0 { 40 } else { 1 };
        last = apply(&mut c, &w).await;
    }
    let w = TestWatch::open(&ours.url()).await;
    w.create(WatchCreateRequest {
        key: b("h/"),
        range_end: prefix_end("h/"),
        start_revision: 2,
        prev_kv: true,
        ..Default::default()
    })
    .await;
    w.wait_progress(last).await;
    let responses: Vec<WatchResponse> = w
        .responses()
        .into_iter()
        .filter(|r| !r.events.is_empty())
        .collect();
    assert!(responses.len() > 2, "one chunk only: {}", responses.len());
    let mut seen_revisions = std::collections::HashSet::new();
    let mut events = Vec::new();
    for r in &responses {
        let revs: std::collections::BTreeSet<i64> = r.events.iter().map(|e| rev_of(e).0).collect();
        for rev in revs {
            assert!(
                seen_revisions.insert(rev),
                "revision {rev} split across responses"
            );
        }
        events.extend(r.events.iter().cloned());
    }
    assert_eq!(events.len(), expected);
    assert!(
        events
            .windows(2)
            .all(|p| rev_of(&p[0]).0 <= rev_of(&p[1]).0)
    );
    // prev_kv of each event is the key's previous event in the stream.
    let mut latest: HashMap<Bytes, i64> = HashMap::new();
    for e in &events {
        let kv = e.kv.as_ref().unwrap();
        let prev = e.prev_kv.as_ref().map(|p| p.mod_revision);
        assert_eq!(
            prev,
            latest.get(&kv.key).copied(),
            "prev_kv of {:?}",
            kv.key
        );
        latest.insert(kv.key.clone(), kv.mod_revision);
    }
    ours.stop().await;
}
