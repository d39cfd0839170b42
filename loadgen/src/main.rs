//! The `loadgen` binary: parse flags, run (see the library for what it does).

use clap::Parser;
use pgetcd_loadgen::{Cli, run};

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("loadgen: {e:#}");
        std::process::exit(1);
    }
}
