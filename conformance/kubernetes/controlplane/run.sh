#!/usr/bin/env bash
# A real control plane on pgetcd, checked end to end (see main.go for the
# list): kube-apiserver over mutual TLS, kube-controller-manager,
# kube-scheduler and kwok with NODES simulated nodes.
#
# Env: BACKENDS (default "pgetcd"; "etcd pgetcd kine" runs the same checks on
# each), NODES (default 1000), PGETCD_BIN (default: cargo builds
# target/debug/pgetcd), ETCD_BIN (default: etcd 3.5, built by build.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mod=$(cd "$here/.." && pwd)
root=$(cd "$mod/../.." && pwd)
cd "$mod"
"$mod/build.sh"
if [ -z "${PGETCD_BIN:-}" ]; then
  (cd "$root" && cargo build --locked -q --bin pgetcd --bin pgetcd-test-postgres)
  PGETCD_BIN=$root/target/debug/pgetcd
fi
ETCD_BIN=${ETCD_BIN:-$mod/.cache/bin/etcd}
go build -o .cache/bin/controlplane ./controlplane

status=0
for backend in ${BACKENDS:-pgetcd}; do
  .cache/bin/controlplane -backend "$backend" -dir ".cache/controlplane/$backend" \
    -bin .cache/bin -pgetcd "$PGETCD_BIN" -etcd "$ETCD_BIN" \
    -test-postgres "$(dirname "$PGETCD_BIN")/pgetcd-test-postgres" \
    -nodes "${NODES:-1000}" "$@" || status=1
done
exit $status
