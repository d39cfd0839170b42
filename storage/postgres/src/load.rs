//! The start-up load: one REPEATABLE READ snapshot of meta, the leases and every
//! retained version (all history above the compact revision, plus each key's newest
//! live version at or below it, from `history` and `history_retained`), streamed.

use bytes::Bytes;
use futures::{StreamExt, pin_mut};
use pgetcd_partitioning::{KIND_DELETE, KIND_PUT, Layout};
use pgetcd_storage::{Changes, LoadVisitor, Loaded, Result, Version};
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

pub(crate) async fn load(
    client: &mut Client,
    layout: &Layout,
    visit: &mut LoadVisitor<'_>,
) -> Result<Loaded> {
    let s = layout.schema();
    let (tx, meta) = snapshot(client, layout, "begin load").await?;
    let leases = tx
        .query(&format!("SELECT id, ttl FROM {s}.leases ORDER BY id"), &[])
        .await
        .map_err(read_error("load leases"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let cols = COLUMNS;
    let above = format!("SELECT {cols} FROM {s}.history WHERE revision > $1");
    let at_or_below = format!(
        "SELECT DISTINCT ON (key) {cols} FROM (\
           SELECT {cols} FROM {s}.history WHERE revision <= $1 \
           UNION ALL SELECT {cols} FROM {s}.history_retained WHERE revision <= $1) h \
         ORDER BY key, revision DESC, sub DESC"
    );
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
