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
//! 5. derive `kv` (each key's newest version, when live) from them (see [`derive_kv`]),
//!    insert the leases, and set the revision and compact revision in `meta`.
//!
//! Any error rolls everything back: a keyspace is never half-loaded.

use bytes::{BufMut, Bytes, BytesMut};
use futures::SinkExt;
use pgetcd_partitioning::{KIND_DELETE, KIND_PUT, Layout};
use pgetcd_storage::{Fence, Import, Imported, Result, StoreError, Version};
use tokio_postgres::{Client, CopyInSink, Transaction};
use tracing::info;

use crate::error::{read_error, write_error};

/// The columns COPY writes, in order (those of `history` and `history_retained`).
const COPY_COLUMNS: &str = "revision, sub, key, kind, create_revision, version, lease, value";

/// Bytes of encoded rows handed to the connection at a time. tokio-postgres's
/// `BinaryCopyInWriter` sends (and waits for the connection task to take) every 4 KiB;
/// with 1 KiB values that was a round trip between tasks per four rows.
const COPY_BLOCK: usize = 256 * 1024;

/// The binary COPY header: signature, flags, header extension length.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

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

/// A COPY into a table in progress: rows are encoded in COPY's binary format (each a
/// field count, then each field's length and big-endian bytes) into blocks of
/// [`COPY_BLOCK`] bytes.
struct Copy {
    sink: std::pin::Pin<Box<CopyInSink<Bytes>>>,
    buf: BytesMut,
}

impl Copy {
    async fn start(tx: &Transaction<'_>, table: &str) -> Result<Copy> {
        let sink = tx
            .copy_in(&format!("COPY {table} ({COPY_COLUMNS}) FROM STDIN BINARY"))
            .await
            .map_err(read_error("import: start COPY"))?;
        let mut buf = BytesMut::with_capacity(COPY_BLOCK + 64 * 1024);
        buf.put_slice(COPY_HEADER);
        Ok(Copy {
            sink: Box::pin(sink),
            buf,
        })
    }

    async fn write(&mut self, key: &[u8], v: &Version) -> Result<()> {
        let kind = if v.is_tombstone() {
            KIND_DELETE
        } else {
            KIND_PUT
        };
        let value: &[u8] = v.value.as_deref().unwrap_or(&[]);
        let b = &mut self.buf;
        b.put_i16(8);
        b.put_i32(8);
        b.put_i64(v.mod_revision);
        b.put_i32(4);
        b.put_i32(v.sub as i32);
        put_bytea(b, key)?;
        b.put_i32(2);
        b.put_i16(kind);
        for n in [v.create_revision, v.version, v.lease] {
            b.put_i32(8);
            b.put_i64(n);
        }
        put_bytea(b, value)?;
        if self.buf.len() >= COPY_BLOCK {
            self.send().await?;
        }
        Ok(())
    }

    async fn send(&mut self) -> Result<()> {
        let block = self.buf.split().freeze();
        self.sink
            .send(block)
            .await
            .map_err(read_error("import: COPY rows"))
    }

    async fn finish(mut self) -> Result<u64> {
        self.buf.put_i16(-1);
        self.send().await?;
        self.sink
            .as_mut()
            .finish()
            .await
            .map_err(read_error("import: end COPY"))
    }
}

/// A `bytea` field: its length, then its bytes.
fn put_bytea(b: &mut BytesMut, data: &[u8]) -> Result<()> {
    let len = i32::try_from(data.len()).map_err(|_| {
        StoreError::Misconfigured(format!(
            "import: a field of {} bytes is too large for Postgres",
            data.len()
        ))
    })?;
    b.put_i32(len);
    b.put_slice(data);
    Ok(())
}

/// Fills `kv` from the imported versions: every put that is its key's newest version.
///
/// Measured at 1M keys (docs/performance.md): finding the superseded versions by
/// sorting only (key, revision, sub) and copying the other puts in revision order took
/// as long or longer than this sort of the whole rows, which spills to temporary files
/// but hands `kv` its rows in key order (cheap appends to its index).
async fn derive_kv(tx: &Transaction<'_>, s: &str) -> Result<u64> {
    tx.execute(
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
    .map_err(read_error("import: derive live keys"))
}

/// Loads `import` into the keyspace (see the module doc).
pub(crate) async fn import(
    client: &mut Client,
    layout: &Layout,
    fence: &Fence,
    mut import: Import,
) -> Result<Imported> {
    let s = layout.schema();
    let started = std::time::Instant::now();
    let tx = client
        .transaction()
        .await
        .map_err(read_error("import: begin"))?;
    // Each statement runs once over the whole import: compiling it is not worth it.
    tx.batch_execute("SET LOCAL jit = off")
        .await
        .map_err(read_error("import: settings"))?;
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
    let copied = started.elapsed();
    let keys = derive_kv(&tx, s).await?;
    let derived = started.elapsed();
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
    info!(
        versions,
        keys,
        copy_ms = copied.as_millis() as u64,
        kv_ms = (derived - copied).as_millis() as u64,
        commit_ms = (started.elapsed() - derived).as_millis() as u64,
        "imported"
    );
    Ok(Imported {
        versions,
        keys,
        leases,
    })
}
