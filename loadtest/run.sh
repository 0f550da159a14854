#!/usr/bin/env bash
# Runs the Sealpost load scenarios against fresh local brokers and prints the figures.
#
# Each scenario gets its own broker on 127.0.0.1 with a fresh `mktemp -d` data dir, which is
# killed and removed afterwards. Everything is bounded in time. Usage:
#
#   loadtest/run.sh                      # all scenarios
#   SCENARIOS="e2e idle" loadtest/run.sh # a subset
#   DURATION=30s RATE=5000 loadtest/run.sh
#
# Knobs (environment, with defaults):
#   SCENARIOS="appends-gc appends-nogc e2e idle"   (also: federated, fanout, blobs)
#   DURATION=10s WARMUP=1s SIZE=256
#   SENDERS=64 RECIPIENTS=100 PIPELINE=32         (appends)
#   DRAIN=1                (appends: then every recipient connects and drains its queue)
#   DEVICES=1000 RATE=0 E2E_PIPELINE=             (e2e and federated; RATE=0 is closed loop)
#   CONNECTIONS=10000 DEVICES_PER_ACCOUNT=1 HOLD=5s (idle)
#   MEMBERS=10,100,1000 MESSAGES=20 FANOUT_DEVICES=2  (fanout: group_send against 1:1 sends)
#   LARGE_MIB=200 SMALL_COUNT=100  (blobs: one large attachment, then that many 1 MiB at once;
#                          the disk's O_DIRECT write speed is measured with dd first)
#   SCENARIO_TIMEOUT=600   seconds before a scenario is killed
#   BROKER_ARGS=""         extra flags for `sealpost serve`
#   SKIP_BUILD=1           use the binaries already in target/release
#   KEEP=1                 keep data dirs and logs
#   BROKER=..., LOADTEST=...  binaries to use (default target/release/...)
#   BROKER_CPU=0 LOADTEST_CPU=1   pin the broker(s) and the load generator to these CPUs
#                          (taskset lists; unset: not pinned), as issue 11's harness does
set -euo pipefail

cd "$(dirname "$0")/.."

SCENARIOS=${SCENARIOS:-"appends-gc appends-nogc e2e idle"}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
SIZE=${SIZE:-256}
SENDERS=${SENDERS:-64}
RECIPIENTS=${RECIPIENTS:-100}
PIPELINE=${PIPELINE:-32}
DEVICES=${DEVICES:-1000}
RATE=${RATE:-0}
E2E_PIPELINE=${E2E_PIPELINE:-}
CONNECTIONS=${CONNECTIONS:-10000}
DEVICES_PER_ACCOUNT=${DEVICES_PER_ACCOUNT:-1}
HOLD=${HOLD:-5s}
MEMBERS=${MEMBERS:-10,100,1000}
MESSAGES=${MESSAGES:-20}
FANOUT_DEVICES=${FANOUT_DEVICES:-2}
LARGE_MIB=${LARGE_MIB:-200}
SMALL_COUNT=${SMALL_COUNT:-100}
SCENARIO_TIMEOUT=${SCENARIO_TIMEOUT:-600}
BROKER_ARGS=${BROKER_ARGS:-}

BROKER=${BROKER:-target/release/sealpost}
LOADTEST=${LOADTEST:-target/release/sealpost-loadtest}

# Optional CPU pinning: a broker on one core and the load generator on another measures the
# broker's cost per envelope without the two competing for a core.
BROKER_PIN=()
LOADTEST_PIN=()
[[ -n ${BROKER_CPU:-} ]] && BROKER_PIN=(taskset -c "$BROKER_CPU")
[[ -n ${LOADTEST_CPU:-} ]] && LOADTEST_PIN=(taskset -c "$LOADTEST_CPU")

# 10,000 connections need more than the usual 1024 descriptors, in the broker and here. Both
# inherit this shell's limit.
if ! ulimit -n 65536 2>/dev/null; then
    hard=$(ulimit -Hn)
    ulimit -n "$hard" || true
    echo "warning: could not raise the open-files limit to 65536; it is $(ulimit -n)" >&2
fi

if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release -p sealpost -p sealpost-loadtest
fi

LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/sealpost-loadtest-logs.XXXXXX")
SUMMARY="$LOGDIR/summary.txt"
: >"$SUMMARY"
broker_pid=""
data_dir=""
failed=0

stop_broker() {
    if [[ -n $broker_pid ]]; then
        kill -TERM "$broker_pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$broker_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
        broker_pid=""
    fi
    if [[ -n $data_dir && -z ${KEEP:-} ]]; then
        rm -rf "$data_dir"
    fi
    data_dir=""
}

cleanup() {
    stop_broker
    if [[ -z ${KEEP:-} ]]; then
        rm -rf "$LOGDIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_broker NAME [extra serve flags...]: sets broker_pid, data_dir and URL.
start_broker() {
    local name=$1
    shift
    data_dir=$(mktemp -d "${TMPDIR:-/tmp}/sealpost-loadtest-data.XXXXXX")
    local out="$LOGDIR/$name.broker.out" err="$LOGDIR/$name.broker.err"
    # shellcheck disable=SC2086 # BROKER_ARGS is a list of flags
    "${BROKER_PIN[@]}" "$BROKER" serve --listen 127.0.0.1:0 --data-dir "$data_dir" --domain localhost \
        --registration open --ip-rate 0 --device-rate 0 --max-unauthenticated-per-ip 0 "$@" $BROKER_ARGS >"$out" 2>"$err" &
    broker_pid=$!
    local addr=""
    for _ in $(seq 300); do
        addr=$(sed -n 's/^listening on \(127\.0\.0\.1:[0-9][0-9]*\)$/\1/p' "$out" | head -n1)
        [[ -n $addr ]] && break
        if ! kill -0 "$broker_pid" 2>/dev/null; then
            echo "broker exited before listening; stderr:" >&2
            tail -n 20 "$err" >&2
            broker_pid=""
            return 1
        fi
        sleep 0.1
    done
    if [[ -z $addr ]]; then
        echo "broker did not print 'listening on 127.0.0.1:PORT' within 30s" >&2
        return 1
    fi
    URL="http://$addr"
    echo "broker pid $broker_pid listening on $URL (data $data_dir)"
}

# run_scenario LABEL [BROKER_FLAGS...] -- LOADTEST_ARGS... (@BROKER_PID@ is replaced by the pid)
run_scenario() {
    local label=$1
    shift
    local broker_flags=()
    while [[ $1 != -- ]]; do
        broker_flags+=("$1")
        shift
    done
    shift
    echo
    echo "=== $label ==="
    if ! start_broker "$label" "${broker_flags[@]}"; then
        echo -e "$label\tFAILED: broker did not start" >>"$SUMMARY"
        failed=1
        stop_broker
        return
    fi
    local args=() arg
    for arg in "$@"; do
        args+=("${arg//@BROKER_PID@/$broker_pid}")
    done
    local log="$LOGDIR/$label.out" status=0
    timeout --kill-after=10 "$SCENARIO_TIMEOUT" "${LOADTEST_PIN[@]}" "$LOADTEST" "${args[@]}" --url "$URL" 2>&1 \
        | tee "$log" || status=${PIPESTATUS[0]}
    if [[ $status -eq 0 ]]; then
        local json
        json=$(grep '^{"scenario"' "$log" | tail -n1 || true)
        echo -e "$label\t${json:-no JSON line}" >>"$SUMMARY"
    else
        [[ $status -eq 124 ]] && status="timed out after ${SCENARIO_TIMEOUT}s"
        echo -e "$label\tFAILED ($status)" >>"$SUMMARY"
        echo "broker stderr (last lines):"
        tail -n 20 "$LOGDIR/$label.broker.err" || true
        failed=1
    fi
    if ! kill -0 "$broker_pid" 2>/dev/null; then
        echo "warning: the broker died during $label" >&2
        echo -e "$label\tWARNING: broker died during the run" >>"$SUMMARY"
        failed=1
    fi
    stop_broker
}

# run_federated: two brokers, a.example on 127.0.0.1 and b.example on 127.0.0.2, each pinning
# the other's key; half the devices on each, every send crosses the link.
run_federated() {
    local label=federated
    echo
    echo "=== $label ==="
    local dir_a dir_b key_a key_b port_a port_b pid_a pid_b
    dir_a=$(mktemp -d "${TMPDIR:-/tmp}/sealpost-loadtest-data.XXXXXX")
    dir_b=$(mktemp -d "${TMPDIR:-/tmp}/sealpost-loadtest-data.XXXXXX")
    key_a=$("$BROKER" federation-key --data-dir "$dir_a")
    key_b=$("$BROKER" federation-key --data-dir "$dir_b")
    port_a=$(free_port 127.0.0.1)
    port_b=$(free_port 127.0.0.2)
    local peers_a="b.example=ws://127.0.0.2:$port_b/v1/federation#$key_b"
    local peers_b="a.example=ws://127.0.0.1:$port_a/v1/federation#$key_a"
    local common=(--registration open --ip-rate 0 --device-rate 0 --max-unauthenticated-per-ip 0 --federation-origin-rate 0)
    # shellcheck disable=SC2086 # BROKER_ARGS is a list of flags
    "${BROKER_PIN[@]}" "$BROKER" serve --listen "127.0.0.1:$port_a" --data-dir "$dir_a" --domain a.example \
        --federation-peers "$peers_a" "${common[@]}" $BROKER_ARGS \
        >"$LOGDIR/$label.a.out" 2>"$LOGDIR/$label.a.err" &
    pid_a=$!
    # shellcheck disable=SC2086
    "${BROKER_PIN[@]}" "$BROKER" serve --listen "127.0.0.2:$port_b" --data-dir "$dir_b" --domain b.example \
        --federation-peers "$peers_b" "${common[@]}" $BROKER_ARGS \
        >"$LOGDIR/$label.b.out" 2>"$LOGDIR/$label.b.err" &
    pid_b=$!
    for _ in $(seq 300); do
        grep -q '^listening on' "$LOGDIR/$label.a.out" 2>/dev/null \
            && grep -q '^listening on' "$LOGDIR/$label.b.out" 2>/dev/null && break
        sleep 0.1
    done
    local log="$LOGDIR/$label.out" status=0
    timeout --kill-after=10 "$SCENARIO_TIMEOUT" "${LOADTEST_PIN[@]}" "$LOADTEST" federated "${e2e_flags[@]}" \
        --url "http://127.0.0.1:$port_a" --domain a.example \
        --peer-url "http://127.0.0.2:$port_b" --peer-domain b.example 2>&1 \
        | tee "$log" || status=${PIPESTATUS[0]}
    if [[ $status -eq 0 ]]; then
        local json
        json=$(grep '^{"scenario"' "$log" | tail -n1 || true)
        echo -e "$label\t${json:-no JSON line}" >>"$SUMMARY"
    else
        echo -e "$label\tFAILED ($status)" >>"$SUMMARY"
        tail -n 20 "$LOGDIR/$label.a.err" "$LOGDIR/$label.b.err" || true
        failed=1
    fi
    for pid in "$pid_a" "$pid_b"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    wait "$pid_a" "$pid_b" 2>/dev/null || true
    if [[ -z ${KEEP:-} ]]; then
        rm -rf "$dir_a" "$dir_b"
    fi
}

free_port() {
    python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1])' "$1"
}

e2e_flags=(--devices "$DEVICES" --size "$SIZE" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP")
[[ -n $E2E_PIPELINE ]] && e2e_flags+=(--pipeline "$E2E_PIPELINE")
appends_flags=(--senders "$SENDERS" --recipients "$RECIPIENTS" --pipeline "$PIPELINE"
    --size "$SIZE" --duration "$DURATION" --warmup "$WARMUP")
[[ -n ${DRAIN:-} ]] && appends_flags+=(--drain)

for scenario in $SCENARIOS; do
    case $scenario in
        appends-gc)
            run_scenario appends-gc -- appends "${appends_flags[@]}" ;;
        appends-nogc)
            run_scenario appends-nogc --group-commit false -- appends "${appends_flags[@]}" ;;
        e2e)
            run_scenario e2e -- e2e "${e2e_flags[@]}" ;;
        federated)
            run_federated ;;
        idle)
            run_scenario idle -- idle --connections "$CONNECTIONS" \
                --devices-per-account "$DEVICES_PER_ACCOUNT" --hold "$HOLD" \
                --broker-pid @BROKER_PID@ ;;
        fanout)
            run_scenario fanout -- fanout --members "$MEMBERS" --messages "$MESSAGES" \
                --devices-per-account "$FANOUT_DEVICES" --broker-pid @BROKER_PID@ ;;
        blobs)
            # The disk's own speed, in the same run and on the same file system as the data
            # directories: 200 MiB of random bytes (made first, so that /dev/urandom is not
            # what is timed) copied with O_DIRECT and synced; only the write is timed.
            probe=$(mktemp -d "${TMPDIR:-/tmp}/sealpost-loadtest-data.XXXXXX")
            echo
            echo "=== disk (dd, same file system) ==="
            dd if=/dev/urandom of="$probe/random" bs=4M count=50 status=none
            dd if="$probe/random" of="$probe/dd" bs=4M oflag=direct conv=fsync 2>&1 | tail -n1 \
                | tee "$LOGDIR/dd.write"
            echo -e "disk-write\t$(cat "$LOGDIR/dd.write")" >>"$SUMMARY"
            rm -rf "$probe"
            run_scenario blobs --blob-rate-per-min 0 --blob-max-mb 1024 --blob-quota-mb 8192 -- \
                blobs --large-mib "$LARGE_MIB" --small-count "$SMALL_COUNT" ;;
        *)
            echo "unknown scenario $scenario (known: appends-gc appends-nogc e2e federated idle fanout blobs)" >&2
            failed=1
            ;;
    esac
done

echo
echo "=== summary ==="
cat "$SUMMARY"
if [[ -n ${KEEP:-} ]]; then
    echo "logs kept in $LOGDIR"
fi
exit "$failed"
