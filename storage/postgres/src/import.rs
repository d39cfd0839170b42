//! Bulk load of a whole keyspace (an etcd snapshot being restored), in one transaction
//! on a connection of its own:
//! 1. lock `meta` and check the fence (the importer holds the writer role);
//! 2. refuse a keyspace holding any version or lease, or empty it when asked to
//!    replace it (TRUNCATE, inside the transaction);
//! 3. create the history partitions of the imported revisions above the compact
//!    revision;
//! 4. COPY (binary) the versions at or below the compact revision into
//!    `history_retained` (what a compaction keeps there), the rest into `history`,
//!    checking their order as they stream;
//! 5. derive `kv` (each key's newest version, when live) from them in one statement,
//!    insert the leases, and set the revision and compact revision in `meta`.
//!
//! Any error rolls everything back: a keyspace is never half-loaded.

use bytes::Bytes;
use pgetcd_partitioning::{KIND_DELETE, KIND_PUT, Layout};
use pgetcd_storage::{Fence, Import, Imported, Result, StoreError, Version};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Transaction};

use crate::error::{read_error, write_error};

/// The columns COPY writes, in order (those of `history` and `history_retained`).
const COPY_COLUMNS: &str = "revision, sub, key, kind, create_revision, version, lease, value";

/// Their types, in the same order.
const COPY_TYPES: [Type; 8] = [
    Type::INT8,
    Type::INT4,
    Type::BYTEA,
    Type::INT2,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::BYTEA,
];

/// Checks the order of the imported versions as they stream.
struct Order {
    last: Option<(i64, u32)>,
    revision: i64,
}

impl Order {
    fn check(&mut self, v: &Version) -> Result<()> {
        let id = v.id();
        if self.last.is_some_and(|last| last >= id) {
            return Err(StoreError::Misconfigured(format!(
                "import: version {id:?} does not follow {:?}",
                self.last
            )));
        }
        if v.mod_revision > self.revision || v.mod_revision < 1 {
            return Err(StoreError::Misconfigured(format!(
                "import: version {id:?} is outside revisions 1..={}",
                self.revision
            )));
        }
        self.last = Some(id);
        Ok(())
    }
}

/// A COPY into a table in progress.
struct Copy {
    writer: std::pin::Pin<Box<BinaryCopyInWriter>>,
}

impl Copy {
    async fn start(tx: &Transaction<'_>, table: &str) -> Result<Copy> {
        let sink = tx
            .copy_in(&format!("COPY {table} ({COPY_COLUMNS}) FROM STDIN BINARY"))
            .await
            .map_err(read_error("import: start COPY"))?;
        Ok(Copy {
            writer: Box::pin(BinaryCopyInWriter::new(sink, &COPY_TYPES)),
        })
    }

    async fn write(&mut self, key: &Bytes, v: &Version) -> Result<()> {
        let kind = if v.is_tombstone() {
            KIND_DELETE
        } else {
            KIND_PUT
        };
        let sub = v.sub as i32;
        let key: &[u8] = key;
        let value: &[u8] = v.value.as_deref().unwrap_or(&[]);
        let row: [&(dyn ToSql + Sync); 8] = [
            &v.mod_revision,
            &sub,
            &key,
            &kind,
            &v.create_revision,
            &v.version,
            &v.lease,
            &value,
        ];
        self.writer
            .as_mut()
            .write(&row)
            .await
            .map_err(read_error("import: COPY row"))
    }

    async fn finish(mut self) -> Result<u64> {
        self.writer
            .as_mut()
            .finish()
            .await
            .map_err(read_error("import: end COPY"))
    }
}

/// Loads `import` into the keyspace (see the module doc).
pub(crate) async fn import(
    client: &mut Client,
    layout: &Layout,
    fence: &Fence,
    mut import: Import,
) -> Result<Imported> {
    let s = layout.schema();
    let tx = client
        .transaction()
        .await
        .map_err(read_error("import: begin"))?;
    let epoch: i64 = tx
        .query_one(
            &format!("SELECT leader_epoch FROM {s}.meta WHERE id = 1 FOR UPDATE"),
            &[],
        )
        .await
        .map_err(read_error("import: lock meta"))?
        .get(0);
    if epoch != fence.epoch {
        return Err(StoreError::Fenced(format!(
            "the leader epoch is {epoch}, the importer holds {}",
            fence.epoch
        )));
    }
    if import.replace {
        tx.batch_execute(&format!(
            "TRUNCATE {s}.kv, {s}.history, {s}.history_retained, {s}.leases"
        ))
        .await
        .map_err(read_error("import: empty the keyspace"))?;
    } else {
        let held: bool = tx
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {s}.history) OR EXISTS (SELECT 1 FROM {s}.history_retained) \
                     OR EXISTS (SELECT 1 FROM {s}.kv) OR EXISTS (SELECT 1 FROM {s}.leases)"
                ),
                &[],
            )
            .await
            .map_err(read_error("import: look for data"))?
            .get(0);
        if held {
            return Err(StoreError::NotEmpty(format!(
                "keyspace {s:?} is not empty: it holds keys or leases already"
            )));
        }
    }
    let compact = import.compact_revision;
    for start in layout.partitions_covering(compact.max(0) + 1, import.revision.max(1)) {
        tx.batch_execute(&layout.create_partition_ddl(start))
            .await
            .map_err(read_error("import: create partition"))?;
    }
    let mut order = Order {
        last: None,
        revision: import.revision,
    };
    let mut versions = 0u64;
    // Revision order: what a compaction kept (at or below the compact revision) comes
    // first, into history_retained; from the first version above it, into history.
    let mut above = false;
    let mut copy = Copy::start(&tx, &layout.table("history_retained")).await?;
    while let Some(chunk) = import.versions.recv().await {
        for (key, v) in chunk? {
            order.check(&v)?;
            if !above && v.mod_revision > compact {
                copy.finish().await?;
                copy = Copy::start(&tx, &layout.table("history")).await?;
                above = true;
            }
            copy.write(&key, &v).await?;
            versions += 1;
        }
    }
    copy.finish().await?;
    let keys = tx
        .execute(
            &format!(
                "INSERT INTO {s}.kv (key, create_revision, mod_revision, mod_sub, version, lease, value) \
                 SELECT key, create_revision, revision, sub, version, lease, value FROM (\
                   SELECT DISTINCT ON (key) * FROM (\
                     SELECT * FROM {s}.history UNION ALL SELECT * FROM {s}.history_retained) h \
                   ORDER BY key, revision DESC, sub DESC) newest \
                 WHERE kind = {KIND_PUT}"
            ),
            &[],
        )
        .await
        .map_err(read_error("import: derive live keys"))?;
    let (ids, ttls): (Vec<i64>, Vec<i64>) = import.leases.iter().copied().unzip();
    let leases = tx
        .execute(
            &format!(
                "INSERT INTO {s}.leases (id, ttl) SELECT * FROM unnest($1::int8[], $2::int8[])"
            ),
            &[&ids, &ttls],
        )
        .await
        .map_err(read_error("import: leases"))?;
    tx.execute(
        &format!(
            "UPDATE {s}.meta SET revision = $1, compact_revision = $2 WHERE id = 1 AND leader_epoch = $3"
        ),
        &[&import.revision, &compact, &fence.epoch],
    )
    .await
    .map_err(read_error("import: meta"))?;
    tx.commit().await.map_err(write_error("import: commit"))?;
    Ok(Imported {
        versions,
        keys,
        leases,
    })
}
