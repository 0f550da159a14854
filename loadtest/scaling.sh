#!/usr/bin/env bash
# How cost grows with the work on one node (issue 11, "Scaling with the work"): W1 at several
# numbers of connected devices, and W1 on fresh accounts beside several stored backlogs (with
# the start-up time), the broker pinned to BROKER_CPU and the load generator to LOADTEST_CPU.
# Appends one CSV row per run to OUT (delete it first for a fresh set: the plot draws every row)
# and then draws OUT as an SVG (`sealpost-loadtest plot`):
#
#   BROKER_CPU=0 LOADTEST_CPU=1 loadtest/scaling.sh
#   PARTS=devices DEVICES_LIST="1000 10000" RUNS=3 loadtest/scaling.sh
#   PARTS=plot loadtest/scaling.sh          # only redraw OUT
#
# Knobs (environment, with defaults):
#   PARTS="devices backlog plot"
#   DEVICES_LIST="1000 10000 19000" RUNS=2  (devices: `SCENARIOS=e2e loadtest/run.sh` per run)
#   PREFILL="0 1000000 10000000" BACKLOG_RUNS=1  (backlog: `loadtest/backlog.sh` in PREFILL mode)
#   DURATION=8s  BACKLOG_DEVICES=1000
#   OUT=loadtest/scaling.csv SVG=loadtest/scaling.svg
#   SKIP_BUILD, BROKER, LOADTEST, BROKER_CPU=0, LOADTEST_CPU=1 as in run.sh
#
# Each process may open at most `ulimit -Hn` descriptors, and the broker and the load generator
# each need one per connected device plus some: with a hard limit of 20,000 the largest W1 is
# about 19,000 devices.
set -euo pipefail
cd "$(dirname "$0")/.."

PARTS=${PARTS:-"devices backlog plot"}
DEVICES_LIST=${DEVICES_LIST:-"1000 10000 19000"}
RUNS=${RUNS:-2}
PREFILL=${PREFILL:-"0 1000000 10000000"}
BACKLOG_RUNS=${BACKLOG_RUNS:-1}
DURATION=${DURATION:-8s}
BACKLOG_DEVICES=${BACKLOG_DEVICES:-1000}
OUT=${OUT:-loadtest/scaling.csv}
SVG=${SVG:-loadtest/scaling.svg}
export BROKER_CPU=${BROKER_CPU:-0}
export LOADTEST_CPU=${LOADTEST_CPU:-1}
LOADTEST=${LOADTEST:-target/release/sealpost-loadtest}

if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release -p sealpost -p sealpost-loadtest
    if [[ $PARTS == *backlog* ]]; then
        cargo bench --bench store --no-run
    fi
fi
export SKIP_BUILD=1

[[ -s $OUT ]] || echo "series,x,delivered_per_s,p99_ms,startup_ms" >"$OUT"
echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) DURATION=$DURATION BROKER_CPU=$BROKER_CPU LOADTEST_CPU=$LOADTEST_CPU" >>"$OUT"

field() { # field JSON-LINE KEY...: a number from the loadtest's JSON line
    python3 -c 'import json,sys; j=json.loads(sys.argv[1]);
for k in sys.argv[2:]: j=j[k]
print(j)' "$@"
}

if [[ $PARTS == *devices* ]]; then
    for devices in $DEVICES_LIST; do
        for run in $(seq "$RUNS"); do
            log=$(mktemp)
            SCENARIOS=e2e DEVICES=$devices DURATION=$DURATION loadtest/run.sh >"$log" 2>&1 || {
                echo "W1 with $devices devices, run $run failed:" >&2
                tail -n 20 "$log" >&2
                rm -f "$log"
                continue
            }
            json=$(grep '^{"scenario"' "$log" | tail -n1)
            rm -f "$log"
            rate=$(field "$json" delivered_per_s)
            p99=$(field "$json" deliver_latency p99_ms)
            printf 'devices,%s,%.0f,%s,\n' "$devices" "$rate" "$p99" | tee -a "$OUT"
        done
    done
fi

if [[ $PARTS == *backlog* ]]; then
    for run in $(seq "$BACKLOG_RUNS"); do
        PREFILL=$PREFILL DEVICES=$BACKLOG_DEVICES DURATION=$DURATION loadtest/backlog.sh \
            | tee /dev/stderr | tail -n +2 \
            | while IFS=$'\t' read -r _fill backlog rate p99 startup after after_p99; do
                printf 'backlog,%s,%s,%s,\n' "$backlog" "$rate" "$p99"
                printf 'backlog_restart,%s,%s,%s,%s\n' "$backlog" "$after" "$after_p99" "$startup"
            done >>"$OUT"
    done
fi

if [[ $PARTS == *plot* ]]; then
    "$LOADTEST" plot --input "$OUT" --output "$SVG"
    echo "drew $SVG from $OUT"
fi
