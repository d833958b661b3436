#!/usr/bin/env bash
# One-GPU checks of the cost model on dummy llama-3.1-8b (docs/benchmarks.md, "One H100:
# prediction errors after the TPOT change, and `pdserve tune` against measured goodput"):
#
#   err:   the slo scheduler's TTFT/TPOT prediction errors at steady load. One colocated
#          replica (--max-batch-tokens 8192 --max-num-seqs 256, deploy/slo-classes.yaml), one
#          `pdserve bench` per rate in RATES_ERR (512 in / 128 out, class mix 30/70), /metrics
#          scraped before and after each (the per-rate deltas of
#          pdserve:{ttft,tpot}_prediction_relative_error are the per-rate errors).
#   coloc: goodput of the deployment `pdserve tune --gpus 1` picks (colocated x1, its
#          default caps 64 seqs / 2048 tokens, KV blocks BLOCKS) under TTFT 1000 / TPOT 40 ms,
#          one bench per rate: workload b (512 / 512) at RATES_B, a (4096 / 256) at RATES_A.
#
#   source .device/setup.sh && source deploy/source-tree.sh && \
#     PACK_DIR=$OUT STAGES="err coloc" WORKLOADS="b" deploy/gpu-slo-check.sh
#
# Each stage writes its logs, /metrics scrapes and bench JSONs under OUT_DIR/<stage> and packs
# them into PACK_DIR/<stage>.tar.gz after every bench (a command cut off at its limit keeps
# what it ran), with OUT_DIR/summary.txt beside. DEADLINE_S: a bench that would not end within
# this many seconds of the script's start is skipped and listed as SKIPPED in the summary.
# MODEL_ARGS replaces the model flags and BENCH_EXTRA adds bench flags, e.g. a CPU check of
# the machinery: MODEL_ARGS="--device cpu --load-format dummy --preset tiny" BENCH_EXTRA=
# "--smoke --min-requests 20 --min-duration-s 5" RATES_ERR=2 RATES_B=2 WORKLOADS=b.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
DEADLINE_S=${DEADLINE_S:-540}
OUT_DIR=${OUT_DIR:-/tmp/gpu-slo-check}
PACK_DIR=${PACK_DIR:-out/gpu-slo-check}
STAGES=${STAGES:-err coloc}
WORKLOADS=${WORKLOADS:-b a}
RATES_ERR=${RATES_ERR:-20 30}
RATES_B=${RATES_B:-10.2 12.7 15.2}
RATES_A=${RATES_A:-5.2 6.47 7.8}
BLOCKS=${BLOCKS:-24372}
PROFILE=${PROFILE:-router/profiles/nvidia-h100-80gb-hbm3-llama-3.1-8b.json}
PORT=${PORT:-50051}
MPORT=${MPORT:-9400}
CLIENT_PROCS=${CLIENT_PROCS:-4}
read -r -a MODEL <<< "${MODEL_ARGS:---device cuda --load-format dummy --preset llama-3.1-8b}"
read -r -a EXTRA <<< "${BENCH_EXTRA:-}"
GPU=; command -v nvidia-smi > /dev/null && GPU=1
PDSERVE=("${PY:-python3}" -P -m pdserve.cluster.cli)
mkdir -p "$OUT_DIR" "$PACK_DIR"
SUMMARY=$OUT_DIR/summary.txt
SERVER_PID=

log() { echo "[$(( SECONDS - T0 ))s] $*" | tee -a "$SUMMARY"; }
fits() { [ $(( SECONDS - T0 + $1 )) -lt "$DEADLINE_S" ]; }
scrape() {  # file
  python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen(
'http://127.0.0.1:$MPORT/metrics', timeout=10).read().decode())" > "$1" 2>/dev/null \
    || log "scrape $1 failed"
}
pack() {  # stage
  tar -C "$OUT_DIR" -czf "$PACK_DIR/$1.tar.gz" "$1" summary.txt 2>/dev/null || true
  cp "$SUMMARY" "$PACK_DIR/summary.txt"
}

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -INT "$SERVER_PID" 2>/dev/null
  for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
  kill -0 "$SERVER_PID" 2>/dev/null && { log "server $SERVER_PID still up: TERM"; kill -TERM "$SERVER_PID"; sleep 5; }
  wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=
  # the workers' processes (Ray actors) must have let go of the GPU before the next server
  [ -n "$GPU" ] || return 0
  for _ in $(seq 30); do
    [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ] && break; sleep 1
  done
  local left; left=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | tr -d ' ')
  if [ -n "$left" ]; then
    log "GPU still held by pids $left after the server stopped: killing them"
    for p in $left; do kill -9 "$p" 2>/dev/null; done; sleep 3
  fi
}
trap 'stop_server' EXIT

start_server() {  # stage, serve flags...
  local stage=$1; shift
  "${PDSERVE[@]}" serve --port "$PORT" --metrics-port "$MPORT" "$@" "${MODEL[@]}" \
    > "$OUT_DIR/$stage/serve.log" 2>&1 &
  SERVER_PID=$!
  log "$stage: serve pid $SERVER_PID: serve $* ${MODEL[*]}"
}

warmup() {  # stage, input len: an unrecorded burst of 8 (also waits for SERVING)
  local stage=$1 in=$2 t=$SECONDS
  for _ in $(seq 15); do
    kill -0 "$SERVER_PID" 2>/dev/null || { log "$stage: server died"; tail -30 "$OUT_DIR/$stage/serve.log"; return 1; }
    if timeout 120 "${PDSERVE[@]}" bench --server "127.0.0.1:$PORT" --ready-timeout 25 \
        --dataset random --input-len "$in" --output-len 8 --request-rate inf --smoke \
        --min-requests 8 --no-progress --result-json "$OUT_DIR/$stage/warmup-$in.json" \
        >> "$OUT_DIR/$stage/warmup-$in.txt" 2>&1; then
      log "$stage: warm-up burst of 8 x $in tokens done ($(( SECONDS - t )) s incl. server start)"
      [ -z "$GPU" ] || nvidia-smi --query-gpu=memory.used,memory.total --format=csv >> "$OUT_DIR/$stage/gpu-mem.txt"
      return 0
    fi
  done
  log "$stage: server not ready"; return 1
}

bench() {  # stage, name, rate, need_s, bench flags...
  local stage=$1 name=$2 rate=$3 need=$4; shift 4
  if ! fits "$need"; then log "SKIPPED $stage $name at $rate req/s (needs ~${need} s)"; return 0; fi
  scrape "$OUT_DIR/$stage/metrics-$name-before.txt"
  local t=$SECONDS
  timeout $(( DEADLINE_S - (SECONDS - T0) + 30 )) "${PDSERVE[@]}" bench --server "127.0.0.1:$PORT" \
    --ready-timeout 60 --dataset random --request-rate "$rate" --client-processes "$CLIENT_PROCS" \
    --no-progress --label "$name" --result-json "$OUT_DIR/$stage/$name.json" "$@" ${EXTRA[@]+"${EXTRA[@]}"} \
    > "$OUT_DIR/$stage/$name.txt" 2>&1
  local rc=$?
  scrape "$OUT_DIR/$stage/metrics-$name-after.txt"
  log "$stage: bench $name at $rate req/s rc=$rc in $(( SECONDS - t )) s"
  pack "$stage"
}

for stage in $STAGES; do
  mkdir -p "$OUT_DIR/$stage"
  case $stage in
  err)
    start_server err --mode colocated --num-decode 1 --scheduler slo \
      --slo-classes deploy/slo-classes.yaml --max-batch-tokens 8192 --max-num-seqs 256
    if warmup err 512; then
      for r in $RATES_ERR; do
        bench err "err-$r" "$r" 85 --input-len 512 --output-len 128 \
          --class-mix interactive=0.3,standard=0.7 --timeout 20
      done
    fi
    stop_server; pack err ;;
  coloc)
    start_server coloc --mode colocated --prefill-blocks "$BLOCKS" --decode-blocks "$BLOCKS" \
      --profile "$PROFILE"
    for w in $WORKLOADS; do
      if [ "$w" = b ]; then in=512 out=512 rates=$RATES_B tmo=30; else in=4096 out=256 rates=$RATES_A tmo=20; fi
      warmup coloc "$in" || break
      for r in $rates; do
        win=$(python3 -c "print(int(max(60, 500 / $r)))")
        bench coloc "$w-$r" "$r" $(( win + tmo + 10 )) --input-len "$in" --output-len "$out" \
          --slo-ttft-ms 1000 --slo-tpot-ms 40 --timeout "$tmo"
      done
    done
    stop_server; pack coloc ;;
  esac
done
log "done in $(( SECONDS - T0 )) s"
cp "$SUMMARY" "$PACK_DIR/summary.txt"
