//! The TLS half of the Postgres connection string.
//!
//! tokio-postgres parses `--postgres-url` (URL or libpq key=value form) but knows only
//! `sslmode` = disable | prefer | require and no certificate files. [`PgConnect::parse`]
//! takes libpq's TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) out of
//! the string, hands the rest to tokio-postgres, reads the certificate files and builds
//! one rustls client configuration. Every file is read here, at start-up: a missing or
//! bad file is a start-up error, never a surprise at the first connection.
//!
//! Every connection pgetcd opens uses the result — the writer's, the read pool's, admin
//! connections and the replication stream (`pgetcd-wal` takes a [`PgConnect`]) — so
//! all honour the same rules, libpq's:
//!
//! | sslmode | TLS | certificate chain | host name |
//! |---|---|---|---|
//! | `disable` | never | - | - |
//! | `prefer` (default) | when the server offers it, else plaintext | checked only with `sslrootcert` | not checked |
//! | `require` | always | checked only with `sslrootcert` | not checked |
//! | `verify-ca` | always | checked against `sslrootcert` | not checked |
//! | `verify-full` | always | checked against `sslrootcert` | must be in the certificate (DNS name, or IP address for an IP host) |
//!
//! `sslcert` + `sslkey` (PEM; PKCS#8, PKCS#1 or SEC1 key) give a client certificate.
//! As in libpq, TLS is never attempted over a unix socket. Unlike libpq: no default
//! files under `~/.postgresql/`, no `PGSSL*` environment variables, no
//! `sslrootcert=system`, no encrypted keys (`sslpassword`), no CRLs, and no channel
//! binding (SCRAM-SHA-256 is used without `-PLUS`).
//!
//! Cryptography is rustls with the ring provider, passed explicitly to every
//! configuration: nothing relies on a process-wide default provider.

use std::fmt;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::Host;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it (libpq's default).
    Prefer,
    /// TLS always; the certificate is checked only when a root certificate is given.
    Require,
    /// TLS always; the chain must lead to the root certificate.
    VerifyCa,
    /// TLS always; the chain must lead to the root certificate and name the host.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, PgUrlError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq accepts "allow" (plaintext first, TLS if the server insists); we
            // never fall back in that direction.
            _ => return Err(PgUrlError::BadSslMode(s.to_owned())),
        })
    }

    /// The parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection string cannot be used.
#[derive(Debug, Error)]
pub enum PgUrlError {
    /// tokio-postgres rejected the string (TLS parameters removed).
    #[error("cannot parse the connection string")]
    Parse(#[source] tokio_postgres::Error),
    /// A key=value string that does not follow libpq's syntax.
    #[error("bad key=value connection string: {0}")]
    Syntax(&'static str),
    /// An `sslmode` we do not know.
    #[error("sslmode={0:?} is not one of disable, prefer, require, verify-ca, verify-full")]
    BadSslMode(String),
    /// verify-ca or verify-full without a root certificate to verify against.
    #[error(
        "sslmode={0} needs sslrootcert=<PEM file of the CA that signed the server's certificate>"
    )]
    NoRootCert(SslMode),
    /// `sslrootcert=system`.
    #[error("sslrootcert=system is not supported: give the path of a PEM file")]
    SystemRoots,
    /// Only one of `sslcert` and `sslkey`.
    #[error("sslcert and sslkey must be given together")]
    HalfClientCert,
    /// A certificate or key file cannot be read.
    #[error("cannot read {param} {path:?}")]
    Read {
        /// The parameter that named it.
        param: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A certificate or key file holds nothing usable.
    #[error("{param} {path:?}: {what}")]
    BadFile {
        /// The parameter that named it.
        param: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the settings (e.g. a key that does not match the certificate).
    #[error("TLS settings rejected")]
    Rustls(#[source] rustls::Error),
}

impl PgUrlError {
    /// This error followed by its causes, `: `-separated (for one-line messages).
    pub fn with_causes(&self) -> String {
        let mut s = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cause = c.source();
        }
        s
    }
}

/// The TLS parameters of a connection string (last one wins, as in libpq).
#[derive(Debug, Default)]
struct TlsParams {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl TlsParams {
    /// Records `key` when it is ours; false when it is for tokio-postgres.
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// Splits `s` into the string tokio-postgres gets and our TLS parameters.
fn split_tls_params(s: &str) -> Result<(String, TlsParams), PgUrlError> {
    let mut params = TlsParams::default();
    let rest = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        split_url(s, &mut params)
    } else {
        split_keyword_value(s, &mut params)?
    };
    Ok((rest, params))
}

/// URL form: the query parameters follow the first `?` after the credentials (as
/// tokio-postgres reads them: up to the first `@`, if any).
fn split_url(s: &str, params: &mut TlsParams) -> String {
    let from = s.find('@').map_or(0, |at| at + 1);
    let Some(q) = s[from..].find('?').map(|i| from + i) else {
        return s.to_owned();
    };
    let kept: Vec<&str> = s[q + 1..]
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode_str(key).decode_utf8_lossy();
            let value = percent_decode_str(value).decode_utf8_lossy().into_owned();
            !params.take(&key, value)
        })
        .collect();
    if kept.is_empty() {
        s[..q].to_owned()
    } else {
        format!("{}?{}", &s[..q], kept.join("&"))
    }
}

/// key=value form (libpq's syntax: spaces around `=` allowed, values optionally in
/// single quotes, backslash escapes). Parameters that are not ours keep their text.
fn split_keyword_value(s: &str, params: &mut TlsParams) -> Result<String, PgUrlError> {
    let mut kept: Vec<Range<usize>> = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i == b.len() {
            break;
        }
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' {
            i += 1;
        }
        let key = &s[start..i];
        i = skip_ws(i);
        if b.get(i) != Some(&b'=') {
            return Err(PgUrlError::Syntax("expected `=` after a keyword"));
        }
        i = skip_ws(i + 1);
        let mut value = Vec::new();
        if b.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(PgUrlError::Syntax("unterminated quoted value")),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < b.len() => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        let value = String::from_utf8_lossy(&value).into_owned();
        if !params.take(key, value) {
            kept.push(start..i);
        }
    }
    Ok(kept
        .into_iter()
        .map(|r| &s[r])
        .collect::<Vec<_>>()
        .join(" "))
}

fn read_file(param: &'static str, path: &str) -> Result<Vec<u8>, PgUrlError> {
    std::fs::read(path).map_err(|source| PgUrlError::Read {
        param,
        path: path.into(),
        source,
    })
}

fn read_certs(param: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, PgUrlError> {
    let pem = read_file(param, path)?;
    let bad = |what: String| PgUrlError::BadFile {
        param,
        path: path.into(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE in it".into()));
    }
    Ok(certs)
}

fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, PgUrlError> {
    let pem = read_file("sslkey", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| PgUrlError::BadFile {
        param: "sslkey",
        path: path.into(),
        what: format!("no usable private key: {e}"),
    })
}

/// What the server's certificate is checked for.
#[derive(Debug)]
enum Verify {
    /// Nothing (encryption only).
    Nothing,
    /// The chain leads to one of the roots.
    Chain(Arc<RootCertStore>),
    /// The chain, and the host name.
    Full(Arc<RootCertStore>),
}

/// Connection settings: tokio-postgres's configuration plus the TLS they ask for.
///
/// It is also the TLS connector for tokio-postgres ([`MakeTlsConnect`]) and gives its
/// configuration through [`AsRef`], so one value carries a whole connection target.
#[derive(Clone)]
pub struct PgConnect {
    config: tokio_postgres::Config,
    tls: PgTls,
    mode: SslMode,
}

impl fmt::Debug for PgConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The configuration's Debug hides the password.
        f.debug_struct("PgConnect")
            .field("config", &self.config)
            .field("sslmode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl PgConnect {
    /// Parses a connection string (URL or key=value form) with libpq's TLS parameters
    /// and reads the certificate files it names.
    pub fn parse(s: &str) -> Result<PgConnect, PgUrlError> {
        let (rest, params) = split_tls_params(s)?;
        let mut config: tokio_postgres::Config = rest.parse().map_err(PgUrlError::Parse)?;
        let mode = match &params.sslmode {
            Some(m) => SslMode::parse(m)?,
            None => SslMode::Prefer,
        };
        let roots = match params.sslrootcert.as_deref() {
            Some("system") => return Err(PgUrlError::SystemRoots),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs("sslrootcert", path)? {
                    roots.add(cert).map_err(|e| PgUrlError::BadFile {
                        param: "sslrootcert",
                        path: path.into(),
                        what: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                Some(Arc::new(roots))
            }
            None => None,
        };
        let verify = match (mode, roots) {
            (SslMode::VerifyFull, Some(roots)) => Verify::Full(roots),
            // As libpq: a root certificate makes prefer and require check the chain.
            (SslMode::VerifyCa | SslMode::Require | SslMode::Prefer, Some(roots)) => {
                Verify::Chain(roots)
            }
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(PgUrlError::NoRootCert(mode));
            }
            _ => Verify::Nothing,
        };
        let client_cert = match (&params.sslcert, &params.sslkey) {
            (Some(cert), Some(key)) => Some((read_certs("sslcert", cert)?, read_key(key)?)),
            (None, None) => None,
            _ => return Err(PgUrlError::HalfClientCert),
        };
        let tls = PgTls::new(verify, client_cert)?;
        let hosts = config.get_hosts();
        let unix_only = !hosts.is_empty() && hosts.iter().all(|h| matches!(h, Host::Unix(_)));
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            _ if unix_only => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(PgConnect { config, tls, mode })
    }

    /// tokio-postgres's configuration (its `ssl_mode`: disable, prefer or require).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The TLS connector.
    pub fn tls(&self) -> &PgTls {
        &self.tls
    }

    /// The `sslmode` asked for.
    pub fn sslmode(&self) -> SslMode {
        self.mode
    }

    /// Opens a connection; the caller drives the returned connection future.
    pub async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, PgTlsStream<tokio_postgres::Socket>>,
        ),
        tokio_postgres::Error,
    > {
        self.config.connect(self.tls.clone()).await
    }
}

impl AsRef<tokio_postgres::Config> for PgConnect {
    fn as_ref(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl<S> MakeTlsConnect<S> for PgConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, Self::Error> {
        MakeTlsConnect::<S>::make_tls_connect(&mut self.tls, domain)
    }
}

/// The TLS connector of every Postgres connection: rustls, ring provider.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<ClientConfig>,
}

impl PgTls {
    fn new(
        verify: Verify,
        client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<PgTls, PgUrlError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(PgUrlError::Rustls)?;
        let builder = match verify {
            Verify::Full(roots) => builder.with_root_certificates(roots),
            Verify::Chain(roots) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(WithoutHostName {
                    roots: Some(roots),
                    provider,
                })),
            Verify::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(WithoutHostName {
                    roots: None,
                    provider,
                })),
        };
        let mut config = match client_cert {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(PgUrlError::Rustls)?,
            None => builder.with_no_client_auth(),
        };
        // Required by PostgreSQL 17+ for direct TLS (sslnegotiation=direct); older
        // servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(PgTls {
            config: Arc::new(config),
        })
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, Self::Error> {
        // The name is checked in `connect`: tokio-postgres asks for a connector even for
        // a unix socket (domain ""), where it never uses it.
        Ok(PgTlsConnect {
            config: self.config.clone(),
            domain: domain.to_owned(),
        })
    }
}

/// A TLS handshake with one host.
pub struct PgTlsConnect {
    config: Arc<ClientConfig>,
    domain: String,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = ServerName::try_from(self.domain.clone()).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("host {:?} is not a name TLS can use: {e}", self.domain),
                )
            })?;
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await?;
            Ok(PgTlsStream(stream))
        })
    }
}

/// A TLS session with a Postgres server.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // tls-server-end-point needs the hash named by the certificate's signature
        // algorithm; a wrong guess would fail SCRAM-SHA-256-PLUS, so offer none.
        ChannelBinding::none()
    }
}

/// The server-certificate checks of the modes that do not check the host name:
/// with `roots`, the chain must lead to one of them (sslmode verify-ca); without, any
/// certificate is accepted (prefer/require without a root certificate). Either way the
/// handshake signatures made with the certificate are checked.
#[derive(Debug)]
struct WithoutHostName {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for WithoutHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn split(s: &str) -> (String, TlsParams) {
        split_tls_params(s).unwrap()
    }

    #[test]
    fn url_tls_parameters_are_taken_out() {
        let (rest, p) = split(
            "postgres://u:p%3Fw@db.example:5433/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem",
        );
        assert_eq!(
            rest,
            "postgres://u:p%3Fw@db.example:5433/app?application_name=x"
        );
        assert_eq!(p.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/etc/ca dir/ca.pem"));
        let (rest, p) = split("postgresql://db/app?sslmode=require");
        assert_eq!(rest, "postgresql://db/app");
        assert_eq!(p.sslmode.as_deref(), Some("require"));
        let (rest, p) = split("postgres://db/app");
        assert_eq!(rest, "postgres://db/app");
        assert!(p.sslmode.is_none());
    }

    #[test]
    fn keyword_value_tls_parameters_are_taken_out() {
        let (rest, p) = split(
            "host=db port = 5433 sslmode=verify-ca  sslrootcert = '/x y/ca\\'s.pem' password='a b' sslcert=/c.pem sslkey=/k\\ ey.pem",
        );
        assert_eq!(rest, "host=db port = 5433 password='a b'");
        assert_eq!(p.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/x y/ca's.pem"));
        assert_eq!(p.sslcert.as_deref(), Some("/c.pem"));
        assert_eq!(p.sslkey.as_deref(), Some("/k ey.pem"));
        assert!(matches!(
            split_tls_params("host=db sslmode='require"),
            Err(PgUrlError::Syntax(_))
        ));
        assert!(matches!(
            split_tls_params("host=db sslmode"),
            Err(PgUrlError::Syntax(_))
        ));
    }

    #[test]
    fn modes_map_to_tokio_postgres() {
        use tokio_postgres::config::SslMode as Pg;
        let mode = |s: &str| PgConnect::parse(s).unwrap().config().get_ssl_mode();
        assert_eq!(mode("postgres://db/app"), Pg::Prefer);
        assert_eq!(mode("postgres://db/app?sslmode=disable"), Pg::Disable);
        assert_eq!(mode("postgres://db/app?sslmode=require"), Pg::Require);
        // No TLS over unix sockets, as libpq.
        assert_eq!(mode("host=/tmp port=5432 sslmode=require"), Pg::Disable);
        let c = PgConnect::parse("host=db user=u dbname=d sslmode=prefer").unwrap();
        assert_eq!(c.sslmode(), SslMode::Prefer);
        assert_eq!(c.config().get_user(), Some("u"));
    }

    #[test]
    fn bad_settings_are_clear_errors() {
        let err = |s: &str| PgConnect::parse(s).unwrap_err().with_causes();
        assert_eq!(
            err("postgres://db/app?sslmode=verify-fuel"),
            "sslmode=\"verify-fuel\" is not one of disable, prefer, require, verify-ca, verify-full"
        );
        assert!(err("postgres://db/app?sslmode=verify-full").contains("needs sslrootcert"));
        assert!(err("host=db sslmode=verify-ca").contains("needs sslrootcert"));
        let e = err("postgres://db/app?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
        assert!(
            e.starts_with("cannot read sslrootcert \"/nonexistent/ca.pem\": "),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("pgetcd-pgtls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = err(&format!(
            "host=db sslmode=verify-full sslrootcert={}",
            junk.display()
        ));
        assert!(e.contains("no CERTIFICATE in it"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err("host=db sslcert=/c.pem").contains("together"));
        assert!(err("host=db sslrootcert=system").contains("system"));
        assert!(err("host=db nonsense=1").starts_with("cannot parse"));
    }
}
