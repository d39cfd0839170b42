//! Runs a throwaway PostgreSQL for harnesses outside cargo test (the Kubernetes
//! storage suite, the control-plane script, the kube-apiserver benchmark runs):
//! the same cluster settings the Rust tests use, on a free loopback port.
//!
//! Usage: `pgetcd-test-postgres DIR [--durable]`. It prints the cluster's URL on
//! one line of stdout once the server accepts connections, then runs until
//! SIGTERM or SIGINT and stops Postgres with a fast shutdown. `--durable` keeps
//! fsync and synchronous commit on (for benchmarks against etcd, which syncs).

use std::io::Write;
use std::path::PathBuf;

use pgetcd_localpg::{LocalPostgres, free_port};
use pgetcd_testkit::throwaway_options;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: pgetcd-test-postgres DIR [--durable]")?,
    );
    let durable = match args.next().as_deref() {
        None => false,
        Some("--durable") => true,
        Some(other) => return Err(format!("unknown argument {other}").into()),
    };
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let mut opts = throwaway_options(&dir, port, Vec::new());
    if durable {
        opts.settings.retain(|(k, _)| {
            !matches!(
                k.as_str(),
                "fsync" | "synchronous_commit" | "full_page_writes"
            )
        });
    }
    let mut pg = LocalPostgres::start(opts)?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", pg.tcp_url("postgres"))?;
    out.flush()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    pg.stop();
    Ok(())
}
