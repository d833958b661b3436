"""What one `pdserve bench` invocation runs: the workload, the sweep of request rates, each
rate's window (``steady``), the objectives and SLO classes, and where the results go,
validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.cluster.bench.classes import check_class_mix
from pdserve.cluster.bench.data import DATASETS, LENGTH_DISTS
from pdserve.cluster.bench.multiturn import SYSTEM_PROMPT_LEN, TURNS, USERS, MultiTurnShape
from pdserve.cluster.bench.records import Slo
from pdserve.cluster.bench.steady import (
    MAX_WARMUP_FRACTION,
    STEADY_DURATION_FACTOR,
    STEADY_MIN_DURATION_S,
    STEADY_MIN_REQUESTS,
    STEADY_WARMUP_FRACTION,
)
from pdserve.proto.credentials import ClientAuth


@dataclass(frozen=True)
class BenchConfig:
    """One `pdserve bench` invocation (a sweep of one or more request rates)."""

    server: str = "127.0.0.1:50051"
    auth: ClientAuth | None = None  # TLS, client certificate, bearer token
    label: str = "pdserve"
    dataset: str = "random"
    dataset_path: str | None = None
    input_len: int = 512
    output_len: int = 128
    input_len_dist: str = "fixed"
    output_len_dist: str = "fixed"
    range_ratio: float = 0.0
    request_rates: tuple[float, ...] = (math.inf,)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = False  # chat/jsonl; random and multiturn always ignore EOS
    # multiturn: conversations sharing one system prompt (cluster.bench.multiturn)
    system_prompt_len: int = SYSTEM_PROMPT_LEN
    turns: int = TURNS
    users: int = USERS
    slo: Slo = field(default_factory=Slo)
    goodput_attainment: float = 0.9
    request_timeout_s: float | None = None
    ready_timeout_s: float = 60.0
    result_json: str | None = None
    plot_dir: str | None = None
    plot_rate: float | None = None
    progress: bool = True
    stop_below_attainment: float | None = None  # stop the (ascending) sweep below this
    client_processes: int = 1  # processes the requests are sent from (shards)
    # each rate's window (steady): max(min_requests, ceil(rate * window)) requests, window =
    # max(min_duration_s, duration_factor * the previous steady rate's median E2E)
    min_duration_s: float = STEADY_MIN_DURATION_S
    duration_factor: float = STEADY_DURATION_FACTOR
    min_requests: int = STEADY_MIN_REQUESTS
    warmup_fraction: float = STEADY_WARMUP_FRACTION  # of the arrival window, not counted
    smoke: bool = False  # windows below the steady-state floors allowed; not steady state
    slo_class: str | None = None  # every request's SLO class (None: the server's default)
    class_mix: tuple[tuple[str, float], ...] = ()  # (class, share): seeded random classes

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}")
        if (self.dataset == "jsonl") != (self.dataset_path is not None):
            raise ValueError("--dataset-path is needed with --dataset jsonl, and only there")
        for dist in (self.input_len_dist, self.output_len_dist):
            if dist not in LENGTH_DISTS:
                raise ValueError(f"length distribution must be one of {LENGTH_DISTS}: {dist!r}")
        for name in ("min_requests", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        _ = self.multiturn  # validates the conversations' shape
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        if not self.request_rates or any(not r > 0 for r in self.request_rates):
            raise ValueError(f"--request-rate values must be > 0, got {self.request_rates}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")
        if not 0 < self.goodput_attainment <= 1:
            raise ValueError("--goodput-attainment must be in (0, 1]")
        if self.temperature < 0:
            raise ValueError("--temperature must be >= 0")
        if self.stop_below_attainment is not None:
            if not 0 < self.stop_below_attainment <= 1:
                raise ValueError("--stop-below-attainment must be in (0, 1], got "
                                 f"{self.stop_below_attainment}")
            if (self.slo.ttft_ms is None and self.slo.tpot_ms is None
                    and self.slo_class is None and not self.class_mix):
                raise ValueError("--stop-below-attainment needs an SLO: --slo-ttft-ms, "
                                 "--slo-tpot-ms, or an SLO class (--slo-class, --class-mix)")
        if self.client_processes < 1:
            raise ValueError(f"--client-processes must be >= 1, got {self.client_processes}")
        self._check_window()
        if self.slo_class is not None and self.class_mix:
            raise ValueError("give --slo-class or --class-mix, not both")
        if self.slo_class is not None and not self.slo_class:
            raise ValueError("--slo-class must name a class")
        if self.class_mix:
            check_class_mix(self.class_mix)

    def _check_window(self) -> None:
        """Positive window settings; below the steady-state floors only with --smoke."""
        if not self.min_duration_s > 0:
            raise ValueError(f"--min-duration-s must be > 0, got {self.min_duration_s}")
        if not self.duration_factor >= 0:
            raise ValueError(f"--duration-factor must be >= 0, got {self.duration_factor}")
        if not 0 <= self.warmup_fraction <= MAX_WARMUP_FRACTION:
            raise ValueError(f"--warmup-fraction must be in [0, {MAX_WARMUP_FRACTION}], got "
                             f"{self.warmup_fraction}")
        if self.smoke:
            return
        short = [f"{flag} {v:g} < {floor:g}" for flag, v, floor in (
            ("--min-duration-s", self.min_duration_s, STEADY_MIN_DURATION_S),
            ("--duration-factor", self.duration_factor, STEADY_DURATION_FACTOR),
            ("--min-requests", self.min_requests, STEADY_MIN_REQUESTS),
            ("--warmup-fraction", self.warmup_fraction, STEADY_WARMUP_FRACTION)) if v < floor]
        if short:
            raise ValueError(f"{', '.join(short)}: shorter than a steady-state window "
                             "(pdserve.cluster.bench.steady); pass --smoke for a short run, "
                             "reported as not steady state")

    @property
    def multiturn(self) -> MultiTurnShape:
        return MultiTurnShape(self.system_prompt_len, self.turns, self.users, self.input_len,
                              self.output_len, self.input_len_dist, self.output_len_dist,
                              self.range_ratio)

    @property
    def steady_state(self) -> bool:
        return not self.smoke
