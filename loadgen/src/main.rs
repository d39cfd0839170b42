//! The `loadgen` binary: parse flags, run (see the library for what it does).

use clap::Parser;
use pgetcd_loadgen::{Cli, run};

/// mimalloc, as in pgetcd: the client allocates a few small buffers per call, and with
/// glibc's allocator a sixth of the loadgen's CPU went to malloc and free, CPU the
/// server under test then did not get on a shared machine.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("loadgen: {e:#}");
        std::process::exit(1);
    }
}
