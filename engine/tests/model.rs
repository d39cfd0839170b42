//! Model-based tests of txn evaluation and the writer: random sequences of Put,
//! DeleteRange, Txn, Compact, LeaseGrant and LeaseRevoke run against the engine over an
//! in-memory store that injects determinate, indeterminate and fenced commit failures,
//! and against a plain `BTreeMap` model of etcd's semantics.
//!
//! Writes of one step are submitted together, so the writer evaluates and commits them
//! as one batch; a fault hits the whole batch. After every step every answer, the state
//! at the current revision and at an older retained one, the revision, the compact
//! revision and the leases must agree with the model. A fenced engine is replaced by a
//! new one opened on the same store, and at the end a fresh engine loaded from the store
//! must agree too: nothing acknowledged is lost, nothing refused is there.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;
use pgetcd_engine::{Engine, EngineConfig, Error};
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, compare,
    request_op::Request, response_op::Response,
};
use pgetcd_storage::faulty::{Fault, FaultyStore};
use pgetcd_storage::memory::MemoryStore;
use proptest::prelude::*;

const KEYS: u8 = 6;
const LEASES: u8 = 3;
const LEASE_TTL: i64 = 100_000;

fn key(i: u8) -> Bytes {
    Bytes::from(format!("k{i}"))
}

fn lease_id(i: u8) -> i64 {
    i64::from(i) + 1
}

/// A write of a step.
#[derive(Debug, Clone)]
enum Write {
    Put {
        key: u8,
        value: u8,
        lease: Option<u8>,
    },
    /// Keys `[from, from + len)`.
    Delete {
        from: u8,
        len: u8,
    },
    /// If key `on`'s mod revision equals `target`, put `key`; else delete `other`.
    /// `target` is set just before the step runs: `on`'s mod revision then (plus one
    /// when `stale`), so a write earlier in the same batch can change the outcome.
    Txn {
        on: u8,
        stale: bool,
        target: i64,
        key: u8,
        value: u8,
        other: u8,
    },
    Grant {
        lease: u8,
    },
    Revoke {
        lease: u8,
    },
}

#[derive(Debug, Clone)]
enum Step {
    /// Writes submitted together, under a fault (and resolutions that fail first).
    Writes {
        writes: Vec<Write>,
        fault: Option<Fault>,
        failing_resolves: u8,
    },
    /// Compaction `back` revisions below the current one, under a fault.
    Compact { back: u8, fault: Option<Fault> },
}

fn write() -> impl Strategy<Value = Write> {
    prop_oneof![
        4 => (0..KEYS, any::<u8>(), proptest::option::weighted(0.3, 0..LEASES))
            .prop_map(|(key, value, lease)| Write::Put { key, value, lease }),
        1 => (0..KEYS, 0..3u8).prop_map(|(from, len)| Write::Delete { from, len }),
        2 => (0..KEYS, any::<bool>(), 0..KEYS, any::<u8>(), 0..KEYS).prop_map(
            |(on, stale, key, value, other)| Write::Txn { on, stale, target: 0, key, value, other }
        ),
        1 => (0..LEASES).prop_map(|lease| Write::Grant { lease }),
        1 => (0..LEASES).prop_map(|lease| Write::Revoke { lease }),
    ]
}

fn fault() -> impl Strategy<Value = Option<Fault>> {
    prop_oneof![
        8 => Just(None),
        1 => Just(Some(Fault::Determinate)),
        1 => Just(Some(Fault::LostBeforeCommit)),
        1 => Just(Some(Fault::LostAfterCommit)),
        1 => Just(Some(Fault::TakenOver)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (proptest::collection::vec(write(), 1..5), fault(), 0..3u8).prop_map(
            |(writes, fault, failing_resolves)| Step::Writes { writes, fault, failing_resolves }
        ),
        1 => (0..6u8, fault()).prop_map(|(back, fault)| Step::Compact { back, fault }),
    ]
}

/// A key's live version in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kv {
    create: i64,
    modified: i64,
    version: i64,
    value: Bytes,
    lease: i64,
}

type Snapshot = BTreeMap<Bytes, Kv>;

/// etcd's semantics over plain maps.
#[derive(Debug, Clone)]
struct Model {
    rev: i64,
    compact: i64,
    kv: Snapshot,
    /// Granted leases and their keys.
    leases: BTreeMap<i64, BTreeSet<Bytes>>,
    /// The state at every revision (for reads of older revisions).
    at: BTreeMap<i64, Snapshot>,
}

/// What the model says a write answers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// Header revision, plus a detail (deleted count, txn succeeded, granted id).
    Ok(i64, i64),
    Err(String),
}

impl Model {
    fn new() -> Self {
        Model {
            rev: 1,
            compact: -1,
            kv: BTreeMap::new(),
            leases: BTreeMap::new(),
            at: BTreeMap::from([(1, BTreeMap::new())]),
        }
    }

    fn detach(&mut self, k: &Bytes) {
        for keys in self.leases.values_mut() {
            keys.remove(k);
        }
    }

    fn put(&mut self, k: Bytes, value: Bytes, lease: i64, rev: i64) {
        let (create, version) = match self.kv.get(&k) {
            Some(old) => (old.create, old.version + 1),
            None => (rev, 1),
        };
        self.detach(&k);
        if lease != 0 {
            self.leases.entry(lease).or_default().insert(k.clone());
        }
        self.kv.insert(
            k,
            Kv {
                create,
                modified: rev,
                version,
                value,
                lease,
            },
        );
    }

    fn delete(&mut self, keys: &[Bytes]) {
        for k in keys {
            self.kv.remove(k);
            self.detach(k);
        }
    }

    fn range_keys(&self, from: u8, len: u8) -> Vec<Bytes> {
        (from..from.saturating_add(len.max(1)))
            .map(key)
            .filter(|k| self.kv.contains_key(k))
            .collect()
    }

    /// Applies one write as etcd would, returning its answer and whether it took a
    /// revision.
    fn apply(&mut self, w: &Write) -> Answer {
        let next = self.rev + 1;
        match *w {
            Write::Put {
                key: k,
                value,
                lease,
            } => {
                let lease = lease.map_or(0, lease_id);
                if lease != 0 && !self.leases.contains_key(&lease) {
                    return Answer::Err(Error::LeaseNotFound.to_string());
                }
                self.put(key(k), Bytes::from(vec![value; 8]), lease, next);
                self.bump();
                Answer::Ok(next, 0)
            }
            Write::Delete { from, len } => {
                let keys = self.range_keys(from, len);
                if keys.is_empty() {
                    return Answer::Ok(self.rev, 0);
                }
                self.delete(&keys);
                self.bump();
                Answer::Ok(next, keys.len() as i64)
            }
            Write::Txn {
                on,
                target,
                key: k,
                value,
                other,
                ..
            } => {
                let current = self.kv.get(&key(on)).map_or(0, |kv| kv.modified);
                if current == target {
                    self.put(key(k), Bytes::from(vec![value; 8]), 0, next);
                    self.bump();
                    Answer::Ok(next, 1)
                } else if self.kv.contains_key(&key(other)) {
                    self.delete(&[key(other)]);
                    self.bump();
                    Answer::Ok(next, 0)
                } else {
                    Answer::Ok(self.rev, 0)
                }
            }
            Write::Grant { lease } => {
                let id = lease_id(lease);
                if self.leases.contains_key(&id) {
                    return Answer::Err(Error::LeaseExists.to_string());
                }
                self.leases.insert(id, BTreeSet::new());
                Answer::Ok(self.rev, id)
            }
            Write::Revoke { lease } => {
                let id = lease_id(lease);
                let Some(keys) = self.leases.remove(&id) else {
                    return Answer::Err(Error::LeaseNotFound.to_string());
                };
                if keys.is_empty() {
                    return Answer::Ok(self.rev, 0);
                }
                let keys: Vec<Bytes> = keys.into_iter().collect();
                self.delete(&keys);
                self.bump();
                Answer::Ok(next, 0)
            }
        }
    }

    fn bump(&mut self) {
        self.rev += 1;
        self.at.insert(self.rev, self.kv.clone());
    }

    /// Whether the writes make the writer commit (a revision or a lease row), and
    /// whether they change the durable state (a batch that grants and revokes the same
    /// lease commits but leaves the store as it was: an in-doubt outcome of it is
    /// rightly resolved as committed).
    fn commits(&self, writes: &[Write]) -> (bool, bool) {
        let mut m = self.clone();
        let mut lease_rows = false;
        for w in writes {
            let ok = matches!(m.apply(w), Answer::Ok(..));
            lease_rows |= ok && matches!(w, Write::Grant { .. } | Write::Revoke { .. });
        }
        let leases_changed = m.leases.keys().ne(self.leases.keys());
        let revision_changed = m.rev != self.rev;
        (
            revision_changed || lease_rows,
            revision_changed || leases_changed,
        )
    }
}

/// The engine's answer to a write, in the model's terms.
async fn run_write(engine: &Engine, w: &Write) -> Answer {
    let err = |e: Error| Answer::Err(e.to_string());
    match *w {
        Write::Put {
            key: k,
            value,
            lease,
        } => {
            let r = PutRequest {
                key: key(k),
                value: Bytes::from(vec![value; 8]),
                lease: lease.map_or(0, lease_id),
                ..Default::default()
            };
            match engine.put(r).await {
                Ok(resp) => Answer::Ok(resp.header.unwrap().revision, 0),
                Err(e) => err(e),
            }
        }
        Write::Delete { from, len } => {
            let r = DeleteRangeRequest {
                key: key(from),
                range_end: key(from.saturating_add(len.max(1))),
                ..Default::default()
            };
            match engine.delete_range(r).await {
                Ok(resp) => Answer::Ok(resp.header.unwrap().revision, resp.deleted),
                Err(e) => err(e),
            }
        }
        Write::Txn { .. } => run_txn(engine, w).await,
        Write::Grant { lease } => {
            let r = LeaseGrantRequest {
                ttl: LEASE_TTL,
                id: lease_id(lease),
            };
            match engine.lease_grant(r).await {
                Ok(resp) => Answer::Ok(resp.header.unwrap().revision, resp.id),
                Err(e) => err(e),
            }
        }
        Write::Revoke { lease } => {
            let r = LeaseRevokeRequest {
                id: lease_id(lease),
            };
            match engine.lease_revoke(r).await {
                Ok(resp) => Answer::Ok(resp.header.unwrap().revision, 0),
                Err(e) => err(e),
            }
        }
    }
}

/// The txn of a [`Write::Txn`].
async fn run_txn(engine: &Engine, w: &Write) -> Answer {
    let Write::Txn {
        on,
        target,
        key: k,
        value,
        other,
        ..
    } = *w
    else {
        unreachable!()
    };
    let r = TxnRequest {
        compare: vec![Compare {
            key: key(on),
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Mod as i32,
            target_union: Some(compare::TargetUnion::ModRevision(target)),
            ..Default::default()
        }],
        success: vec![RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key(k),
                value: Bytes::from(vec![value; 8]),
                ..Default::default()
            })),
        }],
        failure: vec![RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: key(other),
                ..Default::default()
            })),
        }],
    };
    match engine.txn(r).await {
        Ok(resp) => {
            match resp.responses.first().and_then(|r| r.response.as_ref()) {
                Some(Response::ResponsePut(_)) => assert!(resp.succeeded),
                Some(Response::ResponseDeleteRange(_)) => assert!(!resp.succeeded),
                other => panic!("unexpected txn response {other:?}"),
            }
            Answer::Ok(resp.header.unwrap().revision, i64::from(resp.succeeded))
        }
        Err(e) => Answer::Err(e.to_string()),
    }
}

/// Every key at `revision` (0: current), as the model writes it.
async fn range_all(engine: &Engine, revision: i64) -> Result<Snapshot, Error> {
    let resp = engine
        .range(&RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            revision,
            ..Default::default()
        })
        .await?;
    Ok(resp
        .kvs
        .into_iter()
        .map(|kv| {
            (
                kv.key,
                Kv {
                    create: kv.create_revision,
                    modified: kv.mod_revision,
                    version: kv.version,
                    value: kv.value,
                    lease: kv.lease,
                },
            )
        })
        .collect())
}

/// The engine agrees with the model: revisions, every key now and at `older`, leases.
async fn check(engine: &Engine, model: &Model, older: i64) {
    let stats = engine.stats();
    assert_eq!(stats.revision, model.rev, "revision");
    assert_eq!(stats.compact_revision, model.compact, "compact revision");
    assert_eq!(range_all(engine, 0).await.unwrap(), model.kv, "state now");
    let at = older.clamp(model.compact.max(1), model.rev);
    assert_eq!(
        range_all(engine, at).await.unwrap(),
        model.at[&at],
        "state at revision {at}"
    );
    if model.compact > 1 {
        let below = range_all(engine, model.compact - 1).await;
        assert!(matches!(below, Err(Error::Compacted)), "{below:?}");
    }
    let ids: BTreeSet<i64> = engine.lease_leases().leases.iter().map(|l| l.id).collect();
    assert_eq!(ids, model.leases.keys().copied().collect(), "leases");
    for (&id, keys) in &model.leases {
        let ttl = engine.lease_time_to_live(&LeaseTimeToLiveRequest { id, keys: true });
        let got: BTreeSet<Bytes> = ttl.keys.into_iter().collect();
        assert_eq!(&got, keys, "keys of lease {id}");
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        // Small enough that most values are read back from the store.
        cache_bytes: 64,
        ..EngineConfig::default()
    }
}

async fn open(store: &FaultyStore<MemoryStore>) -> Engine {
    Engine::open(config(), Arc::new(store.clone()))
        .await
        .unwrap()
}

async fn run(steps: Vec<Step>) {
    let store = FaultyStore::new(MemoryStore::new("model"));
    let mut engine = open(&store).await;
    let mut model = Model::new();
    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::Writes {
                writes,
                fault,
                failing_resolves,
            } => {
                let writes: Vec<Write> = writes
                    .iter()
                    .map(|w| match *w {
                        Write::Txn { on, stale, .. } => {
                            let now = model.kv.get(&key(on)).map_or(0, |kv| kv.modified);
                            let mut w = w.clone();
                            if let Write::Txn { target, .. } = &mut w {
                                *target = now + i64::from(stale);
                            }
                            w
                        }
                        _ => w.clone(),
                    })
                    .collect();
                let writes = &writes;
                if let Some(f) = fault {
                    store.inject(*f);
                    store.fail_resolves(usize::from(*failing_resolves));
                }
                let (commits, changes) = model.commits(writes);
                let answers = join_all(writes.iter().map(|w| run_write(&engine, w))).await;
                let lost = match fault {
                    Some(Fault::Determinate) => commits,
                    Some(Fault::LostBeforeCommit) => commits && changes,
                    _ => false,
                };
                match (commits, fault) {
                    _ if lost => {
                        for a in &answers {
                            assert_eq!(a, &Answer::Err(Error::Timeout.to_string()), "step {n}");
                        }
                    }
                    (true, Some(Fault::TakenOver)) => {
                        for a in &answers {
                            assert!(
                                matches!(a, Answer::Err(e) if e.contains("taken over")),
                                "step {n}: {a:?}"
                            );
                        }
                        engine = open(&store).await;
                    }
                    _ => {
                        for (w, a) in writes.iter().zip(&answers) {
                            assert_eq!(a, &model.apply(w), "step {n}: {w:?}");
                        }
                    }
                }
                store.clear();
                store.fail_resolves(0);
            }
            Step::Compact { back, fault } => {
                let target = model.rev - i64::from(*back);
                if target < 1 {
                    continue;
                }
                if let Some(f) = fault {
                    store.inject(*f);
                }
                let got = engine
                    .compact(CompactionRequest {
                        revision: target,
                        physical: true,
                    })
                    .await;
                if target <= model.compact {
                    assert!(matches!(got, Err(Error::Compacted)), "step {n}: {got:?}");
                    store.clear();
                    continue;
                }
                match fault {
                    None => {
                        got.unwrap();
                        model.compact = target;
                    }
                    Some(Fault::Determinate | Fault::LostBeforeCommit) => {
                        assert!(matches!(got, Err(Error::Timeout)), "step {n}: {got:?}");
                    }
                    Some(Fault::LostAfterCommit) => {
                        // Recorded, though the writer could not tell: it reloaded.
                        assert!(matches!(got, Err(Error::Timeout)), "step {n}: {got:?}");
                        model.compact = target;
                    }
                    Some(Fault::TakenOver) => {
                        assert!(
                            matches!(got, Err(Error::Fenced { .. })),
                            "step {n}: {got:?}"
                        );
                        engine = open(&store).await;
                    }
                }
                store.clear();
            }
        }
        let older = model.rev - (n as i64 % 7);
        check(&engine, &model, older).await;
    }
    // Everything acknowledged is durable: a fresh engine loads the same state.
    drop(engine);
    let reloaded = open(&store).await;
    check(&reloaded, &model, model.rev - 3).await;
}

proptest! {
    // 256 cases by default (under a second); PROPTEST_CASES=N for a longer hunt.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_agrees_with_the_model_under_faults(steps in proptest::collection::vec(step(), 1..40)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(run(steps));
    }
}

#[tokio::test(start_paused = true)]
async fn an_in_doubt_commit_that_landed_is_acknowledged() {
    let store = FaultyStore::new(MemoryStore::new("doubt"));
    let engine = open(&store).await;
    store.inject(Fault::LostAfterCommit);
    store.fail_resolves(2);
    let resp = engine
        .put(PutRequest {
            key: key(1),
            value: Bytes::from_static(b"v"),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(resp.header.unwrap().revision, 2);
    assert_eq!(store.inner().stored_meta().unwrap().revision, 2);
}

#[tokio::test(start_paused = true)]
async fn a_lease_grant_in_doubt_is_settled_by_its_row() {
    let store = FaultyStore::new(MemoryStore::new("lease-doubt"));
    let engine = open(&store).await;
    store.inject(Fault::LostBeforeCommit);
    let got = engine
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 7 })
        .await;
    assert!(matches!(got, Err(Error::Timeout)), "{got:?}");
    assert!(engine.lease_leases().leases.is_empty());
    store.inject(Fault::LostAfterCommit);
    let got = engine
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 7 })
        .await;
    assert_eq!(got.unwrap().id, 7);
    assert_eq!(store.inner().leases().get(&7), Some(&60));
}

#[tokio::test(start_paused = true)]
async fn a_deposed_writer_commits_nothing() {
    let store = MemoryStore::new("deposed");
    let old = Engine::open(config(), Arc::new(store.clone()))
        .await
        .unwrap();
    let new = Engine::open(config(), Arc::new(store.clone()))
        .await
        .unwrap();
    let put = |k: u8| PutRequest {
        key: key(k),
        value: Bytes::from_static(b"v"),
        ..Default::default()
    };
    let got = old.put(put(1)).await;
    assert!(matches!(got, Err(Error::Fenced { .. })), "{got:?}");
    assert!(old.writer_failed());
    assert_eq!(new.put(put(2)).await.unwrap().header.unwrap().revision, 2);
    assert_eq!(store.stored_meta().unwrap().revision, 2);
    assert_eq!(store.history().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_watch_hand_off_never_holds_the_writer() {
    let store = MemoryStore::new("handoff");
    let config = EngineConfig {
        commit_handoff: 2,
        ..config()
    };
    let engine = Engine::open(config, Arc::new(store)).await.unwrap();
    let mut commits = engine.subscribe_commits();
    for k in 0..5 {
        let put = PutRequest {
            key: key(k),
            value: Bytes::from_static(b"v"),
            ..Default::default()
        };
        engine.put(put).await.unwrap();
    }
    // Two batches wait in the queue; the other three were not handed over, and the
    // subscriber sees the gap before the next one it gets.
    assert_eq!(engine.handoff_skipped(), 3);
    assert_eq!(commits.recv().await.unwrap().last_revision, 2);
    assert_eq!(commits.recv().await.unwrap().last_revision, 3);
    let put = PutRequest {
        key: key(9),
        value: Bytes::from_static(b"v"),
        ..Default::default()
    };
    engine.put(put).await.unwrap();
    assert_eq!(commits.recv().await.unwrap().last_revision, 7);
}
