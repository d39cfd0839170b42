//! Closed-loop KV workloads: put, txn-put, range, create, update, list, count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, bail};
use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{PutRequest, RangeRequest, TxnRequest};
use rand::Rng;

use super::{Outcome, RoundCtx, closed_loop, ops};
use crate::cli::Workload;
use crate::conn;
use crate::prefill::item_key;

/// etcd benchmark's key: the number zero-padded to `key_size`, cut to `key_size`.
fn numbered_key(k: u64, key_size: usize) -> Bytes {
    let mut key = format!("{k:0key_size$}").into_bytes();
    key.truncate(key_size.max(1));
    Bytes::from(key)
}

/// put, txn-put and range.
pub async fn simple(ctx: &RoundCtx<'_>) -> Result<Outcome> {
    let channels = &ctx.prep.channels;
    let value = ctx.prep.value.clone();
    let (key_size, space, serializable) =
        (ctx.p.key_size, ctx.p.key_space_size, ctx.p.serializable);
    let pick = move |n: u64, sequential: bool| {
        let k = if sequential {
            n % space
        } else {
            rand::rng().random_range(0..space)
        };
        numbered_key(k, key_size)
    };
    match ctx.cli.workload.clone() {
        Workload::Put { sequential_keys } => {
            closed_loop(ctx, channels, 0, move |mut kv, n| {
                let req = PutRequest {
                    key: pick(n, sequential_keys),
                    value: value.clone(),
                    ..Default::default()
                };
                async move {
                    kv.put(req).await?;
                    Ok(())
                }
            })
            .await?;
        }
        Workload::TxnPut { txn_ops } => {
            let txn_ops = txn_ops.max(1) as u64;
            if txn_ops > space {
                bail!(
                    "--txn-ops {txn_ops} needs --key-space-size of at least {txn_ops} (a txn may not put a key twice)"
                );
            }
            closed_loop(ctx, channels, 0, move |mut kv, _| {
                // Distinct keys: consecutive from a random start.
                let base = rand::rng().random_range(0..space);
                let req = TxnRequest {
                    success: (0..txn_ops)
                        .map(|i| {
                            ops::put_op(
                                numbered_key((base + i) % space, key_size),
                                value.clone(),
                                0,
                            )
                        })
                        .collect(),
                    ..Default::default()
                };
                async move {
                    kv.txn(req).await?;
                    Ok(())
                }
            })
            .await?;
        }
        Workload::Range {
            range_key,
            range_end,
        } => {
            let key = Bytes::from(range_key);
            if range_end.is_none() {
                conn::kv(&channels[0])
                    .put(PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        ..Default::default()
                    })
                    .await?;
            }
            let end = range_end.map(Bytes::from).unwrap_or_default();
            ctx.restart();
            closed_loop(ctx, channels, 0, move |mut kv, _| {
                let req = RangeRequest {
                    key: key.clone(),
                    range_end: end.clone(),
                    serializable,
                    ..Default::default()
                };
                async move {
                    kv.range(req).await?;
                    Ok(())
                }
            })
            .await?;
        }
        _ => bail!("not a simple KV workload"),
    }
    Ok(Outcome::default())
}

/// Kubernetes create on fresh keys `<prefix><round>/<n>`.
pub async fn create(ctx: &RoundCtx<'_>) -> Result<Outcome> {
    let channels = &ctx.prep.channels;
    let prefix = format!("{}{}/", ctx.prep.prefix, ctx.idx);
    let (width, value) = (ctx.prep.width, ctx.prep.value.clone());
    let kind = ctx.stats.kind(0);
    closed_loop(ctx, channels, 0, move |mut kv, n| {
        let (key, value, kind) = (item_key(&prefix, width, n), value.clone(), kind.clone());
        async move {
            if ops::create(&mut kv, key, value, 0).await?.is_none() {
                kind.add_conflicts(1);
            }
            Ok(())
        }
    })
    .await?;
    Ok(Outcome::default())
}

/// GuaranteedUpdate of random keys among the prefilled ones.
pub async fn update(ctx: &RoundCtx<'_>) -> Result<Outcome> {
    let channels = &ctx.prep.channels;
    let prefix = ctx.prep.prefix.clone();
    let (width, value, space, serializable) = (
        ctx.prep.width,
        ctx.prep.value.clone(),
        ctx.p.key_space_size,
        ctx.p.serializable,
    );
    let kind = ctx.stats.kind(0);
    closed_loop(ctx, channels, 0, move |mut kv, _| {
        let key = item_key(&prefix, width, rand::rng().random_range(0..space));
        let (value, kind) = (value.clone(), kind.clone());
        async move {
            let (_, retries) = ops::guaranteed_update(&mut kv, key, value, serializable).await?;
            kind.add_conflicts(retries);
            Ok(())
        }
    })
    .await?;
    Ok(Outcome {
        notes: vec![format!(
            "{} clients over {space} keys",
            ctx.cli.clients.max(1)
        )],
        ..Outcome::default()
    })
}

/// Full paginated lists of the prefilled prefix; checks each returns every key.
pub async fn list(ctx: &RoundCtx<'_>, limit: i64) -> Result<Outcome> {
    if limit <= 0 {
        bail!("--limit must be positive");
    }
    let channels = &ctx.prep.channels;
    let prefix = ctx.prep.prefix.clone();
    let (want, serializable) = (ctx.p.key_space_size, ctx.p.serializable);
    let (list, page) = (ctx.stats.kind(0), ctx.stats.kind(1));
    let short = Arc::new(AtomicU64::new(0));
    let short2 = short.clone();
    closed_loop(ctx, channels, 0, move |mut kv, _| {
        let (prefix, list, page, short) =
            (prefix.clone(), list.clone(), page.clone(), short2.clone());
        async move {
            let keys = ops::paginated_list(&mut kv, &prefix, limit, serializable, &page).await?;
            list.add_items(keys);
            if keys != want {
                short.fetch_add(1, Ordering::Relaxed);
                bail!("list returned {keys} keys, not {want}");
            }
            Ok(())
        }
    })
    .await?;
    let mut notes = vec![format!(
        "{want} keys of {} B per list, pages of {limit}",
        ctx.p.val_size
    )];
    let short = short.load(Ordering::Relaxed);
    if short > 0 {
        notes.push(format!("{short} lists did not return every key"));
    }
    Ok(Outcome {
        notes,
        ..Outcome::default()
    })
}

/// count_only over the prefilled prefix; checks the count.
pub async fn count(ctx: &RoundCtx<'_>) -> Result<Outcome> {
    let channels = &ctx.prep.channels;
    let prefix = ctx.prep.prefix.clone();
    let (want, serializable) = (ctx.p.key_space_size as i64, ctx.p.serializable);
    let kind = ctx.stats.kind(0);
    closed_loop(ctx, channels, 0, move |mut kv, _| {
        let (prefix, kind) = (prefix.clone(), kind.clone());
        async move {
            let n = ops::count(&mut kv, &prefix, serializable).await?;
            kind.add_items(n as u64);
            if n != want {
                bail!("count returned {n}, not {want}");
            }
            Ok(())
        }
    })
    .await?;
    Ok(Outcome {
        notes: vec![format!("count over {want} keys")],
        ..Outcome::default()
    })
}
