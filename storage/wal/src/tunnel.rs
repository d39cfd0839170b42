//! TLS for the replication connection.
//!
//! pgwire-replication does TLS itself only with its `tls-rustls` feature, which turns
//! on rustls's default features and so builds aws-lc-rs (a C library, cmake) beside
//! ring; its rules also differ from libpq's (it ignores a root certificate under
//! `require` and refuses `verify-full` to an IP address). So the replication client
//! speaks plaintext to a unix socket in a fresh private directory (mode 0700), and this
//! module pipes that one connection to the server over a TLS session opened with the
//! caller's connector: the same `sslmode`, certificates and checks as every other
//! connection pgetcd opens.
//!
//! Protocol: [`open`] connects over TCP (to `hostaddr` when given, else `host`), sends
//! the SSLRequest (skipped with `sslnegotiation=direct`) and completes the handshake
//! *before* the replication client starts, so a refused TLS or a bad certificate is an
//! error of `WalStream::start` with its cause. When the server declines TLS under
//! `sslmode=prefer`, [`open`] returns `None` and the caller connects directly in
//! plaintext. The socket accepts one connection (within [`ACCEPT_TIMEOUT`]), then its
//! directory is removed. A close on either side is passed on to the other, so
//! dropping the replication client closes the TLS session, and a server that goes away
//! ends the replication client's stream.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio_postgres::config::{SslMode, SslNegotiation};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tracing::{debug, warn};

use crate::WalError;

/// How long the socket waits for the replication client.
pub(crate) const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes copied per read in each direction.
const PIPE_BUFFER: usize = 64 * 1024;

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Opens a TLS session with `host:port` and a private unix socket piped to it; returns
/// the socket's directory (the replication client connects to
/// `<dir>/.s.PGSQL.<port>`), or `None` when the server declined TLS under
/// `sslmode=prefer`.
pub(crate) async fn open<T>(target: &T, host: &str, port: u16) -> Result<Option<String>, WalError>
where
    T: AsRef<tokio_postgres::Config> + MakeTlsConnect<TcpStream> + Clone,
    T::Stream: Send + 'static,
{
    let config = target.as_ref();
    let handshake = handshake(target, host, port);
    let tls = match config.get_connect_timeout() {
        Some(limit) => tokio::time::timeout(*limit, handshake)
            .await
            .map_err(|_| WalError::Tls {
                host: host.to_owned(),
                reason: format!("no TLS session within the connect timeout ({limit:?})"),
            })??,
        None => handshake.await?,
    };
    let Some(tls) = tls else { return Ok(None) };
    // A unix socket path is limited to about 100 bytes.
    let mut parent = std::env::temp_dir();
    if parent.as_os_str().len() > 64 {
        parent = PathBuf::from("/tmp");
    }
    let dir = tempfile::Builder::new()
        .prefix("pgetcd-wal-")
        .tempdir_in(parent)
        .map_err(|e| tunnel_error(host, "creating its socket directory", e))?;
    let socket: PathBuf = dir.path().join(format!(".s.PGSQL.{port}"));
    let listener =
        UnixListener::bind(&socket).map_err(|e| tunnel_error(host, "binding its socket", e))?;
    let dir_name = dir.path().to_string_lossy().into_owned();
    tokio::spawn(pipe(listener, dir, tls));
    Ok(Some(dir_name))
}

fn tunnel_error(host: &str, what: &str, e: std::io::Error) -> WalError {
    WalError::Tls {
        host: host.to_owned(),
        reason: format!("{what}: {e}"),
    }
}

/// TCP connect, SSLRequest, TLS handshake. `None`: the server declined under prefer.
async fn handshake<T>(target: &T, host: &str, port: u16) -> Result<Option<T::Stream>, WalError>
where
    T: AsRef<tokio_postgres::Config> + MakeTlsConnect<TcpStream> + Clone,
{
    let config = target.as_ref();
    let connected = match config.get_hostaddrs().first() {
        Some(addr) => TcpStream::connect((*addr, port)).await,
        None => TcpStream::connect((host, port)).await,
    };
    let mut tcp = connected.map_err(|source| WalError::Connect {
        addr: format!("{host}:{port}"),
        source,
    })?;
    tcp.set_nodelay(true)
        .map_err(|e| tunnel_error(host, "setting TCP_NODELAY", e))?;
    if config.get_ssl_negotiation() != SslNegotiation::Direct {
        tcp.write_all(&SSL_REQUEST)
            .await
            .map_err(|e| tunnel_error(host, "sending SSLRequest", e))?;
        let answer = tcp
            .read_u8()
            .await
            .map_err(|e| tunnel_error(host, "reading the answer to SSLRequest", e))?;
        if answer != b'S' {
            if config.get_ssl_mode() == SslMode::Prefer {
                return Ok(None);
            }
            return Err(WalError::Tls {
                host: host.to_owned(),
                reason: "the server does not support TLS (sslmode requires it)".into(),
            });
        }
    }
    let fail = |e: Box<dyn std::error::Error + Send + Sync>| WalError::Tls {
        host: host.to_owned(),
        reason: e.to_string(),
    };
    let connector = target
        .clone()
        .make_tls_connect(host)
        .map_err(|e| fail(e.into()))?;
    let tls = connector.connect(tcp).await.map_err(|e| fail(e.into()))?;
    Ok(Some(tls))
}

/// Accepts one connection on `listener`, removes the socket's directory, and copies
/// bytes both ways between it and `tls` until either side closes.
async fn pipe<S>(listener: UnixListener, dir: tempfile::TempDir, mut tls: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let accepted = tokio::time::timeout(ACCEPT_TIMEOUT, listener.accept()).await;
    drop(listener);
    drop(dir);
    let mut local = match accepted {
        Ok(Ok((local, _))) => local,
        Ok(Err(e)) => {
            warn!(error = %e, "replication TLS tunnel: accept failed");
            return;
        }
        Err(_) => {
            warn!("replication TLS tunnel: the replication client never connected");
            return;
        }
    };
    match tokio::io::copy_bidirectional_with_sizes(&mut local, &mut tls, PIPE_BUFFER, PIPE_BUFFER)
        .await
    {
        Ok((up, down)) => debug!(up, down, "replication TLS tunnel closed"),
        Err(e) => debug!(error = %e, "replication TLS tunnel ended"),
    }
}
