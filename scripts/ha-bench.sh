#!/usr/bin/env bash
# Three pgetcd instances on one keyspace against one: read throughput (serializable and
# linearizable) spread over the three vs one instance alone, and puts through a
# follower (forwarded) vs through the writer. All on this machine, on one throwaway
# Postgres (fsync on). Rounds alternate A B A B (loadgen --vs).
#
# Usage: scripts/ha-bench.sh   (TOTAL=20000 ROUNDS=2; results in target/ha-bench/<time>)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
TOTAL=${TOTAL:-20000}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-$REPO/target/ha-bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
cd "$REPO"
cargo build --release --quiet --bin pgetcd --bin loadgen --bin pgetcd-test-postgres
BIN=$REPO/target/release
TMP=$(mktemp -d)
# As root, Postgres runs as the postgres user, which must reach the directory.
chmod 755 "$TMP"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
"$BIN/pgetcd-test-postgres" "$TMP/pg" --durable >"$TMP/pg.url" 2>"$TMP/pg.log" &
PIDS+=($!)
for _ in $(seq 600); do [ -s "$TMP/pg.url" ] && break; sleep 0.2; done
PG=$(head -1 "$TMP/pg.url")
if [ -z "$PG" ]; then
    echo "the throwaway Postgres did not start:" >&2
    tail -20 "$TMP/pg.log" >&2
    exit 1
fi
ports=$(python3 -c 'import socket
s=[socket.socket() for _ in range(6)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
read -r p1 p2 p3 m1 m2 m3 <<<"$ports"
start() { # name port metrics
    "$BIN/pgetcd" --name "$1" --postgres-url "$PG" --keyspace bench \
        --listen-client-urls "http://127.0.0.1:$2" --advertise-client-urls "http://127.0.0.1:$2" \
        --listen-metrics-urls "http://127.0.0.1:$3" >"$TMP/$1.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 300); do
        curl -fsS "http://127.0.0.1:$3/health" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "$1 did not start" >&2
    tail -20 "$TMP/$1.log" >&2
    exit 1
}
start a "$p1" "$m1"
start b "$p2" "$m2"
start c "$p3" "$m3"
A=http://127.0.0.1:$p1 B=http://127.0.0.1:$p2 C=http://127.0.0.1:$p3
# Server CPU of both sides: every pgetcd process and Postgres (all three instances run
# during both sides' rounds).
LG="$BIN/loadgen --rounds $ROUNDS --cpu-comm pgetcd,postgres --vs-cpu-comm pgetcd,postgres"
for c in s l; do
    echo "== range-$c: three instances vs the writer alone" >&2
    $LG --endpoints "$A,$B,$C" --vs "$A" --consistency "$c" --conns 30 --clients 300 --total "$TOTAL" range | tee "$OUT/range-$c.txt"
done
echo "== put: through a follower vs through the writer" >&2
$LG --endpoints "$B" --vs "$A" --conns 10 --clients 100 --total "$TOTAL" put --key-space-size 10000 | tee "$OUT/put.txt"
echo "results: $OUT" >&2
