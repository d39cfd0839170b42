//! loadgen: drives any etcd v3 endpoint (pgetcd or real etcd) with etcd-benchmark-style
//! and Kubernetes-shaped workloads and reports throughput, latency percentiles (HDR
//! histograms), latency and throughput per second (HTML report) and the server-side CPU
//! time per operation.
//!
//! `--vs URL` runs the same workload against a second endpoint in alternating rounds
//! (A B A B ...) and prints each round and the median ratios A/B, so both endpoints see
//! the same machine conditions. Server CPU is read from /proc for processes whose
//! command name is listed in `--cpu-comm` (A) and `--vs-cpu-comm` (B).
//!
//! Talks to servers only through the etcd v3 gRPC API (`pgetcd-proto` clients); depends
//! on no other pgetcd crate, so it measures pgetcd exactly as it measures etcd.

/// Flags, subcommands and their resolved parameters.
pub mod cli;
/// Connections, plain or TLS.
mod conn;
/// Server CPU from /proc.
mod cpu;
/// Rounds, printing, ratios.
mod driver;
/// Round length and rate limiting.
mod pace;
/// Fast prefill of many keys.
mod prefill;
/// The progress line on stderr.
mod progress;
/// The HTML report.
mod report;
/// What a round measured (shared by the driver and the report).
mod results;
/// Histograms and per-second buckets.
mod stats;
/// The workloads.
mod workloads;

pub use cli::Cli;
pub use driver::run;
