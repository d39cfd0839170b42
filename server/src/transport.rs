//! Client listeners: accept TCP, optionally terminate TLS (with client-certificate
//! verification for `--client-cert-auth`), then serve HTTP/2 gRPC and plain HTTP/1
//! (`/health`, `/metrics`, `/version`, ...) on the same port, as etcd does.
//!
//! HTTP/2 settings follow etcd's server: no limit on concurrent streams per connection
//! (kube-apiserver multiplexes thousands of watches on a few connections), server
//! keepalive pings every `--grpc-keepalive-interval` with `--grpc-keepalive-timeout`, and
//! client pings accepted at any rate (etcd's `--grpc-keepalive-min-time` of 5 s is the
//! floor it enforces; pgetcd never answers pings with GOAWAY).
//!
//! Shutdown: stop accepting, send GOAWAY on every connection and let in-flight calls
//! finish (watch and keepalive streams end themselves on the same signal), then drop
//! whatever remains after [`DRAIN_TIMEOUT`].

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use pgetcd_coalesce::CoalescedWrites;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

/// A URL to listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenUrl {
    /// Address to bind.
    pub addr: SocketAddr,
    /// https: serve TLS.
    pub tls: bool,
}

/// Parses `http://host:port` or `https://host:port` into an address to bind.
pub fn parse_listen_url(url: &str) -> Result<ListenUrl, String> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix("http://") {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (rest, true)
    } else if url.starts_with("unix://") || url.starts_with("unixs://") {
        return Err(format!("{url}: unix socket URLs are not supported"));
    } else {
        return Err(format!(
            "{url}: expected http://host:port or https://host:port"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let rest = rest.replace("localhost:", "127.0.0.1:");
    let addr = rest
        .parse()
        .map_err(|e| format!("{url}: not an address to listen on ({e})"))?;
    Ok(ListenUrl { addr, tls })
}

/// How long shutdown waits for connections to finish their calls.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 connection-level receive window.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Client TLS settings (etcd's flags of the same names).
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// `--cert-file`.
    pub cert_file: Option<PathBuf>,
    /// `--key-file`.
    pub key_file: Option<PathBuf>,
    /// `--trusted-ca-file`: CAs that sign client certificates.
    pub trusted_ca_file: Option<PathBuf>,
    /// `--client-cert-auth`: refuse clients without a certificate signed by a trusted CA.
    pub client_cert_auth: bool,
    /// `--auto-tls`: a self-signed certificate generated under the data directory.
    pub auto_tls: bool,
    /// Where auto-TLS keeps its certificate (`<data-dir>/fixtures/client`).
    pub auto_tls_dir: PathBuf,
    /// Validity of generated certificates, in years.
    pub self_signed_cert_validity_years: u32,
    /// `--tls-min-version` (`TLS1.2` or `TLS1.3`; none = TLS1.2).
    pub min_version: Option<String>,
    /// `--tls-max-version` (none = TLS1.3).
    pub max_version: Option<String>,
    /// `--cipher-suites`: the TLS 1.2 suites offered, by Go's (IANA) names; empty = all
    /// of rustls's. TLS 1.3 suites are not configurable, as in Go.
    pub cipher_suites: Vec<String>,
    /// `--client-crl-file`: revoked client certificates (PEM or DER CRLs), checked under
    /// --client-cert-auth.
    pub client_crl_file: Option<PathBuf>,
    /// `--client-cert-allowed-hostname`: under --client-cert-auth, a client certificate
    /// must also be valid for one of these names (SAN DNS names with wildcards, or IP
    /// addresses); empty = any.
    pub allowed_hostnames: Vec<String>,
}

/// A TLS version flag value (etcd's names).
fn tls_version(flag: &str, v: &str) -> Result<&'static rustls::SupportedProtocolVersion, String> {
    match v {
        "TLS1.2" => Ok(&rustls::version::TLS12),
        "TLS1.3" => Ok(&rustls::version::TLS13),
        "TLS1.0" | "TLS1.1" => Err(format!(
            "{flag}: {v} is not supported (pgetcd speaks TLS1.2 and TLS1.3)"
        )),
        _ => Err(format!(
            "{flag}: unexpected TLS version {v:?} (TLS1.2 or TLS1.3)"
        )),
    }
}

/// The crypto provider and protocol versions the flags allow.
pub(crate) fn tls_policy(
    settings: &TlsSettings,
) -> Result<
    (
        Arc<rustls::crypto::CryptoProvider>,
        Vec<&'static rustls::SupportedProtocolVersion>,
    ),
    String,
> {
    let min = match &settings.min_version {
        Some(v) => tls_version("--tls-min-version", v)?,
        None => &rustls::version::TLS12,
    };
    let max = match &settings.max_version {
        Some(v) => tls_version("--tls-max-version", v)?,
        None => &rustls::version::TLS13,
    };
    let rank = |v: &rustls::SupportedProtocolVersion| u16::from(v.version);
    if rank(min) > rank(max) {
        return Err("--tls-min-version is above --tls-max-version".into());
    }
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [&rustls::version::TLS12, &rustls::version::TLS13]
            .into_iter()
            .filter(|v| rank(v) >= rank(min) && rank(v) <= rank(max))
            .collect();
    let mut provider = rustls::crypto::ring::default_provider();
    if !settings.cipher_suites.is_empty() {
        if !versions.contains(&&rustls::version::TLS12) {
            return Err(
                "cipher suites cannot be configured when only TLS1.3 or greater is supported"
                    .into(),
            );
        }
        let name_of = |s: &rustls::SupportedCipherSuite| format!("{:?}", s.suite());
        let mut chosen = Vec::new();
        for want in &settings.cipher_suites {
            // Go names the ChaCha20 suites without their _SHA256 suffix.
            let found = provider.cipher_suites.iter().find(|s| {
                s.version() == &rustls::version::TLS12
                    && (name_of(s) == *want || name_of(s) == format!("{want}_SHA256"))
            });
            match found {
                Some(s) => chosen.push(*s),
                None if want.starts_with("TLS_") => {
                    let offered: Vec<String> = provider
                        .cipher_suites
                        .iter()
                        .filter(|s| s.version() == &rustls::version::TLS12)
                        .map(name_of)
                        .collect();
                    return Err(format!(
                        "--cipher-suites: {want} is not supported (TLS 1.2 suites available: {})",
                        offered.join(", ")
                    ));
                }
                None => return Err(format!("unexpected TLS cipher suite {want:?}")),
            }
        }
        provider
            .cipher_suites
            .retain(|s| s.version() != &rustls::version::TLS12 || chosen.contains(s));
    }
    Ok((Arc::new(provider), versions))
}

/// Certificate revocation lists from a PEM file, or one DER CRL.
fn read_crls(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, String> {
    use rustls::pki_types::CertificateRevocationListDer;
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| format!("reading {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("parsing {}: {e}", path.display()))?;
    if !crls.is_empty() {
        return Ok(crls);
    }
    let der = fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if der.first() != Some(&0x30) {
        return Err(format!(
            "{}: no certificate revocation list found",
            path.display()
        ));
    }
    Ok(vec![CertificateRevocationListDer::from(der)])
}

/// HTTP/2 keepalive settings.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    /// Server pings an idle connection this often.
    pub interval: Duration,
    /// and closes it when a ping is not answered within this.
    pub timeout: Duration,
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("reading {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("parsing {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("reading key {}: {e}", path.display()))
}

/// Generates (or reuses) the auto-TLS certificate for `hosts`; returns (cert, key)
/// paths.
fn auto_cert(settings: &TlsSettings, hosts: &[SocketAddr]) -> Result<(PathBuf, PathBuf), String> {
    let dir = &settings.auto_tls_dir;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        info!(cert = %cert.display(), "auto-tls: reusing the generated certificate");
        return Ok((cert, key));
    }
    let mut names: Vec<String> = vec!["localhost".into()];
    for h in hosts {
        let ip = h.ip().to_string();
        if !names.contains(&ip) {
            names.push(ip);
        }
    }
    let mut params = rcgen::CertificateParams::new(names)
        .map_err(|e| format!("auto-tls: certificate parameters: {e}"))?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after =
        now + time::Duration::days(365 * i64::from(settings.self_signed_cert_validity_years));
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "pgetcd");
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key_pair = rcgen::KeyPair::generate().map_err(|e| format!("auto-tls: key: {e}"))?;
    let signed = params
        .self_signed(&key_pair)
        .map_err(|e| format!("auto-tls: signing: {e}"))?;
    fs::create_dir_all(dir).map_err(|e| format!("auto-tls: creating {}: {e}", dir.display()))?;
    fs::write(&cert, signed.pem()).map_err(|e| format!("auto-tls: writing cert: {e}"))?;
    write_private(&key, key_pair.serialize_pem().as_bytes())
        .map_err(|e| format!("auto-tls: writing key: {e}"))?;
    info!(cert = %cert.display(), "auto-tls: generated a self-signed certificate");
    Ok((cert, key))
}

fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// The rustls configuration for https client URLs, read from the files `settings`
/// name (generating the auto-TLS certificate for `hosts` when asked).
fn server_config(
    settings: &TlsSettings,
    hosts: &[SocketAddr],
) -> Result<rustls::ServerConfig, String> {
    let (cert, key) = cert_and_key(settings, hosts)?;
    let (provider, versions) = tls_policy(settings)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("tls: {e}"))?;
    let builder = if settings.client_cert_auth {
        let Some(ca) = &settings.trusted_ca_file else {
            return Err("--client-cert-auth needs --trusted-ca-file".into());
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(ca)? {
            roots
                .add(c)
                .map_err(|e| format!("{}: bad CA certificate: {e}", ca.display()))?;
        }
        let mut verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        if let Some(crl) = &settings.client_crl_file {
            // Like etcd: a client certificate listed as revoked is refused; a CA
            // without a list in the file revokes nothing.
            verifier = verifier
                .with_crls(read_crls(crl)?)
                .allow_unknown_revocation_status();
        }
        let verifier = verifier
            .build()
            .map_err(|e| format!("client certificate verifier: {e}"))?;
        if settings.allowed_hostnames.is_empty() {
            builder.with_client_cert_verifier(verifier)
        } else {
            let allowed =
                crate::tls_names::AllowedHostnames::new(verifier, &settings.allowed_hostnames)?;
            builder.with_client_cert_verifier(Arc::new(allowed))
        }
    } else if !settings.allowed_hostnames.is_empty() {
        return Err(
            "--client-cert-allowed-hostname needs --client-cert-auth (and --trusted-ca-file)"
                .into(),
        );
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(read_certs(&cert)?, read_key(&key)?)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The certificate and key files served: --cert-file/--key-file, or auto-TLS's.
fn cert_and_key(
    settings: &TlsSettings,
    hosts: &[SocketAddr],
) -> Result<(PathBuf, PathBuf), String> {
    match (&settings.cert_file, &settings.key_file) {
        (Some(c), Some(k)) => Ok((c.clone(), k.clone())),
        (None, None) if settings.auto_tls => auto_cert(settings, hosts),
        (None, None) => {
            Err("https client URLs need --cert-file and --key-file (or --auto-tls)".into())
        }
        _ => Err("--cert-file and --key-file go together".into()),
    }
}

/// What identifies one version of a file: a rename over it changes the inode, a
/// write in place the modification time or length. None: the file cannot be read.
type FileStamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The TLS side of the https client URLs (and https metrics URLs), reloadable.
///
/// Protocol: every accepted connection takes the configuration current at that
/// moment ([`ServerTls::acceptor`]); a reload builds a whole new configuration from
/// the files (certificate, key, trusted CA, CRL) and swaps it in atomically, so new
/// handshakes use the new files and connections already established keep the session
/// they negotiated. A reload that fails (a file missing, unparsable, a key that does
/// not match the certificate) keeps the configuration in force, logs an error and
/// counts `pgetcd_tls_reload_failures_total`; the next change of any file tries again.
/// Reloads happen when [`ServerTls::run`] sees a file's stamp change (polled every
/// `--tls-reload-interval`) and on SIGHUP (always re-read).
pub struct ServerTls {
    settings: TlsSettings,
    hosts: Vec<SocketAddr>,
    current: arc_swap::ArcSwap<rustls::ServerConfig>,
    files: Vec<PathBuf>,
    stamps: parking_lot::Mutex<Vec<FileStamp>>,
    metrics: Arc<Metrics>,
}

impl ServerTls {
    /// Reads the files once; an error here stops start-up.
    pub fn new(
        settings: &TlsSettings,
        hosts: &[SocketAddr],
        metrics: Arc<Metrics>,
    ) -> Result<Arc<ServerTls>, String> {
        let config = server_config(settings, hosts)?;
        let (cert, key) = cert_and_key(settings, hosts)?;
        let mut files = vec![cert, key];
        files.extend(settings.trusted_ca_file.clone());
        files.extend(settings.client_crl_file.clone());
        let stamps = files.iter().map(|f| stamp(f)).collect();
        Ok(Arc::new(ServerTls {
            settings: settings.clone(),
            hosts: hosts.to_vec(),
            current: arc_swap::ArcSwap::from_pointee(config),
            files,
            stamps: parking_lot::Mutex::new(stamps),
            metrics,
        }))
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Re-reads the files and swaps the new configuration in; on error keeps the old.
    pub fn reload(&self) -> Result<(), String> {
        *self.stamps.lock() = self.files.iter().map(|f| stamp(f)).collect();
        match server_config(&self.settings, &self.hosts) {
            Ok(config) => {
                self.current.store(Arc::new(config));
                self.metrics.tls_reloads.fetch_add(1, Ordering::Relaxed);
                info!(files = ?self.files, "reloaded the client TLS certificate");
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .tls_reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "client TLS files changed but cannot be used; keeping the certificate in force");
                Err(e)
            }
        }
    }

    /// Reloads when any file's stamp changed since the last look.
    pub fn reload_if_changed(&self) {
        let now: Vec<FileStamp> = self.files.iter().map(|f| stamp(f)).collect();
        if *self.stamps.lock() != now {
            let _ = self.reload();
        }
    }

    /// Polls the files every `interval` (never when zero) and reloads on SIGHUP, until
    /// `shutdown`.
    pub async fn run(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; TLS files are reloaded by polling only");
                None
            }
        };
        let poll = !interval.is_zero();
        let mut tick = tokio::time::interval(if poll {
            interval
        } else {
            Duration::from_secs(3600)
        });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::shutdown::stopped(&mut shutdown) => return,
                _ = tick.tick(), if poll => self.reload_if_changed(),
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    info!("SIGHUP: reloading the client TLS files");
                    let _ = self.reload();
                }
            }
        }
    }
}

/// How a follower reaches a writer whose client URL is https: the writer's certificate
/// is checked against --trusted-ca-file, and this instance presents its own
/// --cert-file/--key-file (an instance's certificate must then allow client use, as an
/// etcd member's peer certificate does). None without --trusted-ca-file.
pub fn forward_tls(
    settings: &TlsSettings,
) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let Some(ca) = &settings.trusted_ca_file else {
        return Ok(None);
    };
    let read = |p: &Path| fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(Some(tls))
}

/// A client connection counting the bytes it carries (etcd's client gRPC byte
/// counters).
struct CountedIo<T> {
    io: T,
    metrics: Arc<Metrics>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountedIo<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.metrics
                .bytes_received
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountedIo<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.metrics
                .bytes_sent
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.metrics
                .bytes_sent
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Counts an open connection for as long as it lives.
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn new(m: &Arc<Metrics>) -> Self {
        m.connections_accepted.fetch_add(1, Ordering::Relaxed);
        m.connections_open.fetch_add(1, Ordering::Relaxed);
        Self(m.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `app` on `listener` until `shutdown`, then drains.
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    app: S,
    metrics: Arc<Metrics>,
    keepalive: Keepalive,
    max_concurrent_streams: u32,
    mut shutdown: watch::Receiver<bool>,
) where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(max_concurrent_streams)
        // h2 closes a connection (GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames")
        // once small request frames it buffered for the application exceed half the
        // connection window: with hyper's 1 MiB default, a few thousand queued requests
        // of an overloaded server. A 16 MiB window (grpc-go's largest) gives backlogs
        // room, bounded in memory, before the peer is cut off.
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(keepalive.interval)
        .keep_alive_timeout(keepalive.timeout);
    builder.http1().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = crate::shutdown::stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::new(&metrics);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let service = TowerToHyperService::new(app.clone());
        let tls = tls.as_ref().map(|t| t.acceptor());
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _open = open;
            let io = match tls {
                None => Either::Left(stream),
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(s)) => {
                            if s.get_ref().1.server_name().is_none() {
                                metrics
                                    .tls_without_server_name
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            Either::Right(s)
                        }
                        failed => {
                            metrics
                                .tls_handshake_failures
                                .fetch_add(1, Ordering::Relaxed);
                            let error = match failed {
                                Ok(Err(e)) => e.to_string(),
                                _ => "timed out".to_owned(),
                            };
                            warn!(%peer, %error, "tls handshake failed");
                            return;
                        }
                    }
                }
            };
            let conn = builder
                .serve_connection_with_upgrades(
                    TokioIo::new(CoalescedWrites::new(CountedIo {
                        io: crate::authority::AuthorityFix::new(io),
                        metrics,
                    })),
                    service,
                )
                .into_owned();
            let result = watcher.watch(conn).await;
            if let Err(e) = result {
                debug!(%peer, error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("client connections still open after the drain timeout; closing them");
    }
}
