"""ServeConfig: the whole deployment in one frozen dataclass, from YAML and/or flags.

Built once at the edge (``pdserve serve``), then cut into the small pieces each part needs
(``worker_config``, ``server_config``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pdserve.engine.config import CacheConfig, ModelConfig, ModelSpec, RunnerConfig, WorkerConfig
from pdserve.router.policy import LocalPrefillRule
from pdserve.router.router import RouterConfig
from pdserve.router.server import ServerConfig
from pdserve.router.validation import Limits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ServeConfig:
    """A pdserve deployment: model, pools, limits, ports."""

    model: ModelSpec = field(default_factory=ModelSpec)
    mode: str = "disaggregated"  # or "colocated": each decode worker also prefills
    num_prefill: int = 1  # ignored in colocated mode
    num_decode: int = 1  # decode workers; in colocated mode, the replicas
    device: str = "auto"  # auto: cuda when a GPU is visible, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    backend: str = "auto"  # kernels: auto = triton on cuda, torch on cpu
    block_size: int = 16
    prefill_blocks: int = 0  # KV blocks per prefill worker; 0: auto (GPU memory; 512 on CPU)
    decode_blocks: int = 0  # per decode worker; 0: auto (GPU memory; 1024 on CPU)
    max_batch_tokens: int = 2048
    max_num_seqs: int = 64
    max_waiting: int = 256
    # Conditional disaggregation (disaggregated mode; 0 = off): the decode worker that
    # leased a prompt prefills it itself when it has at most local_prefill_max_tokens
    # tokens, or when the prefill worker has more than prefill_queue_max_tokens queued.
    local_prefill_max_tokens: int = 0
    prefill_queue_max_tokens: int = 0
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_context: int = 0  # 0: the model's own
    lease_timeout_s: float = 30.0
    transfer_timeout_s: float = 60.0
    torch_threads: int = 0  # CPU intra-op threads per worker; 0: cores / workers
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9400
    # gRPC frontend processes sharing `port` (SO_REUSEPORT); each client connection is
    # served by one. More stream more tokens a second (cluster.bench_router measures it).
    frontends: int = 1
    namespace: str = "pdserve"  # Ray namespace; also prefixes actor names

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be disaggregated or colocated, got {self.mode!r}")
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("num_prefill and num_decode must be >= 1")
        if self.frontends < 1:
            raise ValueError(f"frontends must be >= 1, got {self.frontends}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be auto, torch or triton, got {self.backend!r}")
        CacheConfig(self.block_size, self.prefill_blocks)  # validates block_size and counts
        CacheConfig(self.block_size, self.decode_blocks)
        rule = self.local_prefill  # validates both thresholds (>= 0)
        if self.colocated:  # every prompt is prefilled locally there: a threshold means nothing
            for name in ("local_prefill_max_tokens", "prefill_queue_max_tokens"):
                if getattr(rule, name):
                    raise ValueError(f"{name} applies to disaggregated mode only (colocated "
                                     f"workers prefill every prompt); got {getattr(rule, name)}")

    # -- resolution of "auto" ---------------------------------------------------------------
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return torch.bfloat16 if self.resolved_device() == "cuda" else torch.float32

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "triton" if self.resolved_device() == "cuda" else "torch"

    @property
    def colocated(self) -> bool:
        return self.mode == "colocated"

    @property
    def local_prefill(self) -> LocalPrefillRule:
        """Which prompts a disaggregated router has the decode worker prefill."""
        return LocalPrefillRule(self.local_prefill_max_tokens, self.prefill_queue_max_tokens)

    @property
    def decode_prefills(self) -> bool:
        """Decode workers prefill too: every prompt in colocated mode, some under conditional
        disaggregation."""
        return self.colocated or self.local_prefill.enabled

    @property
    def num_workers(self) -> int:
        return self.num_decode if self.colocated else self.num_prefill + self.num_decode

    def threads_per_worker(self, cpus: int) -> int:
        if self.torch_threads > 0:
            return self.torch_threads
        return max(1, cpus // self.num_workers)

    # -- the pieces -------------------------------------------------------------------------
    def worker_config(self, role: str, cpus: int) -> WorkerConfig:
        blocks = self.prefill_blocks if role == "prefill" else self.decode_blocks
        cpu = self.resolved_device() == "cpu"
        if blocks == 0 and cpu:  # no device memory to size from
            blocks = 512 if role == "prefill" else 1024
        dtype = self.resolved_dtype()
        return WorkerConfig(
            model=self.model,
            cache=CacheConfig(self.block_size, blocks, dtype),
            run=RunnerConfig(self.resolved_device(), dtype, self.resolved_backend(),
                             self.threads_per_worker(cpus) if cpu else 0,
                             # A prefill worker never decodes: no graphs to capture.
                             enforce_eager=role == "prefill"),
            max_batch_tokens=self.max_batch_tokens, max_num_seqs=self.max_num_seqs,
            lease_timeout_s=self.lease_timeout_s, transfer_timeout_s=self.transfer_timeout_s,
            host=self.host, local_prefill=self.decode_prefills and role == "decode",
        )

    def server_config(self, model_config: ModelConfig) -> ServerConfig:
        context = self.max_context or model_config.max_position
        limits = Limits(
            max_context=context, vocab_size=model_config.vocab_size,
            max_tokens_limit=min(self.max_tokens_limit, context),
            default_max_tokens=min(self.default_max_tokens, self.max_tokens_limit, context),
        )
        return ServerConfig(
            model=self.model, model_config=model_config, limits=limits,
            router=RouterConfig(max_waiting=self.max_waiting, local_prefill=self.local_prefill),
            block_size=self.block_size,
            dtype=str(self.resolved_dtype()).removeprefix("torch."), host=self.host,
            port=self.port, metrics_port=self.metrics_port, mode=self.mode,
            frontends=self.frontends,
        )

    # -- YAML -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ServeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        values = dict(raw)
        model = values.pop("model", None)
        if isinstance(model, dict):
            mk = {f.name for f in dataclasses.fields(ModelSpec)}
            if set(model) - mk:
                raise ValueError(f"unknown model keys: {sorted(set(model) - mk)}")
            values["model"] = ModelSpec(**model)
        elif model is not None:
            raise ValueError("model must be a mapping (source, path, preset, seed)")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServeConfig:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(raw)
