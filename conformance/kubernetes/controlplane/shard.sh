#!/usr/bin/env bash
# Keyspace isolation under an event storm (see shard.go): one pgetcd serving
# keyspace "main" on one throwaway Postgres and "events" on another, each on
# its own mutual-TLS listener; kube-apiserver with events and leases in main
# (layout "single") or sent to the events keyspace with --etcd-servers-overrides
# ("sharded"), alternating, RUNS runs of each. Per run: where an Event, a Lease
# and a ConfigMap land, then ConfigMap update latency (through kube-apiserver,
# and a probe straight to main) in a quiet window and under a storm of Event
# creates, with pgetcd's per-keyspace histograms and each process's CPU. Not
# part of scripts/test.sh: a measurement, about 2 minutes a run.
#
# Env: RUNS (default 2), PGETCD_BIN (default: cargo builds target/release/pgetcd
# and loadgen), REPORT (default .cache/shard-report.json; the run dirs are .cache/shard,
# kept short: Postgres socket paths must fit in 107 bytes). More
# flags go to the harness, e.g. -shard-storm loadgen (the storm from loadgen
# straight to the keyspace Events go to, not through kube-apiserver),
# -shard-storm-rate 1500, -shard-window 60s (controlplane -help lists them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mod=$(cd "$here/.." && pwd)
root=$(cd "$mod/../.." && pwd)
cd "$mod"
"$mod/build.sh"
if [ -z "${PGETCD_BIN:-}" ]; then
  (cd "$root" && cargo build --release --locked -q --bin pgetcd --bin pgetcd-test-postgres --bin loadgen)
  PGETCD_BIN=${CARGO_TARGET_DIR:-$root/target}/release/pgetcd
fi
bindir=$(dirname "$PGETCD_BIN")
go build -o .cache/bin/controlplane ./controlplane
mkdir -p .cache
report=${REPORT:-$mod/.cache/shard-report.json}
exec .cache/bin/controlplane -shard "${RUNS:-2}" -dir .cache/shard \
  -bin .cache/bin -pgetcd "$PGETCD_BIN" -test-postgres "$bindir/pgetcd-test-postgres" \
  -loadgen "$bindir/loadgen" -shard-report "$report" "$@"
