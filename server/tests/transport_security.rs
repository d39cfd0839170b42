//! Transport hardening of the client and metrics URLs: certificates reloaded without a
//! restart (polled and on SIGHUP; bad files keep the certificate in force), etcd's
//! `--client-cert-allowed-hostname` (checked against real etcd 3.5), and https on
//! `--listen-metrics-urls` with the client URLs' certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgetcd_proto::etcdserverpb::PutRequest;
use pgetcd_proto::etcdserverpb::kv_client::KvClient;
use pgetcd_testkit::pki::TestPki;
use pgetcd_testkit::{RealEtcd, TestServer, http_get, test_config, tls_channel};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client handshake with `addr` trusting `ca` (presenting `identity`), then an
/// HTTP/1.1 GET of `path`: the server's certificate and the answer's status and body.
/// Err: the handshake or the request failed.
async fn tls_get(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    path: &str,
) -> Result<(CertificateDer<'static>, u16, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake: {e}"))?;
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    // TLS 1.3 reports a refused client certificate at the first read.
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut raw))
        .await
        .map_err(|_| "read timed out".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    if raw.len() < 12 {
        return Err(format!("no answer: {raw:?}"));
    }
    let code = raw[9..12].parse().map_err(|_| format!("answer {raw:?}"))?;
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((served.into_owned(), code, body))
}

/// A CA that signs server certificates with chosen serial numbers.
struct SigningCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl SigningCa {
    fn new() -> SigningCa {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "rotation test CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = p.self_signed(&key).unwrap().pem();
        SigningCa {
            issuer: Issuer::new(p, key),
            pem,
        }
    }

    /// A server certificate for localhost with `serial`: (cert PEM, key PEM, cert DER).
    fn server(&self, serial: u64) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        p.serial_number = Some(SerialNumber::from(serial));
        p.distinguished_name
            .push(DnType::CommonName, format!("pgetcd serial {serial}"));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// Writes `contents` to `path` the way certificate tools rotate files: a new file
/// renamed over the old one.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A metric's value in a scrape (0 when absent).
fn value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn put(ch: tonic::transport::Channel) -> Result<(), tonic::Status> {
    KvClient::new(ch)
        .put(PutRequest {
            key: "k".into(),
            value: "v".into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// The certificate a new connection to `addr` is served, waited for until it is
/// `want` (10 s).
async fn wait_for_served(addr: SocketAddr, ca: &Path, want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (served, ..) = tls_get(addr, ca, None, "/health").await.unwrap();
        if served.as_ref() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_is_served_to_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = SigningCa::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let (cert_file, key_file): (PathBuf, PathBuf) =
        (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (cert1, key1, der1) = ca.server(1001);
    std::fs::write(&cert_file, &cert1).unwrap();
    std::fs::write(&key_file, &key1).unwrap();

    let mut config = test_config();
    config.member.listen_client_urls = vec!["https://127.0.0.1:0".into()];
    config.tls.cert_file = Some(cert_file.clone());
    config.tls.key_file = Some(key_file.clone());
    config.tls.tls_reload_interval = Duration::from_millis(100);
    let srv = TestServer::start(config).await;
    let addr = srv.running.client_addrs[0];
    let metrics = srv.running.metrics_addrs[0];
    let (served, code, _) = tls_get(addr, &ca_file, None, "/health").await.unwrap();
    assert_eq!((served.as_ref(), code), (&der1[..], 200));
    // A gRPC connection made with the first certificate.
    let old = tls_channel(&srv.url(), &ca_file, None).await.unwrap();
    put(old.clone()).await.unwrap();

    // Rotated: key first, then certificate (in between the pair does not match, which
    // must not take effect).
    let (cert2, key2, der2) = ca.server(1002);
    replace(&key_file, &key2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    replace(&cert_file, &cert2);
    wait_for_served(addr, &ca_file, &der2).await;
    // The connection made before goes on with its session.
    put(old.clone()).await.unwrap();
    put(tls_channel(&srv.url(), &ca_file, None).await.unwrap())
        .await
        .unwrap();
    let (_, m) = http_get(metrics, "/metrics").await;
    assert!(value(&m, "pgetcd_tls_reloads_total") >= 1.0, "{m}");

    // A bad certificate file: logged, counted, and the certificate in force stays.
    let failures = value(&m, "pgetcd_tls_reload_failures_total");
    replace(
        &cert_file,
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = http_get(metrics, "/metrics").await;
        if value(&m, "pgetcd_tls_reload_failures_total") > failures {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (served, ..) = tls_get(addr, &ca_file, None, "/health").await.unwrap();
    assert_eq!(
        served.as_ref(),
        &der2[..],
        "a bad file replaced the certificate"
    );
    put(old).await.unwrap();

    // SIGHUP re-reads the files at once, even with polling off.
    let (cert3, key3, der3) = ca.server(1003);
    let mut config = srv.stop().await;
    std::fs::write(&cert_file, &cert2).unwrap();
    std::fs::write(&key_file, &key2).unwrap();
    config.tls.tls_reload_interval = Duration::ZERO;
    let srv = TestServer::start(config).await;
    let addr = srv.running.client_addrs[0];
    // Its SIGHUP listener is set up by a task of its own: give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&key_file, &key3).unwrap();
    std::fs::write(&cert_file, &cert3).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (served, ..) = tls_get(addr, &ca_file, None, "/health").await.unwrap();
    assert_eq!(
        served.as_ref(),
        &der2[..],
        "reloaded without polling or SIGHUP"
    );
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for_served(addr, &ca_file, &der3).await;
    srv.stop().await;
}

/// etcd's --client-cert-allowed-hostname: a client certificate (of the trusted CA)
/// whose names do not include the allowed one fails the handshake; pgetcd and etcd
/// 3.5 agree on both certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_allowed_hostname_as_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    // pki's client certificate names "client"; its member certificate (client use
    // too) names localhost and 127.0.0.1.
    let mut config = test_config();
    config.member.listen_client_urls = vec!["https://127.0.0.1:0".into()];
    config.tls.cert_file = Some(pki.server_cert.clone());
    config.tls.key_file = Some(pki.server_key.clone());
    config.tls.trusted_ca_file = Some(pki.ca.clone());
    config.tls.client_cert_auth = true;
    config.tls.client_cert_allowed_hostname = vec!["client".into()];
    let srv = TestServer::start(config).await;
    let etcd = RealEtcd::start_with_tls(&pki, &["--client-cert-allowed-hostname", "client"]).await;
    for url in [srv.url(), etcd.url.clone()] {
        let allowed = tls_channel(&url, &pki.ca, Some((&pki.client_cert, &pki.client_key)))
            .await
            .unwrap();
        put(allowed).await.unwrap();
        let other =
            match tls_channel(&url, &pki.ca, Some((&pki.member_cert, &pki.member_key))).await {
                Ok(ch) => put(ch).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
        assert!(
            other.is_err(),
            "{url}: a certificate of another name got in"
        );
    }
    // The refusal is in the handshake: no HTTP answer either.
    let addr = srv.running.client_addrs[0];
    let got = tls_get(
        addr,
        &pki.ca,
        Some((&pki.member_cert, &pki.member_key)),
        "/health",
    )
    .await;
    assert!(got.is_err(), "{got:?}");
    let (_, code, _) = tls_get(
        addr,
        &pki.ca,
        Some((&pki.client_cert, &pki.client_key)),
        "/health",
    )
    .await
    .unwrap();
    assert_eq!(code, 200);
    srv.stop().await;

    // A list: any name of it will do (etcd 3.6's form).
    let mut config = test_config();
    config.member.listen_client_urls = vec!["https://127.0.0.1:0".into()];
    config.tls.cert_file = Some(pki.server_cert.clone());
    config.tls.key_file = Some(pki.server_key.clone());
    config.tls.trusted_ca_file = Some(pki.ca.clone());
    config.tls.client_cert_auth = true;
    config.tls.client_cert_allowed_hostname = vec!["elsewhere".into(), "localhost".into()];
    let srv = TestServer::start(config.clone()).await;
    let addr = srv.running.client_addrs[0];
    assert!(
        tls_get(
            addr,
            &pki.ca,
            Some((&pki.member_cert, &pki.member_key)),
            "/health"
        )
        .await
        .is_ok()
    );
    assert!(
        tls_get(
            addr,
            &pki.ca,
            Some((&pki.client_cert, &pki.client_key)),
            "/health"
        )
        .await
        .is_err()
    );
    srv.stop().await;

    // Without --client-cert-auth the flag would check nothing: refused at start-up.
    config.tls.client_cert_auth = false;
    let e = pgetcd_server::start(config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("--client-cert-allowed-hostname needs --client-cert-auth"),
        "{e}"
    );
}

/// https on --listen-metrics-urls, as etcd: the client URLs' certificate, and under
/// --client-cert-auth their client certificate check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_metrics_url() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let mut config = test_config();
    config.member.listen_metrics_urls = vec!["https://127.0.0.1:0".into()];
    config.tls.cert_file = Some(pki.server_cert.clone());
    config.tls.key_file = Some(pki.server_key.clone());
    let srv = TestServer::start(config.clone()).await;
    let addr = srv.running.metrics_addrs[0];
    let (served, code, body) = tls_get(addr, &pki.ca, None, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("etcd_server_has_leader"), "{body}");
    let server_der = CertificateDer::pem_file_iter(&pki.server_cert)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(served, server_der);
    let (_, code, body) = tls_get(addr, &pki.ca, None, "/health").await.unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"health":"true","reason":""}"#)
    );
    srv.stop().await;

    // With mutual TLS the scrape needs a client certificate too.
    config.tls.trusted_ca_file = Some(pki.ca.clone());
    config.tls.client_cert_auth = true;
    config.storage.keyspace = pgetcd_testkit::fresh_keyspace();
    let srv = TestServer::start(config.clone()).await;
    let addr = srv.running.metrics_addrs[0];
    assert!(tls_get(addr, &pki.ca, None, "/metrics").await.is_err());
    let (_, code, _) = tls_get(
        addr,
        &pki.ca,
        Some((&pki.client_cert, &pki.client_key)),
        "/metrics",
    )
    .await
    .unwrap();
    assert_eq!(code, 200);
    srv.stop().await;

    // https without a certificate is a start-up error.
    config.tls.cert_file = None;
    config.tls.key_file = None;
    config.tls.client_cert_auth = false;
    config.tls.trusted_ca_file = None;
    let e = pgetcd_server::start(config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--cert-file"), "{e}");
}
