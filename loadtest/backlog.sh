#!/usr/bin/env bash
# How a broker's cost grows with what it stores: fresh traffic's delivery speed with a stored
# backlog, and start-up time with it. For each BACKLOG fill time, one broker on a fresh data
# directory:
#
#   1. fill: `appends` to RECIPIENTS offline accounts for FILL seconds (unpinned, as fast as
#      the machine goes), which leaves that backlog queued;
#   2. `e2e` on fresh accounts (broker on BROKER_CPU, load generator on LOADTEST_CPU): the
#      delivery speed of new traffic beside the backlog;
#   3. SIGTERM, then a restart on the same directory: time to `listening on` (start-up with
#      the backlog), and `e2e` once more.
#
#   FILLS="0 60" RECIPIENTS=1000 DURATION=8s DEVICES=1000 loadtest/backlog.sh
#
# Prints one line per fill: the backlog stored, delivered/s and p99 before and after the
# restart, and the restart's start-up time. Needs the release binaries (SKIP_BUILD as in
# run.sh).
#
# Large backlogs: filling through the broker goes at about 10,000 envelopes/s (10,000,000 would
# take 20 minutes). PREFILL lists envelope counts to fill directly through the store instead
# (`SEALPOST_BENCH_KEEP_DIR=... cargo bench --bench store -- --startup-only`: the same records
# a send stores, for 1,000 offline accounts, about 100,000/s), replacing step 1; FILLS is then
# ignored, and the fill_s column is how long that fill took:
#
#   PREFILL="0 1000000 10000000" DURATION=8s loadtest/backlog.sh
#
# Each filled directory is removed after its line (10,000,000 envelopes take about 10 GB).
set -euo pipefail
cd "$(dirname "$0")/.."

FILLS=${FILLS:-"0 60"}
PREFILL=${PREFILL:-}
RECIPIENTS=${RECIPIENTS:-1000}
DURATION=${DURATION:-8s}
DEVICES=${DEVICES:-1000}
BROKER_CPU=${BROKER_CPU:-0}
LOADTEST_CPU=${LOADTEST_CPU:-1}
BROKER=${BROKER:-target/release/sealpost}
LOADTEST=${LOADTEST:-target/release/sealpost-loadtest}

ulimit -n 65536 2>/dev/null || true
if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release -p sealpost -p sealpost-loadtest
    if [[ -n $PREFILL ]]; then
        cargo bench --bench store --no-run
    fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/sealpost-backlog.XXXXXX")
pid=""
cleanup() {
    [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# start DIR LOG: starts the broker on DIR, pinned, sets pid and URL, prints the start-up time.
start() {
    local started=$EPOCHREALTIME
    taskset -c "$BROKER_CPU" "$BROKER" serve --listen 127.0.0.1:0 --data-dir "$1" \
        --domain localhost --registration open --ip-rate 0 --device-rate 0 \
        --max-unauthenticated-per-ip 0 >"$2" 2>&1 &
    pid=$!
    local addr=""
    # Up to about 10 minutes: start-up grows with the backlog.
    for _ in $(seq 60000); do
        addr=$(sed -n 's/^listening on \(127\.0\.0\.1:[0-9][0-9]*\)$/\1/p' "$2" | head -n1)
        [[ -n $addr ]] && break
        kill -0 "$pid" 2>/dev/null || { echo "broker exited" >&2; tail "$2" >&2; exit 1; }
        sleep 0.01
    done
    URL="http://$addr"
    STARTUP_MS=$(python3 -c "print(round(($EPOCHREALTIME - $started) * 1000))")
}

stop() {
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    pid=""
}

field() { # field JSON-LINE KEY...: a number from the loadtest's JSON line
    python3 -c 'import json,sys; j=json.loads(sys.argv[1]); 
for k in sys.argv[2:]: j=j[k]
print(j)' "$@"
}

e2e() {
    taskset -c "$LOADTEST_CPU" "$LOADTEST" e2e --url "$URL" --devices "$DEVICES" \
        --duration "$DURATION" --warmup 1s 2>&1 | grep '^{"scenario"' | tail -n1
}

# prefill N DIR: fills DIR with N envelopes through the store, sets fill and backlog.
prefill() {
    backlog=0
    fill=0
    if [[ $1 == 0 ]]; then
        mkdir -p "$2"
        return
    fi
    local out
    out=$(SEALPOST_BENCH_ENVELOPES=$1 SEALPOST_BENCH_KEEP_DIR=$2 \
        cargo bench -q --bench store -- --startup-only 2>&1) || { echo "$out" >&2; exit 1; }
    echo "$out" | grep -E '^(filled|store open)' >&2
    # "filled N envelopes (U users) in S.Ss, M MiB on disk"
    backlog=$(echo "$out" | sed -n 's/^filled \([0-9]*\) envelopes.*/\1/p')
    fill=$(echo "$out" | sed -n 's/^filled .* in \([0-9.]*\)s,.*/\1/p')
}

printf 'fill_s\tbacklog\tdelivered/s\tp99_ms\tstartup_ms\tafter_restart/s\tp99_ms\n'
for level in ${PREFILL:-$FILLS}; do
    dir="$work/data-$level"
    if [[ -n $PREFILL ]]; then
        prefill "$level" "$dir"
    else
        mkdir -p "$dir"
        fill=$level
    fi
    start "$dir" "$work/broker-$level.log"
    if [[ -n $PREFILL ]]; then
        echo "backlog $backlog: first start to \`listening on\`: $STARTUP_MS ms" >&2
    else
        backlog=0
        if [[ $fill != 0 ]]; then
            line=$("$LOADTEST" appends --url "$URL" --senders 64 --recipients "$RECIPIENTS" \
                --pipeline 32 --duration "${fill}s" --warmup 0s 2>&1 | grep '^{"scenario"' | tail -n1)
            backlog=$(field "$line" accepted)
        fi
    fi
    before=$(e2e)
    stop
    start "$dir" "$work/broker-$level.restart.log"
    after=$(e2e)
    stop
    printf '%s\t%s\t%.0f\t%s\t%s\t%.0f\t%s\n' "$fill" "$backlog" \
        "$(field "$before" delivered_per_s)" "$(field "$before" deliver_latency p99_ms)" \
        "$STARTUP_MS" \
        "$(field "$after" delivered_per_s)" "$(field "$after" deliver_latency p99_ms)"
    rm -rf "$dir"
done
