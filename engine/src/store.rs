//! Postgres I/O of one keyspace: schema set-up and version check, start-up load, the
//! group commit of a batch, value reads on cache misses, and compaction.
//!
//! Failure protocol of a commit (see [`CommitError`]): an error before COMMIT was sent,
//! or an error the server reported for COMMIT, is *determinate*: the batch is not in
//! Postgres. Losing the connection while COMMIT was in flight is *indeterminate*: the
//! writer must read `meta.revision` back before it answers anyone.

use std::collections::HashMap;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::{StreamExt, pin_mut};
use pgetcd_partitioning::{KIND_DELETE, KIND_PUT, Layout, SCHEMA_VERSION};
use tokio_postgres::Client;
use tokio_postgres::Statement;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::exec::Change;
use crate::index::{Index, Pruned, Version};
use crate::pgtls::PgConnect;

/// The `meta` row.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// Random id of this keyspace, reported as etcd's cluster_id.
    pub cluster_id: u64,
    /// Random id reported as etcd's member_id.
    pub member_id: u64,
    /// Last committed revision.
    pub revision: i64,
    /// Compact revision (-1 before the first compaction, like etcd).
    pub compact_revision: i64,
    /// Fencing epoch of the instance that writes; raised at every start.
    pub leader_epoch: i64,
}

/// Why a commit failed.
#[derive(Debug)]
pub enum CommitError {
    /// The batch is certainly not in Postgres.
    Determinate(Error),
    /// The batch may or may not be in Postgres.
    Indeterminate(Error),
    /// Another instance raised the leader epoch: this one must stop writing.
    Fenced,
}

/// The writer's connection with its prepared commit statement.
pub struct WriterConn {
    /// The connection (also used for DDL and compaction).
    pub client: Client,
    commit: Statement,
}

/// One lease row change, in the order the batch made them.
#[derive(Debug, Clone, Copy)]
pub enum LeaseOp {
    /// Granted (id, ttl).
    Grant(i64, i64),
    /// Revoked id, with the TTL it had (restored if the batch does not commit).
    Revoke { id: i64, ttl: i64 },
}

/// Lease rows a batch writes.
#[derive(Debug, Default)]
pub struct LeaseOps {
    /// Grants and revokes in order (a lease revoked and granted again in one batch
    /// appears twice).
    pub ops: Vec<LeaseOp>,
}

impl LeaseOps {
    /// Whether the batch writes no lease row.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Revoked ids, in order.
    pub fn revokes(&self) -> impl Iterator<Item = i64> + '_ {
        self.ops.iter().filter_map(|op| match op {
            LeaseOp::Revoke { id, .. } => Some(*id),
            LeaseOp::Grant(..) => None,
        })
    }

    /// What the `leases` table must hold afterwards: per id, its last operation
    /// decides (ids to upsert with their TTLs, ids to delete).
    fn net(&self) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
        let mut last: HashMap<i64, Option<i64>> = HashMap::with_capacity(self.ops.len());
        for op in &self.ops {
            match *op {
                LeaseOp::Grant(id, ttl) => last.insert(id, Some(ttl)),
                LeaseOp::Revoke { id, .. } => last.insert(id, None),
            };
        }
        let (mut ids, mut ttls, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        for (id, ttl) in last {
            match ttl {
                Some(t) => {
                    ids.push(id);
                    ttls.push(t);
                }
                None => gone.push(id),
            }
        }
        (ids, ttls, gone)
    }
}

/// Postgres access for one keyspace.
pub struct PgStore {
    layout: Layout,
    target: PgConnect,
    pool: Pool,
}

/// Opens a connection and drives it on a background task.
async fn connect(target: &PgConnect) -> Result<Client> {
    let (client, conn) = target.connect().await.map_err(Error::pg("connect"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            warn!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

fn to_i64(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

fn to_u64(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

impl PgStore {
    /// Parses the connection string (URL or key=value form, with libpq's TLS
    /// parameters), reads the certificate files it names and builds the read pool.
    pub fn new(url: &str, layout: Layout, pool_size: usize) -> Result<Self> {
        let target = PgConnect::parse(url).map_err(|e| {
            Error::Misconfigured(format!("bad --postgres-url: {}", e.with_causes()))
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
            .max_size(pool_size.max(1))
            .build()
            .map_err(|e| Error::Pool(e.to_string()))?;
        Ok(Self {
            layout,
            target,
            pool,
        })
    }

    /// The connection settings, with their TLS connector.
    pub fn target(&self) -> &PgConnect {
        &self.target
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A new dedicated connection (the writer's).
    pub async fn connect(&self) -> Result<Client> {
        connect(&self.target).await
    }

    /// Checks server settings, creates the schema when missing, refuses a newer schema,
    /// and raises the leader epoch (fencing any previous writer).
    pub async fn setup(&self, client: &mut Client) -> Result<Meta> {
        let wal_level: String = client
            .query_one("SHOW wal_level", &[])
            .await
            .map_err(Error::pg("SHOW wal_level"))?
            .get(0);
        if wal_level != "logical" {
            return Err(Error::Misconfigured(format!(
                "wal_level is '{wal_level}', pgetcd needs wal_level = logical for its watch stream: set it in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
            )));
        }
        let s = self.layout.schema();
        let tx = client
            .transaction()
            .await
            .map_err(Error::pg("begin setup"))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("pgetcd:{s}")],
        )
        .await
        .map_err(Error::pg("lock keyspace"))?;
        let exists: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'meta')",
                &[&s],
            )
            .await
            .map_err(Error::pg("look up meta"))?
            .get(0);
        if exists {
            let found: i32 = tx
                .query_one(
                    &format!("SELECT schema_version FROM {s}.meta WHERE id = 1"),
                    &[],
                )
                .await
                .map_err(Error::pg("read schema version"))?
                .get(0);
            if found > SCHEMA_VERSION {
                return Err(Error::SchemaTooNew {
                    schema: s.to_owned(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            for from in found..SCHEMA_VERSION {
                for ddl in self.layout.migration_ddl(from) {
                    tx.batch_execute(&ddl)
                        .await
                        .map_err(Error::pg("migrate schema"))?;
                }
                info!(schema = s, from, to = from + 1, "migrated keyspace schema");
            }
            if found < SCHEMA_VERSION {
                tx.execute(
                    &format!("UPDATE {s}.meta SET schema_version = $1 WHERE id = 1"),
                    &[&SCHEMA_VERSION],
                )
                .await
                .map_err(Error::pg("record schema version"))?;
            }
        } else {
            for ddl in self.layout.create_schema_ddl() {
                tx.batch_execute(&ddl)
                    .await
                    .map_err(Error::pg("create schema"))?;
            }
            let cluster_id = to_i64(rand::random::<u64>() | 1);
            let member_id = to_i64(rand::random::<u64>() | 1);
            tx.execute(
                &format!(
                    "INSERT INTO {s}.meta (id, schema_version, cluster_id, member_id, revision, compact_revision, leader_epoch) \
                     VALUES (1, $1, $2, $3, 1, -1, 0)"
                ),
                &[&SCHEMA_VERSION, &cluster_id, &member_id],
            )
            .await
            .map_err(Error::pg("init meta"))?;
            info!(schema = s, "created keyspace schema");
        }
        let row = tx
            .query_one(
                &format!(
                    "UPDATE {s}.meta SET leader_epoch = leader_epoch + 1 WHERE id = 1 \
                     RETURNING cluster_id, member_id, revision, compact_revision, leader_epoch"
                ),
                &[],
            )
            .await
            .map_err(Error::pg("raise leader epoch"))?;
        tx.commit().await.map_err(Error::pg("commit setup"))?;
        Ok(Meta {
            cluster_id: to_u64(row.get(0)),
            member_id: to_u64(row.get(1)),
            revision: row.get(2),
            compact_revision: row.get(3),
            leader_epoch: row.get(4),
        })
    }

    /// Reads `meta.revision` and `leader_epoch` (after an indeterminate commit).
    pub async fn read_revision(&self, client: &Client) -> Result<(i64, i64)> {
        let row = client
            .query_one(
                &format!(
                    "SELECT revision, leader_epoch FROM {} WHERE id = 1",
                    self.layout.table("meta")
                ),
                &[],
            )
            .await
            .map_err(Error::pg("read meta"))?;
        Ok((row.get(0), row.get(1)))
    }

    /// Reads `meta` without changing it.
    pub async fn read_meta(&self, client: &Client) -> Result<Meta> {
        let row = client
            .query_one(
                &format!(
                    "SELECT cluster_id, member_id, revision, compact_revision, leader_epoch FROM {} WHERE id = 1",
                    self.layout.table("meta")
                ),
                &[],
            )
            .await
            .map_err(Error::pg("read meta"))?;
        Ok(Meta {
            cluster_id: to_u64(row.get(0)),
            member_id: to_u64(row.get(1)),
            revision: row.get(2),
            compact_revision: row.get(3),
            leader_epoch: row.get(4),
        })
    }

    /// Fills `index` with every retained version: all history above the compact
    /// revision, plus each key's newest live version at or below it. Values are kept
    /// while the cache budget allows; the rest are read on demand.
    pub async fn load(&self, client: &Client, index: &Index, compact: i64) -> Result<usize> {
        let s = self.layout.schema();
        let cols = "key, revision, sub, create_revision, version, lease, kind, value";
        let above = format!("SELECT {cols} FROM {s}.history WHERE revision > $1");
        let at_or_below = format!(
            "SELECT DISTINCT ON (key) {cols} FROM (\
               SELECT {cols} FROM {s}.history WHERE revision <= $1 \
               UNION ALL SELECT {cols} FROM {s}.history_retained WHERE revision <= $1) h \
             ORDER BY key, revision DESC, sub DESC"
        );
        let mut rows_loaded = 0usize;
        let mut budget = index.cache_budget();
        let mut cached = Vec::new();
        for (sql, skip_tombstones) in [(above, false), (at_or_below, true)] {
            let stream = client
                .query_raw(sql.as_str(), [&compact as &(dyn ToSql + Sync)])
                .await
                .map_err(Error::pg("load history"))?;
            pin_mut!(stream);
            while let Some(row) = stream.next().await {
                let row = row.map_err(Error::pg("load history row"))?;
                let kind: i16 = row.get(6);
                if skip_tombstones && kind == KIND_DELETE {
                    continue;
                }
                let key: Vec<u8> = row.get(0);
                let key = Bytes::from(key);
                let mod_revision: i64 = row.get(1);
                let sub: i32 = row.get(2);
                let value = if kind == KIND_PUT {
                    let v: &[u8] = row.get(7);
                    if v.len() <= budget {
                        budget -= v.len();
                        cached.push((key.clone(), mod_revision, sub as u32, v.len()));
                        Some(Bytes::copy_from_slice(v))
                    } else {
                        budget = 0;
                        None
                    }
                } else {
                    None
                };
                index.load(
                    key,
                    Version {
                        mod_revision,
                        sub: sub as u32,
                        create_revision: row.get(3),
                        version: row.get(4),
                        lease: row.get(5),
                        value,
                    },
                );
                rows_loaded += 1;
            }
        }
        index.note_cached(cached);
        Ok(rows_loaded)
    }

    /// Granted leases: (id, ttl).
    pub async fn load_leases(&self, client: &Client) -> Result<Vec<(i64, i64)>> {
        let rows = client
            .query(
                &format!(
                    "SELECT id, ttl FROM {} ORDER BY id",
                    self.layout.table("leases")
                ),
                &[],
            )
            .await
            .map_err(Error::pg("load leases"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Starts of the existing history partitions, ascending.
    pub async fn partitions(&self, client: &Client) -> Result<Vec<i64>> {
        let rows = client
            .query(
                "SELECT c.relname::text FROM pg_inherits i \
                 JOIN pg_class c ON c.oid = i.inhrelid \
                 JOIN pg_class p ON p.oid = i.inhparent \
                 JOIN pg_namespace n ON n.oid = p.relnamespace \
                 WHERE p.relname = 'history' AND n.nspname = $1",
                &[&self.layout.schema()],
            )
            .await
            .map_err(Error::pg("list partitions"))?;
        let mut starts: Vec<i64> = rows
            .iter()
            .filter_map(|r| self.layout.parse_partition_name(r.get::<_, &str>(0)))
            .collect();
        starts.sort_unstable();
        Ok(starts)
    }

    /// Creates the given partitions.
    pub async fn create_partitions(&self, client: &Client, starts: &[i64]) -> Result<()> {
        for &start in starts {
            client
                .batch_execute(&self.layout.create_partition_ddl(start))
                .await
                .map_err(Error::pg("create partition"))?;
            info!(
                schema = self.layout.schema(),
                start, "created history partition"
            );
        }
        Ok(())
    }

    /// Prepares the writer's statements on `client`.
    pub async fn writer_conn(&self, client: Client) -> Result<WriterConn> {
        let s = self.layout.schema();
        // One statement, so one implicit transaction and one answer per batch (the
        // server flushes only at its end). Every data-modifying WITH part runs to
        // completion whether or not the SELECT reads it, and all of them see the same
        // snapshot: the caller sends each kv key and lease id at most once.
        // The fence divides by the number of meta rows it updated: a moved epoch raises
        // division_by_zero, and the whole statement, so the batch, is rolled back.
        let sql = format!(
            "WITH fence AS (UPDATE {s}.meta SET revision = $1 WHERE id = 1 AND leader_epoch = $2 RETURNING 1), \
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
        );
        let commit = client
            .prepare(&sql)
            .await
            .map_err(Error::pg("prepare the commit statement"))?;
        Ok(WriterConn { client, commit })
    }

    /// Writes one batch in one statement, so one implicit transaction and one round
    /// trip: the fenced revision update of `meta`, the history rows, the `kv` upserts
    /// and deletes and the lease rows. An error the server reports means the statement
    /// was rolled back: determinate. A transport error with no server error is
    /// indeterminate.
    pub async fn commit(
        &self,
        conn: &WriterConn,
        epoch: i64,
        new_revision: i64,
        changes: &[Change],
        leases: &LeaseOps,
    ) -> Result<(), CommitError> {
        let n = changes.len();
        let mut h_rev = Vec::with_capacity(n);
        let mut h_sub = Vec::with_capacity(n);
        let mut h_key: Vec<&[u8]> = Vec::with_capacity(n);
        let mut h_kind = Vec::with_capacity(n);
        let mut h_create = Vec::with_capacity(n);
        let mut h_ver = Vec::with_capacity(n);
        let mut h_lease = Vec::with_capacity(n);
        let mut h_value: Vec<&[u8]> = Vec::with_capacity(n);
        // Last change per key decides the kv row.
        let mut last: HashMap<&[u8], &Change> = HashMap::with_capacity(n);
        for c in changes {
            let v = &c.version;
            h_rev.push(v.mod_revision);
            h_sub.push(v.sub as i32);
            h_key.push(&c.key);
            h_kind.push(if v.is_tombstone() {
                KIND_DELETE
            } else {
                KIND_PUT
            });
            h_create.push(v.create_revision);
            h_ver.push(v.version);
            h_lease.push(v.lease);
            h_value.push(v.value.as_deref().unwrap_or(&[]));
            last.insert(&c.key, c);
        }
        let mut u_key: Vec<&[u8]> = Vec::new();
        let mut u_create = Vec::new();
        let mut u_mod = Vec::new();
        let mut u_sub = Vec::new();
        let mut u_ver = Vec::new();
        let mut u_lease = Vec::new();
        let mut u_value: Vec<&[u8]> = Vec::new();
        let mut d_key: Vec<&[u8]> = Vec::new();
        for (k, c) in &last {
            let v = &c.version;
            if v.is_tombstone() {
                d_key.push(k);
            } else {
                u_key.push(k);
                u_create.push(v.create_revision);
                u_mod.push(v.mod_revision);
                u_sub.push(v.sub as i32);
                u_ver.push(v.version);
                u_lease.push(v.lease);
                u_value.push(v.value.as_deref().unwrap_or(&[]));
            }
        }
        let (grant_ids, grant_ttls, revoke_ids) = leases.net();
        let params: [&(dyn ToSql + Sync); 21] = [
            &new_revision,
            &epoch,
            &h_rev,
            &h_sub,
            &h_key,
            &h_kind,
            &h_create,
            &h_ver,
            &h_lease,
            &h_value,
            &u_key,
            &u_create,
            &u_mod,
            &u_sub,
            &u_ver,
            &u_lease,
            &u_value,
            &d_key,
            &grant_ids,
            &grant_ttls,
            &revoke_ids,
        ];
        let source = match conn.client.execute(&conn.commit, &params).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if source.code() == Some(&SqlState::DIVISION_BY_ZERO) {
            return Err(CommitError::Fenced);
        }
        // The server's error decides determinacy.
        let determinate = source.as_db_error().is_some();
        let err = Error::Postgres {
            context: "commit batch",
            source,
        };
        if determinate {
            Err(CommitError::Determinate(err))
        } else {
            Err(CommitError::Indeterminate(err))
        }
    }

    /// Values of the given versions, read from `history` and `history_retained`.
    pub async fn fetch_values(&self, ids: &[(i64, u32)]) -> Result<HashMap<(i64, u32), Bytes>> {
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
            .map_err(Error::pg("prepare value read"))?;
        let rows = client
            .query(&stmt, &[&revs, &subs])
            .await
            .map_err(Error::pg("read values"))?;
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

    /// Records a compaction: the fenced update of `meta.compact_revision`, one
    /// statement on the writer's connection (the data is pruned later by
    /// [`physical_compaction`](Self::physical_compaction)).
    pub async fn record_compaction(
        &self,
        client: &Client,
        epoch: i64,
        compact: i64,
    ) -> Result<(), CommitError> {
        let s = self.layout.schema();
        let n = client
            .execute(
                &format!(
                    "UPDATE {s}.meta SET compact_revision = $1 WHERE id = 1 AND leader_epoch = $2"
                ),
                &[&compact, &epoch],
            )
            .await
            .map_err(|e| {
                let determinate = e.as_db_error().is_some();
                let err = Error::Postgres {
                    context: "recording compaction",
                    source: e,
                };
                if determinate {
                    CommitError::Determinate(err)
                } else {
                    CommitError::Indeterminate(err)
                }
            })?;
        if n != 1 {
            return Err(CommitError::Fenced);
        }
        Ok(())
    }

    /// The data half of a compaction, in one transaction on its own connection while
    /// the writer goes on: copies the versions still visible out of the partitions about
    /// to be dropped into `history_retained`, deletes retained versions no longer
    /// visible, then drops the partitions (last, so the drop's lock on `history` is held
    /// only until the commit right after it). Idempotent, so a failed or uncertain
    /// attempt is simply run again. Fenced when another instance took the keyspace.
    pub async fn physical_compaction(
        &self,
        client: &mut Client,
        epoch: i64,
        pruned: &Pruned,
        drop: &[i64],
    ) -> Result<(), CommitError> {
        let s = self.layout.schema();
        let failed = |e| {
            CommitError::Determinate(Error::Postgres {
                context: "compaction",
                source: e,
            })
        };
        let tx = client.transaction().await.map_err(failed)?;
        let row = tx
            .query_one(
                &format!("SELECT leader_epoch FROM {s}.meta WHERE id = 1"),
                &[],
            )
            .await
            .map_err(failed)?;
        if row.get::<_, i64>(0) != epoch {
            return Err(CommitError::Fenced);
        }
        let split = |ids: &[(i64, u32)]| -> (Vec<i64>, Vec<i32>) {
            (
                ids.iter().map(|i| i.0).collect(),
                ids.iter().map(|i| i.1 as i32).collect(),
            )
        };
        if !pruned.to_retain.is_empty() {
            let (r, sb) = split(&pruned.to_retain);
            tx.execute(
                &format!(
                    "INSERT INTO {s}.history_retained SELECT h.* FROM unnest($1::int8[], $2::int4[]) AS t(r, s) \
                     JOIN {s}.history h ON h.revision = t.r AND h.sub = t.s ON CONFLICT DO NOTHING"
                ),
                &[&r, &sb],
            )
            .await
            .map_err(failed)?;
        }
        if !pruned.removed_retained.is_empty() {
            let (r, sb) = split(&pruned.removed_retained);
            tx.execute(
                &format!(
                    "DELETE FROM {s}.history_retained h USING unnest($1::int8[], $2::int4[]) AS t(r, s) \
                     WHERE h.revision = t.r AND h.sub = t.s"
                ),
                &[&r, &sb],
            )
            .await
            .map_err(failed)?;
        }
        for &start in drop {
            tx.batch_execute(&self.layout.drop_partition_ddl(start))
                .await
                .map_err(failed)?;
        }
        tx.commit().await.map_err(failed)
    }

    /// A connection from the read pool.
    pub async fn pooled(&self) -> Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| Error::Pool(e.to_string()))
    }

    /// Bytes on disk of the keyspace's tables and indexes.
    pub async fn db_size(&self) -> Result<i64> {
        let client = self.pooled().await?;
        let row = client
            .query_one(
                "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relkind = 'r'",
                &[&self.layout.schema()],
            )
            .await
            .map_err(Error::pg("db size"))?;
        Ok(row.get(0))
    }

    /// Whether the read pool can reach Postgres.
    pub async fn ping(&self) -> Result<()> {
        let client = self.pooled().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(Error::pg("ping"))?;
        Ok(())
    }
    /// VACUUM (ANALYZE) of the keyspace's tables: dead rows left by updates, deletes
    /// and compaction become reusable space (etcd's Defragment has no closer meaning on
    /// Postgres; VACUUM FULL would lock out writes).
    pub async fn vacuum(&self) -> Result<()> {
        let s = self.layout.schema();
        let client = self.pooled().await?;
        client
            .batch_execute(&format!(
                "VACUUM (ANALYZE) {s}.meta, {s}.kv, {s}.history, {s}.history_retained, {s}.leases"
            ))
            .await
            .map_err(Error::pg("vacuum"))?;
        Ok(())
    }

    /// Read pool figures: (connections open, idle, maximum, tasks waiting).
    pub fn pool_status(&self) -> (usize, usize, usize, usize) {
        let s = self.pool.status();
        (s.size, s.available, s.max_size, s.waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::{LeaseOp, LeaseOps};

    #[test]
    fn the_last_operation_on_a_lease_decides_its_row() {
        let ops = LeaseOps {
            ops: vec![
                LeaseOp::Grant(1, 10),
                LeaseOp::Revoke { id: 1, ttl: 10 },
                LeaseOp::Revoke { id: 2, ttl: 20 },
                LeaseOp::Grant(2, 20),
                LeaseOp::Grant(3, 30),
            ],
        };
        let (mut ids, _, gone) = ops.net();
        ids.sort_unstable();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(gone, vec![1]);
        assert_eq!(ops.revokes().collect::<Vec<_>>(), vec![1, 2]);
    }
}
