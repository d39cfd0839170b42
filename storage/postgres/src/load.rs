//! The start-up load: one REPEATABLE READ snapshot of meta, the leases and every
//! retained version (all history above the compact revision, plus each key's newest
//! live version at or below it, from `history` and `history_retained`), streamed.

use bytes::Bytes;
use futures::{StreamExt, pin_mut};
use pgetcd_partitioning::{KIND_DELETE, KIND_PUT, Layout};
use pgetcd_storage::{LoadVisitor, Loaded, Result, Version};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel};

use crate::error::read_error;
use crate::setup::{META_COLUMNS, meta_of};

pub(crate) async fn load(
    client: &mut Client,
    layout: &Layout,
    visit: &mut LoadVisitor<'_>,
) -> Result<Loaded> {
    let s = layout.schema();
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(read_error("begin load"))?;
    let meta = meta_of(
        &tx.query_one(
            &format!("SELECT {META_COLUMNS} FROM {s}.meta WHERE id = 1"),
            &[],
        )
        .await
        .map_err(read_error("read meta"))?,
    );
    let leases = tx
        .query(&format!("SELECT id, ttl FROM {s}.leases ORDER BY id"), &[])
        .await
        .map_err(read_error("load leases"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let cols = "key, revision, sub, create_revision, version, lease, kind, value";
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
            let kind: i16 = row.get(6);
            if skip_tombstones && kind == KIND_DELETE {
                continue;
            }
            let key: Vec<u8> = row.get(0);
            let sub: i32 = row.get(2);
            let value: Option<&[u8]> = (kind == KIND_PUT).then(|| row.get(7));
            visit(
                Bytes::from(key),
                Version {
                    mod_revision: row.get(1),
                    sub: sub as u32,
                    create_revision: row.get(3),
                    version: row.get(4),
                    lease: row.get(5),
                    value: None,
                },
                value,
            );
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
