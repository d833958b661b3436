"""What one `pdserve bench` invocation runs: the workload, the sweep of request rates, the
objectives and where the results go, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.cluster.bench.data import DATASETS, LENGTH_DISTS
from pdserve.cluster.bench.records import Slo


@dataclass(frozen=True)
class BenchConfig:
    """One `pdserve bench` invocation (a sweep of one or more request rates)."""

    server: str = "127.0.0.1:50051"
    label: str = "pdserve"
    dataset: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 100
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
    ignore_eos: bool = False  # chat/jsonl; random always ignores EOS
    slo: Slo = field(default_factory=Slo)
    goodput_attainment: float = 0.9
    request_timeout_s: float | None = None
    ready_timeout_s: float = 60.0
    result_json: str | None = None
    plot_dir: str | None = None
    plot_rate: float | None = None
    progress: bool = True
    stop_below_attainment: float | None = None  # stop the (ascending) sweep below this
    max_duration_s: float | None = None  # per rate: about this long at the rate, see below
    client_processes: int = 1  # processes the requests are sent from (shards)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}")
        if (self.dataset == "jsonl") != (self.dataset_path is not None):
            raise ValueError("--dataset-path is needed with --dataset jsonl, and only there")
        for dist in (self.input_len_dist, self.output_len_dist):
            if dist not in LENGTH_DISTS:
                raise ValueError(f"length distribution must be one of {LENGTH_DISTS}: {dist!r}")
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
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
            if self.slo.ttft_ms is None and self.slo.tpot_ms is None:
                raise ValueError("--stop-below-attainment needs an SLO: --slo-ttft-ms or "
                                 "--slo-tpot-ms")
        if self.max_duration_s is not None and not self.max_duration_s > 0:
            raise ValueError(f"--max-duration-s must be > 0, got {self.max_duration_s}")
        if self.client_processes < 1:
            raise ValueError(f"--client-processes must be >= 1, got {self.client_processes}")
