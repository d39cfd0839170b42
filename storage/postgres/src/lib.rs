//! pgetcd's Postgres store: one keyspace in one Postgres schema, behind the
//! [`pgetcd_storage::Store`] trait.
//!
//! Owns everything that knows Postgres: the connection string and libpq TLS
//! ([`PgConnect`]), the read pool, the writer's connection with its prepared commit
//! statement and its backend's identity, the history partitions (created ahead of the
//! revisions, dropped by compaction; DDL in `pgetcd-partitioning`), schema set-up and
//! migration, and the change feed over logical replication (`pgetcd-wal`).
//!
//! Tables of a keyspace `<schema>`: `meta` (one row: ids, revision, compact revision,
//! leader epoch, schema version), `history` (every version, partitioned by revision),
//! `history_retained` (versions at or below the compact revision still visible, copied
//! out of dropped partitions), `kv` (each key's live version) and `leases`.
//!
//! Commit protocol: one statement, so one implicit transaction and one round trip per
//! batch; its first part is the fence, a compare-and-swap of `meta` on the leader epoch
//! *and* the previous revision. An in-doubt commit is resolved only after the backend
//! that ran it is terminated and gone (see `commit.rs`).
//!
//! Must not depend on the engine or gRPC.

/// The writer's connection, the fenced commit, and in-doubt resolution.
mod commit;
/// The data step of compaction.
mod compaction;
/// Postgres errors classified by SQLSTATE.
mod error;
/// The change feed over the logical replication stream.
mod feed;
/// Bulk load of a whole keyspace.
mod import;
/// Whole-keyspace reads: the start-up load, the export, the catch-up read.
mod load;
/// Instances of a keyspace and the writer role.
mod members;
/// libpq's TLS parameters of the connection string, and the TLS connector they make.
mod pgtls;
/// Server checks, schema creation and migration, and the fence.
mod setup;

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use pgetcd_storage::{
    Batch, Campaign, ChangeFeed, Changes, CompactionPlan, Export, FeedPrepared, Fence, Import,
    Imported, LoadVisitor, Loaded, MemberInfo, Meta, PoolStatus, Pruned, Removal, Resolution,
    Result, Store, StoreError, VersionId,
};
use pgetcd_wal::FeedNames;
use tokio_postgres::Client;
use tracing::{info, warn};

pub use commit::CommitRows;
pub use error::proves_rollback;
pub use pgetcd_partitioning::{DEFAULT_PARTITION_REVISIONS, Layout};
pub use pgtls::{PgConnect, PgTls, PgTlsConnect, PgTlsStream, PgUrlError, SslMode};

use error::read_error;

/// Default connections of the read pool.
pub const DEFAULT_READ_POOL_SIZE: usize = 8;

/// Where and how a keyspace lives in Postgres.
#[derive(Debug, Clone)]
pub struct PgStoreConfig {
    /// Connection string (URL or libpq key=value form, with libpq's TLS parameters).
    pub url: String,
    /// Postgres schema of the keyspace.
    pub schema: String,
    /// Revisions per history partition.
    pub partition_revisions: i64,
    /// Connections for value reads and figures.
    pub read_pool_size: usize,
    /// This instance's name as a consumer of the change feed (its own replication slot,
    /// `pgetcd_<schema>_<consumer>`); None: the keyspace's default slot
    /// `pgetcd_<schema>`.
    pub feed_consumer: Option<String>,
}

impl PgStoreConfig {
    /// Defaults for everything but the connection string.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "pgetcd".into(),
            partition_revisions: DEFAULT_PARTITION_REVISIONS,
            read_pool_size: DEFAULT_READ_POOL_SIZE,
            feed_consumer: None,
        }
    }
}

/// One keyspace in Postgres.
pub struct PgStore {
    layout: Layout,
    feed: FeedNames,
    target: PgConnect,
    pool: Pool,
    writer: tokio::sync::Mutex<commit::WriterState>,
    compactor: tokio::sync::Mutex<Option<Client>>,
    /// The role keeper's own connection (registration, campaign, renewal), so that a
    /// busy read pool never delays a renewal.
    role: tokio::sync::Mutex<Option<Client>>,
    /// Set by a load: the next compaction's data step also sweeps retained versions the
    /// index may not know of (see `compaction::physical`).
    sweep_retained: std::sync::atomic::AtomicBool,
}

/// Opens a connection and drives it on a background task.
pub(crate) async fn connect(target: &PgConnect) -> Result<Client> {
    let (client, conn) = target.connect().await.map_err(read_error("connect"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            warn!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

impl PgStore {
    /// Parses the connection string (with libpq's TLS parameters), reads the
    /// certificate files it names and builds the read pool. Connects to nothing yet.
    pub fn new(config: &PgStoreConfig) -> Result<Self> {
        let layout = Layout::new(&config.schema, config.partition_revisions)
            .map_err(|e| StoreError::Misconfigured(e.to_string()))?;
        let feed = match &config.feed_consumer {
            None => FeedNames::new(&config.schema),
            Some(c) => FeedNames::for_consumer(&config.schema, c)
                .map_err(|e| StoreError::Misconfigured(e.to_string()))?,
        };
        let target = PgConnect::parse(&config.url).map_err(|e| {
            StoreError::Misconfigured(format!(
                "PostgreSQL is misconfigured: bad --postgres-url: {}",
                e.with_causes()
            ))
        })?;
        info!(sslmode = %target.sslmode(), "postgres connection settings");
        let manager = Manager::from_config(
            target.config().clone(),
            target.tls().clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.read_pool_size.max(1))
            .build()
            .map_err(|e| StoreError::Misconfigured(format!("read pool: {e}")))?;
        Ok(Self {
            layout,
            feed,
            target,
            pool,
            writer: tokio::sync::Mutex::new(commit::WriterState::default()),
            compactor: tokio::sync::Mutex::new(None),
            role: tokio::sync::Mutex::new(None),
            sweep_retained: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The connection settings, with their TLS connector.
    pub fn target(&self) -> &PgConnect {
        &self.target
    }

    /// The layout of the keyspace's tables.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A new dedicated connection.
    pub async fn connect(&self) -> Result<Client> {
        connect(&self.target).await
    }

    /// The role keeper's connection, reconnected when lost.
    async fn role_connection(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let mut slot = self.role.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(self.connect().await?);
        }
        Ok(slot)
    }

    /// A connection from the read pool.
    async fn pooled(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(read_error("read pool"))
    }

    /// The backend pid of the writer's current connection, if it has one (tests cut
    /// and hold it).
    pub async fn writer_backend_pid(&self) -> Option<i32> {
        self.writer.lock().await.backend_pid()
    }
}

#[async_trait]
impl Store for PgStore {
    fn keyspace(&self) -> &str {
        self.layout.schema()
    }

    async fn setup(&self) -> Result<Meta> {
        let mut client = self.connect().await?;
        setup::check_server(&client).await?;
        setup::create_or_migrate(&mut client, &self.layout).await
    }

    async fn fence(&self) -> Result<(Fence, Meta)> {
        let client = self.connect().await?;
        let meta = setup::raise_epoch(&client, &self.layout).await?;
        Ok((
            Fence {
                epoch: meta.leader_epoch,
            },
            meta,
        ))
    }

    async fn meta(&self) -> Result<Meta> {
        let client = self.pooled().await?;
        setup::read_meta(&client, &self.layout).await
    }

    async fn register(&self, member: &MemberInfo) -> Result<u64> {
        let guard = self.role_connection().await?;
        let Some(client) = guard.as_ref() else {
            return Err(StoreError::determinate("role connection", "not connected"));
        };
        members::register(client, &self.layout, member).await
    }

    async fn members(&self, live: std::time::Duration) -> Result<Vec<MemberInfo>> {
        let guard = self.role_connection().await?;
        let Some(client) = guard.as_ref() else {
            return Err(StoreError::determinate("role connection", "not connected"));
        };
        members::members(client, &self.layout, live).await
    }

    async fn alarms(&self) -> Result<Vec<(u64, i32)>> {
        let guard = self.role_connection().await?;
        let Some(client) = guard.as_ref() else {
            return Err(StoreError::determinate("role connection", "not connected"));
        };
        members::alarms(client, &self.layout).await
    }

    async fn set_alarm(&self, member_id: u64, alarm: i32, on: bool) -> Result<bool> {
        let guard = self.role_connection().await?;
        let Some(client) = guard.as_ref() else {
            return Err(StoreError::determinate("role connection", "not connected"));
        };
        members::set_alarm(client, &self.layout, member_id, alarm, on).await
    }

    async fn auth(&self) -> Result<pgetcd_storage::AuthRecord> {
        let guard = self.role_connection().await?;
        let Some(client) = guard.as_ref() else {
            return Err(StoreError::determinate("role connection", "not connected"));
        };
        members::auth(client, &self.layout).await
    }

    async fn swap_auth(&self, expected: u64, record: &pgetcd_storage::AuthRecord) -> Result<bool> {
        let guard = self.role_connection().await?;
        let Some(client) = guard.as_ref() else {
            return Err(StoreError::determinate("role connection", "not connected"));
        };
        members::swap_auth(client, &self.layout, expected, record).await
    }

    async fn campaign(&self, name: &str, ttl: std::time::Duration) -> Result<Campaign> {
        let guard = self.role_connection().await?;
        let Some(client) = guard.as_ref() else {
            return Err(StoreError::determinate("role connection", "not connected"));
        };
        members::campaign(client, &self.layout, name, ttl).await
    }

    async fn renew(&self, fence: &Fence, name: &str, ttl: std::time::Duration) -> Result<()> {
        let guard = self.role_connection().await?;
        let Some(client) = guard.as_ref() else {
            return Err(StoreError::determinate("role connection", "not connected"));
        };
        members::renew(client, &self.layout, fence, name, ttl).await
    }

    async fn remove_member(
        &self,
        name: &str,
        feed: Option<&str>,
        live: std::time::Duration,
    ) -> Result<Removal> {
        let schema = self.layout.schema();
        let names = match feed {
            None => FeedNames::new(schema),
            Some(c) => FeedNames::for_consumer(schema, c)
                .map_err(|e| StoreError::Misconfigured(e.to_string()))?,
        };
        let client = self.pooled().await?;
        members::remove(&client, &self.layout, name, &names, live).await
    }

    async fn hand_over(
        &self,
        fence: &Fence,
        name: &str,
        to: Option<&str>,
        ttl: std::time::Duration,
    ) -> Result<()> {
        let guard = self.role_connection().await?;
        let Some(client) = guard.as_ref() else {
            return Err(StoreError::determinate("role connection", "not connected"));
        };
        members::hand_over(client, &self.layout, fence, name, to, ttl).await
    }

    async fn leader(&self) -> Result<Option<String>> {
        let guard = self.role_connection().await?;
        let Some(client) = guard.as_ref() else {
            return Err(StoreError::determinate("role connection", "not connected"));
        };
        members::leader(client, &self.layout).await
    }

    /// Settles an in-doubt write first (an uncertain compaction record, say), so the
    /// snapshot cannot be overtaken by it.
    async fn changes_after(&self, after: i64, revisions: i64) -> Result<Changes> {
        let mut client = self.pooled().await?;
        load::changes_after(&mut client, &self.layout, after, revisions).await
    }

    async fn export(&self) -> Result<Export> {
        let client = self.connect().await?;
        let (head_tx, head) = tokio::sync::oneshot::channel();
        let (tx, versions) = tokio::sync::mpsc::channel(pgetcd_storage::CHUNKS_IN_FLIGHT);
        tokio::spawn(load::export(client, self.layout.clone(), head_tx, tx));
        let (meta, leases) = head
            .await
            .map_err(|_| StoreError::determinate("export", "the export task ended"))??;
        Ok(Export {
            meta,
            leases,
            versions,
        })
    }

    async fn import(&self, fence: &Fence, import: Import) -> Result<Imported> {
        let mut w = self.writer.lock().await;
        w.settle_in_doubt(&self.target).await?;
        w.forget_partitions();
        let mut client = self.connect().await?;
        let imported = import::import(&mut client, &self.layout, fence, import).await?;
        // What was imported at or below the compact revision is in history_retained.
        self.sweep_retained.store(true, Ordering::SeqCst);
        Ok(imported)
    }

    async fn load(&self, visit: &mut LoadVisitor<'_>) -> Result<Loaded> {
        let mut w = self.writer.lock().await;
        w.settle_in_doubt(&self.target).await?;
        // The writer's partition list is read again before its next commit.
        w.forget_partitions();
        drop(w);
        let mut client = self.connect().await?;
        let loaded = load::load(&mut client, &self.layout, visit).await?;
        if loaded.meta.compact_revision >= 0 {
            self.sweep_retained.store(true, Ordering::SeqCst);
        }
        Ok(loaded)
    }

    async fn commit(&self, fence: &Fence, batch: Batch<'_>) -> Result<()> {
        let mut w = self.writer.lock().await;
        w.commit(&self.target, &self.layout, fence, batch).await
    }

    async fn resolve(&self, fence: &Fence, batch: Batch<'_>) -> Result<Resolution> {
        let mut w = self.writer.lock().await;
        w.resolve(&self.target, &self.layout, fence, batch).await
    }

    async fn values(&self, ids: &[VersionId]) -> Result<HashMap<VersionId, Bytes>> {
        let s = self.layout.schema();
        let client = self.pooled().await?;
        let revs: Vec<i64> = ids.iter().map(|i| i.0).collect();
        let subs: Vec<i32> = ids.iter().map(|i| i.1 as i32).collect();
        let sql = format!(
            "SELECT h.revision, h.sub, h.value FROM unnest($1::int8[], $2::int4[]) AS t(r, s) \
               JOIN {s}.history h ON h.revision = t.r AND h.sub = t.s \
             UNION ALL \
             SELECT h.revision, h.sub, h.value FROM unnest($1::int8[], $2::int4[]) AS t(r, s) \
               JOIN {s}.history_retained h ON h.revision = t.r AND h.sub = t.s"
        );
        let stmt = client
            .prepare_cached(&sql)
            .await
            .map_err(read_error("prepare value read"))?;
        let rows = client
            .query(&stmt, &[&revs, &subs])
            .await
            .map_err(read_error("read values"))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let v: Vec<u8> = r.get(2);
                (
                    (r.get::<_, i64>(0), r.get::<_, i32>(1) as u32),
                    Bytes::from(v),
                )
            })
            .collect())
    }

    async fn record_compaction(
        &self,
        fence: &Fence,
        current: i64,
        revision: i64,
    ) -> Result<CompactionPlan> {
        let mut w = self.writer.lock().await;
        w.record_compaction(&self.target, &self.layout, fence, current, revision)
            .await
    }

    async fn compact(&self, fence: &Fence, plan: &CompactionPlan, pruned: &Pruned) -> Result<()> {
        let mut slot = self.compactor.lock().await;
        let mut client = match slot.take().filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => self.connect().await?,
        };
        let sweep = self.sweep_retained.load(Ordering::SeqCst);
        let result =
            compaction::physical(&mut client, &self.layout, fence, plan, pruned, sweep).await;
        if result.is_ok() {
            self.sweep_retained.store(false, Ordering::SeqCst);
            *slot = Some(client);
        }
        result
    }

    async fn size(&self) -> Result<i64> {
        let client = self.pooled().await?;
        let row = client
            .query_one(
                "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relkind = 'r'",
                &[&self.layout.schema()],
            )
            .await
            .map_err(read_error("db size"))?;
        Ok(row.get(0))
    }

    async fn ping(&self) -> Result<()> {
        let client = self.pooled().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(read_error("ping"))?;
        Ok(())
    }

    /// VACUUM (ANALYZE) of the keyspace's tables: dead rows left by updates, deletes
    /// and compaction become reusable space (etcd's Defragment has no closer meaning on
    /// Postgres; VACUUM FULL would lock out writes).
    async fn defragment(&self) -> Result<()> {
        let s = self.layout.schema();
        let client = self.pooled().await?;
        client
            .batch_execute(&format!(
                "VACUUM (ANALYZE) {s}.meta, {s}.kv, {s}.history, {s}.history_retained, {s}.leases"
            ))
            .await
            .map_err(read_error("vacuum"))?;
        Ok(())
    }

    fn pool_status(&self) -> PoolStatus {
        let s = self.pool.status();
        PoolStatus {
            open: s.size,
            idle: s.available,
            max: s.max_size,
            waiting: s.waiting,
        }
    }

    async fn prepare_feed(&self) -> Result<FeedPrepared> {
        let client = self.connect().await?;
        feed::prepare(&client, &self.feed).await
    }

    async fn open_feed(&self) -> Result<Box<dyn ChangeFeed>> {
        Ok(Box::new(
            feed::PgFeed::open(&self.target, &self.feed).await?,
        ))
    }

    async fn feed_retained_bytes(&self) -> Result<Option<i64>> {
        let client = self.pooled().await?;
        pgetcd_wal::retained_bytes(&client, &self.feed)
            .await
            .map_err(read_error("replication slot lag"))
    }

    async fn bump_revision(
        &self,
        fence: &Fence,
        current: i64,
        revision: i64,
        mark_compacted: bool,
    ) -> Result<Meta> {
        let mut w = self.writer.lock().await;
        w.bump_revision(
            &self.target,
            &self.layout,
            fence,
            current,
            revision,
            mark_compacted,
        )
        .await
    }
}

/// The pgetcd keyspaces of the database at `url`: the schemas holding a keyspace's
/// `meta` table (with its `schema_version` column) and partitioned `history`, by name.
pub async fn list_keyspaces(url: &str) -> Result<Vec<String>> {
    let target = PgConnect::parse(url).map_err(|e| {
        StoreError::Misconfigured(format!("bad --postgres-url: {}", e.with_causes()))
    })?;
    let client = connect(&target).await?;
    let rows = client
        .query(
            "SELECT n.nspname::text FROM pg_namespace n \
             WHERE EXISTS (SELECT 1 FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid \
                 WHERE c.relnamespace = n.oid AND c.relname = 'meta' AND a.attname = 'schema_version') \
               AND EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid \
                 AND c.relname = 'history' AND c.relkind = 'p') \
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(read_error("list keyspaces"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

impl PgStore {
    /// Drops the keyspace for good: its schema with every table and partition, its
    /// publication, and the replication slots of its default feed and of the named
    /// feed consumers (its instances; a slot in use is refused by Postgres). One
    /// transaction for the schema and publication; the slots after it.
    pub async fn drop_keyspace(&self, consumers: &[String]) -> Result<()> {
        let s = self.layout.schema();
        let mut slots = vec![FeedNames::new(s).slot];
        for c in consumers {
            if let Ok(names) = FeedNames::for_consumer(s, c) {
                slots.push(names.slot);
            }
        }
        let mut client = self.connect().await?;
        let tx = client
            .transaction()
            .await
            .map_err(read_error("drop keyspace: begin"))?;
        tx.batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}; DROP SCHEMA IF EXISTS {s} CASCADE",
            pgetcd_wal::slot_name(s)
        ))
        .await
        .map_err(read_error("drop keyspace"))?;
        tx.commit()
            .await
            .map_err(error::write_error("drop keyspace: commit"))?;
        for slot in &slots {
            client
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE slot_name = $1",
                    &[slot],
                )
                .await
                .map_err(read_error("drop the keyspace's replication slot"))?;
        }
        Ok(())
    }
}
