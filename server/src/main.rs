//! The `pgetcd` binary: flags, logging, start, wait for SIGINT/SIGTERM, stop.

use clap::Parser;
use pgetcd_server::config::{Cli, Command, KeyspaceCommand, SnapshotCommand};
use pgetcd_server::{ServerError, start};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// mimalloc: the request path allocates many small, short-lived buffers (HTTP/2
/// frames, protobuf messages) across threads; glibc's malloc showed up in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
}

/// Prints the error with its whole cause chain ("postgres: connect" alone does not say
/// why) and exits.
fn fail(e: ServerError) -> ! {
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

/// Runs an offline command with its logging, prints its report and exits (1 on error).
async fn offline(
    logging: &pgetcd_server::config::LogFlags,
    command: impl std::future::Future<Output = Result<String, ServerError>>,
) -> ! {
    init_logging(&logging.filter());
    match command.await {
        Ok(report) => {
            println!("{report}");
            std::process::exit(0);
        }
        Err(e) => fail(e),
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let config = match cli.command {
        None => cli.config,
        Some(Command::Snapshot(SnapshotCommand::Restore(args))) => {
            offline(&args.logging, pgetcd_server::snapshot::restore::run(&args)).await
        }
        Some(Command::Keyspace(cmd)) => {
            let logging = match &cmd {
                KeyspaceCommand::Create(a) | KeyspaceCommand::List(a) => &a.logging,
                KeyspaceCommand::Drop(d) => &d.target.logging,
                KeyspaceCommand::CopyPrefix(c) => &c.target.logging,
            };
            offline(logging, pgetcd_server::keyspaces::run(&cmd)).await
        }
        Some(Command::Migrate(args)) => {
            offline(&args.logging, pgetcd_server::migrate::run(&args)).await
        }
    };
    init_logging(&config.log_filter());
    let running = match start(config).await {
        Ok(r) => r,
        Err(e) => fail(e),
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
