//! A lease kept alive as an etcd client keeps it: one LeaseKeepAlive stream, a request
//! every 500 ms, opened again when it fails or stops answering; every answer logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pgetcd_proto::etcdserverpb::{LeaseKeepAliveRequest, lease_client::LeaseClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

/// Keepalive answers: when each came and its TTL, or why the stream failed.
pub type KeepAlives = Arc<Mutex<Vec<(Instant, Result<i64, String>)>>>;

/// Keeps lease `id` alive through `url` until `stop` turns true, logging into `log`.
pub async fn keep_alive(url: String, id: i64, log: KeepAlives, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        let channel = Endpoint::from_shared(url.clone())
            .expect("url")
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        let (tx, rx) = mpsc::channel(4);
        tx.send(LeaseKeepAliveRequest { id }).await.unwrap();
        let call = LeaseClient::new(channel)
            .lease_keep_alive(ReceiverStream::new(rx))
            .await;
        let mut down = match call {
            Ok(s) => s.into_inner(),
            Err(e) => {
                log.lock().push((Instant::now(), Err(format!("open: {e}"))));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(2), down.message()).await {
                Ok(Ok(Some(r))) => log.lock().push((Instant::now(), Ok(r.ttl))),
                other => {
                    log.lock().push((Instant::now(), Err(format!("{other:?}"))));
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
