#!/usr/bin/env bash
# The headline comparison (issue 4): disaggregated (1 prefill + 1 decode worker) against
# colocated (2 replicas) on the same two GPUs, same workloads, one run. Goodput as
# DistServe defines it: the highest rate at which >= 90% of requests meet TTFT and TPOT.
#
#   deploy/headline.sh                       # nvidia-h200-x2, dummy llama-3.1-8b (defaults)
#   MODEL_ARGS="--device cpu" RATES_A=1,2 RATES_B=1,2 N=4 IN_A=32 OUT_A=8 IN_B=16 OUT_B=8 \
#     deploy/headline.sh                     # a smoke run of the same machinery on a CPU
#
# Writes OUT_DIR/{disagg,coloc}-{a,b}.json and the plots OUT_DIR/{a,b}/*.png.
set -euo pipefail
cd "$(dirname "$0")/.."
PDSERVE=${PDSERVE:-.venv/bin/pdserve}
[ -x "$PDSERVE" ] || PDSERVE="python3 -m cluster.cli"
MODEL_ARGS=${MODEL_ARGS:---device cuda --load-format dummy --preset llama-3.1-8b \
  --max-batch-tokens 8192 --max-num-seqs 256}
OUT_DIR=${OUT_DIR:-out/headline}
N=${N:-200}
IN_A=${IN_A:-4096}; OUT_A=${OUT_A:-256}; RATES_A=${RATES_A:-0.5,1,2,3,4,6}
IN_B=${IN_B:-512}; OUT_B=${OUT_B:-512}; RATES_B=${RATES_B:-2,4,8,12,16,24}
SLO=(--slo-ttft-ms "${SLO_TTFT_MS:-1000}" --slo-tpot-ms "${SLO_TPOT_MS:-40}")
PORT=${PORT:-50051}
mkdir -p "$OUT_DIR"

run_config() {  # label, serve flags...
  local label=$1; shift
  # shellcheck disable=SC2086
  $PDSERVE serve --port "$PORT" --metrics-port 0 "$@" $MODEL_ARGS &
  local pid=$!
  for w in a b; do
    local in=IN_${w^^} out=OUT_${w^^} rates=RATES_${w^^}
    $PDSERVE bench --server "127.0.0.1:$PORT" --ready-timeout 900 --label "$label" \
      --dataset random --input-len "${!in}" --output-len "${!out}" --num-prompts "$N" \
      --request-rate "${!rates}" "${SLO[@]}" --no-progress \
      --result-json "$OUT_DIR/$label-$w.json"
  done
  kill -INT "$pid"
  wait "$pid" || true
}

run_config disagg --mode disaggregated --num-prefill 1 --num-decode 1
run_config coloc --mode colocated --num-decode 2
for w in a b; do
  $PDSERVE bench plot "$OUT_DIR/disagg-$w.json" "$OUT_DIR/coloc-$w.json" --out "$OUT_DIR/$w"
done
python3 - "$OUT_DIR" <<'PY'
import json, sys
out = sys.argv[1]
for w in ("a", "b"):
    g = {}
    for label in ("disagg", "coloc"):
        res = json.load(open(f"{out}/{label}-{w}.json"))
        g[label] = res.get("goodput", {}).get("rate")
    ratio = (g["disagg"] / g["coloc"]) if g["disagg"] and g["coloc"] else None
    print(f"workload {w}: goodput disagg {g['disagg']} req/s, coloc {g['coloc']} req/s, "
          f"ratio {ratio}")
PY
