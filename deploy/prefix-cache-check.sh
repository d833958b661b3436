#!/usr/bin/env bash
# Prefix caching on and off against the same multi-turn chat workload (docs/benchmarks.md,
# "Prefix caching on a multi-turn chat workload"): two deployments one after the other, the
# same flags but --enable-prefix-caching / --no-enable-prefix-caching, one
# `pdserve bench --dataset multiturn` sweep each (the same seed: the same prompts), then a
# table of TTFT p50/p90, goodput per rate and the prefix cache hit rate from /metrics, and
# `pdserve bench compare`.
#
# One GPU (the defaults: dummy llama-3.1-8b, one colocated replica, steady-state windows;
# each mode takes about 6-7 minutes on one H100, so under a 10-minute command limit run one
# mode a call, the same OUT_DIR, and the table comes with the second):
#   source .device/setup.sh && source deploy/source-tree.sh && MODES=on PACK_DIR=$OUT deploy/prefix-cache-check.sh
#   source .device/setup.sh && source deploy/source-tree.sh && MODES=off PACK_DIR=$OUT deploy/prefix-cache-check.sh
# The CPU demo (the figures in docs/benchmarks.md):
#   SERVE_ARGS="--config deploy/serve-cpu.yaml" MODEL_ARGS= RATES=1,2 \
#     WORKLOAD="--system-prompt-len 512 --input-len 32 --output-len 16 --turns 4 --users 8" \
#     SLO="--slo-ttft-ms 1500 --slo-tpot-ms 150" BENCH_EXTRA="--smoke --min-duration-s 40 --min-requests 60" \
#     deploy/prefix-cache-check.sh
#
# Logs, bench JSONs and /metrics scrapes go to OUT_DIR/{on,off}, packed into
# PACK_DIR/prefix-cache.tar.gz after each bench; OUT_DIR/summary.txt holds the table.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
OUT_DIR=${OUT_DIR:-/tmp/prefix-cache-check}
PACK_DIR=${PACK_DIR:-out/prefix-cache-check}
PORT=${PORT:-50051}
MPORT=${MPORT:-9400}
RATES=${RATES:-4,8,12}
MODES=${MODES:-on off}  # on: --enable-prefix-caching; off: --no-enable-prefix-caching
read -r -a SERVE <<< "${SERVE_ARGS:---mode colocated --num-decode 1 --max-batch-tokens 8192 --max-num-seqs 256}"
read -r -a MODEL <<< "${MODEL_ARGS---device cuda --load-format dummy --preset llama-3.1-8b}"
read -r -a WL <<< "${WORKLOAD:---system-prompt-len 2048 --input-len 128 --output-len 128 --turns 4 --users 32}"
read -r -a SLOS <<< "${SLO:---slo-ttft-ms 1000 --slo-tpot-ms 50}"
read -r -a EXTRA <<< "${BENCH_EXTRA:---client-processes 4 --timeout 30}"
PDSERVE=("${PY:-python3}" -P -m pdserve.cluster.cli)
GPU=; command -v nvidia-smi > /dev/null && GPU=1
mkdir -p "$OUT_DIR/on" "$OUT_DIR/off" "$PACK_DIR"
SUMMARY=$OUT_DIR/summary.txt
SERVER_PID=

log() { echo "[$(( SECONDS - T0 ))s] $*" | tee -a "$SUMMARY"; }
scrape() {  # file
  python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen(
'http://127.0.0.1:$MPORT/metrics', timeout=10).read().decode())" > "$1" 2>/dev/null \
    || log "scrape $1 failed"
}
pack() { tar -C "$OUT_DIR" -czf "$PACK_DIR/prefix-cache.tar.gz" on off summary.txt 2>/dev/null || true; }

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -INT "$SERVER_PID" 2>/dev/null
  for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
  kill -0 "$SERVER_PID" 2>/dev/null && { log "server $SERVER_PID still up: TERM"; kill -TERM "$SERVER_PID"; sleep 5; }
  wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=
  [ -n "$GPU" ] || return 0
  for _ in $(seq 30); do  # the workers must have let go of the GPU before the next server
    [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ] && break; sleep 1
  done
}
trap 'stop_server' EXIT

for mode in $MODES; do
  flag=--enable-prefix-caching; [ "$mode" = off ] && flag=--no-enable-prefix-caching
  "${PDSERVE[@]}" serve --port "$PORT" --metrics-port "$MPORT" "${SERVE[@]}" ${MODEL[@]+"${MODEL[@]}"} "$flag" \
    > "$OUT_DIR/$mode/serve.log" 2>&1 &
  SERVER_PID=$!
  log "$mode: serve pid $SERVER_PID: serve ${SERVE[*]} ${MODEL[*]-} $flag"
  # An unrecorded warm-up burst (it also waits for the server), on other prompts (seed 99).
  "${PDSERVE[@]}" bench --server "127.0.0.1:$PORT" --ready-timeout 300 --dataset random \
    --input-len 64 --output-len 8 --request-rate inf --smoke --min-requests 8 --seed 99 \
    --no-progress > "$OUT_DIR/$mode/warmup.txt" 2>&1 || { log "$mode: warm-up failed"; tail -30 "$OUT_DIR/$mode/serve.log"; exit 1; }
  scrape "$OUT_DIR/$mode/metrics-before.txt"
  t=$SECONDS
  "${PDSERVE[@]}" bench --server "127.0.0.1:$PORT" --ready-timeout 60 --dataset multiturn \
    "${WL[@]}" --request-rate "$RATES" "${SLOS[@]}" --no-progress --label "caching-$mode" \
    --result-json "$OUT_DIR/$mode/bench.json" ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT_DIR/$mode/bench.txt" 2>&1
  log "$mode: bench rc=$? in $(( SECONDS - t )) s"
  scrape "$OUT_DIR/$mode/metrics-after.txt"
  stop_server
  pack
done

python3 - "$OUT_DIR" >> "$SUMMARY" <<'EOF'
import json, os, sys
out = sys.argv[1]

def counter(path, name):
    total = 0.0
    for line in open(path):
        if line.startswith(name):
            total += float(line.split()[-1])
    return total

print("| caching | rate req/s | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | goodput req/s | attainment | prefix hit rate |")
print("|---|---|---|---|---|---|---|---|")
for mode in ("on", "off"):
    if not os.path.exists(f"{out}/{mode}/bench.json"):
        print(f"| {mode} | not run | | | | | | |")
        continue
    d = json.load(open(f"{out}/{mode}/bench.json"))
    q = counter(f"{out}/{mode}/metrics-after.txt", "pdserve:prefix_cache_queries_total") - \
        counter(f"{out}/{mode}/metrics-before.txt", "pdserve:prefix_cache_queries_total")
    h = counter(f"{out}/{mode}/metrics-after.txt", "pdserve:prefix_cache_hits_total") - \
        counter(f"{out}/{mode}/metrics-before.txt", "pdserve:prefix_cache_hits_total")
    for run in d["runs"]:
        r = run["report"]
        print(f"| {mode} | {r['request_rate']:g} | {r['ttft']['p50_ms']:.0f} | {r['ttft']['p90_ms']:.0f} "
              f"| {r['tpot']['p50_ms']:.1f} | {r['slo_goodput_throughput']:.2f} | {r['attainment']:.1%} "
              f"| {h / q if q else 0:.1%} (sweep) |")
    g = d["goodput"]
    print(f"| {mode} | goodput (DistServe, {g['target']:.0%}) | {g['rate']} req/s {g['note']} | | | | | |")
EOF
[ -f "$OUT_DIR/on/bench.json" ] && [ -f "$OUT_DIR/off/bench.json" ] && \
  "${PDSERVE[@]}" bench compare "$OUT_DIR/on/bench.json" "$OUT_DIR/off/bench.json" >> "$SUMMARY" 2>&1
cat "$SUMMARY"
pack
