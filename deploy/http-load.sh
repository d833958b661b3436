#!/usr/bin/env bash
# Streamed chat completions through the official openai client against `pdserve serve
# --http-port` (deploy/http_load.py): starts the server, waits for /health, runs the load,
# stops the server. Extra arguments go to http_load.py.
#
#   deploy/http-load.sh --concurrency 8 --requests 64 --max-tokens 64
#   CONFIG=deploy/serve-gpu-8b.yaml deploy/http-load.sh --concurrency 64 --requests 512
set -euo pipefail
cd "$(dirname "$0")/.."
PDSERVE=${PDSERVE:-.venv/bin/pdserve}
PYTHON=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-deploy/serve-cpu.yaml}
HTTP_PORT=${HTTP_PORT:-8000}
SERVE_FLAGS=${SERVE_FLAGS:-}
export PYTHONSAFEPATH=1

# shellcheck disable=SC2086
"$PDSERVE" serve --config "$CONFIG" --http-port "$HTTP_PORT" --port 0 --metrics-port 0 \
  $SERVE_FLAGS &
server=$!
trap 'kill -INT "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/health" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { echo "pdserve serve exited" >&2; exit 1; }
  sleep 1
done
"$PYTHON" deploy/http_load.py --base-url "http://127.0.0.1:$HTTP_PORT/v1" "$@"
