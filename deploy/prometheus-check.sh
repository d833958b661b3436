#!/usr/bin/env bash
# Every query of deploy/grafana/pdserve-dashboard.json against a real Prometheus: start a
# pdserve server on this machine (deploy/serve-cpu.yaml, two SLO classes), send it a short
# load (`pdserve bench --smoke`, plus one request it refuses), let Prometheus (Debian's
# package) scrape its /metrics every second, then run each `expr` as an instant query and
# print its status and the number of series it returned
# (tests/support/pdserve_testing/promcheck.py does the querying).
#
#   deploy/prometheus-check.sh            # from anywhere; needs `make install` (run if missing)
#   STRICT=1 deploy/prometheus-check.sh   # also fail on data missing for no known reason
#
# Exits non-zero if a query errors (Prometheus refuses it, or it names a Grafana variable the
# check does not know), or if the server, the load or Prometheus fails. A query that returns
# no series (EMPTY) or only NaN (a quantile or a mean over a window without observations) is
# reported, not a failure. In this run (a disaggregated CPU deployment, no autoscaler) these
# are EMPTY by design (promcheck.EXPECTED_EMPTY gives the reason next to each such line):
#   - pdserve:num_workers (the "Workers per pool and state" panel, and the serving line of
#     "Autoscaler target vs serving workers"): only there once the router or the autoscaler
#     reports its pools (Metrics.set_workers); an absent series means "not reported", not 0;
#   - pdserve:autoscaler_target_workers: set only by the autoscaler, which does not run here.
# The scaling decisions, preemptions, retries and local prefills always have data (0 or
# more): their counters start at zero. Elsewhere a series is born at its first increment:
# the failures panel is EMPTY without a failure (hence the refused request below), and that
# first increment reads as rate 0 (as does a finish reason's first request). The prediction
# quantiles are NaN in a window without a cost-model prediction, the KV transfer panels
# EMPTY where no prompt crossed to a decode worker.
#
# The names keep their colons in Prometheus because the router's /metrics answers in the
# classic text format (router/metrics.py); prometheus_client's OpenMetrics answer, which
# Prometheus asks for first, writes them as pdserve_..., and every query here came back EMPTY.
#
# Everything talks to 127.0.0.1 only: the server's gRPC and /metrics ports and Prometheus's
# port are free ports picked here. The server's Ray is a local instance of its own (its temp
# dir, RAY_TMPDIR, is this run's, so it never joins another Ray on the machine through
# /tmp/ray/ray_current_cluster), and `pdserve serve` shuts it down when stopped with SIGINT.
# On exit (also on Ctrl-C or an error) the trap stops Prometheus and the server (SIGINT, then
# SIGTERM, then SIGKILL), checks that no process of this run's Ray is left (and ends any by
# pid) and removes the temp dir (KEEP_TMP=1 keeps it, with the logs).
#
# Knobs (environment): SERVE_CONFIG (deploy/serve-cpu.yaml), BENCH_REQUESTS (24), BENCH_RATE
# (4 req/s), WINDOW (s, the rate() window; default: since Prometheus started, at least 30),
# SERVE_TIMEOUT (s to SERVING, 900), SERVE_ARGS (more `pdserve serve` flags, split on spaces),
# STRICT, KEEP_TMP.
#
# Installing Debian's prometheus package (done here when `prometheus` is missing; root or
# sudo) also enables its own service on :9090 where systemd runs; this script never uses it.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PDSERVE=$VENV/bin/pdserve
PY=$VENV/bin/python
HELPER=tests/support/pdserve_testing/promcheck.py
DASHBOARD=deploy/grafana/pdserve-dashboard.json
SERVE_CONFIG=${SERVE_CONFIG:-deploy/serve-cpu.yaml}
SLO_CLASSES=deploy/slo-classes-cpu.yaml
BENCH_REQUESTS=${BENCH_REQUESTS:-24}
BENCH_RATE=${BENCH_RATE:-4}
SERVE_TIMEOUT=${SERVE_TIMEOUT:-900}

# fd 3: this script's stderr, also from the trap while a step's output goes to its log.
exec 3>&2
log() { echo "prometheus-check: $*" >&3; }

if ! command -v prometheus >/dev/null; then
    SUDO=()
    [ "$(id -u)" = 0 ] || SUDO=(sudo)
    log "installing Debian's prometheus package"
    if ! apt-cache policy prometheus 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        "${SUDO[@]}" apt-get update
    fi
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y --no-install-recommends \
        prometheus
fi
[ -x "$PDSERVE" ] || make install
log "$(prometheus --version 2>&1 | head -n 1)"

# Short: Ray's socket paths under RAY_TMPDIR must stay under the 107-byte limit.
TMP=$(mktemp -d /tmp/pdpc.XXXXXX)
SERVE_PID=
PROM_PID=
FG_PID=

# Run a step in the background and wait for it: a signal to this script then runs the trap at
# once instead of after the step (bash runs traps only between commands, but `wait` breaks).
step() {
    "$@" &
    FG_PID=$!
    local rc=0
    wait "$FG_PID" || rc=$?
    FG_PID=
    return "$rc"
}

# Stop process $1 (a child of this script): signal $2, then SIGTERM, then SIGKILL, waiting
# up to $3 s after the first and 10 s after the second.
stop() {
    local pid=$1 sig=$2 grace=$3 name=$4 i
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    log "stopping $name (pid $pid, SIG$sig)"
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 2; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name still running after ${grace}s: SIGTERM"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 20; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    if kill -0 "$pid" 2>/dev/null; then
        log "$name still running: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? left pid
    trap - EXIT INT TERM
    stop "$FG_PID" TERM 5 "the current step"
    stop "$PROM_PID" TERM 20 prometheus
    stop "$SERVE_PID" INT 120 "pdserve serve"
    # This run's Ray (gcs_server, raylet, agents) names $TMP on its command lines; nothing
    # of it may outlive the server. Its workers die with their raylet.
    left=$(pgrep -f -- "$TMP/ray" || true)
    if [ -n "$left" ]; then
        log "Ray processes of this run left after the server stopped: ${left//$'\n'/ }"
        for pid in $left; do kill -TERM "$pid" 2>/dev/null || true; done
        sleep 2
        for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
        [ "$rc" != 0 ] || rc=1
    elif [ -n "$SERVE_PID" ]; then
        log "the server stopped; no process of its Ray is left"
    fi
    if [ -n "${KEEP_TMP:-}" ]; then log "logs kept in $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PORT=$("$PY" -P "$HELPER" free-port)
METRICS_PORT=$("$PY" -P "$HELPER" free-port)
PROM_PORT=$("$PY" -P "$HELPER" free-port)

# Job control on for the background starts only: a background job of a script otherwise
# starts with SIGINT ignored, and the server must take SIGINT even before it serves (it shuts
# its Ray down on KeyboardInterrupt while starting, on SIGINT or SIGTERM once serving).
log "starting pdserve serve --config $SERVE_CONFIG (gRPC 127.0.0.1:$PORT, /metrics" \
    "127.0.0.1:$METRICS_PORT; log $TMP/serve.log)"
read -r -a EXTRA <<<"${SERVE_ARGS:-}"
set -m
env -u RAY_ADDRESS RAY_TMPDIR="$TMP" "$PDSERVE" serve --config "$SERVE_CONFIG" \
    --slo-classes "$SLO_CLASSES" --host 127.0.0.1 --port "$PORT" \
    --metrics-host 127.0.0.1 --metrics-port "$METRICS_PORT" \
    --namespace "pdserve-promcheck-$$" "${EXTRA[@]}" >"$TMP/serve.log" 2>&1 &
SERVE_PID=$!
set +m
if ! step "$PY" -P "$HELPER" wait-serving --server "127.0.0.1:$PORT" --pid "$SERVE_PID" \
        --timeout "$SERVE_TIMEOUT"; then
    tail -n 40 "$TMP/serve.log" >&2
    exit 1
fi
log "serving"

mkdir -p "$TMP/prom-data"
cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: pdserve
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$METRICS_PORT"]
EOF
log "starting prometheus on 127.0.0.1:$PROM_PORT (log $TMP/prometheus.log)"
set -m
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/prom-data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$TMP/prometheus.log" 2>&1 &
PROM_PID=$!
set +m
PROM_START=$(date +%s)
PROM=http://127.0.0.1:$PROM_PORT
if ! step "$PY" -P "$HELPER" wait-scrapes --prometheus "$PROM" --scrapes 3 --timeout 60; then
    tail -n 20 "$TMP/prometheus.log" >&2
    exit 1
fi

log "load: pdserve bench --smoke, $BENCH_REQUESTS requests at $BENCH_RATE req/s"
step "$PDSERVE" bench --server "127.0.0.1:$PORT" --smoke --no-progress --dataset random \
    --input-len 64 --output-len 16 --request-rate "$BENCH_RATE" \
    --min-requests "$BENCH_REQUESTS" --min-duration-s 2 --duration-factor 0 \
    --warmup-fraction 0 --class-mix interactive=0.5,standard=0.5 --timeout 120 \
    >"$TMP/bench.log" 2>&1 || { tail -n 40 "$TMP/bench.log" >&2; exit 1; }
sed -n '/^server:/,/^Goodput/p' "$TMP/bench.log" >&2  # the bench's summary row
# One request the server refuses (max_tokens over max_tokens_limit), so the failures panel has
# a series (INVALID_ARGUMENT).
if step "$PDSERVE" generate --server "127.0.0.1:$PORT" --max-tokens 1000000 "hi" \
        >/dev/null 2>"$TMP/refused.log"; then
    log "the oversized request was not refused"
fi
sleep 3  # a few more scrapes after the last request

WINDOW=${WINDOW:-$(($(date +%s) - PROM_START + 5))}
((WINDOW >= 30)) || WINDOW=30
STRICT_FLAG=()
[ -z "${STRICT:-}" ] || STRICT_FLAG=(--strict)
"$PY" -P "$HELPER" check --prometheus "$PROM" --dashboard "$DASHBOARD" --window "$WINDOW" \
    "${STRICT_FLAG[@]}"
