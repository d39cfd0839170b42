//! The writer's connection, the fenced group commit, and resolution of a commit whose
//! outcome is unknown.
//!
//! The writer's connection carries the prepared commit statement and the identity of
//! its backend (`pg_backend_pid()` and `backend_start`, read right after connecting,
//! before any commit is sent on it).
//!
//! Commit: the history partitions the batch needs are created first (DDL on the same
//! connection); then one statement does everything. Its first part is the fence, an
//! `UPDATE meta ... WHERE leader_epoch = $epoch AND revision = $prev`; the statement
//! divides by the number of rows the fence updated, so a moved epoch or revision raises
//! `division_by_zero` and rolls the whole batch back ([`StoreError::Fenced`]).
//!
//! In doubt (the connection failed while the statement was in flight): the backend that
//! ran it may still be running it, for instance waiting for a lock, and commit after
//! anything we read. So [`WriterState::resolve`] first terminates that backend from a
//! new connection and waits until it is gone from `pg_stat_activity`; only then is the
//! transaction's fate settled, and `meta` is read: revision = the batch's last revision
//! means committed, = the previous revision means not committed, anything else (or a
//! moved epoch) is fenced.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use pgetcd_partitioning::{KIND_DELETE, KIND_PUT, Layout};
use pgetcd_storage::{Batch, Change, CompactionPlan, Fence, Meta, Resolution, Result, StoreError};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};
use tracing::{info, warn};

use crate::PgConnect;
use crate::error::{read_error, write_error};
use crate::setup::{META_COLUMNS, meta_of};

/// How long resolution waits for the in-doubt backend to exit before it reports a
/// transient error (the writer calls again).
const BACKEND_EXIT_WAIT: Duration = Duration::from_secs(10);

/// A backend, as `pg_stat_activity` names it (pids are reused; with the start time
/// they are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backend {
    pid: i32,
    started: SystemTime,
}

/// The writer's connection with its prepared commit statement.
struct WriterConn {
    client: Client,
    commit: Statement,
    backend: Backend,
}

/// What the store keeps for its single writer.
#[derive(Default)]
pub(crate) struct WriterState {
    conn: Option<WriterConn>,
    /// Starts of the existing history partitions, ascending (None: to be read).
    partitions: Option<Vec<i64>>,
    /// The backend of the last commit attempt whose outcome is unknown.
    in_doubt: Option<Backend>,
}

impl WriterState {
    /// The current connection's backend pid.
    pub(crate) fn backend_pid(&self) -> Option<i32> {
        self.conn.as_ref().map(|c| c.backend.pid)
    }

    /// Makes the next commit read the partition list again.
    pub(crate) fn forget_partitions(&mut self) {
        self.partitions = None;
    }

    /// The connection, reconnected and prepared when lost.
    async fn conn(&mut self, target: &PgConnect, layout: &Layout) -> Result<&mut WriterConn> {
        if self.conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            self.conn = None;
            let client = crate::connect(target).await?;
            let row = client
                .query_one(
                    "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .map_err(read_error("read the writer's backend"))?;
            let backend = Backend {
                pid: row.get(0),
                started: row.get(1),
            };
            let commit = client
                .prepare(&commit_sql(layout.schema()))
                .await
                .map_err(read_error("prepare the commit statement"))?;
            self.conn = Some(WriterConn {
                client,
                commit,
                backend,
            });
        }
        self.conn.as_mut().ok_or_else(|| {
            StoreError::determinate("writer connection", "no connection after connecting")
        })
    }

    /// Starts of the existing partitions, read when unknown.
    async fn partitions(&mut self, target: &PgConnect, layout: &Layout) -> Result<&mut Vec<i64>> {
        if self.partitions.is_none() {
            let conn = self.conn(target, layout).await?;
            let found = list_partitions(&conn.client, layout).await?;
            self.partitions = Some(found);
        }
        Ok(self.partitions.get_or_insert_with(Vec::new))
    }

    /// Creates the partitions revisions up to `revision` need.
    async fn ensure_partitions(
        &mut self,
        target: &PgConnect,
        layout: &Layout,
        revision: i64,
    ) -> Result<()> {
        let existing = self.partitions(target, layout).await?;
        let created_upto = existing
            .last()
            .map(|s| s + layout.partition_revisions())
            .unwrap_or(0);
        let want = layout.partitions_to_create(created_upto, revision);
        if want.is_empty() {
            return Ok(());
        }
        let conn = self.conn(target, layout).await?;
        for &start in &want {
            // IF NOT EXISTS: an error here says nothing about the batch.
            conn.client
                .batch_execute(&layout.create_partition_ddl(start))
                .await
                .map_err(read_error("create partition"))?;
            info!(schema = layout.schema(), start, "created history partition");
        }
        let existing = self.partitions.get_or_insert_with(Vec::new);
        existing.extend(want);
        existing.sort_unstable();
        existing.dedup();
        Ok(())
    }

    /// Writes one batch in one statement (see the module doc).
    pub(crate) async fn commit(
        &mut self,
        target: &PgConnect,
        layout: &Layout,
        fence: &Fence,
        batch: Batch<'_>,
    ) -> Result<()> {
        self.ensure_partitions(target, layout, batch.revision)
            .await?;
        let conn = self.conn(target, layout).await?;
        let backend = conn.backend;
        let rows = CommitRows::of(batch.changes);
        let (grant_ids, grant_ttls, revoke_ids) = batch.leases.net();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(22);
        params.push(&batch.revision);
        params.push(&fence.epoch);
        params.extend(rows.columns().map(|(p, _)| p));
        params.extend([
            &grant_ids as &(dyn ToSql + Sync),
            &grant_ttls,
            &revoke_ids,
            &batch.prev_revision,
        ]);
        let source = match conn.client.execute(&conn.commit, &params).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if source.code() == Some(&SqlState::DIVISION_BY_ZERO) {
            return Err(StoreError::Fenced(format!(
                "the leader epoch is no longer {} or the revision no longer {}",
                fence.epoch, batch.prev_revision
            )));
        }
        Err(self.write_failed(backend, write_error("commit batch")(source)))
    }

    /// A write on `backend` failed with `err`: when its outcome is unknown, that backend
    /// is the one to settle before anything is read, and its connection is not reused.
    fn write_failed(&mut self, backend: Backend, err: StoreError) -> StoreError {
        if err.outcome() == pgetcd_storage::Outcome::Indeterminate {
            self.in_doubt = Some(backend);
            self.conn = None;
        }
        err
    }

    /// Makes sure the last in-doubt attempt, if any, can no longer commit: terminates
    /// its backend and waits until it is gone. The in-doubt connection is never reused.
    pub(crate) async fn settle_in_doubt(&mut self, target: &PgConnect) -> Result<()> {
        if let Some(backend) = self.in_doubt {
            self.conn = None;
            let client = crate::connect(target).await?;
            terminate_and_wait(&client, backend).await?;
            self.in_doubt = None;
        }
        Ok(())
    }

    /// Settles an in-doubt commit (see the module doc).
    pub(crate) async fn resolve(
        &mut self,
        target: &PgConnect,
        layout: &Layout,
        fence: &Fence,
        batch: Batch<'_>,
    ) -> Result<Resolution> {
        let (prev, revision) = (batch.prev_revision, batch.revision);
        self.settle_in_doubt(target).await?;
        let conn = self.conn(target, layout).await?;
        let meta = crate::setup::read_meta(&conn.client, layout).await?;
        if meta.leader_epoch != fence.epoch {
            return Err(StoreError::Fenced(format!(
                "leader epoch moved to {} (held {})",
                meta.leader_epoch, fence.epoch
            )));
        }
        if batch.leases_only() && meta.revision == revision {
            let (ids, _, gone) = batch.leases.net();
            let named: Vec<i64> = ids.into_iter().chain(gone).collect();
            let granted = conn
                .client
                .query(
                    &format!(
                        "SELECT id, ttl FROM {} WHERE id = ANY($1)",
                        layout.table("leases")
                    ),
                    &[&named],
                )
                .await
                .map_err(read_error("read leases"))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let applied = batch.leases_applied(&granted);
            info!(revision, applied, "lease-only commit outcome resolved");
            return Ok(if applied {
                Resolution::Committed
            } else {
                Resolution::NotCommitted
            });
        }
        if meta.revision == revision {
            info!(revision, "commit outcome resolved: committed");
            Ok(Resolution::Committed)
        } else if meta.revision == prev {
            info!(revision, "commit outcome resolved: not committed");
            Ok(Resolution::NotCommitted)
        } else {
            Err(StoreError::Fenced(format!(
                "meta revision is {}, neither {prev} nor {revision}",
                meta.revision
            )))
        }
    }

    /// Records the compact revision (fenced like a commit) and plans the data step:
    /// partitions wholly at or below it are dropped, their survivors copied out first.
    pub(crate) async fn record_compaction(
        &mut self,
        target: &PgConnect,
        layout: &Layout,
        fence: &Fence,
        current: i64,
        revision: i64,
    ) -> Result<CompactionPlan> {
        let existing = self.partitions(target, layout).await?.clone();
        let floor = existing
            .first()
            .copied()
            .unwrap_or_else(|| layout.partition_start(current));
        let drop = layout.droppable_partitions(&existing, revision);
        let drop_below = drop
            .last()
            .map(|s| s + layout.partition_revisions())
            .unwrap_or(floor)
            .max(floor);
        let conn = self.conn(target, layout).await?;
        let backend = conn.backend;
        let updated = conn
            .client
            .execute(
                &format!(
                    "UPDATE {} SET compact_revision = $1 WHERE id = 1 AND leader_epoch = $2 AND revision = $3",
                    layout.table("meta")
                ),
                &[&revision, &fence.epoch, &current],
            )
            .await;
        match updated {
            Ok(1) => {}
            Ok(_) => {
                return Err(StoreError::Fenced(format!(
                    "the leader epoch is no longer {} or the revision no longer {current}",
                    fence.epoch
                )));
            }
            Err(e) => {
                return Err(self.write_failed(backend, write_error("record compaction")(e)));
            }
        }
        if let Some(p) = self.partitions.as_mut() {
            p.retain(|s| !drop.contains(s));
        }
        Ok(CompactionPlan {
            revision,
            list_removed_below: floor,
            list_survivors: floor..drop_below,
            segments: drop,
        })
    }
}

impl WriterState {
    /// Raises the revision (and with `mark_compacted` the compact revision) to
    /// `revision` in one statement, fenced like a commit on the epoch and `current`.
    pub(crate) async fn bump_revision(
        &mut self,
        target: &PgConnect,
        layout: &Layout,
        fence: &Fence,
        current: i64,
        revision: i64,
        mark_compacted: bool,
    ) -> Result<Meta> {
        if revision <= current {
            return Err(StoreError::Misconfigured(format!(
                "bump: revision {revision} is not above {current}"
            )));
        }
        let conn = self.conn(target, layout).await?;
        let backend = conn.backend;
        let bumped = conn
            .client
            .query_opt(
                &format!(
                    "UPDATE {} SET revision = $1, \
                     compact_revision = CASE WHEN $4 THEN $1 ELSE compact_revision END \
                     WHERE id = 1 AND leader_epoch = $2 AND revision = $3 RETURNING {META_COLUMNS}",
                    layout.table("meta")
                ),
                &[&revision, &fence.epoch, &current, &mark_compacted],
            )
            .await;
        match bumped {
            Ok(Some(row)) => Ok(meta_of(&row)),
            Ok(None) => Err(StoreError::Fenced(format!(
                "the leader epoch is no longer {} or the revision no longer {current}",
                fence.epoch
            ))),
            Err(e) => Err(self.write_failed(backend, write_error("bump revision")(e))),
        }
    }
}

/// The commit statement (see the module doc). Every data-modifying WITH part runs to
/// completion whether or not the SELECT reads it, and all of them see the same
/// snapshot: the caller sends each kv key and lease id at most once.
fn commit_sql(s: &str) -> String {
    format!(
        "WITH fence AS (UPDATE {s}.meta SET revision = $1 WHERE id = 1 AND leader_epoch = $2 AND revision = $22 RETURNING 1), \
         history AS (INSERT INTO {s}.history (revision, sub, key, kind, create_revision, version, lease, value) \
           SELECT * FROM unnest($3::int8[], $4::int4[], $5::bytea[], $6::int2[], $7::int8[], $8::int8[], $9::int8[], $10::bytea[])), \
         upsert AS (INSERT INTO {s}.kv (key, create_revision, mod_revision, mod_sub, version, lease, value) \
           SELECT * FROM unnest($11::bytea[], $12::int8[], $13::int8[], $14::int4[], $15::int8[], $16::int8[], $17::bytea[]) \
           ON CONFLICT (key) DO UPDATE SET create_revision = excluded.create_revision, \
           mod_revision = excluded.mod_revision, mod_sub = excluded.mod_sub, version = excluded.version, \
           lease = excluded.lease, value = excluded.value), \
         deleted AS (DELETE FROM {s}.kv WHERE key = ANY($18::bytea[])), \
         granted AS (INSERT INTO {s}.leases (id, ttl) SELECT * FROM unnest($19::int8[], $20::int8[]) \
           ON CONFLICT (id) DO UPDATE SET ttl = excluded.ttl), \
         revoked AS (DELETE FROM {s}.leases WHERE id = ANY($21::int8[])) \
         SELECT 1 / (SELECT count(*)::int FROM fence)"
    )
}

/// A batch's changes as the commit statement's arrays: every history row, and the
/// last change per key for `kv` (an upsert, or a delete for a tombstone). Public so the
/// encoding benchmark (`benches/benches/encode.rs`) measures this very code.
pub struct CommitRows<'a> {
    h_rev: Vec<i64>,
    h_sub: Vec<i32>,
    h_key: Vec<&'a [u8]>,
    h_kind: Vec<i16>,
    h_create: Vec<i64>,
    h_ver: Vec<i64>,
    h_lease: Vec<i64>,
    h_value: Vec<&'a [u8]>,
    u_key: Vec<&'a [u8]>,
    u_create: Vec<i64>,
    u_mod: Vec<i64>,
    u_sub: Vec<i32>,
    u_ver: Vec<i64>,
    u_lease: Vec<i64>,
    u_value: Vec<&'a [u8]>,
    d_key: Vec<&'a [u8]>,
}

impl<'a> CommitRows<'a> {
    /// The statement's parameters `$3` to `$18`, in order, each with its Postgres type.
    pub fn columns(&self) -> [(&(dyn ToSql + Sync), Type); 16] {
        [
            (&self.h_rev, Type::INT8_ARRAY),
            (&self.h_sub, Type::INT4_ARRAY),
            (&self.h_key, Type::BYTEA_ARRAY),
            (&self.h_kind, Type::INT2_ARRAY),
            (&self.h_create, Type::INT8_ARRAY),
            (&self.h_ver, Type::INT8_ARRAY),
            (&self.h_lease, Type::INT8_ARRAY),
            (&self.h_value, Type::BYTEA_ARRAY),
            (&self.u_key, Type::BYTEA_ARRAY),
            (&self.u_create, Type::INT8_ARRAY),
            (&self.u_mod, Type::INT8_ARRAY),
            (&self.u_sub, Type::INT4_ARRAY),
            (&self.u_ver, Type::INT8_ARRAY),
            (&self.u_lease, Type::INT8_ARRAY),
            (&self.u_value, Type::BYTEA_ARRAY),
            (&self.d_key, Type::BYTEA_ARRAY),
        ]
    }

    /// Splits `changes` into the columns.
    pub fn of(changes: &'a [Change]) -> Self {
        let n = changes.len();
        let mut r = CommitRows {
            h_rev: Vec::with_capacity(n),
            h_sub: Vec::with_capacity(n),
            h_key: Vec::with_capacity(n),
            h_kind: Vec::with_capacity(n),
            h_create: Vec::with_capacity(n),
            h_ver: Vec::with_capacity(n),
            h_lease: Vec::with_capacity(n),
            h_value: Vec::with_capacity(n),
            u_key: Vec::new(),
            u_create: Vec::new(),
            u_mod: Vec::new(),
            u_sub: Vec::new(),
            u_ver: Vec::new(),
            u_lease: Vec::new(),
            u_value: Vec::new(),
            d_key: Vec::new(),
        };
        // Last change per key decides the kv row.
        let mut last: HashMap<&[u8], &Change> = HashMap::with_capacity(n);
        for c in changes {
            let v = &c.version;
            r.h_rev.push(v.mod_revision);
            r.h_sub.push(v.sub as i32);
            r.h_key.push(&c.key);
            r.h_kind.push(if v.is_tombstone() {
                KIND_DELETE
            } else {
                KIND_PUT
            });
            r.h_create.push(v.create_revision);
            r.h_ver.push(v.version);
            r.h_lease.push(v.lease);
            r.h_value.push(v.value.as_deref().unwrap_or(&[]));
            last.insert(&c.key, c);
        }
        for (k, c) in last {
            let v = &c.version;
            if v.is_tombstone() {
                r.d_key.push(k);
            } else {
                r.u_key.push(k);
                r.u_create.push(v.create_revision);
                r.u_mod.push(v.mod_revision);
                r.u_sub.push(v.sub as i32);
                r.u_ver.push(v.version);
                r.u_lease.push(v.lease);
                r.u_value.push(v.value.as_deref().unwrap_or(&[]));
            }
        }
        r
    }
}

/// Starts of the existing history partitions, ascending.
async fn list_partitions(client: &Client, layout: &Layout) -> Result<Vec<i64>> {
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent \
             JOIN pg_namespace n ON n.oid = p.relnamespace \
             WHERE p.relname = 'history' AND n.nspname = $1",
            &[&layout.schema()],
        )
        .await
        .map_err(read_error("list partitions"))?;
    let mut starts: Vec<i64> = rows
        .iter()
        .filter_map(|r| layout.parse_partition_name(r.get::<_, &str>(0)))
        .collect();
    starts.sort_unstable();
    Ok(starts)
}

/// Terminates `backend` and waits until it is gone, so that whatever it was running is
/// committed or rolled back for good. One statement looks the backend up by pid *and*
/// start time and signals it, so a reused pid is never hit.
async fn terminate_and_wait(client: &Client, backend: Backend) -> Result<()> {
    let started = Instant::now();
    let mut signalled = false;
    loop {
        // pg_terminate_backend with a timeout waits (up to 1 s) for the exit itself.
        let found = client
            .query_opt(
                "SELECT pg_terminate_backend(pid, 1000) FROM pg_stat_activity \
                 WHERE pid = $1 AND backend_start = $2",
                &[&backend.pid, &backend.started],
            )
            .await
            .map_err(read_error("terminate the in-doubt backend"))?;
        if found.is_none() {
            if signalled {
                info!(pid = backend.pid, "in-doubt backend is gone");
            }
            return Ok(());
        }
        if !signalled {
            warn!(
                pid = backend.pid,
                "terminated the backend of the in-doubt commit; waiting for it to exit before reading the outcome"
            );
            signalled = true;
        }
        if started.elapsed() > BACKEND_EXIT_WAIT {
            return Err(StoreError::determinate(
                "resolve",
                format!(
                    "backend {} did not exit after pg_terminate_backend",
                    backend.pid
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
