#!/usr/bin/env bash
# kube-apiserver on etcd 3.5 moved to pgetcd while it runs, three times, each on
# a fresh cluster: a workload and a steady writer through client-go, `pgetcd
# migrate --freeze-source` following etcd, then kube-apiserver stopped, the
# migration cut over, pgetcd started on the keyspace and kube-apiserver
# restarted on it (see migrate.go for what is checked and timed). Not part of
# scripts/test.sh: a measurement of the write-unavailability window more than
# a gate.
#
# Env: RUNS (default 3), PGETCD_BIN (default: cargo builds target/debug/pgetcd),
# ETCD_BIN (default: etcd 3.5, built by build.sh). More flags go to the harness,
# e.g. -migrate-baseline (kube-apiserver restarted on etcd, no migration: the
# control), -migrate-rate 50, -migrate-follow 30s (controlplane -help lists them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mod=$(cd "$here/.." && pwd)
root=$(cd "$mod/../.." && pwd)
cd "$mod"
"$mod/build.sh"
if [ -z "${PGETCD_BIN:-}" ]; then
  (cd "$root" && cargo build --locked -q --bin pgetcd --bin pgetcd-test-postgres)
  PGETCD_BIN=${CARGO_TARGET_DIR:-$root/target}/debug/pgetcd
fi
ETCD_BIN=${ETCD_BIN:-$mod/.cache/bin/etcd}
go build -o .cache/bin/controlplane ./controlplane
exec .cache/bin/controlplane -migrate "${RUNS:-3}" -dir .cache/controlplane/migrate \
  -bin .cache/bin -pgetcd "$PGETCD_BIN" -etcd "$ETCD_BIN" \
  -test-postgres "$(dirname "$PGETCD_BIN")/pgetcd-test-postgres" "$@"
