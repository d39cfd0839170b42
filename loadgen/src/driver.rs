//! Runs the rounds: prepare each endpoint once, then rounds A B A B ...; prints each
//! round (text or one JSON object), the median ratios A/B, and writes the HTML report.
//!
//! The top of loadgen's module graph: it imports `results` (what a round measured) and
//! `report` (which reads those results); nothing but `lib.rs` imports this module.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::Rng;

use crate::cli::{Cli, Params};
use crate::conn::{Target, TlsFiles};
use crate::cpu;
use crate::pace::{Budget, Epoch};
use crate::progress::Progress;
use crate::report;
use crate::results::RoundResult;
use crate::stats::Stats;
use crate::workloads::{self, Prepared, RoundCtx, Spec};

struct Side {
    name: &'static str,
    target: Target,
    cpu: cpu::Source,
    prep: Prepared,
}

pub async fn run(cli: Cli) -> Result<()> {
    let p = Params::resolve(&cli)?;
    let tls = TlsFiles::load(&cli)?;
    let spec = workloads::spec(&cli.workload);
    // One tag per invocation: fresh keys for create and k8s on both sides.
    let run_tag: u32 = rand::rng().random();
    let mut sides = Vec::new();
    for (name, spec_str, comm, pids) in [
        (
            "A",
            Some(cli.endpoints.as_str()),
            &cli.cpu_comm,
            cli.cpu_pid.as_deref(),
        ),
        (
            "B",
            cli.vs.as_deref(),
            &cli.vs_cpu_comm,
            cli.vs_cpu_pid.as_deref(),
        ),
    ] {
        let Some(spec_str) = spec_str else { continue };
        let cpu = cpu::Source::parse(comm, pids)?;
        let target = Target::new(spec_str, &tls)?;
        let prep = workloads::prepare(&cli, &p, &target, run_tag)
            .await
            .with_context(|| format!("preparing {}", target.label))?;
        sides.push(Side {
            name,
            target,
            cpu,
            prep,
        });
    }
    let mut results: Vec<RoundResult> = Vec::new();
    for i in 0..cli.rounds.max(1) {
        for side in &sides {
            let r = round(&cli, &p, &spec, side, i)
                .await
                .with_context(|| format!("{} round {i}", side.target.label))?;
            print(&cli, &r)?;
            results.push(r);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if sides.len() == 2 && !cli.json {
        print_ratios(&results);
    }
    if let Some(path) = &cli.report {
        let html = report::html(&cli, &results);
        std::fs::write(path, html).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report: {}", path.display());
    }
    Ok(())
}

async fn round(cli: &Cli, p: &Params, spec: &Spec, side: &Side, idx: usize) -> Result<RoundResult> {
    let epoch = Epoch::new();
    let stats = Stats::new(spec.kinds, epoch.clone());
    let budget = Arc::new(Budget::new(p, epoch.clone()));
    let progress = {
        let (stats, budget) = (stats.clone(), budget.clone());
        let label = format!("{} round {idx}", side.target.label);
        let primary = stats.kind(0);
        Progress::start(move || {
            let secs = stats.epoch.elapsed().as_secs_f64().max(1e-3);
            let (done, errors) = (primary.ok_count(), primary.error_count());
            format!(
                "{label}: {done} {} ({:.0}/s), {:.0}%, errors {errors}, {secs:.1} s",
                primary.name,
                done as f64 / secs,
                budget.fraction(done + errors) * 100.0
            )
        })
    };
    let cpu_before = cpu::cpu_ticks(&side.cpu);
    let ctx = RoundCtx {
        cli,
        p,
        target: &side.target,
        prep: &side.prep,
        idx,
        stats: stats.clone(),
        budget,
    };
    let outcome = workloads::run_round(&ctx).await;
    let measured = epoch.elapsed().as_secs_f64();
    let cpu_after = cpu::cpu_ticks(&side.cpu);
    progress.finish().await;
    let outcome = outcome?;
    let measured = outcome.load_seconds.unwrap_or(measured);
    let kinds = stats.finish(measured);
    let cpu_ops: u64 = spec.cpu_kinds.iter().map(|&k| kinds[k].ops).sum();
    let primary = &kinds[0];
    let seconds = outcome.seconds.unwrap_or(measured);
    Ok(RoundResult {
        workload: cli.workload.name(),
        side: side.name,
        endpoint: side.target.label.clone(),
        round: idx,
        requests: primary.ops + primary.errors,
        errors: primary.errors,
        seconds,
        ops_per_sec: outcome.ops_per_sec.unwrap_or(primary.ops_per_sec),
        latency: primary.latency,
        server_cpu_us_per_op: cpu::cpu_per_op(cpu_before, cpu_after, cpu_ops),
        kinds,
        notes: outcome.notes,
        first_error: stats.first_error(),
    })
}

fn print(cli: &Cli, r: &RoundResult) -> Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "{:<28} round {} {:>9.0} ops/s  p50 {:>7.2} ms  p90 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2}  max {:>7.2}  errors {}  server cpu {}",
        r.endpoint,
        r.round,
        r.ops_per_sec,
        r.latency.p50_ms,
        r.latency.p90_ms,
        r.latency.p99_ms,
        r.latency.p999_ms,
        r.latency.max_ms,
        r.errors,
        r.server_cpu_us_per_op
            .map(|c| format!("{c:.0} us/op"))
            .unwrap_or_else(|| "n/a".into())
    );
    let detail = r.kinds.len() > 1 || r.kinds.iter().any(|k| k.items > 0 || k.conflicts > 0);
    if detail {
        for k in &r.kinds {
            let mut line = format!(
                "    {:<12} {:>8} ok {:>9.1}/s  p50 {:>7.2} ms  p99 {:>7.2}  max {:>7.2}  errors {}",
                k.kind,
                k.ops,
                k.ops_per_sec,
                k.latency.p50_ms,
                k.latency.p99_ms,
                k.latency.max_ms,
                k.errors
            );
            if k.items > 0 {
                line += &format!("  items {} ({:.0}/s)", k.items, k.items_per_sec);
            }
            if k.conflicts > 0 {
                line += &format!(
                    "  conflicts {} ({:.1}% of ok)",
                    k.conflicts,
                    k.conflicts as f64 * 100.0 / k.ops.max(1) as f64
                );
            }
            println!("{line}");
        }
    }
    for n in &r.notes {
        println!("    {n}");
    }
    if let Some(e) = &r.first_error {
        println!("    first error: {e}");
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Median over rounds of A/B for throughput and p99, per kind when there are several.
fn print_ratios(results: &[RoundResult]) {
    let pairs: Vec<(&RoundResult, &RoundResult)> = results
        .iter()
        .filter(|a| a.side == "A")
        .filter_map(|a| {
            results
                .iter()
                .find(|b| b.side == "B" && b.round == a.round)
                .map(|b| (a, b))
        })
        .collect();
    let ratio =
        |f: &dyn Fn(&RoundResult) -> f64| median(pairs.iter().map(|(a, b)| f(a) / f(b)).collect());
    println!(
        "median throughput ratio A/B: {:.2}",
        ratio(&|r| r.ops_per_sec)
    );
    println!("median p99 ratio A/B: {:.2}", ratio(&|r| r.latency.p99_ms));
    let Some((first, _)) = pairs.first() else {
        return;
    };
    if first.kinds.len() > 1 {
        for (i, k) in first.kinds.iter().enumerate() {
            let t = ratio(&|r| r.kinds[i].ops_per_sec);
            let p = ratio(&|r| r.kinds[i].latency.p99_ms);
            if t.is_finite() || p.is_finite() {
                println!("    {:<12} throughput {t:.2}  p99 {p:.2}", k.kind);
            }
        }
    }
}
