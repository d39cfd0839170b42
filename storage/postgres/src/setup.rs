//! Server checks, schema creation and migration, and the fence. Set-up runs in one
//! transaction under an advisory lock on the keyspace's name, so two instances starting
//! together neither create the schema twice nor migrate it twice.

use pgetcd_partitioning::{Layout, SCHEMA_VERSION};
use pgetcd_storage::{Meta, Result, StoreError};
use tokio_postgres::{Client, Row, Transaction};
use tracing::info;

use crate::error::{read_error, write_error};

/// A u64 id as Postgres's int8, bit for bit.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// An int8 back to the u64 id, bit for bit.
pub(crate) fn to_u64(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// The meta columns [`meta_of`] reads, in order.
pub(crate) const META_COLUMNS: &str =
    "cluster_id, member_id, revision, compact_revision, leader_epoch";

/// A meta record from a row of [`META_COLUMNS`].
pub(crate) fn meta_of(row: &Row) -> Meta {
    Meta {
        cluster_id: to_u64(row.get(0)),
        member_id: to_u64(row.get(1)),
        revision: row.get(2),
        compact_revision: row.get(3),
        leader_epoch: row.get(4),
    }
}

/// Refuses a server without logical decoding (the change feed needs it).
pub(crate) async fn check_server(client: &Client) -> Result<()> {
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(read_error("SHOW wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(StoreError::Misconfigured(format!(
            "PostgreSQL is misconfigured: wal_level is '{wal_level}', pgetcd needs wal_level = logical for its watch stream: set it in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
        )));
    }
    Ok(())
}

/// Creates the keyspace when missing or migrates an older schema; refuses a newer one.
pub(crate) async fn create_or_migrate(client: &mut Client, layout: &Layout) -> Result<Meta> {
    let s = layout.schema();
    let tx = client
        .transaction()
        .await
        .map_err(write_error("begin setup"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("pgetcd:{s}")],
    )
    .await
    .map_err(write_error("lock keyspace"))?;
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'meta')",
            &[&s],
        )
        .await
        .map_err(write_error("look up meta"))?
        .get(0);
    if exists {
        migrate(&tx, layout).await?;
    } else {
        create(&tx, layout).await?;
    }
    let row = tx
        .query_one(
            &format!("SELECT {META_COLUMNS} FROM {s}.meta WHERE id = 1"),
            &[],
        )
        .await
        .map_err(write_error("read meta"))?;
    tx.commit().await.map_err(write_error("commit setup"))?;
    Ok(meta_of(&row))
}

async fn migrate(tx: &Transaction<'_>, layout: &Layout) -> Result<()> {
    let s = layout.schema();
    let found: i32 = tx
        .query_one(
            &format!("SELECT schema_version FROM {s}.meta WHERE id = 1"),
            &[],
        )
        .await
        .map_err(write_error("read schema version"))?
        .get(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            schema: s.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for from in found..SCHEMA_VERSION {
        for ddl in layout.migration_ddl(from) {
            tx.batch_execute(&ddl)
                .await
                .map_err(write_error("migrate schema"))?;
        }
        info!(schema = s, from, to = from + 1, "migrated keyspace schema");
    }
    if found < SCHEMA_VERSION {
        tx.execute(
            &format!("UPDATE {s}.meta SET schema_version = $1 WHERE id = 1"),
            &[&SCHEMA_VERSION],
        )
        .await
        .map_err(write_error("record schema version"))?;
    }
    Ok(())
}

async fn create(tx: &Transaction<'_>, layout: &Layout) -> Result<()> {
    let s = layout.schema();
    for ddl in layout.create_schema_ddl() {
        tx.batch_execute(&ddl)
            .await
            .map_err(write_error("create schema"))?;
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
    .map_err(write_error("init meta"))?;
    info!(schema = s, "created keyspace schema");
    Ok(())
}

/// Raises the leader epoch (one atomic increment): every earlier writer's next fenced
/// statement fails.
pub(crate) async fn raise_epoch(client: &Client, layout: &Layout) -> Result<Meta> {
    let row = client
        .query_one(
            &format!(
                "UPDATE {} SET leader_epoch = leader_epoch + 1 WHERE id = 1 RETURNING {META_COLUMNS}",
                layout.table("meta")
            ),
            &[],
        )
        .await
        .map_err(write_error("raise leader epoch"))?;
    Ok(meta_of(&row))
}

/// Reads the meta record.
pub(crate) async fn read_meta(client: &Client, layout: &Layout) -> Result<Meta> {
    let row = client
        .query_one(
            &format!(
                "SELECT {META_COLUMNS} FROM {} WHERE id = 1",
                layout.table("meta")
            ),
            &[],
        )
        .await
        .map_err(read_error("read meta"))?;
    Ok(meta_of(&row))
}
