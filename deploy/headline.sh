#!/usr/bin/env bash
# The headline comparison (issue 4): disaggregated (1 prefill + 1 decode worker) against
# colocated (2 replicas) on the same two GPUs, same workloads, one run. Goodput as
# DistServe defines it: the highest rate at which >= 90% of requests meet TTFT and TPOT,
# and that the deployment sustains (steady state, see `pdserve bench --help`).
# Each rate runs to steady state: arrivals over at least max(MIN_DUR, DUR_FACTOR x the
# median E2E of the previous steady rate) seconds and at least MIN_REQ requests; the first
# WARMUP_FRAC of each rate's arrivals is not counted. Each sweep runs its rates in ascending
# order and stops after the first rate below 90% attainment or not steady (its queue grew;
# the rates above it are skipped, and listed in the JSON), so a sweep that reaches past
# saturation costs little device time beyond the knee. SMOKE=1 allows windows below the
# steady-state floors (the JSON and the summary then say: not steady state).
#
#   deploy/headline.sh                       # nvidia-h200-x2, dummy llama-3.1-8b (defaults)
#   MODEL_ARGS="--device cpu" SMOKE=1 MIN_REQ=4 MIN_DUR=1 RATES_A=1,2 RATES_B=1,2 \
#     IN_A=32 OUT_A=8 IN_B=16 OUT_B=8 deploy/headline.sh   # a smoke run of the machinery on a CPU
#
# Writes OUT_DIR/{disagg,coloc}-{a,b}.json, the plots OUT_DIR/{a,b}/*.png, and the goodput
# table OUT_DIR/summary.md (also printed). CONFIGS=disagg or CONFIGS=coloc runs one
# configuration (e.g. one per device call); the plots and table follow once both JSONs exist.
# DISAGG_FLAGS adds serve flags to the disaggregated configuration only, e.g. conditional
# disaggregation (give it its own OUT_DIR, with a copy of coloc-*.json for the table, or it
# replaces the plain disagg-*.json):
#
#   DISAGG_FLAGS="--prefill-queue-max-tokens 8192" CONFIGS=disagg WORKLOADS=a \
#     OUT_DIR=out/headline-cond deploy/headline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PDSERVE=${PDSERVE:-.venv/bin/pdserve}
[ -x "$PDSERVE" ] || PDSERVE="python3 -P -m pdserve.cluster.cli"
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
MODEL_ARGS=${MODEL_ARGS:---device cuda --load-format dummy --preset llama-3.1-8b \
  --max-batch-tokens 8192 --max-num-seqs 256}
OUT_DIR=${OUT_DIR:-out/headline}
MIN_DUR=${MIN_DUR:-60}  # least seconds of arrivals per rate
DUR_FACTOR=${DUR_FACTOR:-10}  # ... and at least this many median E2Es of the last steady rate
MIN_REQ=${MIN_REQ:-500}  # least requests per rate
WARMUP_FRAC=${WARMUP_FRAC:-0.2}  # share of each rate's arrivals not counted
SMOKE=${SMOKE:-}  # 1: windows below the steady-state floors allowed (not steady state)
SMOKE_FLAG=()
if [ -n "$SMOKE" ]; then SMOKE_FLAG=(--smoke); fi
# ascending, reaching well past saturation of 8B llama on one H200 per worker
IN_A=${IN_A:-4096}; OUT_A=${OUT_A:-256}; RATES_A=${RATES_A:-1,2,3,4,5,6,8}
IN_B=${IN_B:-512}; OUT_B=${OUT_B:-512}; RATES_B=${RATES_B:-2,4,6,8,12,16,24,32}
SLO=(--slo-ttft-ms "${SLO_TTFT_MS:-1000}" --slo-tpot-ms "${SLO_TPOT_MS:-40}")
PORT=${PORT:-50051}
WORKLOADS=${WORKLOADS:-a b}  # e.g. WORKLOADS=a to extend one workload's sweep
WARMUP_N=${WARMUP_N:-8}  # requests of an unrecorded burst before each workload (0: none)
DISAGG_FLAGS=${DISAGG_FLAGS:-}  # extra serve flags of the disaggregated configuration
# client processes of each sweep: one sufficed at 9,500 streamed tokens/s on one H200, and
# two H200s stream about twice that on (b) (docs/benchmarks.md)
CLIENT_PROCS=${CLIENT_PROCS:-4}
# gRPC frontend processes of both configurations: one streams on the order of 20,000 tokens
# a second, about what two H200s produce on (b) (docs/benchmarks.md, cluster.bench.router).
FRONTENDS=${FRONTENDS:-2}
mkdir -p "$OUT_DIR"
SERVER_PID=
# a failed bench (set -e) must not leave the server and its Ray cluster running
trap 'if [ -n "$SERVER_PID" ]; then kill -INT "$SERVER_PID" 2>/dev/null || true; fi' EXIT

run_config() {  # label, serve flags...
  local label=$1; shift
  # shellcheck disable=SC2086
  $PDSERVE serve --port "$PORT" --metrics-port 0 --frontends "$FRONTENDS" "$@" $MODEL_ARGS &
  local pid=$!
  SERVER_PID=$pid
  for w in $WORKLOADS; do
    local in=IN_${w^^} out=OUT_${w^^} rates=RATES_${w^^}
    # Unrecorded warm-up burst of the workload's shapes (as vLLM's benchmark sends a test
    # prompt first): first-seen batch shapes are kept out of the sweep. Logged separately.
    if [ "$WARMUP_N" -gt 0 ]; then
      $PDSERVE bench --server "127.0.0.1:$PORT" --ready-timeout 900 --label "$label-warmup" \
        --dataset random --input-len "${!in}" --output-len 8 --request-rate inf \
        --smoke --min-requests "$WARMUP_N" --no-progress --result-json "$OUT_DIR/warmup-$label-$w.json" \
        > "$OUT_DIR/warmup-$label-$w.txt"
    fi
    $PDSERVE bench --server "127.0.0.1:$PORT" --ready-timeout 900 --label "$label" \
      --dataset random --input-len "${!in}" --output-len "${!out}" \
      --request-rate "${!rates}" "${SLO[@]}" --stop-below-attainment 0.9 \
      --min-duration-s "$MIN_DUR" --duration-factor "$DUR_FACTOR" --min-requests "$MIN_REQ" \
      --warmup-fraction "$WARMUP_FRAC" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"} \
      --client-processes "$CLIENT_PROCS" --no-progress --result-json "$OUT_DIR/$label-$w.json"
  done
  kill -INT "$pid"
  wait "$pid" || true
  SERVER_PID=
}

CONFIGS=${CONFIGS:-disagg,coloc}  # e.g. CONFIGS=disagg, then CONFIGS=coloc in a later call
# DISAGG_FLAGS is a list of flags: split on spaces, as MODEL_ARGS is
# shellcheck disable=SC2086
[[ ",$CONFIGS," == *,disagg,* ]] && run_config disagg --mode disaggregated --num-prefill 1 \
  --num-decode 1 $DISAGG_FLAGS
[[ ",$CONFIGS," == *,coloc,* ]] && run_config coloc --mode colocated --num-decode 2
for f in disagg-a disagg-b coloc-a coloc-b; do
  if [ ! -f "$OUT_DIR/$f.json" ]; then
    echo "$OUT_DIR/$f.json missing: plots and summary once both configurations ran"
    exit 0
  fi
done
for w in a b; do
  $PDSERVE bench plot "$OUT_DIR/disagg-$w.json" "$OUT_DIR/coloc-$w.json" --out "$OUT_DIR/$w"
done
$PYTHON -P - "$OUT_DIR" "$IN_A/$OUT_A" "$IN_B/$OUT_B" <<'PY' | tee "$OUT_DIR/summary.md"
import json, sys
out, shapes = sys.argv[1], dict(zip("ab", sys.argv[2:4]))


def fmt(r):  # a rate as the JSON holds it: a number, or "inf"
    return f"{r:g}" if isinstance(r, (float, int)) else str(r)


print("| workload | config | goodput req/s | ratio |")
print("|---|---|---|---|")
notes = []
for w in ("a", "b"):
    g = {}
    for label in ("disagg", "coloc"):
        res = json.load(open(f"{out}/{label}-{w}.json"))
        g[label] = res.get("goodput", {})
        if not res.get("steady_state", False):
            notes.append(f"{label}-{w}: short windows (SMOKE, or written before steady-state "
                         "windows): not steady state")
        for run in res["runs"]:
            st = run["report"].get("steadiness") or {}
            if st and not st.get("steady"):
                notes.append(f"{label}-{w} at {fmt(run['report']['request_rate'])} req/s not "
                             f"steady: {st.get('reason')}")
        if res.get("stopped_early"):
            skipped = ", ".join(fmt(r) for r in res["skipped_rates"])
            notes.append(f"{label}-{w} stopped early: {res['stopped_early']}; "
                         f"skipped {skipped} req/s")
    rate = {k: v.get("rate") for k, v in g.items()}
    finite = all(isinstance(r, (float, int)) for r in rate.values())
    ratio = rate["disagg"] / rate["coloc"] if finite else None
    unbracketed = not all(v.get("bracketed") for v in g.values())
    for label in ("disagg", "coloc"):
        r = rate[label]
        cell = "none (below the lowest rate)" if r is None else fmt(r)
        if r is not None and not g[label].get("bracketed"):
            cell = f">= {fmt(r)} (not bracketed)"
        ratio_cell = "-" if ratio is None else f"{ratio:.2f}" if label == "disagg" else "1.00"
        if ratio is not None and unbracketed:
            ratio_cell += " *"
        print(f"| {w} ({shapes[w]} tok in/out) | {label} | {cell} | {ratio_cell} |")
print()
print("Goodput: the highest swept rate that was steady and at which >= 90% of the counted "
      "requests meet both SLOs; ratio: disaggregated over colocated (* a goodput the sweep did "
      "not bracket: not a measured ratio).")
for n in notes:
    print(f"- {n}")

# The same records rescored under other objectives (no new runs): where the ratio moves.
from pdserve.cluster.bench.records import Slo
from pdserve.cluster.bench.report import rescore_goodput

print()
print("Goodput ratio (disagg / coloc) rescored from the same per-request records; "
      "rows TTFT, columns TPOT objective (ms); * not bracketed by the sweep:")
tpots = (20, 30, 40, 60, 100)
for w in ("a", "b"):
    res = {label: json.load(open(f"{out}/{label}-{w}.json")) for label in ("disagg", "coloc")}
    print()
    print(f"| {w} ({shapes[w]}) TTFT \\ TPOT | " + " | ".join(map(str, tpots)) + " |")
    print("|---" * (len(tpots) + 1) + "|")
    for ttft in (500, 1000, 2000):
        cells = []
        for tpot in tpots:
            g = {k: rescore_goodput(v, Slo(ttft, tpot)) for k, v in res.items()}
            if g["disagg"].rate is None or g["coloc"].rate is None:
                cells.append(f"{g['disagg'].rate}/{g['coloc'].rate}")
                continue
            star = "" if g["disagg"].bracketed and g["coloc"].bracketed else " *"
            cells.append(f"{g['disagg'].rate:g}/{g['coloc'].rate:g} = "
                         f"{g['disagg'].rate / g['coloc'].rate:.2f}{star}")
        print(f"| {ttft} | " + " | ".join(cells) + " |")
PY
