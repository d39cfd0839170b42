//! `pgetcd migrate --from URL`: a running etcd copied into a keyspace with its revisions,
//! then followed until cutover.
//!
//! 1. **Take** the keyspace ([`crate::admin::Exclusive`]: no instance may serve it).
//! 2. **Copy.** The source's Maintenance.Snapshot, restored as `pgetcd snapshot restore`
//!    does (every retained revision, leases, the compaction); where Snapshot is refused
//!    (or with `--initial-copy range`), a Range of every key at one fixed revision R,
//!    imported with R as the compact revision (older revisions are not there to serve).
//! 3. **Follow.** A Watch of the whole keyspace from the next revision: each source
//!    revision is committed as one batch with the source's revision, create revision,
//!    version and lease, and the events' order as sub-revisions, so pgetcd's history is
//!    etcd's. Leases are polled every second (a watch does not carry them): new ones are
//!    granted with their ID and granted TTL (asked for once), gone ones revoked. The lag (source
//!    revision from progress requests, minus the applied revision) is logged.
//! 4. **Cut over** on SIGINT or SIGTERM: with `--freeze-source`, the source gets etcd's
//!    NOSPACE alarm first (it refuses puts, txns with puts and lease grants). The
//!    cutover refuses, and following goes on, unless a probe write is refused by the
//!    source, pgetcd has applied the source's revision as a read after that probe gives
//!    it (a progress response may be a second old and predate a write made just before
//!    the freeze), and no revision came for a quiet second. It is checked at the
//!    signal, then every second until it completes or refuses. Then the leases are synchronised a last time, the writer role is
//!    released, and the command prints how to switch clients. A second signal during a
//!    cutover aborts.
//!
//! Lease TTLs: pgetcd keeps a lease's granted TTL; an instance that opens the keyspace
//! starts every lease's TTL afresh, as etcd does on a leader change, so a lease lives at
//! most one TTL longer than it would have on the source.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    AlarmRequest, AlarmType, Compare, LeaseLeasesRequest, LeaseTimeToLiveRequest, RangeRequest,
    RequestOp, SnapshotRequest, TxnRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest,
    alarm_request::AlarmAction, compare, kv_client::KvClient, lease_client::LeaseClient,
    maintenance_client::MaintenanceClient, request_op, watch_client::WatchClient, watch_request,
};
use pgetcd_proto::mvccpb::{Event, event::EventType};
use pgetcd_storage::{
    Batch, CHUNK_VERSIONS, CHUNKS_IN_FLIGHT, Change, Import, LeaseOp, LeaseOps, Resolution, Store,
    Version,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::{info, warn};

use crate::ServerError;
use crate::admin::Exclusive;
use crate::config::StorageFlags;

/// The name under which `pgetcd migrate` holds the writer role.
pub const MIGRATE_NAME: &str = "pgetcd-migrate";
/// How often leases are polled and the lag is asked for.
const POLL: Duration = Duration::from_secs(1);
/// How often the lag is logged.
const REPORT: Duration = Duration::from_secs(5);
/// How long a cutover waits for pgetcd to catch up before it refuses.
const CATCH_UP_WAIT: Duration = Duration::from_secs(15);
/// Keys per page of the initial Range.
const RANGE_PAGE: i64 = 5000;

/// How the first copy is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitialCopy {
    /// Maintenance.Snapshot (all retained history), else a Range.
    Snapshot,
    /// A Range of every key at one revision (no history below it).
    Range,
}

/// `pgetcd migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// The source etcd's client URL (http://host:2379 or https://host:2379).
    #[arg(long)]
    pub from: String,

    /// CA bundle verifying the source's certificate (needed for https).
    #[arg(long)]
    pub from_cacert: Option<PathBuf>,

    /// Client certificate presented to the source.
    #[arg(long)]
    pub from_cert: Option<PathBuf>,

    /// Key of --from-cert.
    #[arg(long)]
    pub from_key: Option<PathBuf>,

    /// How to take the first copy: snapshot (every retained revision; falls back to
    /// range when the source refuses Snapshot) or range (the keys at one revision).
    #[arg(long, value_enum, default_value_t = InitialCopy::Snapshot)]
    pub initial_copy: InitialCopy,

    /// At cutover, make the source refuse writes with etcd's NOSPACE alarm (undo with
    /// `etcdctl alarm disarm`).
    #[arg(long, default_value_t = false)]
    pub freeze_source: bool,

    /// Replace whatever the keyspace holds; without it a keyspace holding keys or
    /// leases is refused.
    #[arg(long, default_value_t = false)]
    pub replace: bool,

    /// Where the keyspace lives.
    #[command(flatten)]
    pub storage: StorageFlags,

    /// Logging.
    #[command(flatten)]
    pub logging: crate::config::LogFlags,
}

/// A channel to the source.
async fn connect(args: &MigrateArgs) -> Result<Channel, ServerError> {
    let url = if args.from.contains("://") {
        args.from.clone()
    } else {
        format!("http://{}", args.from)
    };
    let mut ep = Endpoint::from_shared(url.clone())
        .map_err(|e| ServerError::failed("--from", e))?
        .connect_timeout(Duration::from_secs(5));
    if url.starts_with("https://") {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| ServerError::failed(&p.display().to_string(), e))
        };
        let mut tls = ClientTlsConfig::new();
        let Some(ca) = &args.from_cacert else {
            return Err(ServerError::failed(
                "--from",
                "an https:// source needs --from-cacert",
            ));
        };
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        match (&args.from_cert, &args.from_key) {
            (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => {}
            _ => {
                return Err(ServerError::failed(
                    "--from-cert",
                    "needs --from-key, and the other way round",
                ));
            }
        }
        ep = ep
            .tls_config(tls)
            .map_err(|e| ServerError::failed("TLS to the source", e))?;
    }
    ep.connect()
        .await
        .map_err(|e| ServerError::failed(&format!("connecting to {url}"), e))
}

/// The source's leases: id → granted TTL. The TTLs of leases in `known` are taken from
/// it (a lease's granted TTL never changes); only new leases are asked about.
async fn source_leases(
    ch: &Channel,
    known: &BTreeMap<i64, i64>,
) -> Result<BTreeMap<i64, i64>, tonic::Status> {
    let mut client = LeaseClient::new(ch.clone());
    let ids = client
        .lease_leases(LeaseLeasesRequest {})
        .await?
        .into_inner()
        .leases;
    let mut out = BTreeMap::new();
    for l in ids {
        if let Some(&ttl) = known.get(&l.id) {
            out.insert(l.id, ttl);
            continue;
        }
        let ttl = client
            .lease_time_to_live(LeaseTimeToLiveRequest {
                id: l.id,
                keys: false,
            })
            .await?
            .into_inner();
        // Expired between the two calls: -1.
        if ttl.ttl >= 0 {
            out.insert(l.id, ttl.granted_ttl);
        }
    }
    Ok(out)
}

/// The first copy by Range: every key at one revision. Returns (revision, versions).
async fn range_copy(ch: &Channel) -> Result<(i64, Vec<(Bytes, Version)>), tonic::Status> {
    let mut kv = KvClient::new(ch.clone());
    let mut revision = 0;
    let mut from = Bytes::from_static(b"\0");
    let mut versions = Vec::new();
    loop {
        let r = kv
            .range(RangeRequest {
                key: from.clone(),
                range_end: Bytes::from_static(b"\0"),
                limit: RANGE_PAGE,
                revision,
                ..Default::default()
            })
            .await?
            .into_inner();
        if revision == 0 {
            revision = r.header.map(|h| h.revision).unwrap_or(0);
        }
        for kv in &r.kvs {
            versions.push((
                kv.key.clone(),
                Version {
                    mod_revision: kv.mod_revision,
                    sub: 0,
                    create_revision: kv.create_revision,
                    version: kv.version,
                    lease: kv.lease,
                    value: Some(kv.value.clone()),
                },
            ));
        }
        match (r.more, r.kvs.last()) {
            (true, Some(last)) => {
                let mut next = last.key.to_vec();
                next.push(0);
                from = Bytes::from(next);
            }
            _ => break,
        }
    }
    // Revision order. Keys written by one txn share a revision, and Range does not say
    // their sub-revisions: they are numbered in key order within their revision.
    versions.sort_by(|a, b| (a.1.mod_revision, &a.0).cmp(&(b.1.mod_revision, &b.0)));
    let mut last = (0, 0u32);
    for (_, v) in versions.iter_mut() {
        v.sub = if v.mod_revision == last.0 {
            last.1 + 1
        } else {
            0
        };
        last = (v.mod_revision, v.sub);
    }
    Ok((revision, versions))
}

/// Takes the first copy into the keyspace; returns the revision and the leases it holds.
async fn first_copy(
    args: &MigrateArgs,
    ch: &Channel,
    held: &Exclusive,
) -> Result<(i64, BTreeMap<i64, i64>), ServerError> {
    if args.initial_copy == InitialCopy::Snapshot {
        match snapshot_bytes(ch).await {
            Ok(data) => {
                info!(
                    bytes = data.len(),
                    "migrate: the source's snapshot is here; loading it"
                );
                let (summary, imported) = crate::snapshot::restore::restore(
                    held.store.as_ref(),
                    &held.fence,
                    Arc::new(data),
                    false,
                    args.replace,
                )
                .await
                .map_err(|e| ServerError::failed("loading the source's snapshot", e))?;
                info!(
                    revision = summary.revision,
                    compact_revision = summary.compact_revision,
                    revisions = imported.versions,
                    keys = imported.keys,
                    leases = imported.leases,
                    "migrate: snapshot loaded"
                );
                return Ok((summary.revision, summary.leases.into_iter().collect()));
            }
            Err(e) => warn!(error = %e, "migrate: the source refused Snapshot; copying by Range"),
        }
    }
    let leases = source_leases(ch, &BTreeMap::new())
        .await
        .map_err(|e| ServerError::failed("reading the source's leases", e.message()))?;
    let (revision, versions) = range_copy(ch)
        .await
        .map_err(|e| ServerError::failed("ranging over the source", e.message()))?;
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let sender = tokio::spawn(async move {
        let mut versions = versions.into_iter().peekable();
        while versions.peek().is_some() {
            let chunk: Vec<_> = versions.by_ref().take(CHUNK_VERSIONS).collect();
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    });
    let imported = held
        .store
        .import(
            &held.fence,
            Import {
                revision,
                // Nothing below the copy's revision is there to serve.
                compact_revision: revision,
                leases: leases.iter().map(|(&id, &ttl)| (id, ttl)).collect(),
                versions: rx,
                replace: args.replace,
            },
        )
        .await
        .map_err(|e| ServerError::failed("loading the source's keys", e.with_causes()))?;
    let _ = sender.await;
    info!(
        revision,
        keys = imported.keys,
        leases = imported.leases,
        "migrate: keys copied by Range"
    );
    Ok((revision, leases))
}

/// The source's snapshot, its SHA-256 trailer included.
async fn snapshot_bytes(ch: &Channel) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = MaintenanceClient::new(ch.clone())
        .max_decoding_message_size(usize::MAX)
        .snapshot(SnapshotRequest {})
        .await?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await? {
        data.extend_from_slice(&chunk.blob);
    }
    Ok(data)
}

/// What the follower knows and has done.
struct Follow {
    /// The newest revision committed into the keyspace.
    applied: i64,
    /// The source's revision, as last heard.
    source: i64,
    /// When the last revision was applied.
    last_applied_at: Instant,
    /// The leases the keyspace holds: id → TTL.
    leases: BTreeMap<i64, i64>,
}

/// Commits `batch`, resolving an indeterminate failure and retrying until it is known
/// to be in the store (a fenced commit stops the migration).
async fn commit(store: &dyn Store, held: &Exclusive, batch: Batch<'_>) -> Result<(), ServerError> {
    let mut backoff = Duration::from_millis(50);
    loop {
        match store.commit(&held.fence, batch).await {
            Ok(()) => return Ok(()),
            Err(e) if e.outcome() == pgetcd_storage::Outcome::Fenced => {
                return Err(ServerError::failed(
                    "the keyspace was taken over",
                    e.with_causes(),
                ));
            }
            Err(e) => {
                warn!(error = %e.with_causes(), "migrate: commit failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                if e.outcome() == pgetcd_storage::Outcome::Indeterminate
                    && let Ok(Resolution::Committed) = store.resolve(&held.fence, batch).await
                {
                    return Ok(());
                }
            }
        }
    }
}

/// The changes of one source revision.
fn changes_of(events: &[Event]) -> Vec<Change> {
    events
        .iter()
        .enumerate()
        .filter_map(|(sub, ev)| {
            let kv = ev.kv.as_ref()?;
            let version = if ev.r#type == EventType::Delete as i32 {
                Version {
                    mod_revision: kv.mod_revision,
                    sub: sub as u32,
                    ..Version::tombstone()
                }
            } else {
                Version {
                    mod_revision: kv.mod_revision,
                    sub: sub as u32,
                    create_revision: kv.create_revision,
                    version: kv.version,
                    lease: kv.lease,
                    value: Some(kv.value.clone()),
                }
            };
            Some(Change {
                key: kv.key.clone(),
                version,
                prev: None,
            })
        })
        .collect()
}

impl Follow {
    /// Applies a watch response's events, one batch per revision.
    async fn apply(&mut self, held: &Exclusive, events: &[Event]) -> Result<(), ServerError> {
        let mut start = 0;
        while start < events.len() {
            let rev = events[start]
                .kv
                .as_ref()
                .map(|k| k.mod_revision)
                .unwrap_or(0);
            let end = start
                + events[start..]
                    .iter()
                    .take_while(|e| e.kv.as_ref().map(|k| k.mod_revision) == Some(rev))
                    .count();
            if rev <= self.applied {
                start = end.max(start + 1);
                continue; // already in the keyspace
            }
            let changes = changes_of(&events[start..end]);
            let none = LeaseOps::default();
            commit(
                held.store.as_ref(),
                held,
                Batch {
                    prev_revision: self.applied,
                    revision: rev,
                    changes: &changes,
                    leases: &none,
                },
            )
            .await?;
            self.applied = rev;
            self.source = self.source.max(rev);
            self.last_applied_at = Instant::now();
            start = end;
        }
        Ok(())
    }

    /// Makes the keyspace's leases the source's.
    async fn sync_leases(&mut self, held: &Exclusive, ch: &Channel) -> Result<(), ServerError> {
        let source = match source_leases(ch, &self.leases).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e.message(), "migrate: cannot read the source's leases now");
                return Ok(());
            }
        };
        let mut ops = LeaseOps::default();
        for (&id, &ttl) in &source {
            if self.leases.get(&id) != Some(&ttl) {
                ops.ops.push(LeaseOp::Grant(id, ttl));
            }
        }
        for (&id, &ttl) in &self.leases {
            if !source.contains_key(&id) {
                ops.ops.push(LeaseOp::Revoke { id, ttl });
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        commit(
            held.store.as_ref(),
            held,
            Batch {
                prev_revision: self.applied,
                revision: self.applied,
                changes: &[],
                leases: &ops,
            },
        )
        .await?;
        self.leases = source;
        Ok(())
    }
}

/// Whether the source refuses writes now: a txn whose compare never holds (so it would
/// write nothing) but that names a put, which a NOSPACE etcd refuses before evaluating.
async fn source_refuses_writes(ch: &Channel) -> Result<bool, ServerError> {
    let probe = Bytes::from_static(b"\0pgetcd-migrate-probe");
    let r = KvClient::new(ch.clone())
        .txn(TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Version as i32,
                key: probe.clone(),
                target_union: Some(compare::TargetUnion::Version(-1)),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(
                    pgetcd_proto::etcdserverpb::PutRequest {
                        key: probe,
                        ..Default::default()
                    },
                )),
            }],
            failure: vec![],
        })
        .await;
    match r {
        Ok(_) => Ok(false),
        Err(s) if s.message().contains("database space exceeded") => Ok(true),
        Err(s) => Err(ServerError::failed("probing the source", s.message())),
    }
}

/// `pgetcd migrate`: returns the report to print after the cutover.
pub async fn run(args: &MigrateArgs) -> Result<String, ServerError> {
    let ch = connect(args).await?;
    let held = Exclusive::take(&args.storage, MIGRATE_NAME).await?;
    let outcome = migrate(args, &ch, &held).await;
    let released = held.release().await;
    let report = outcome?;
    released?;
    Ok(report)
}

async fn migrate(
    args: &MigrateArgs,
    ch: &Channel,
    held: &Exclusive,
) -> Result<String, ServerError> {
    let started = Instant::now();
    let (copied, leases) = first_copy(args, ch, held).await?;
    held.renew().await?;
    let mut follow = Follow {
        applied: copied,
        source: copied,
        last_applied_at: Instant::now(),
        leases,
    };
    let (req_tx, req_rx) = mpsc::channel(16);
    req_tx
        .send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: Bytes::from_static(b"\0"),
                    range_end: Bytes::from_static(b"\0"),
                    start_revision: copied + 1,
                    ..Default::default()
                },
            )),
        })
        .await
        .map_err(|e| ServerError::failed("watch", e))?;
    let mut responses = WatchClient::new(ch.clone())
        .max_decoding_message_size(usize::MAX)
        .watch(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
        .map_err(|e| ServerError::failed("watching the source", e.message()))?
        .into_inner();
    let (mut term, mut int) = (
        signal(SignalKind::terminate()).map_err(|e| ServerError::failed("signals", e))?,
        signal(SignalKind::interrupt()).map_err(|e| ServerError::failed("signals", e))?,
    );
    let mut poll = tokio::time::interval(POLL);
    let mut renew = tokio::time::interval(crate::node::TICK);
    let mut last_report = Instant::now();
    info!(
        from = copied + 1,
        "migrate: following the source; SIGINT or SIGTERM cuts over"
    );
    let mut cutover: Option<Instant> = None;
    let mut frozen = false;
    loop {
        tokio::select! {
            r = responses.message() => {
                let r = r.map_err(|e| ServerError::failed("the source's watch", e.message()))?
                    .ok_or_else(|| ServerError::failed("the source's watch", "ended"))?;
                if r.canceled {
                    return Err(ServerError::failed(
                        "the source's watch was cancelled",
                        if r.compact_revision > 0 {
                            format!("the source compacted past revision {} (compact revision {}): run the migration again", follow.applied + 1, r.compact_revision)
                        } else {
                            r.cancel_reason
                        },
                    ));
                }
                if let Some(h) = &r.header && r.events.is_empty() && !r.created {
                    // A progress response: the source's revision.
                    follow.source = follow.source.max(h.revision);
                }
                follow.apply(held, &r.events).await?;
            }
            _ = renew.tick() => held.renew().await?,
            _ = poll.tick() => {
                let _ = req_tx.try_send(WatchRequest {
                    request_union: Some(watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {})),
                });
                follow.sync_leases(held, ch).await?;
                if last_report.elapsed() >= REPORT {
                    last_report = Instant::now();
                    info!(applied = follow.applied, source = follow.source, lag = follow.source - follow.applied, leases = follow.leases.len(), "migrate: following");
                }
                if let Some(since) = cutover {
                    match try_cutover(ch, &mut follow).await? {
                        Cutover::Done => break,
                        Cutover::Refused(why) => {
                            warn!("migrate: cutover refused: {why}; still following (signal again to retry)");
                            cutover = None;
                        }
                        Cutover::Wait(why) if since.elapsed() > CATCH_UP_WAIT => {
                            warn!("migrate: cutover refused: {why}; still following (signal again to retry)");
                            cutover = None;
                        }
                        Cutover::Wait(_) => {}
                    }
                }
            }
            // The cutover is checked at once, not a second later.
            _ = term.recv() => {
                cutover = start_cutover(args, ch, &mut frozen, cutover).await?;
                poll.reset_immediately();
            }
            _ = int.recv() => {
                cutover = start_cutover(args, ch, &mut frozen, cutover).await?;
                poll.reset_immediately();
            }
        }
    }
    follow.sync_leases(held, ch).await?;
    Ok(format!(
        "cut over at revision {applied}: keyspace {ks:?} holds every revision of {from} (copied at {copied}, {followed} revisions followed, {leases} leases) after {secs:.1} s.\n\
         The source refuses writes{frozen}. Now start pgetcd on the keyspace (the same --postgres-url/--data-dir and --keyspace) \
         and point clients at it, e.g. kube-apiserver --etcd-servers=http://<pgetcd>:2379.",
        applied = follow.applied,
        ks = args.storage.keyspace,
        from = args.from,
        followed = follow.applied - copied,
        leases = follow.leases.len(),
        secs = started.elapsed().as_secs_f64(),
        frozen = if frozen {
            " (NOSPACE alarm; to go back to it: etcdctl alarm disarm)"
        } else {
            ""
        },
    ))
}

/// A signal: starts a cutover (freezing the source first when asked), or aborts one in
/// progress.
async fn start_cutover(
    args: &MigrateArgs,
    ch: &Channel,
    frozen: &mut bool,
    current: Option<Instant>,
) -> Result<Option<Instant>, ServerError> {
    if current.is_some() {
        return Err(ServerError::failed("cutover", "aborted by a second signal"));
    }
    info!("migrate: cutover asked for");
    if args.freeze_source && !*frozen {
        MaintenanceClient::new(ch.clone())
            .alarm(AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id: 0,
                alarm: AlarmType::Nospace as i32,
            })
            .await
            .map_err(|e| ServerError::failed("freezing the source (NOSPACE alarm)", e.message()))?;
        *frozen = true;
        info!("migrate: the source is frozen (NOSPACE alarm)");
    }
    Ok(Some(Instant::now()))
}

/// Where a cutover stands.
enum Cutover {
    /// It may complete.
    Done,
    /// Not yet: pgetcd is catching up (why).
    Wait(String),
    /// It cannot: the source accepts writes (why).
    Refused(String),
}

/// The source's revision now, from the header of a (linearizable) read.
async fn source_revision(ch: &Channel) -> Result<i64, ServerError> {
    let r = KvClient::new(ch.clone())
        .range(RangeRequest {
            key: Bytes::from_static(b"\0pgetcd-migrate-probe"),
            limit: 1,
            keys_only: true,
            ..Default::default()
        })
        .await
        .map_err(|e| ServerError::failed("reading the source's revision", e.message()))?;
    Ok(r.into_inner().header.map(|h| h.revision).unwrap_or(0))
}

/// Whether the cutover may complete now.
async fn try_cutover(ch: &Channel, follow: &mut Follow) -> Result<Cutover, ServerError> {
    if !source_refuses_writes(ch).await? {
        return Ok(Cutover::Refused(
            "the source still accepts writes (stop its writers and freeze it: run with --freeze-source)".into(),
        ));
    }
    // Frozen, the source's revision moves no more but by lease expiries (which come
    // through the watch like any delete): pgetcd must have applied it. The progress
    // responses alone may be a second old, from before a write made just before the
    // freeze whose event is still on its way.
    follow.source = follow.source.max(source_revision(ch).await?);
    if follow.applied < follow.source {
        return Ok(Cutover::Wait(format!(
            "pgetcd is at revision {}, the source at {}",
            follow.applied, follow.source
        )));
    }
    if follow.last_applied_at.elapsed() < POLL {
        return Ok(Cutover::Wait(
            "the source's revisions are still moving".into(),
        ));
    }
    Ok(Cutover::Done)
}
