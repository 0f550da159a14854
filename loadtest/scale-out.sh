#!/usr/bin/env bash
# Scale-out on NATS JetStream: the e2e scenario against one broker on the embedded sled store,
# then against 1, 2 and 3 broker pods of one domain over a fresh 3-node NATS JetStream cluster
# (scripts/nats-cluster), every configuration REPEAT times, interleaved (sled, 1, 2, 3, sled,
# ...) so that slow drift on the machine touches them all alike.
#
# With several pods the load generator registers accounts and connects devices round-robin
# (`--url A,B,C`), so a sender and its recipient are on different pods (n-1)/n of the time and
# delivery crosses core NATS. Each run prints one line; the end prints per configuration the
# delivered envelopes/s (mean, min-max), send->deliver p50 and p99 (means), and the CPU seconds
# that the broker pods, the NATS servers and the load generator used during the measured
# window (from /proc/PID/stat, read by the load generator's `--cpu`), per 10,000 delivered.
# Everything runs on 127.0.0.1 and is bounded in time; brokers, NATS servers and temp dirs are
# removed on exit. Usage:
#
#   loadtest/scale-out.sh
#   DURATION=10s DEVICES=200 REPEAT=3 SKIP_BUILD=1 loadtest/scale-out.sh
#   CONFIGS="nats-1 nats-3" RATE=2000 loadtest/scale-out.sh
#
# Knobs (environment, with defaults):
#   CONFIGS="sled nats-1 nats-2 nats-3"   sled, or nats-N for N pods over NATS
#   REPEAT=3
#   DURATION=10s WARMUP=1s SIZE=256 DEVICES=200 RATE=0 E2E_PIPELINE=   (as in run.sh)
#   NATS_PARTITIONS=4 NATS_REPLICAS=3     the pods' --nats-partitions / --nats-replicas
#   NATS_PORT_BASE=24222   the cluster's client ports (scripts/nats-cluster; not its default
#                          14222, so that a cluster left running for tests is not reused)
#   RUN_TIMEOUT=300        seconds before one load generator run is killed
#   BROKER_ARGS=""         extra flags for every `sealpost serve`
#   SKIP_BUILD=1           use the binaries already in target/release
#   KEEP=1                 keep data dirs, NATS stores and logs (and print where)
#   VERBOSE=1              show the load generator's own output too
#   BROKER=..., LOADTEST=...  binaries to use (default target/release/...)
set -euo pipefail

cd "$(dirname "$0")/.."

CONFIGS=${CONFIGS:-"sled nats-1 nats-2 nats-3"}
REPEAT=${REPEAT:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
SIZE=${SIZE:-256}
DEVICES=${DEVICES:-200}
RATE=${RATE:-0}
E2E_PIPELINE=${E2E_PIPELINE:-}
NATS_PARTITIONS=${NATS_PARTITIONS:-4}
NATS_REPLICAS=${NATS_REPLICAS:-3}
export NATS_PORT_BASE=${NATS_PORT_BASE:-24222}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
BROKER_ARGS=${BROKER_ARGS:-}

BROKER=${BROKER:-target/release/sealpost}
LOADTEST=${LOADTEST:-target/release/sealpost-loadtest}

for config in $CONFIGS; do
    [[ $config == sled || $config =~ ^nats-[1-9][0-9]*$ ]] || {
        echo "unknown configuration $config (sled or nats-N)" >&2
        exit 2
    }
done

if ! ulimit -n 65536 2>/dev/null; then
    ulimit -n "$(ulimit -Hn)" || true
    echo "warning: could not raise the open-files limit to 65536; it is $(ulimit -n)" >&2
fi

if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release -p sealpost -p sealpost-loadtest
fi

LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/sealpost-scale-out-logs.XXXXXX")
RESULTS="$LOGDIR/results.tsv"
: >"$RESULTS"
broker_pids=()
broker_urls=()
temp_dirs=()
nats_dir=""
failed=0

# alive PID: running (a zombie, exited but not yet reaped by whoever adopted it, is not).
alive() {
    local state
    state=$(sed -n 's/^[0-9]* (.*) \([A-Z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

# Stops what one run started: brokers (SIGTERM, SIGKILL after 10 s), then the NATS cluster
# (waiting until its servers are gone: the next run binds the same ports).
stop_all() {
    local pid
    for pid in "${broker_pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${broker_pids[@]}"; do
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    broker_pids=()
    broker_urls=()
    if [[ -n $nats_dir ]]; then
        local nats_pids
        nats_pids=$(cat "$nats_dir"/n*.pid 2>/dev/null || true)
        scripts/nats-cluster stop "$nats_dir" >/dev/null 2>&1 || true
        for pid in $nats_pids; do
            for _ in $(seq 100); do
                alive "$pid" || break
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null || true
        done
        nats_dir=""
    fi
    if [[ -z ${KEEP:-} && ${#temp_dirs[@]} -gt 0 ]]; then
        rm -rf "${temp_dirs[@]}"
    fi
    temp_dirs=()
}

cleanup() {
    stop_all
    if [[ -z ${KEEP:-} ]]; then
        rm -rf "$LOGDIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# new_dir KIND: a fresh temp dir in NEW_DIR, removed by stop_all (not in a subshell: it
# records the dir).
new_dir() {
    NEW_DIR=$(mktemp -d "${TMPDIR:-/tmp}/sealpost-scale-out-$1.XXXXXX")
    temp_dirs+=("$NEW_DIR")
}

# start_broker LABEL [serve flags...]: one broker on 127.0.0.1:0 with its own data dir;
# appends to broker_pids and broker_urls.
start_broker() {
    local label=$1
    shift
    local data_dir out="$LOGDIR/$label.out" err="$LOGDIR/$label.err" pid addr=""
    new_dir data
    data_dir=$NEW_DIR
    # shellcheck disable=SC2086 # BROKER_ARGS is a list of flags
    "$BROKER" serve --listen 127.0.0.1:0 --data-dir "$data_dir" --domain localhost \
        --registration open --ip-rate 0 --device-rate 0 --max-unauthenticated-per-ip 0 \
        "$@" $BROKER_ARGS >"$out" 2>"$err" &
    pid=$!
    broker_pids+=("$pid")
    for _ in $(seq 300); do
        addr=$(sed -n 's/^listening on \(127\.0\.0\.1:[0-9][0-9]*\)$/\1/p' "$out" | head -n1)
        [[ -n $addr ]] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$label exited before listening; stderr:" >&2
            tail -n 20 "$err" >&2
            return 1
        fi
        sleep 0.1
    done
    if [[ -z $addr ]]; then
        echo "$label did not print 'listening on 127.0.0.1:PORT' within 30s" >&2
        return 1
    fi
    broker_urls+=("http://$addr")
}

# start_config CONFIG RUN: the brokers (and NATS cluster) of one run; sets cpu_flags.
start_config() {
    local config=$1 run=$2
    cpu_flags=()
    if [[ $config == sled ]]; then
        start_broker "$config.$run.broker" || return 1
    else
        local pods=${config#nats-} urls key_dir i
        new_dir nats
        nats_dir=$NEW_DIR
        urls=$(scripts/nats-cluster start "$nats_dir" | tail -n1) || return 1
        new_dir keys
        key_dir=$NEW_DIR
        "$BROKER" keygen "$key_dir" >/dev/null || return 1
        for ((i = 1; i <= pods; i++)); do
            start_broker "$config.$run.pod-$i" --store "$urls" --key-dir "$key_dir" \
                --pod-name "pod-$i" --nats-partitions "$NATS_PARTITIONS" \
                --nats-replicas "$NATS_REPLICAS" || return 1
        done
        cpu_flags+=(--cpu "nats=$(cat "$nats_dir"/n*.pid | paste -sd, -)")
    fi
    cpu_flags+=(--cpu "brokers=$(IFS=,; echo "${broker_pids[*]}")")
}

e2e_flags=(--devices "$DEVICES" --size "$SIZE" --rate "$RATE" --duration "$DURATION"
    --warmup "$WARMUP")
[[ -n $E2E_PIPELINE ]] && e2e_flags+=(--pipeline "$E2E_PIPELINE")

echo "scale-out: e2e, $DEVICES devices, $SIZE B, rate $RATE (0: closed loop), pipeline" \
    "${E2E_PIPELINE:-default}, $DURATION after $WARMUP warm-up; configurations: $CONFIGS;" \
    "$REPEAT runs each; NATS: 3 servers, $NATS_PARTITIONS partitions, R$NATS_REPLICAS;" \
    "$(nproc) cores"

for ((run = 1; run <= REPEAT; run++)); do
    for config in $CONFIGS; do
        label="$config.$run"
        load=$(cut -d' ' -f1 /proc/loadavg)
        if ! start_config "$config" "$run"; then
            echo -e "$config\t$run\tFAILED: did not start" >>"$RESULTS"
            echo "$label: FAILED to start (logs in $LOGDIR)"
            failed=1
            stop_all
            continue
        fi
        log="$LOGDIR/$label.loadtest"
        status=0
        url_list=$(IFS=,; echo "${broker_urls[*]}")
        if [[ -n ${VERBOSE:-} ]]; then
            timeout --kill-after=10 "$RUN_TIMEOUT" "$LOADTEST" e2e "${e2e_flags[@]}" \
                "${cpu_flags[@]}" --url "$url_list" 2>&1 | tee "$log" || status=${PIPESTATUS[0]}
        else
            timeout --kill-after=10 "$RUN_TIMEOUT" "$LOADTEST" e2e "${e2e_flags[@]}" \
                "${cpu_flags[@]}" --url "$url_list" >"$log" 2>&1 || status=$?
        fi
        json=$(grep '^{"scenario"' "$log" | tail -n1 || true)
        died=""
        for pid in "${broker_pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || died="; a broker died"
        done
        if [[ $status -ne 0 || -z $json ]]; then
            [[ $status -eq 124 ]] && status="timed out after ${RUN_TIMEOUT}s"
            echo -e "$config\t$run\tFAILED ($status)$died" >>"$RESULTS"
            echo "$label: FAILED ($status)$died; last lines:"
            tail -n 5 "$log" | sed 's/^/    /'
            failed=1
        else
            echo -e "$config\t$run\t$json" >>"$RESULTS"
            # One line per run: the figures, and anything that went wrong.
            jq -r --arg run "$label" --arg load "$load" --arg died "$died" '
                def r: . * 10 | round / 10;
                "\($run): delivered/s \(.delivered_per_s)  p50 \(.deliver_latency.p50_ms | r) ms"
                + "  p99 \(.deliver_latency.p99_ms | r) ms  CPU s: "
                + ([.window_cpu_s | to_entries[] | "\(.key) \(.value | r)"] | join(", "))
                + "  (load avg \($load)"
                + (if .drained then "" else "; DRAIN TIMED OUT" end)
                + (if (.rejected | length) > 0 then "; rejected \(.rejected)" else "" end)
                + (if (.server_errors | length) > 0 then "; server errors \(.server_errors)" else "" end)
                + (if (.closed_early | length) > 0 then "; closed early \(.closed_early)" else "" end)
                + "\($died))"' <<<"$json"
            [[ -n $died ]] && failed=1
        fi
        stop_all
    done
done

echo
echo "=== summary: mean (min-max) over the runs; CPU seconds per 10,000 delivered in the window ==="
python3 - "$RESULTS" "$CONFIGS" <<'EOF'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    config, _run, rest = line.rstrip("\n").split("\t", 2)
    rows.setdefault(config, []).append(json.loads(rest) if rest.startswith("{") else None)
def mean(xs):
    return sum(xs) / len(xs)
print(f"{'config':<8} {'runs':>4} {'delivered/s':>10} {'(min-max)':>17} {'p50 ms':>7} {'p99 ms':>7}"
      f" {'brokers':>8} {'nats':>6} {'loadgen':>8}")
for config in sys.argv[2].split():
    runs = [r for r in rows.get(config, []) if r]
    failed = len(rows.get(config, [])) - len(runs)
    if not runs:
        print(f"{config:<8} no successful run ({failed} failed)")
        continue
    rate = [r["delivered_per_s"] for r in runs]
    per10k = {}
    for cls in ("brokers", "nats", "loadgen"):
        vals = []
        for r in runs:
            delivered = r["delivered_per_s"] * r["duration_s"]
            cpu = r.get("window_cpu_s", {})
            if cls in cpu and delivered > 0:
                vals.append(cpu[cls] / delivered * 10_000)
        per10k[cls] = f"{mean(vals):.2f}" if vals else "-"
    print(f"{config:<8} {len(runs):>4} {mean(rate):>10,.0f} {f'({min(rate):,.0f}-{max(rate):,.0f})':>17}"
          f" {mean([r['deliver_latency']['p50_ms'] for r in runs]):>7.1f}"
          f" {mean([r['deliver_latency']['p99_ms'] for r in runs]):>7.1f}"
          f" {per10k['brokers']:>8} {per10k['nats']:>6} {per10k['loadgen']:>8}"
          + (f"  ({failed} failed)" if failed else ""))
EOF
if [[ -n ${KEEP:-} ]]; then
    echo "logs, data dirs and NATS stores kept; logs in $LOGDIR"
fi
exit "$failed"
