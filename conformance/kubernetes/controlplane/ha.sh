#!/usr/bin/env bash
# kube-apiserver on three pgetcd instances of one keyspace (one throwaway
# Postgres), ConfigMaps created and updated through client-go while the writer
# is killed with SIGKILL and restarted, three times (see haload.go for what is
# checked). Not part of scripts/test.sh: it takes about two minutes and
# measures more than it gates.
#
# Env: INSTANCES (default 3), PGETCD_BIN (default: cargo builds
# target/debug/pgetcd). More flags go to the harness, e.g. -ha-kills 4
# -ha-duration 100s -ha-rate 20 (controlplane -help lists them).
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
go build -o .cache/bin/controlplane ./controlplane
exec .cache/bin/controlplane -ha "${INSTANCES:-3}" -dir .cache/controlplane/ha \
  -bin .cache/bin -pgetcd "$PGETCD_BIN" \
  -test-postgres "$(dirname "$PGETCD_BIN")/pgetcd-test-postgres" "$@"
