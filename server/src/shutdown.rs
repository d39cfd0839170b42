//! The shutdown signal: a `watch` channel that turns true once.

use tokio::sync::watch;

/// Resolves once `shutdown` says true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
