#!/usr/bin/env bash
# The side-by-side benchmark of a real control plane on etcd 3.5, pgetcd and
# kine (on a Postgres of the same version pgetcd uses): ROUNDS rounds, each
# running every backend once from a clean start, in alternation. Each run is
# `controlplane -bench` (see controlplane/bench.go); benchreport then prints the
# table of medians and writes the plots.
#
# Env: ROUNDS (2), BACKENDS ("etcd pgetcd kine"), NODES (1000), NAMESPACES (20),
# PODS_PER_NODE (3), LIST_OBJECTS (10000), OUT (.cache/bench).
# Takes about an hour with the defaults on 2 cores; not part of scripts/test.sh.
set -euo pipefail
mod=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$mod/../.." && pwd)
cd "$mod"
./build.sh
(cd "$root" && cargo build --release --locked -q --bin pgetcd --bin pgetcd-test-postgres)
go build -o .cache/bin/controlplane ./controlplane
out=${OUT:-$mod/.cache/bench}
mkdir -p "$out/results"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for backend in ${BACKENDS:-etcd pgetcd kine}; do
    echo "=== round $round: $backend"
    .cache/bin/controlplane -bench -backend "$backend" -dir "$out/run/$backend" \
      -bin .cache/bin -pgetcd "$root/target/release/pgetcd" -etcd .cache/bin/etcd \
      -test-postgres "$root/target/release/pgetcd-test-postgres" \
      -nodes "${NODES:-1000}" -bench-namespaces "${NAMESPACES:-20}" \
      -bench-pods-per-node "${PODS_PER_NODE:-3}" -bench-list-objects "${LIST_OBJECTS:-10000}" \
      -bench-report "$out/results/$round-$backend.json"
  done
done
go run ./benchreport -plots "$out" "$out"/results/*.json | tee "$out/report.md"
