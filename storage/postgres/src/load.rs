//! Whole-keyspace reads, each in one REPEATABLE READ snapshot: the start-up load and
//! the export read meta, the leases and every retained version (all history above the
//! compact revision, plus each key's newest live version at or below it, from
//! `history` and `history_retained`), streamed; the catch-up read takes what follows a
//! revision.

use bytes::Bytes;
use futures::{StreamExt, pin_mut};
use pgetcd_partitioning::{KIND_DELETE, KIND_PUT, Layout};
use pgetcd_storage::{CHUNK_VERSIONS, Changes, LoadVisitor, Loaded, Result, Version, VersionChunk};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel};

use crate::error::read_error;
use crate::setup::{META_COLUMNS, meta_of};

/// The columns [`version_of`] reads, in its order.
const COLUMNS: &str = "key, revision, sub, create_revision, version, lease, kind, value";

/// A row of [`COLUMNS`]: the key, the version (`value` unset) and, for a put, its value.
fn version_of(row: &tokio_postgres::Row) -> (Bytes, Version, Option<&[u8]>) {
    let kind: i16 = row.get(6);
    let key: Vec<u8> = row.get(0);
    let sub: i32 = row.get(2);
    let version = Version {
        mod_revision: row.get(1),
        sub: sub as u32,
        create_revision: row.get(3),
        version: row.get(4),
        lease: row.get(5),
        value: None,
    };
    (
        Bytes::from(key),
        version,
        (kind == KIND_PUT).then(|| row.get(7)),
    )
}

/// A read-only REPEATABLE READ transaction and the meta record it sees.
async fn snapshot<'c>(
    client: &'c mut Client,
    layout: &Layout,
    what: &'static str,
) -> Result<(tokio_postgres::Transaction<'c>, pgetcd_storage::Meta)> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(read_error(what))?;
    let meta = meta_of(
        &tx.query_one(
            &format!(
                "SELECT {META_COLUMNS} FROM {}.meta WHERE id = 1",
                layout.schema()
            ),
            &[],
        )
        .await
        .map_err(read_error("read meta"))?,
    );
    Ok((tx, meta))
}

/// Changes after revision `after`, at most `revisions` revisions of them, with meta, in
/// one REPEATABLE READ snapshot. Above the compact revision `history` holds every
/// change, so the answer is complete unless `after` is below it.
pub(crate) async fn changes_after(
    client: &mut Client,
    layout: &Layout,
    after: i64,
    revisions: i64,
) -> Result<Changes> {
    let s = layout.schema();
    let (tx, meta) = snapshot(client, layout, "begin catch-up read").await?;
    let mut changes = Vec::new();
    if after >= meta.compact_revision {
        let upto = after.saturating_add(revisions.max(1));
        let rows = tx
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM {s}.history WHERE revision > $1 AND revision <= $2 \
                     ORDER BY revision, sub"
                ),
                &[&after, &upto],
            )
            .await
            .map_err(read_error("read changes"))?;
        changes.reserve(rows.len());
        for row in &rows {
            let (key, mut version, value) = version_of(row);
            version.value = value.map(Bytes::copy_from_slice);
            changes.push((key, version));
        }
    }
    tx.commit().await.map_err(read_error("end catch-up read"))?;
    Ok(Changes { meta, changes })
}

/// Each key's newest live version at or below `$1` (the compact revision): what a
/// compaction there keeps of `history` and `history_retained`.
fn kept_at_or_below(s: &str) -> String {
    let cols = COLUMNS;
    format!(
        "SELECT DISTINCT ON (key) {cols} FROM (\
           SELECT {cols} FROM {s}.history WHERE revision <= $1 \
           UNION ALL SELECT {cols} FROM {s}.history_retained WHERE revision <= $1) h \
         ORDER BY key, revision DESC, sub DESC"
    )
}

/// The leases of a snapshot, by id.
async fn leases(tx: &tokio_postgres::Transaction<'_>, s: &str) -> Result<Vec<(i64, i64)>> {
    Ok(tx
        .query(&format!("SELECT id, ttl FROM {s}.leases ORDER BY id"), &[])
        .await
        .map_err(read_error("read leases"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// What an export knows before its versions: the meta record and the leases.
pub(crate) type ExportHead = (pgetcd_storage::Meta, Vec<(i64, i64)>);

/// Streams the keyspace in revision order into chunks (see [`Store::export`]): sends
/// meta and leases on `head` first, then the versions on `tx`. Runs on its own
/// connection until the receiver goes away or everything is sent; errors go down the
/// channel they belong to.
///
/// [`Store::export`]: pgetcd_storage::Store::export
pub(crate) async fn export(
    mut client: Client,
    layout: Layout,
    head: tokio::sync::oneshot::Sender<Result<ExportHead>>,
    out: tokio::sync::mpsc::Sender<VersionChunk>,
) {
    let s = layout.schema();
    let begun = async {
        let (tx, meta) = snapshot(&mut client, &layout, "begin export").await?;
        let leases = leases(&tx, s).await?;
        Ok::<_, pgetcd_storage::StoreError>((tx, meta, leases))
    }
    .await;
    let (tx, meta) = match begun {
        Ok((tx, meta, leases)) => {
            if head.send(Ok((meta, leases))).is_err() {
                return;
            }
            (tx, meta)
        }
        Err(e) => {
            let _ = head.send(Err(e));
            return;
        }
    };
    let cols = COLUMNS;
    let kept = format!(
        "SELECT * FROM ({}) k WHERE kind = {KIND_PUT} ORDER BY revision, sub",
        kept_at_or_below(s)
    );
    let above =
        format!("SELECT {cols} FROM {s}.history WHERE revision > $1 ORDER BY revision, sub");
    let compact = meta.compact_revision;
    for sql in [kept, above] {
        let stream = match tx
            .query_raw(sql.as_str(), [&compact as &(dyn ToSql + Sync)])
            .await
        {
            Ok(stream) => stream,
            Err(e) => {
                let _ = out.send(Err(read_error("export history")(e))).await;
                return;
            }
        };
        pin_mut!(stream);
        let mut chunk = Vec::with_capacity(CHUNK_VERSIONS);
        while let Some(row) = stream.next().await {
            let row = match row {
                Ok(row) => row,
                Err(e) => {
                    let _ = out.send(Err(read_error("export history row")(e))).await;
                    return;
                }
            };
            let (key, mut version, value) = version_of(&row);
            version.value = value.map(Bytes::copy_from_slice);
            chunk.push((key, version));
            if chunk.len() == CHUNK_VERSIONS {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_VERSIONS));
                if out.send(Ok(full)).await.is_err() {
                    return; // the reader went away
                }
            }
        }
        if !chunk.is_empty() && out.send(Ok(chunk)).await.is_err() {
            return;
        }
    }
    if let Err(e) = tx.commit().await {
        let _ = out.send(Err(read_error("end export")(e))).await;
    }
}

pub(crate) async fn load(
    client: &mut Client,
    layout: &Layout,
    visit: &mut LoadVisitor<'_>,
) -> Result<Loaded> {
    let s = layout.schema();
    let (tx, meta) = snapshot(client, layout, "begin load").await?;
    let leases = leases(&tx, s).await?;
    let above = format!("SELECT {COLUMNS} FROM {s}.history WHERE revision > $1");
    let at_or_below = kept_at_or_below(s);
    let compact = meta.compact_revision;
    let mut versions = 0usize;
    for (sql, skip_tombstones) in [(above, false), (at_or_below, true)] {
        let stream = tx
            .query_raw(sql.as_str(), [&compact as &(dyn ToSql + Sync)])
            .await
            .map_err(read_error("load history"))?;
        pin_mut!(stream);
        while let Some(row) = stream.next().await {
            let row = row.map_err(read_error("load history row"))?;
            if skip_tombstones && row.get::<_, i16>(6) == KIND_DELETE {
                continue;
            }
            let (key, version, value) = version_of(&row);
            visit(key, version, value);
            versions += 1;
        }
    }
    tx.commit().await.map_err(read_error("end load"))?;
    Ok(Loaded {
        meta,
        leases,
        versions,
    })
}
