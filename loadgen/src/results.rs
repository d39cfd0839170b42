//! What a round measured ([`RoundResult`]): the one type both the round driver and the
//! HTML report need.
//!
//! Dependencies go one way: `driver` produces results and hands them to `report`; both
//! import this module, which imports only `stats` (and neither of them), so the report
//! never reaches back into the driver.

use serde::Serialize;

use crate::stats::{KindReport, Latency};

/// One round's figures; the top-level latency and throughput are the primary kind's.
#[derive(Serialize, Clone, Debug)]
pub struct RoundResult {
    pub workload: &'static str,
    /// "A" (--endpoints) or "B" (--vs).
    pub side: &'static str,
    pub endpoint: String,
    pub round: usize,
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    #[serde(flatten)]
    pub latency: Latency,
    pub server_cpu_us_per_op: Option<f64>,
    pub kinds: Vec<KindReport>,
    pub notes: Vec<String>,
    pub first_error: Option<String>,
}
