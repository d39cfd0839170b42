//! Prefill: write keys `<prefix><i>` (i in 0..n, zero-padded) before the measured
//! rounds, fast: transactions of up to 128 puts (etcd's default --max-txn-ops) and at
//! most ~1.2 MiB (under the default 1.5 MiB --max-request-bytes), many in flight over
//! several connections.
//!
//! A prefix that already holds exactly `n` keys is taken as prefilled (a second run
//! against the same server skips the work); one that holds more is refused, because the
//! workloads check that lists and counts see exactly `n` keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, bail};
use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest, request_op};
use tokio::task::JoinSet;

use crate::conn::{self, Target};
use crate::progress::Progress;

/// etcd's default --max-txn-ops.
pub const MAX_TXN_OPS: usize = 128;
/// Bytes per prefill transaction at most (etcd's default limit is 1.5 MiB).
const MAX_TXN_BYTES: usize = 1_200_000;
/// Prefill transactions in flight.
const IN_FLIGHT: usize = 16;

/// The key of item `i` under `prefix`.
pub fn item_key(prefix: &str, width: usize, i: u64) -> Bytes {
    Bytes::from(format!("{prefix}{i:0width$}"))
}

/// Digits needed for item numbers below `n`, at least `min`.
pub fn width_for(n: u64, min: usize) -> usize {
    let digits = n.saturating_sub(1).max(1).ilog10() as usize + 1;
    digits.max(min)
}

/// The end of the range of all keys starting with `prefix` (etcd's prefix range end).
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.last_mut() {
        if *last < 0xff {
            *last += 1;
            return Bytes::from(end);
        }
        end.pop();
    }
    // All 0xff (or empty): to the end of the keyspace.
    Bytes::from_static(b"\0")
}

/// Keys under `prefix` now.
pub async fn count(target: &Target, prefix: &str) -> Result<i64> {
    let ch = target.channel(0).await?;
    let r = conn::kv(&ch)
        .range(RangeRequest {
            key: Bytes::from(prefix.to_owned()),
            range_end: prefix_end(prefix.as_bytes()),
            count_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.count)
}

/// Writes `n` keys under `prefix` unless exactly `n` are there already.
pub async fn prefill(
    target: &Target,
    conns: usize,
    prefix: &str,
    width: usize,
    n: u64,
    value: &Bytes,
) -> Result<()> {
    let have = count(target, prefix).await?;
    if have == n as i64 {
        return Ok(());
    }
    if have > n as i64 {
        bail!(
            "{}: {prefix} holds {have} keys, more than the {n} wanted; pass another --prefix",
            target.label
        );
    }
    let per_key = prefix.len() + width + value.len() + 32;
    let batch = (MAX_TXN_BYTES / per_key).clamp(1, MAX_TXN_OPS) as u64;
    let channels = target.channels(conns.clamp(1, 8)).await?;
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let progress = {
        let (done, label, t) = (
            done.clone(),
            target.label.clone(),
            std::time::Instant::now(),
        );
        Progress::start(move || {
            let d = done.load(Ordering::Relaxed);
            format!(
                "{label}: prefill {d}/{n} keys ({:.0}/s)",
                d as f64 / t.elapsed().as_secs_f64().max(1e-3)
            )
        })
    };
    let mut tasks = JoinSet::new();
    for t in 0..IN_FLIGHT {
        let mut kv = conn::kv(&channels[t % channels.len()]);
        let (next, done, value, prefix) =
            (next.clone(), done.clone(), value.clone(), prefix.to_owned());
        tasks.spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                let to = (from + batch).min(n);
                let success = (from..to)
                    .map(|i| RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: item_key(&prefix, width, i),
                            value: value.clone(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                kv.txn(TxnRequest {
                    success,
                    ..Default::default()
                })
                .await?;
                done.fetch_add(to - from, Ordering::Relaxed);
            }
        });
    }
    let mut result = Ok(());
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.map_err(anyhow::Error::from).and_then(|r| r)
            && result.is_ok()
        {
            result = Err(e);
            tasks.abort_all();
        }
    }
    progress.finish().await;
    result?;
    let have = count(target, prefix).await?;
    if have != n as i64 {
        bail!(
            "{}: prefilled {prefix} holds {have} keys, not {n}",
            target.label
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), Bytes::from_static(b"/a0"));
        assert_eq!(prefix_end(b"a\xff"), Bytes::from_static(b"b"));
        assert_eq!(prefix_end(b"\xff"), Bytes::from_static(b"\0"));
    }

    #[test]
    fn widths() {
        assert_eq!(width_for(1, 1), 1);
        assert_eq!(width_for(10, 1), 1);
        assert_eq!(width_for(11, 1), 2);
        assert_eq!(width_for(1_000_000, 8), 8);
        assert_eq!(width_for(1_000_001, 1), 7);
    }
}
