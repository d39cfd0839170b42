//! This instance's place among the instances of its keyspace: registration, the writer
//! role, and the engine it serves with now.
//!
//! Every instance registers in the keyspace's `members` table and campaigns for the
//! writer role ([`Store::campaign`], a claim of [`ROLE_TTL`] on Postgres's clock, taken
//! with the fencing epoch raised in the same compare-and-swap). The winner opens a
//! writer engine; the others open follower engines (each on a change feed of its own)
//! and campaign again every [`TICK`]. The writer renews its claim every tick; when a
//! renewal is refused (fenced) or none succeeded for a whole [`ROLE_TTL`], it steps down
//! to a follower, since another instance may be writing. A follower that wins becomes
//! the writer: a new engine loads the store's state. On every switch the engine is
//! replaced in the [`Node`] the services read, and the watch feed is restarted over the
//! new engine (watchers keep their streams: the bus and its revisions go on).
//!
//! A single instance campaigns once, wins, and behaves as before. An instance that
//! restarts under the same `--name` takes its own claim back at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use pgetcd_engine::{Engine, EngineConfig, Error};
use pgetcd_storage::{Campaign, MemberInfo, Store};
use pgetcd_watchbus::Hub;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::watch_feed::{self, WatchSource};

/// How long a writer's claim lasts without renewal; a dead writer is replaced within
/// about this plus one [`TICK`].
pub const ROLE_TTL: Duration = Duration::from_secs(2);
/// How long after sending a renewal (or a won campaign) the writer trusts its claim for
/// linearizable reads: the claim lasts [`ROLE_TTL`] from when Postgres ran the statement,
/// which is later; the margin covers clock rate differences.
pub const CLAIM_SURE: Duration = Duration::from_millis(1700);
/// How often the writer renews and followers campaign and heartbeat.
pub const TICK: Duration = Duration::from_millis(500);
/// Instances seen within this are listed by MemberList.
pub const MEMBER_LIVE: Duration = Duration::from_secs(5);
/// A forwarded request not answered within this fails (see [`forwarded`]): the writer it
/// went to may be paused or cut off, and the client retries, by then through the
/// instance that took over.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a follower tries to connect to the writer.
pub const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a follower waits to apply the revision of a write it forwarded.
pub const FORWARD_APPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// An instance that has not seen a live writer (the writer: has not renewed its claim)
/// for this long has no leader: it refuses new require-leader streams and ends the open
/// ones with `etcdserver: no leader`, as an etcd member does a few election timeouts
/// after losing its leader. Longer than a take-over, so one does not end them.
pub const LEADER_LOST_AFTER: Duration = Duration::from_millis(2500);

/// The gRPC metadata key and value of etcd's require-leader streams
/// (clientv3.WithRequireLeader; kube-apiserver's watches use it).
const REQUIRE_LEADER: (&str, &str) = ("hasleader", "true");

/// Whether a request asks for a stream that needs a leader.
pub fn requires_leader(metadata: &tonic::metadata::MetadataMap) -> bool {
    metadata
        .get(REQUIRE_LEADER.0)
        .is_some_and(|v| v.as_bytes() == REQUIRE_LEADER.1.as_bytes())
}

/// How long a follower holds a write while no writer can take it (no writer known, or
/// the known one refuses connections: it died and its claim has not lapsed yet) before
/// answering `etcdserver: no leader`: long enough for a take-over, as an etcd member
/// holds proposals through an election.
pub const FORWARD_WAIT: Duration = Duration::from_secs(5);

/// Whether a forwarding attempt failed before the request reached a writer (so it can
/// be sent again without risk of applying it twice): no writer known, or the connection
/// to it refused.
fn never_sent(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    if status.message() == no_leader().message() && status.source().is_none() {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = status.source();
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// What a client sees when a request forwarded to the writer fails: the writer's own
/// answer as it is; a failure to reach the writer or to hear back (it died, is cut off
/// or paused; a write may or may not have happened) becomes etcd's error for a request
/// cut short by a leader failure, which clients retry, instead of the transport's
/// (`Unknown "transport error"` is not retried).
pub fn forwarded(status: tonic::Status) -> tonic::Status {
    use std::error::Error as _;
    let from_transport = status.source().is_some() || status.code() == tonic::Code::Unknown;
    if from_transport {
        tonic::Status::unavailable(
            "etcdserver: request timed out, possibly due to previous leader failure",
        )
    } else {
        status
    }
}

/// The gRPC metadata key marking a request an instance forwarded to its keyspace's
/// writer: a routed listener receiving one serves it for its own keyspace alone (the
/// forwarding instance's router reaches the other keyspaces itself).
pub const FORWARDED: &str = "pgetcd-forwarded";

/// `message` as a request forwarded to the writer.
pub fn to_writer<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r
}

/// Whether a request was forwarded by another instance (see [`FORWARDED`]).
pub fn was_forwarded(metadata: &tonic::metadata::MetadataMap) -> bool {
    metadata.contains_key(FORWARDED)
}

/// etcd's error for a request only the writer answers, sent to another instance.
fn not_leader() -> tonic::Status {
    crate::status::to_status(Error::NotWriter)
}

/// etcd's error for a require-leader stream on a member without a leader.
pub fn no_leader() -> tonic::Status {
    tonic::Status::unavailable("etcdserver: no leader")
}

/// The engine this instance serves with now, and what it knows of the others. Cheap to
/// clone; the services hold one.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    engine: ArcSwap<Engine>,
    me: Mutex<MemberInfo>,
    /// Live instances, refreshed every tick.
    members: Mutex<Vec<MemberInfo>>,
    /// The writer's member id (0: unknown).
    leader_id: AtomicU64,
    /// The last writer seen (0: none yet), and how often another one was seen
    /// (etcd_server_leader_changes_seen_total).
    last_leader: AtomicU64,
    leader_changes: AtomicU64,
    /// A channel to the writer's first client URL, by URL.
    writer_channel: Mutex<Option<(String, tonic::transport::Channel)>>,
    /// How to reach a writer whose client URL is https.
    forward_tls: Option<tonic::transport::ClientTlsConfig>,
    /// When a live writer was last seen (by the writer: when its claim was last renewed).
    leader_seen: Mutex<Instant>,
    /// Requests to the role keeper (MoveLeader).
    role_requests: mpsc::Sender<RoleRequest>,
    /// Their receiving end, until the role keeper takes it.
    role_inbox: Mutex<Option<mpsc::Receiver<RoleRequest>>>,
    /// The keyspace's store (MoveLeader watches the epoch in it).
    store: Arc<dyn Store>,
}

/// Asks the role keeper to hand the writer role to the named instance; answers with the
/// epoch it held.
struct RoleRequest {
    to: String,
    reply: oneshot::Sender<Result<i64, tonic::Status>>,
}

/// How long MoveLeader waits for the new writer to take the role.
pub const MOVE_LEADER_TIMEOUT: Duration = Duration::from_secs(5);

impl Node {
    fn new(
        store: Arc<dyn Store>,
        engine: Engine,
        me: MemberInfo,
        forward_tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Node {
        let (role_requests, role_inbox) = mpsc::channel(4);
        Node {
            inner: Arc::new(NodeInner {
                role_requests,
                role_inbox: Mutex::new(Some(role_inbox)),
                store,
                engine: ArcSwap::from_pointee(engine),
                members: Mutex::new(vec![me.clone()]),
                me: Mutex::new(me),
                leader_id: AtomicU64::new(0),
                last_leader: AtomicU64::new(0),
                leader_changes: AtomicU64::new(0),
                writer_channel: Mutex::new(None),
                forward_tls,
                leader_seen: Mutex::new(Instant::now()),
            }),
        }
    }

    /// The engine to serve this request with.
    pub fn engine(&self) -> Arc<Engine> {
        self.inner.engine.load_full()
    }

    /// This instance's registration.
    pub fn me(&self) -> MemberInfo {
        self.inner.me.lock().clone()
    }

    /// The live instances (at least this one).
    pub fn members(&self) -> Vec<MemberInfo> {
        self.inner.members.lock().clone()
    }

    /// A channel to the writer, for a follower to forward writes on. `etcdserver: no
    /// leader` while no instance is known to hold the role.
    pub fn writer_channel(&self) -> Result<tonic::transport::Channel, tonic::Status> {
        let id = self.inner.leader_id.load(Ordering::Relaxed);
        let url = self
            .members()
            .into_iter()
            .find(|m| m.member_id == id && id != 0)
            .and_then(|m| m.client_urls.into_iter().next())
            .ok_or_else(no_leader)?;
        let mut cached = self.inner.writer_channel.lock();
        if let Some((u, ch)) = cached.as_ref()
            && *u == url
        {
            return Ok(ch.clone());
        }
        let mut endpoint =
            tonic::transport::Endpoint::from_shared(url.clone()).map_err(|_| no_leader())?;
        if url.starts_with("https://") {
            let Some(tls) = &self.inner.forward_tls else {
                return Err(tonic::Status::unavailable(
                    "etcdserver: not leader (forwarding to an https writer needs --trusted-ca-file)",
                ));
            };
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| {
                warn!(error = %e, %url, "TLS settings for forwarding to the writer");
                no_leader()
            })?;
        }
        let ch = endpoint
            .connect_timeout(FORWARD_CONNECT_TIMEOUT)
            .timeout(FORWARD_TIMEOUT)
            .connect_lazy();
        *cached = Some((url, ch.clone()));
        Ok(ch)
    }

    /// Whether this instance knows of a live writer (itself, or another it saw within
    /// [`LEADER_LOST_AFTER`]).
    pub fn has_leader(&self) -> bool {
        self.inner.leader_seen.lock().elapsed() < LEADER_LOST_AFTER
    }

    fn saw_leader(&self) {
        *self.inner.leader_seen.lock() = Instant::now();
    }

    /// Resolves once this instance has no leader (see [`Node::has_leader`]): what ends a
    /// require-leader stream.
    pub async fn leader_lost(&self) {
        while self.has_leader() {
            tokio::time::sleep(TICK).await;
        }
    }

    /// For a stream opened with `metadata`: refuses it when it requires a leader and
    /// there is none; else whether it must end when the leader is lost.
    pub fn admit_stream(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<bool, tonic::Status> {
        let required = requires_leader(metadata);
        if required && !self.has_leader() {
            return Err(no_leader());
        }
        Ok(required)
    }

    /// MoveLeader: hands the writer role from this instance to the live instance
    /// `target`, and returns once it took it (etcd's errors: `not leader` on a follower,
    /// `bad leader transferee` for an unknown target, a timeout when the target did not
    /// take over).
    pub async fn move_leader(&self, target: u64) -> Result<(), tonic::Status> {
        if self.engine().is_follower() {
            return Err(not_leader());
        }
        if target == self.me().member_id {
            return Ok(());
        }
        let Some(to) = self.members().into_iter().find(|m| m.member_id == target) else {
            return Err(tonic::Status::failed_precondition(
                "etcdserver: bad leader transferee",
            ));
        };
        let (reply, answer) = oneshot::channel();
        self.inner
            .role_requests
            .send(RoleRequest {
                to: to.name.clone(),
                reply,
            })
            .await
            .map_err(|_| not_leader())?;
        let epoch = answer.await.map_err(|_| not_leader())??;
        let deadline = Instant::now() + MOVE_LEADER_TIMEOUT;
        loop {
            if let Ok(meta) = self.inner.store.meta().await
                && meta.leader_epoch > epoch
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(tonic::Status::deadline_exceeded(
                    "etcdserver: request timed out, leader transfer took too long",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// MemberRemove: forgets an instance that is gone for good and drops its replication
    /// slot (which otherwise keeps WAL for it); the live instances after it. A running
    /// instance would register again at once, so it is refused until it stops.
    pub async fn remove_member(&self, id: u64) -> Result<Vec<MemberInfo>, tonic::Status> {
        const EVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
        let storage =
            |e: pgetcd_storage::StoreError| crate::status::to_status(pgetcd_engine::Error::from(e));
        let store = &self.inner.store;
        let not_found = || tonic::Status::not_found("etcdserver: member not found");
        let all = store.members(EVER).await.map_err(storage)?;
        let Some(m) = all.into_iter().find(|m| m.member_id == id) else {
            return Err(not_found());
        };
        let feed = feed_consumer(&m.name);
        match store
            .remove_member(&m.name, feed.as_deref(), MEMBER_LIVE)
            .await
            .map_err(storage)?
        {
            pgetcd_storage::Removal::Removed => {
                info!(name = %m.name, member_id = id, "removed a departed instance");
                store.members(MEMBER_LIVE).await.map_err(storage)
            }
            pgetcd_storage::Removal::Unknown => Err(not_found()),
            pgetcd_storage::Removal::Live => Err(tonic::Status::failed_precondition(format!(
                "etcdserver: member {id:x} is running (seen within {MEMBER_LIVE:?}): stop it first"
            ))),
        }
    }

    /// Sends a request to the writer with `call` (given a channel to it), holding it
    /// through a take-over: an attempt that never reached a writer ([`never_sent`]) is
    /// made again, every 50 ms for up to [`FORWARD_WAIT`], so a client sees a pause
    /// rather than an error. Any other failure is answered at once ([`forwarded`]): a
    /// request the writer may have received is never sent twice.
    pub async fn forward<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(tonic::transport::Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + FORWARD_WAIT;
        loop {
            let attempt = match self.writer_channel() {
                Ok(ch) => call(ch).await,
                Err(s) => Err(s),
            };
            match attempt {
                Err(s) if never_sent(&s) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) if never_sent(&s) => return Err(no_leader()),
                r => return r.map_err(forwarded),
            }
        }
    }

    /// Notes the writer known now: a writer other than the last one seen (the first
    /// one included, as etcd counts) is a leader change.
    pub fn note_leader(&self) {
        let now = self.leader_id();
        if now != 0 && self.inner.last_leader.swap(now, Ordering::Relaxed) != now {
            self.inner.leader_changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many leader changes this instance saw.
    pub fn leader_changes(&self) -> u64 {
        self.inner.leader_changes.load(Ordering::Relaxed)
    }

    /// The writer's member id, or 0 when no instance holds the role.
    pub fn leader_id(&self) -> u64 {
        if !self.engine().is_follower() {
            return self.me().member_id;
        }
        self.inner.leader_id.load(Ordering::Relaxed)
    }
}

/// Runs the role of this instance.
pub struct Roles {
    node: Node,
    store: Arc<dyn Store>,
    config: EngineConfig,
    hub: Hub,
    watch_source: WatchSource,
    feed: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    /// The writer's fence, while this instance writes.
    fence: Option<pgetcd_storage::Fence>,
    renewed: Instant,
}

/// The name of this instance's change feed consumer: the keyspace's default slot for
/// the default name (a single instance keeps the slot it always had), else one derived
/// from the name.
pub fn feed_consumer(name: &str) -> Option<String> {
    if name == "default" {
        return None;
    }
    let cleaned: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    Some(cleaned)
}

/// Registers this instance, campaigns once and opens the engine its role calls for.
pub async fn join(
    store: Arc<dyn Store>,
    mut config: EngineConfig,
    mut me: MemberInfo,
    forward_tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<(Node, Option<pgetcd_storage::Fence>, EngineConfig), Error> {
    store.setup().await?;
    me.member_id = store.register(&me).await?;
    config.member_id = Some(me.member_id);
    let claimed = Instant::now();
    let (engine, fence) = match store.campaign(&me.name, ROLE_TTL).await? {
        Campaign::Won { fence, meta } => {
            info!(name = %me.name, epoch = fence.epoch, "writing the keyspace");
            let engine = Engine::open_fenced(config.clone(), store.clone(), fence, meta).await?;
            engine.claim_until(claimed + CLAIM_SURE);
            engine.prepare_feed().await?;
            (engine, Some(fence))
        }
        Campaign::Lost { leader } => {
            info!(name = %me.name, %leader, "following the keyspace's writer");
            (Engine::follow(config.clone(), store.clone()).await?, None)
        }
    };
    Ok((Node::new(store, engine, me, forward_tls), fence, config))
}

impl Roles {
    /// The role keeper for `node` (joined with `fence` when it writes).
    pub fn new(
        node: Node,
        store: Arc<dyn Store>,
        config: EngineConfig,
        fence: Option<pgetcd_storage::Fence>,
        hub: Hub,
        watch_source: WatchSource,
    ) -> Roles {
        Roles {
            node,
            store,
            config,
            hub,
            watch_source,
            feed: None,
            fence,
            renewed: Instant::now(),
        }
    }

    /// Keeps the role until `shutdown`; then a writer gives it up, so that another
    /// instance takes over at its next campaign rather than once the claim lapses.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.restart_feed();
        let mut tick = tokio::time::interval(TICK);
        let mut requests = self.node.inner.role_inbox.lock().take();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(req) = async {
                    match requests.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.hand_over(req).await;
                    continue;
                }
                _ = crate::shutdown::stopped(&mut shutdown) => break,
            }
            self.heartbeat().await;
            self.node.note_leader();
            if self.fence.is_some() && self.node.engine().writer_failed() {
                // Its commit found the store elsewhere than it expected (fenced): give the
                // role up; the next campaign opens a writer on what the store holds.
                warn!("the writer stopped; following, then campaigning again");
                self.step_down().await;
            } else if self.fence.is_some() {
                self.renew().await;
            } else {
                self.campaign().await;
            }
        }
        if let Some(fence) = self.fence.take() {
            let name = self.node.me().name;
            let resign = self.store.hand_over(&fence, &name, None, ROLE_TTL);
            match tokio::time::timeout(TICK, resign).await {
                Ok(Ok(())) => info!(%name, "gave the writer role up"),
                Ok(Err(e)) => warn!(error = %e, "giving the writer role up"),
                Err(_) => warn!("giving the writer role up: no answer"),
            }
        }
        if let Some((stop, task)) = self.feed.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }

    /// MoveLeader's part here: gives the claim to `req.to` and follows.
    async fn hand_over(&mut self, req: RoleRequest) {
        let Some(fence) = self.fence else {
            let _ = req.reply.send(Err(not_leader()));
            return;
        };
        let name = self.node.me().name;
        match self
            .store
            .hand_over(&fence, &name, Some(&req.to), ROLE_TTL)
            .await
        {
            Ok(()) => {
                info!(to = %req.to, epoch = fence.epoch, "handing the writer role over");
                // Forwarded requests wait for the new writer rather than come back here.
                self.node.inner.leader_id.store(0, Ordering::Relaxed);
                let _ = req.reply.send(Ok(fence.epoch));
                self.step_down().await;
            }
            Err(e) => {
                let _ = req.reply.send(Err(tonic::Status::unavailable(format!(
                    "etcdserver: leader transfer failed: {e}"
                ))));
            }
        }
    }

    /// Registers again (the heartbeat) and refreshes what is known of the others.
    async fn heartbeat(&self) {
        let me = self.node.me();
        if let Err(e) = self.store.register(&me).await {
            warn!(error = %e, "registering this instance");
        }
        if let Ok(members) = self.store.members(MEMBER_LIVE).await
            && !members.is_empty()
        {
            match self.store.leader().await {
                Ok(Some(leader)) => {
                    if let Some(m) = members.iter().find(|m| m.name == leader) {
                        self.node
                            .inner
                            .leader_id
                            .store(m.member_id, Ordering::Relaxed);
                        // The writer counts its own renewals, not its registration.
                        if self.fence.is_none() {
                            self.node.saw_leader();
                        }
                    }
                }
                Ok(None) => self.node.inner.leader_id.store(0, Ordering::Relaxed),
                Err(_) => {}
            }
            *self.node.inner.members.lock() = members;
        }
    }

    async fn renew(&mut self) {
        let Some(fence) = self.fence else { return };
        let name = self.node.me().name;
        let started = Instant::now();
        match self.store.renew(&fence, &name, ROLE_TTL).await {
            Ok(()) => {
                self.renewed = started;
                self.node.engine().claim_until(started + CLAIM_SURE);
                self.node.saw_leader();
            }
            Err(e) if e.outcome() == pgetcd_storage::Outcome::Fenced => {
                warn!(error = %e, "lost the writer role; following");
                self.step_down().await;
            }
            Err(e) => {
                warn!(error = %e, "renewing the writer role");
                if self.renewed.elapsed() >= ROLE_TTL {
                    warn!(
                        "no renewal for a whole claim; another instance may write now: following"
                    );
                    self.step_down().await;
                }
            }
        }
    }

    async fn campaign(&mut self) {
        let name = self.node.me().name;
        let started = Instant::now();
        match self.store.campaign(&name, ROLE_TTL).await {
            Ok(Campaign::Won { fence, meta }) => {
                match Engine::open_fenced(self.config.clone(), self.store.clone(), fence, meta)
                    .await
                {
                    Ok(engine) => {
                        if let Err(e) = engine.prepare_feed().await {
                            warn!(error = %e, "preparing the change feed");
                        }
                        info!(
                            %name,
                            epoch = fence.epoch,
                            revision = engine.stats().revision,
                            took_ms = started.elapsed().as_millis() as u64,
                            "took over the writer role"
                        );
                        engine.claim_until(started + CLAIM_SURE);
                        self.swap(engine);
                        self.node.saw_leader();
                        self.fence = Some(fence);
                        self.renewed = started;
                    }
                    Err(e) => warn!(error = %e, "opening the writer after winning the role"),
                }
            }
            Ok(Campaign::Lost { .. }) => {}
            Err(e) => warn!(error = %e, "campaigning for the writer role"),
        }
    }

    async fn step_down(&mut self) {
        self.fence = None;
        match Engine::follow(self.config.clone(), self.store.clone()).await {
            Ok(engine) => self.swap(engine),
            Err(e) => warn!(error = %e, "opening a follower after losing the writer role"),
        }
    }

    /// Serves with `engine` from now on; retires the old one and restarts the watch feed.
    fn swap(&mut self, engine: Engine) {
        let old = self.node.inner.engine.swap(Arc::new(engine));
        old.retire();
        self.restart_feed();
    }

    fn restart_feed(&mut self) {
        if let Some((stop, _)) = self.feed.take() {
            let _ = stop.send(true);
        }
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(watch_feed::run(
            (*self.node.engine()).clone(),
            self.hub.clone(),
            self.watch_source,
            rx,
        ));
        self.feed = Some((stop, task));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_failures_become_etcds_leader_failure_error() {
        let leader_failure =
            "etcdserver: request timed out, possibly due to previous leader failure";
        // The transport's own errors (connect, reset, timeout) carry their cause.
        let transport = tonic::Status::from_error(Box::new(std::io::Error::other("reset")));
        let unknown = tonic::Status::unknown("transport error");
        for s in [transport, unknown] {
            let f = forwarded(s);
            assert_eq!(f.code(), tonic::Code::Unavailable);
            assert_eq!(f.message(), leader_failure);
        }
        // The writer's own answers pass as they are.
        let answer = tonic::Status::invalid_argument("etcdserver: key is not provided");
        assert_eq!(forwarded(answer.clone()).message(), answer.message());
        assert_eq!(forwarded(no_leader()).message(), "etcdserver: no leader");
    }
}
