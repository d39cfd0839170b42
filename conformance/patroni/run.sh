#!/usr/bin/env bash
# Patroni (Debian's package) with pgetcd as its etcd3 DCS: two Postgres nodes on
# loopback ports through bootstrap, a switchover, a failover after kill -9 of the
# primary, and the killed node's rejoin; the same checks on real etcd as a control.
# The checks are listed in check.py. Needs root (Patroni and Postgres run as the
# postgres user), the patroni package and Postgres server binaries.
#
# Env: BACKENDS (default "etcd pgetcd"), PGETCD_BIN (default: cargo builds
# target/debug/pgetcd), KEEP=1 keeps the work directories (kept anyway on a
# failure). Arguments go to check.py: --trace logs the DCS traffic of Patroni,
# --margin S the failover's allowance over ttl + loop_wait, --etcd BIN.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if ! command -v patroni >/dev/null 2>&1; then
  echo "patroni is not installed (apt-get install patroni)" >&2
  exit 1
fi
if [ -z "${PGETCD_BIN:-}" ]; then
  (cd "$root" && cargo build --locked -q --bin pgetcd)
  PGETCD_BIN=${CARGO_TARGET_DIR:-$root/target}/debug/pgetcd
fi
exec python3 "$here/check.py" --backends "${BACKENDS:-etcd pgetcd}" --pgetcd "$PGETCD_BIN" "$@"
