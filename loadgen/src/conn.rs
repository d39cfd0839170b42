//! Connections to one side of a comparison: a comma-separated endpoint list, plain
//! http:// or TLS for https:// (rustls with ring via tonic; `--cacert` verifies the
//! server, `--cert`/`--key` present a client certificate).

use std::path::Path;

use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use pgetcd_coalesce::CoalescedWrites;
use pgetcd_proto::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
};
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::cli::Cli;

/// One side of the comparison (A or B).
#[derive(Clone)]
pub struct Target {
    /// As given on the command line; names the side in output.
    pub label: String,
    urls: Vec<String>,
    tls: Option<ClientTlsConfig>,
}

/// TLS material read once from the files named by the flags.
#[derive(Clone, Default)]
pub struct TlsFiles {
    ca: Option<Certificate>,
    identity: Option<Identity>,
}

impl TlsFiles {
    pub fn load(cli: &Cli) -> Result<TlsFiles> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let ca = match &cli.cacert {
            Some(p) => Some(Certificate::from_pem(read(p)?)),
            None => None,
        };
        let identity = match (&cli.cert, &cli.key) {
            (Some(c), Some(k)) => Some(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => None,
            _ => bail!("--cert and --key go together"),
        };
        Ok(TlsFiles { ca, identity })
    }
}

impl Target {
    pub fn new(spec: &str, tls: &TlsFiles) -> Result<Target> {
        let urls: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.contains("://") {
                    s.to_owned()
                } else {
                    format!("http://{s}")
                }
            })
            .collect();
        if urls.is_empty() {
            bail!("no endpoint in {spec:?}");
        }
        let https = urls.iter().filter(|u| u.starts_with("https://")).count();
        if https != 0 && https != urls.len() {
            bail!("{spec}: mixes http:// and https:// endpoints");
        }
        let tls = if https > 0 {
            let Some(ca) = &tls.ca else {
                bail!("{spec}: https:// endpoints need --cacert");
            };
            let mut cfg = ClientTlsConfig::new().ca_certificate(ca.clone());
            if let Some(id) = &tls.identity {
                cfg = cfg.identity(id.clone());
            }
            Some(cfg)
        } else {
            None
        };
        Ok(Target {
            label: spec.to_owned(),
            urls,
            tls,
        })
    }

    /// Connection `i` (endpoints taken round-robin).
    pub async fn channel(&self, i: usize) -> Result<Channel> {
        let url = &self.urls[i % self.urls.len()];
        // Large windows, as grpc-go's BDP estimation reaches: with the 64 KiB defaults a
        // busy client's h2 ends its connection with GOAWAY "too_many_data_frames" when
        // many small responses queue up unread (seen under 1,000 watchers), which
        // would measure the client, not the server.
        let mut ep = Endpoint::from_shared(url.clone())
            .with_context(|| format!("bad URL {url}"))?
            .initial_connection_window_size(4 << 20)
            .initial_stream_window_size(1 << 20);
        if let Some(tls) = &self.tls {
            ep = ep
                .tls_config(tls.clone())
                .with_context(|| format!("TLS for {url}"))?;
        }
        ep.connect_with_connector(tower::service_fn(connect_coalesced))
            .await
            .with_context(|| format!("connecting to {url}"))
    }

    /// `n` connections (at least one).
    pub async fn channels(&self, n: usize) -> Result<Vec<Channel>> {
        let mut out = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            out.push(self.channel(i).await?);
        }
        Ok(out)
    }
}

/// A TCP connection (no Nagle, as tonic's own connector) whose small writes are
/// coalesced: the client's HTTP/2 connection task otherwise makes about two `writev`
/// per call, and the CPU they cost on a shared machine is CPU the server under test does
/// not get (range, 1,000 clients: the loadgen's system time fell from 2.1 to 0.8 s per
/// 300k calls). TLS, when configured, runs on top of it (tonic wraps the connector).
async fn connect_coalesced(uri: Uri) -> std::io::Result<TokioIo<CoalescedWrites<TcpStream>>> {
    let host = uri.host().unwrap_or("127.0.0.1");
    // A bracketed IPv6 literal comes with its brackets.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    let stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    Ok(TokioIo::new(CoalescedWrites::new(stream)))
}

/// A KV client without message size limits (lists and prefills are large).
pub fn kv(ch: &Channel) -> KvClient<Channel> {
    KvClient::new(ch.clone())
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

pub fn lease(ch: &Channel) -> LeaseClient<Channel> {
    LeaseClient::new(ch.clone())
}

pub fn watch(ch: &Channel) -> WatchClient<Channel> {
    WatchClient::new(ch.clone()).max_decoding_message_size(usize::MAX)
}
