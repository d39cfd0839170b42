//! A TCP proxy whose connections a test can cut, pause or send elsewhere: to lose a
//! client's connection while the server side (a Postgres backend) goes on, to stall a
//! client without closing anything, or to stand for a virtual IP that moves to another
//! server (a Postgres failover).

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards every connection to its target.
pub struct TcpProxy {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    paused: watch::Sender<bool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let target = Arc::new(Mutex::new(target));
        let (paused, paused_rx) = watch::channel(false);
        let (tracked, to) = (conns.clone(), target.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let target = *to.lock();
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let paused = paused_rx.clone();
                let task = tokio::spawn(async move {
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pipe(cr, sw, paused.clone()) => {}
                        _ = pipe(sr, cw, paused) => {}
                    }
                });
                let mut conns = tracked.lock();
                conns.retain(|t| !t.is_finished());
                conns.push(task);
            }
        });
        TcpProxy {
            addr,
            target,
            paused,
            conns,
            accept,
        }
    }

    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes every connection open now, on both sides of the proxy; new ones are
    /// still accepted. A server that is busy does not notice until it next writes.
    pub fn cut(&self) {
        for t in self.conns.lock().drain(..) {
            t.abort();
        }
    }

    /// Stops passing bytes on every connection, open or new, without closing any (a
    /// network that drops everything): the two ends wait.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Passes bytes again after [`TcpProxy::pause`].
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Connections made from now on go to `target`.
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock() = target;
    }
}

/// Copies `from` to `to` until either ends, holding each chunk while paused.
async fn pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut paused: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
