//! TLS to Postgres: pgetcd against a throwaway Postgres that accepts TCP connections
//! only over TLS (`hostnossl ... reject` in its pg_hba.conf), with a CA, a server
//! certificate for `localhost` only (no IP address, so host-name checks show) and a
//! client certificate, all made here with rcgen. KV and watch work over TLS (a watch
//! event proves the replication connection is encrypted too, and pg_stat_ssl says so);
//! plaintext, an unknown CA and a host name the certificate does not carry are refused
//! at start-up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgetcd_localpg::{LocalPostgres, free_port, postgres_user};
use pgetcd_proto::etcdserverpb::{RangeRequest, WatchCreateRequest};
use pgetcd_server::ServerError;
use pgetcd_testkit::watch::TestWatch;
use pgetcd_testkit::{Clients, TestServer, test_config};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::sync::OnceCell;

/// The TLS-only Postgres and the files the tests point pgetcd at.
struct TlsPostgres {
    pg: LocalPostgres,
    ca: PathBuf,
    other_ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

static PG: OnceCell<TlsPostgres> = OnceCell::const_new();

fn write(path: &Path, contents: &str, mode: u32) {
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate signed by `issuer`: (certificate PEM, key PEM).
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn start_postgres() -> TlsPostgres {
    let port = free_port().unwrap();
    // The pgetcd-test-<pid>- prefix lets testkit remove it once this process is gone.
    let dir = std::env::temp_dir().join(format!("pgetcd-test-{}-tls-{port}", std::process::id()));
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let ca_issuer = ca("pgetcd test CA");
    let (server_cert, server_key) = leaf(
        &ca_issuer,
        &["localhost"],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        &ca_issuer,
        &[],
        "certuser",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let paths = |name: &str| tls.join(name);
    write(&paths("ca.pem"), &ca_issuer.pem(), 0o644);
    write(&paths("other-ca.pem"), &ca("some other CA").pem(), 0o644);
    write(&paths("server.crt"), &server_cert, 0o644);
    // Postgres wants its key owned by the user it runs as, mode 0600.
    write(&paths("server.key"), &server_key, 0o600);
    if let Some((uid, gid)) = postgres_user().unwrap() {
        std::os::unix::fs::chown(paths("server.key"), Some(uid), Some(gid)).unwrap();
    }
    write(&paths("client.crt"), &client_cert, 0o644);
    write(&paths("client.key"), &client_key, 0o600);
    // TCP only over TLS; certuser only with a client certificate; the unix socket (the
    // tests' admin connection) in plaintext.
    write(
        &paths("pg_hba.conf"),
        "local all all trust\n\
         hostnossl all all 0.0.0.0/0 reject\n\
         hostnossl all all ::/0 reject\n\
         hostssl all certuser 127.0.0.1/32 cert\n\
         hostssl all all 127.0.0.1/32 trust\n",
        0o644,
    );
    let setting = |k: &str, v: &Path| (k.to_owned(), v.display().to_string());
    let opts = pgetcd_testkit::throwaway_options(
        &dir,
        port,
        vec![
            ("ssl".into(), "on".into()),
            setting("ssl_cert_file", &paths("server.crt")),
            setting("ssl_key_file", &paths("server.key")),
            setting("ssl_ca_file", &paths("ca.pem")),
            setting("hba_file", &paths("pg_hba.conf")),
        ],
    );
    TlsPostgres {
        pg: LocalPostgres::start(opts).expect("start the TLS-only postgres"),
        ca: paths("ca.pem"),
        other_ca: paths("other-ca.pem"),
        client_cert: paths("client.crt"),
        client_key: paths("client.key"),
    }
}

async fn postgres() -> &'static TlsPostgres {
    PG.get_or_init(|| async {
        let pg = tokio::task::spawn_blocking(start_postgres).await.unwrap();
        let admin = admin(&pg).await;
        admin
            .batch_execute("CREATE ROLE certuser LOGIN SUPERUSER")
            .await
            .unwrap();
        pg
    })
    .await
}

/// A plaintext superuser connection over the unix socket.
async fn admin(pg: &TlsPostgres) -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect(&pg.pg.connection_string("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    client
}

/// A URL to the TLS-only Postgres over TCP.
fn url(pg: &TlsPostgres, user: &str, host: &str, params: &str) -> String {
    format!(
        "postgres://{user}@{host}:{}/postgres?{params}",
        pg.pg.options().port
    )
}

/// Starts pgetcd on `postgres_url` (fresh keyspace).
async fn start(postgres_url: String) -> Result<TestServer, ServerError> {
    let mut config = test_config();
    config.storage.postgres_url = Some(postgres_url);
    let running = pgetcd_server::start(config.clone()).await?;
    Ok(TestServer { running, config })
}

/// The error and all its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

async fn refused(postgres_url: String) -> String {
    match start(postgres_url.clone()).await {
        Ok(_) => panic!("pgetcd started with {postgres_url}"),
        Err(e) => chain(&e),
    }
}

/// Put, get, and a watch event for the put: the KV connections and the replication
/// connection all work. Then pg_stat_ssl must show whether the walsender is on TLS.
async fn kv_and_watch(server: &TestServer, admin: tokio_postgres::Client, tls: bool) {
    let mut c = Clients::connect(&server.url()).await;
    let watch = TestWatch::open(&server.url()).await;
    watch
        .create(WatchCreateRequest {
            key: "k".into(),
            ..Default::default()
        })
        .await;
    let rev = c.put("k", "v").await;
    let got =
        c.kv.range(RangeRequest {
            key: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs.len(), 1);
    assert_eq!(&got.kvs[0].value[..], b"v");
    let deadline = Instant::now() + Duration::from_secs(10);
    while watch.event_count() == 0 {
        assert!(Instant::now() < deadline, "no watch event over TLS");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let events: Vec<_> = watch
        .responses()
        .into_iter()
        .flat_map(|r| r.events)
        .collect();
    assert_eq!(events.len(), 1);
    let kv = events[0].kv.as_ref().unwrap();
    assert_eq!((&kv.key[..], kv.mod_revision), (&b"k"[..], rev));
    let row = admin
        .query_one(
            "SELECT count(*), coalesce(bool_and(s.ssl), false) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.backend_type = 'walsender' AND a.application_name = $1",
            &[&format!("pgetcd-wal-{}", server.config.storage.keyspace)],
        )
        .await
        .unwrap();
    let (walsenders, ssl): (i64, bool) = (row.get(0), row.get(1));
    assert_eq!(walsenders, 1);
    assert_eq!(ssl, tls, "TLS of the replication connection");
}

#[tokio::test]
async fn verify_full_serves_kv_and_watch() {
    let pg = postgres().await;
    let ca = pg.ca.display();
    let server = start(url(
        pg,
        "postgres",
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .expect("pgetcd over verify-full TLS");
    kv_and_watch(&server, admin(pg).await, true).await;
    server.stop().await;
}

#[tokio::test]
async fn host_name_is_checked_only_by_verify_full() {
    let pg = postgres().await;
    let ca = pg.ca.display();
    // The certificate names localhost, not 127.0.0.1.
    let e = refused(url(
        pg,
        "postgres",
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert!(e.contains("certificate"), "{e}");
    let server = start(url(
        pg,
        "postgres",
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await
    .expect("pgetcd over verify-ca TLS");
    kv_and_watch(&server, admin(pg).await, true).await;
    server.stop().await;
}

#[tokio::test]
async fn require_without_root_certificate_encrypts() {
    let pg = postgres().await;
    let server = start(url(pg, "postgres", "127.0.0.1", "sslmode=require"))
        .await
        .expect("pgetcd over require TLS");
    kv_and_watch(&server, admin(pg).await, true).await;
    server.stop().await;
}

#[tokio::test]
async fn client_certificate_authenticates() {
    let pg = postgres().await;
    let params = format!(
        "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        pg.ca.display(),
        pg.client_cert.display(),
        pg.client_key.display()
    );
    let server = start(url(pg, "certuser", "localhost", &params))
        .await
        .expect("pgetcd with a client certificate");
    kv_and_watch(&server, admin(pg).await, true).await;
    server.stop().await;
    // Without it the server refuses certuser.
    let ca = pg.ca.display();
    let e = refused(url(
        pg,
        "certuser",
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert!(e.contains("certificate"), "{e}");
}

#[tokio::test]
async fn prefer_uses_tls_when_offered_and_plaintext_otherwise() {
    let pg = postgres().await;
    // No sslmode: libpq's default, prefer.
    let server = start(url(pg, "postgres", "localhost", ""))
        .await
        .expect("pgetcd with sslmode=prefer");
    kv_and_watch(&server, admin(pg).await, true).await;
    server.stop().await;
    // testkit's Postgres has no TLS.
    let server = start(format!("{}?sslmode=prefer", pgetcd_testkit::postgres_url()))
        .await
        .expect("pgetcd with sslmode=prefer to a server without TLS");
    kv_and_watch(&server, pgetcd_testkit::admin_client().await, false).await;
    server.stop().await;
}

#[tokio::test]
async fn plaintext_is_refused() {
    let pg = postgres().await;
    let e = refused(url(pg, "postgres", "localhost", "sslmode=disable")).await;
    assert!(e.contains("no encryption"), "{e}");
}

#[tokio::test]
async fn unknown_ca_is_refused() {
    let pg = postgres().await;
    let other = pg.other_ca.display();
    let e = refused(url(
        pg,
        "postgres",
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    ))
    .await;
    assert!(e.contains("UnknownIssuer"), "{e}");
}

#[tokio::test]
async fn bad_tls_settings_are_start_up_errors() {
    let pg = postgres().await;
    let e = refused(url(pg, "postgres", "localhost", "sslmode=verify-fuel")).await;
    assert!(e.contains("sslmode=\"verify-fuel\" is not one of"), "{e}");
    let e = refused(url(
        pg,
        "postgres",
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ))
    .await;
    assert!(
        e.contains("cannot read sslrootcert \"/nonexistent/ca.pem\""),
        "{e}"
    );
}
