//! The engine's background tasks: lease expiry and the quota check. Each ends when the
//! engine is dropped.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use pgetcd_proto::etcdserverpb::LeaseRevokeRequest;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::lease::LeaseTable;
use crate::state::Core;
use crate::writer::{Job, Op};

/// How often the keyspace's size is compared with the quota.
pub const QUOTA_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Raises the NOSPACE alarm when the keyspace grows over its quota (it stays raised
/// until disarmed, as in etcd). Ends when the engine is dropped.
pub(crate) async fn watch_quota(core: std::sync::Weak<Core>) {
    let mut tick = tokio::time::interval(QUOTA_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        let Some(core) = core.upgrade() else { return };
        if let Ok(size) = core.store.size().await
            && size > core.config.quota_backend_bytes
            && !core.nospace.swap(true, Ordering::SeqCst)
        {
            tracing::warn!(
                size,
                quota = core.config.quota_backend_bytes,
                "NOSPACE alarm raised"
            );
        }
    }
}

/// Every 500 ms, revokes leases past their expiry through the writer (one revision per
/// lease, all its keys deleted in it). Ends when the engine is dropped.
pub(crate) async fn expire_leases(leases: Arc<LeaseTable>, jobs: mpsc::WeakSender<Job>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Some(jobs) = jobs.upgrade() else { return };
        for id in leases.take_expired(tokio::time::Instant::now()) {
            let (reply, rx) = oneshot::channel();
            let job = Job {
                op: Op::LeaseRevoke(LeaseRevokeRequest { id }),
                reply,
            };
            if jobs.send(job).await.is_err() {
                return;
            }
            let leases = leases.clone();
            tokio::spawn(async move {
                match rx.await {
                    Ok(Ok(_)) | Ok(Err(Error::LeaseNotFound)) => {}
                    _ => leases.retry_expiry(id),
                }
            });
        }
    }
}
