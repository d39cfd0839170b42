//! The `pgetcd` binary: flags, logging, start, wait for SIGINT/SIGTERM, stop.

use clap::Parser;
use pgetcd_server::{Config, start};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// mimalloc: the request path allocates many small, short-lived buffers (HTTP/2
/// frames, protobuf messages) across threads; glibc's malloc showed up in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_new(config.log_filter()).unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let running = match start(config).await {
        Ok(r) => r,
        Err(e) => {
            // The whole cause chain: "postgres: connect" alone does not say why.
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                let text = s.to_string();
                if !msg.contains(&text) {
                    msg.push_str(": ");
                    msg.push_str(&text);
                }
                source = s.source();
            }
            eprintln!("pgetcd: {msg}");
            std::process::exit(1);
        }
    };
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("pgetcd: cannot install signal handlers");
        std::process::exit(1);
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    running.stop().await;
}
