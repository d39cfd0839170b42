//! `pgetcd keyspace copy-prefix`: the live keys under a prefix copied from one keyspace
//! into another, as when a resource moves to a keyspace of its own.
//!
//! The source is read from one export (a consistent snapshot of its store; it may be
//! served meanwhile). The target is held ([`crate::admin::Exclusive`]: no instance
//! serves it). Every key to write is written in one batch at revision
//! `max(source revision, target revision) + 1`, with a sub-revision each, so a client
//! that saw a resourceVersion in either keyspace never sees a smaller one after moving:
//! the revisions in between are empty in the target. A key the target holds already
//! with the same value and lease is left alone (a rerun writes nothing when nothing
//! changed); one it holds with another value gets a new version; a new key is created
//! at that revision. Leases the copied keys are attached to are copied with their
//! granted TTLs unless the target has them.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use pgetcd_storage::{Batch, Change, Export, LeaseOp, LeaseOps, Store, Version};

use crate::ServerError;
use crate::config::CopyPrefixArgs;

fn failed(what: &str, e: pgetcd_storage::StoreError) -> ServerError {
    ServerError::failed(what, e.with_causes())
}

/// Each key's newest version in `export`, for the keys starting with `prefix` (None:
/// every key), and the leases; drains the export.
async fn live(
    mut export: Export,
    prefix: Option<&[u8]>,
) -> Result<BTreeMap<Bytes, Version>, ServerError> {
    let mut newest: BTreeMap<Bytes, Version> = BTreeMap::new();
    while let Some(chunk) = export.versions.recv().await {
        for (key, v) in chunk.map_err(|e| failed("reading a keyspace", e))? {
            if prefix.is_none_or(|p| key.starts_with(p)) {
                newest.insert(key, v);
            }
        }
    }
    newest.retain(|_, v| !v.is_tombstone());
    Ok(newest)
}

/// What a copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Keys written (created or updated).
    pub written: usize,
    /// Keys the target held already, equal.
    pub unchanged: usize,
    /// Leases copied.
    pub leases: usize,
    /// The revision they were written at (0: nothing written).
    pub revision: i64,
}

/// Copies the keys under `prefix` from `source` into `target`, held at `fence`.
pub async fn copy(
    source: &dyn Store,
    target: &dyn Store,
    fence: &pgetcd_storage::Fence,
    prefix: &[u8],
) -> Result<Copied, ServerError> {
    let from = source
        .export()
        .await
        .map_err(|e| failed("reading the source keyspace", e))?;
    let source_revision = from.meta.revision;
    let source_leases: HashMap<i64, i64> = from.leases.iter().copied().collect();
    let wanted = live(from, Some(prefix)).await?;
    let to = target
        .export()
        .await
        .map_err(|e| failed("reading the target keyspace", e))?;
    let target_revision = to.meta.revision;
    let target_leases: HashMap<i64, i64> = to.leases.iter().copied().collect();
    let held = live(to, Some(prefix)).await?;
    let revision = source_revision.max(target_revision) + 1;
    let mut copied = Copied::default();
    let mut changes = Vec::new();
    let mut leases = LeaseOps::default();
    for (key, v) in wanted {
        let before = held.get(&key);
        if before.is_some_and(|b| b.value == v.value && b.lease == v.lease) {
            copied.unchanged += 1;
            continue;
        }
        if v.lease != 0
            && !target_leases.contains_key(&v.lease)
            && !leases
                .ops
                .iter()
                .any(|op| matches!(op, LeaseOp::Grant(id, _) if *id == v.lease))
            && let Some(&ttl) = source_leases.get(&v.lease)
        {
            leases.ops.push(LeaseOp::Grant(v.lease, ttl));
        }
        let version = Version {
            mod_revision: revision,
            sub: changes.len() as u32,
            create_revision: before.map_or(revision, |b| b.create_revision),
            version: before.map_or(1, |b| b.version + 1),
            // A lease the source no longer has is not attached.
            lease: if source_leases.contains_key(&v.lease) {
                v.lease
            } else {
                0
            },
            value: v.value.clone(),
        };
        changes.push(Change {
            key,
            version,
            prev: before.cloned(),
        });
    }
    copied.written = changes.len();
    copied.leases = leases.ops.len();
    if changes.is_empty() && leases.is_empty() {
        return Ok(copied);
    }
    let revision = if changes.is_empty() {
        target_revision
    } else {
        revision
    };
    target
        .commit(
            fence,
            Batch {
                prev_revision: target_revision,
                revision,
                changes: &changes,
                leases: &leases,
            },
        )
        .await
        .map_err(|e| failed("writing the target keyspace", e))?;
    copied.revision = if changes.is_empty() { 0 } else { revision };
    Ok(copied)
}

/// `pgetcd keyspace copy-prefix`: returns the report to print.
pub async fn run(args: &CopyPrefixArgs) -> Result<String, ServerError> {
    if args.prefix.is_empty() {
        return Err(ServerError::Config(
            "--prefix must not be empty (a whole keyspace moves with pgetcd snapshot restore)"
                .into(),
        ));
    }
    let target_flags = &args.target.storage;
    if args.from_keyspace == target_flags.keyspace && args.from_postgres_url.is_none() {
        return Err(ServerError::Config(
            "--from-keyspace names the target keyspace itself".into(),
        ));
    }
    let held = crate::admin::Exclusive::take(target_flags, "pgetcd-copy-prefix").await?;
    let outcome = async {
        let mut source_flags = target_flags.clone();
        source_flags.keyspace = args.from_keyspace.clone();
        source_flags.postgres_url = match &args.from_postgres_url {
            Some(url) => Some(url.clone()),
            None => Some(held.store_url().to_owned()),
        };
        let url = source_flags.postgres_url.clone().unwrap_or_default();
        let source = crate::keyspaces::store_of(&source_flags, url)?;
        let meta = source
            .meta()
            .await
            .map_err(|e| failed("the source keyspace", e))?;
        let copied = copy(
            &source,
            held.store.as_ref(),
            &held.fence,
            args.prefix.as_bytes(),
        )
        .await?;
        Ok::<_, ServerError>((meta.revision, copied))
    }
    .await;
    let released = held.release().await;
    let (source_revision, copied) = outcome?;
    released?;
    Ok(format!(
        "copied {prefix:?} from keyspace {from:?} (revision {source_revision}) into {to:?}: \
         {written} keys written at revision {revision}, {unchanged} already equal, {leases} leases",
        prefix = args.prefix,
        from = args.from_keyspace,
        to = target_flags.keyspace,
        written = copied.written,
        revision = copied.revision,
        unchanged = copied.unchanged,
        leases = copied.leases,
    ))
}
