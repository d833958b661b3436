#!/usr/bin/env bash
# The full fuzz run (docs/reliability.md, "Fuzzing"): a local Ray cluster and a CPU
# deployment of the embedded model, 10,000 seeded hostile requests while a greedy neighbour
# stream runs, then the table of status codes by category, the neighbour's result, whether
# every actor is alive in its process, and the KV blocks left held. Exits 1 on any problem.
#
#   deploy/fuzz.sh                          # 10,000 cases, seed 0, 48 in flight
#   deploy/fuzz.sh --count 2000 --seed 3    # what the e2e test sends, another seed
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONSAFEPATH=1 PYTHONPATH="tests/support${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -P -m pdserve_testing.fuzz_main "$@"
