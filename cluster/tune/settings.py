"""The defaults of ``pdserve tune``, each written once (its flags, the goodput search and
the steady-state window read them here; kept free of heavy imports so that ``pdserve``
starts fast)."""

from __future__ import annotations

TARGET = 0.9  # DistServe's share of requests that meet both objectives
TOLERANCE = 0.05  # the rate search stops when its bracket's ends are within 5%
BRACKET_STEP = 1.5  # rate factor between bracketing points
MIN_RATE = 1e-3  # req/s: below it a deployment has no goodput to speak of
MAX_RATE = 1e6  # req/s: the search looks no higher
MAX_POINTS = 16  # simulated rates per deployment at most

# A rate's run: warm-up requests (this share of the counted ones) before the counted ones
# and as many after them; the counted ones arrive over at least MIN_WINDOW_S and at least
# E2E_LIFETIMES request lifetimes (DESIGN.md section 9: a short burst measures the batch
# seats, not what the deployment sustains).
WARMUP_SHARE = 0.25
MIN_WINDOW_S = 60.0
E2E_LIFETIMES = 10
NUM_PROMPTS = 100  # counted requests per rate at least (`pdserve bench`'s default)
MAX_COUNTED = 20_000  # and at most, however high the rate

GPUS = 8
FINALISTS = 2  # disaggregated deployments carried into the caps and rules stages
MAX_NUM_SEQS_GRID = (64, 16)  # the first is the base (the serve default)
MAX_BATCH_TOKENS_GRID = (2048, 512, 128)
RULE_OFF, RULE_MODEL = "off", "model"  # conditional disaggregation, besides a threshold N
AUTO_RULE = "auto"  # a threshold at the workload's 25th-percentile prompt length
RULES = (RULE_MODEL, RULE_OFF, AUTO_RULE)
PLOT_RATES = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5)  # x the best goodput

# One way of a Ray actor call between processes of one node (the router and its workers).
CALL_LATENCY_S = 0.0005
