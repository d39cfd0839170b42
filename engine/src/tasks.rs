//! The engine's background tasks: lease expiry and the quota check. Each ends when the
//! engine is dropped.

use std::sync::Arc;

use pgetcd_proto::etcdserverpb::LeaseRevokeRequest;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::lease::LeaseTable;
use crate::state::{ALARM_NOSPACE, Core};
use crate::writer::{Job, Op};

/// How often the alarms are read from the store and, by the writer, the keyspace's size
/// compared with the quota.
pub const ALARM_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Every second: reads the keyspace's alarms (another instance may have raised or
/// cleared one), and on the writer raises NOSPACE under its own member id when the
/// keyspace grows over its quota (it stays raised until disarmed, as in etcd). Ends when
/// the engine is dropped.
pub(crate) async fn watch_alarms(core: std::sync::Weak<Core>) {
    let mut tick = tokio::time::interval(ALARM_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        let Some(core) = core.upgrade() else { return };
        let Ok(alarms) = core.refresh_alarms().await else {
            continue;
        };
        let quota = core.config.quota_backend_bytes;
        let raised = alarms
            .iter()
            .any(|(m, a)| *m == core.member_id && *a == ALARM_NOSPACE);
        if core.follower || quota <= 0 || raised {
            continue;
        }
        if let Ok(size) = core.store.size().await
            && size > quota
            && core
                .store
                .set_alarm(core.member_id, ALARM_NOSPACE, true)
                .await
                .is_ok()
        {
            let _ = core.refresh_alarms().await;
            tracing::warn!(size, quota, "NOSPACE alarm raised");
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
