#!/usr/bin/env bash
# kube-apiserver's storage conformance suite (k8s.io/apiserver's etcd3 store,
# watcher and compactor tests, and the cacher tests over them) against real
# etcd 3.5 and against pgetcd, each test on a fresh server and keyspace.
#
# The suites are k8s.io/apiserver's own _test.go files at the version go.mod
# pins, built with their testserver package swapped for ours
# (testserver/test_server.go): it starts an external etcd or pgetcd per test
# instead of an embedded etcd. Then compare/ checks that every test that
# passes on etcd passes on pgetcd, but for the exceptions listed in
# exceptions.txt.
#
# Env: PGETCD_BIN (default: cargo builds target/debug/pgetcd), ETCD_BIN
# (default: etcd 3.5, built by ../build.sh), SUITES (default: "etcd3 cacher"),
# RUN (a -test.run regexp, default all).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mod=$(cd "$here/.." && pwd)
root=$(cd "$mod/../.." && pwd)
out=$mod/.cache/storage
mkdir -p "$out"
cd "$mod"

if [ -z "${PGETCD_BIN:-}" ]; then
  (cd "$root" && cargo build --locked -q --bin pgetcd --bin pgetcd-test-postgres)
  PGETCD_BIN=$root/target/debug/pgetcd
fi
pgbin=$(dirname "$PGETCD_BIN")/pgetcd-test-postgres
[ -x "$pgbin" ] || { (cd "$root" && cargo build --locked -q --bin pgetcd-test-postgres); pgbin=$root/target/debug/pgetcd-test-postgres; }
"$mod/build.sh" >/dev/null
ETCD_BIN=${ETCD_BIN:-$mod/.cache/bin/etcd}
export PGETCD_BIN ETCD_BIN
echo "etcd:   $("$ETCD_BIN" --version | head -1)"
echo "pgetcd: $PGETCD_BIN"

# The test binaries, with our testserver in place of theirs. Go refuses to
# overlay files of the module cache, so the suites build from a copy of
# k8s.io/apiserver under .cache (never committed), through a go.mod of the
# run's own (-modfile) that replaces the module with that copy.
apiserver=$(go list -m -f '{{.Dir}}' k8s.io/apiserver)
src=$out/apiserver
if [ "$(cat "$src/.from" 2>/dev/null)" != "$apiserver" ]; then
  rm -rf "$src" && cp -r "$apiserver" "$src" && chmod -R u+w "$src"
  echo "$apiserver" >"$src/.from"
fi
cp "$here/testserver/test_server.go" "$src/pkg/storage/etcd3/testserver/test_server.go"
sed "s#^\(\s*k8s.io/apiserver =>\).*#\1 $src#" go.mod >"$out/go.mod"
cp go.sum "$out/go.sum"
grep -q "k8s.io/apiserver => $src" "$out/go.mod"
SUITES=${SUITES:-etcd3 cacher}
for suite in $SUITES; do
  go test -modfile "$out/go.mod" -c -o "$out/$suite.test" "k8s.io/apiserver/pkg/storage/$suite"
done

# One throwaway Postgres for every pgetcd test server of this run.
# (Open to others: as root, Postgres runs as the postgres user.)
pgdir=$(mktemp -d /tmp/pgetcd-k8s-storage.XXXXXX)
chmod 755 "$pgdir"
coproc PG { exec "$pgbin" "$pgdir/pg"; }
trap 'kill "${PG_PID:-}" 2>/dev/null; wait "${PG_PID:-}" 2>/dev/null; rm -rf "$pgdir"' EXIT
read -r PGETCD_TEST_POSTGRES_URL <&"${PG[0]}"
export PGETCD_TEST_POSTGRES_URL
echo "postgres: $PGETCD_TEST_POSTGRES_URL"

# Both backends at once (the suites mostly wait on watches and timers), one
# suite after the other.
for suite in $SUITES; do
  t0=$(date +%s)
  pids=()
  for backend in etcd pgetcd; do
    # A test that fails is a result, not an error of this script.
    (cd "$out" && STORAGE_BACKEND=$backend "./$suite.test" -test.v -test.count=1 \
      -test.timeout=30m ${RUN:+-test.run "$RUN"} 2>&1 || true) |
      go tool test2json -t -p "$suite" >"$out/$suite.$backend.json" &
    pids+=($!)
  done
  wait "${pids[@]}"
  echo "ran $suite on etcd and pgetcd in $(($(date +%s) - t0)) s"
done

args=()
for suite in $SUITES; do args+=("$out/$suite.etcd.json" "$out/$suite.pgetcd.json"); done
go run ./storage/compare -exceptions "$here/exceptions.txt" "${args[@]}"
