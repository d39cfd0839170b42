//! The data step of a compaction, in one transaction on its own connection while the
//! writer goes on: copies the survivors out of the partitions about to be dropped into
//! `history_retained`, deletes retained versions no longer visible, then drops the
//! partitions (last, so the drop's lock on `history` is held only until the commit right
//! after it). Idempotent, so a failed or uncertain attempt is simply made again. Fenced
//! when another instance took the keyspace. The epoch is read without a row lock: a
//! lock on `meta` held until the partition drop would deadlock with the writer's commit
//! (which locks the partitions first, then waits for `meta`).

use pgetcd_partitioning::Layout;
use pgetcd_storage::{CompactionPlan, Fence, Pruned, Result, StoreError, VersionId};
use tokio_postgres::Client;

use crate::error::write_error;

fn split(ids: &[VersionId]) -> (Vec<i64>, Vec<i32>) {
    (
        ids.iter().map(|i| i.0).collect(),
        ids.iter().map(|i| i.1 as i32).collect(),
    )
}

/// With `sweep_retained`, the retained versions the index may not know of are removed
/// too: every retained version at or below the compact revision that a newer version
/// of its key at or below it shadows (needed once after a load, which cannot tell
/// whether an earlier compaction's data step ran; it reads the history at or below the
/// compact revision once).
pub(crate) async fn physical(
    client: &mut Client,
    layout: &Layout,
    fence: &Fence,
    plan: &CompactionPlan,
    pruned: &Pruned,
    sweep_retained: bool,
) -> Result<()> {
    let s = layout.schema();
    let failed = write_error("compaction");
    let tx = client
        .transaction()
        .await
        .map_err(write_error("begin compaction"))?;
    let epoch: i64 = tx
        .query_one(
            &format!("SELECT leader_epoch FROM {s}.meta WHERE id = 1"),
            &[],
        )
        .await
        .map_err(write_error("compaction: read epoch"))?
        .get(0);
    if epoch != fence.epoch {
        return Err(StoreError::Fenced(format!(
            "leader epoch moved to {epoch} (held {})",
            fence.epoch
        )));
    }
    if !pruned.survivors.is_empty() {
        let (r, sb) = split(&pruned.survivors);
        tx.execute(
            &format!(
                "INSERT INTO {s}.history_retained SELECT h.* FROM unnest($1::int8[], $2::int4[]) AS t(r, s) \
                 JOIN {s}.history h ON h.revision = t.r AND h.sub = t.s ON CONFLICT DO NOTHING"
            ),
            &[&r, &sb],
        )
        .await
        .map_err(write_error("compaction: retain survivors"))?;
    }
    if !pruned.removed.is_empty() {
        let (r, sb) = split(&pruned.removed);
        tx.execute(
            &format!(
                "DELETE FROM {s}.history_retained h USING unnest($1::int8[], $2::int4[]) AS t(r, s) \
                 WHERE h.revision = t.r AND h.sub = t.s"
            ),
            &[&r, &sb],
        )
        .await
        .map_err(write_error("compaction: delete retained"))?;
    }
    if sweep_retained {
        for shadow in ["history", "history_retained"] {
            tx.execute(
                &format!(
                    "DELETE FROM {s}.history_retained r WHERE r.revision <= $1 AND EXISTS (\
                       SELECT 1 FROM {s}.{shadow} n WHERE n.key = r.key \
                       AND n.revision > r.revision AND n.revision <= $1)"
                ),
                &[&plan.revision],
            )
            .await
            .map_err(write_error("compaction: sweep retained"))?;
        }
    }
    for &start in &plan.segments {
        tx.batch_execute(&layout.drop_partition_ddl(start))
            .await
            .map_err(write_error("compaction: drop partition"))?;
    }
    tx.commit().await.map_err(failed)
}
