"""ServeConfig: the whole deployment in one frozen dataclass, from YAML and/or flags.

Every serve knob is defined once, here: a field with its default and its help text
(``knob``), from which the ``pdserve serve``/``pdserve demo`` flags (``cluster.knobs``) and
the YAML keys (the field names) follow. Built once at the edge, it is then cut into the
small pieces each part needs (``worker_config``, ``server_config``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pdserve.cluster.autoscale_config import AutoscaleConfig
from pdserve.cluster.knobs import check_values, knob
from pdserve.cluster.security_config import SecurityConfig
from pdserve.engine.config import (
    BLOCK_SIZE,
    CPU_DECODE_BLOCKS,
    CPU_PREFILL_BLOCKS,
    CUDA_GRAPH_MAX_BATCH,
    ENABLE_PREFIX_CACHING,
    GPU_MEMORY_UTILIZATION,
    HOST,
    LAYERWISE_TRANSFER,
    LEASE_TIMEOUT_S,
    MAX_BATCH_TOKENS,
    MAX_NUM_SEQS,
    TRANSFER_TIMEOUT_S,
    CacheConfig,
    ModelConfig,
    ModelSpec,
    RunnerConfig,
    WorkerConfig,
)
from pdserve.engine.secret import Secret
from pdserve.router.config import (
    MAX_ATTEMPTS,
    MAX_WAITING,
    SCHEDULERS,
    RouterConfig,
    ServerConfig,
)
from pdserve.router.cost_model import Profile, shipped_profile
from pdserve.router.policy import LocalPrefillRule
from pdserve.router.slo import SloClasses
from pdserve.router.validation import (
    MAX_N,
    MAX_STOP_LEN,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    Limits,
)

# Sections of a ServeConfig with knobs of their own, by field name: their keys are flat in the
# YAML and their flags sit beside the others (``from_dict``, ``cluster.cli``).
SECTIONS: dict[str, type] = {"autoscaling": AutoscaleConfig, "security": SecurityConfig}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The flag groups of `pdserve serve --help`, in order: title -> description.
DEPLOYMENT, SERVER, WORKERS, CACHE = "deployment", "server", "workers", "KV cache"
SCHEDULING, LIMITS, LOCAL = "scheduling", "request limits", "conditional disaggregation"
FLAG_GROUPS: dict[str, str | None] = {
    DEPLOYMENT: None,
    SERVER: None,
    WORKERS: "how each worker runs its model",
    CACHE: None,
    SCHEDULING: None,
    LIMITS: "what one request may ask for",
    LOCAL: "disaggregated mode: the decode worker that leased a prompt prefills it itself "
           "(chunked, mixed into its decode steps) instead of a prefill worker, when either "
           "rule below holds (NVIDIA Dynamo's rule); 0 turns a rule off (the default)",
}


@dataclass(frozen=True)
class ServeConfig:
    """A pdserve deployment: model, pools, limits, ports."""

    model: ModelSpec = field(default_factory=ModelSpec)
    # Their knobs are flags and top-level YAML keys like the ones below (``from_dict``).
    autoscaling: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    # The key every side channel of the deployment authenticates with (engine.secret): new
    # with every config, never read from YAML or flags; launch() draws a fresh one.
    secret: Secret = field(default_factory=Secret.generate, compare=False)
    mode: str = knob("disaggregated", "disaggregated: prefill and decode workers; colocated: "
                     "--num-decode replicas that each prefill (chunked, mixed into decode "
                     "steps) and decode", DEPLOYMENT, choices=("disaggregated", "colocated"))
    num_prefill: int = knob(1, "prefill workers; ignored in colocated mode", DEPLOYMENT,
                            minimum=1)
    num_decode: int = knob(1, "decode workers, or replicas in colocated mode", DEPLOYMENT,
                           minimum=1)
    device: str = knob("auto", "auto: cuda when a GPU is visible, else cpu", WORKERS,
                       choices=("auto", "cpu", "cuda"))
    dtype: str = knob("auto", "auto: bfloat16 on cuda, float32 on cpu", WORKERS,
                      choices=("auto", *DTYPES))
    backend: str = knob("auto", "kernel backend; auto: triton on cuda, torch on cpu", WORKERS,
                        choices=("auto", "torch", "triton"))
    block_size: int = knob(BLOCK_SIZE, "tokens per KV block (a power of two)", CACHE,
                           minimum=1)
    prefill_blocks: int = knob(0, "KV blocks per prefill worker; 0: auto (from GPU memory; "
                               f"{CPU_PREFILL_BLOCKS} on CPU)", CACHE, minimum=0)
    decode_blocks: int = knob(0, "KV blocks per decode worker; 0: auto (from GPU memory; "
                              f"{CPU_DECODE_BLOCKS} on CPU)", CACHE, minimum=0)
    max_batch_tokens: int = knob(MAX_BATCH_TOKENS, "tokens in one prefill step (chunked "
                                 "prefill beyond)", SCHEDULING, minimum=1)
    max_num_seqs: int = knob(MAX_NUM_SEQS, "sequences in one step or decode batch", SCHEDULING,
                             minimum=1)
    max_waiting: int = knob(MAX_WAITING, "requests queued for a decode lease before new ones "
                            "are refused (RESOURCE_EXHAUSTED)", SCHEDULING, minimum=1)
    max_attempts: int = knob(MAX_ATTEMPTS, "prefill attempts of a request (after worker and "
                             "transfer failures; preemptions do not count) before it fails",
                             SCHEDULING, minimum=1)
    scheduler: str = knob("slo", "slo: admission by predicted TTFT, priority then TTFT "
                          "deadline order, placement by the cost model's headroom; fifo: "
                          "arrival order, least-loaded placement (the baseline)", SCHEDULING,
                          choices=SCHEDULERS)
    slo_classes: str = knob("", "YAML or JSON file of named SLO classes (objectives, "
                            "priority, best_effort; see docs/architecture.md); empty: one "
                            "class 'default' without objectives", SCHEDULING, metavar="FILE")
    default_slo_class: str = knob("", "the SLO class of a request that names none; empty: "
                                  "the classes file's default", SCHEDULING, metavar="NAME")
    profile: str = knob("", "the cost model's calibration, a JSON from `pdserve profile`; "
                        "empty: the profile shipped for this device and model if there is "
                        "one, else the model learns from the workers' reports", SCHEDULING,
                        metavar="FILE")
    local_prefill_max_tokens: int = knob(
        0, "prefill prompts of at most N tokens on the decode worker (a short prompt costs "
        "less in place than its hop and KV transfer)", LOCAL, minimum=0, metavar="N")
    prefill_queue_max_tokens: int = knob(
        0, "prefill on the decode worker while the prefill worker has more than N prompt "
        "tokens queued (spill a backed-up prefill pool)", LOCAL, minimum=0, metavar="N")
    local_prefill_by_model: bool = knob(
        True, "scheduler slo: the decode worker prefills a prompt itself when the cost model "
        "predicts it faster there and its running requests keep their TPOT objectives (the "
        "two thresholds above, when set, decide instead)", LOCAL)
    default_max_tokens: int = knob(256, "max_tokens of a request that leaves it unset", LIMITS,
                                   minimum=1)
    max_tokens_limit: int = knob(4096, "largest max_tokens a request may ask for", LIMITS,
                                 minimum=1)
    max_context: int = knob(0, "prompt + generated tokens of one request; 0: the model's own",
                            LIMITS, minimum=0)
    max_stop_strings: int = knob(MAX_STOP_STRINGS, "stop strings in one request", LIMITS,
                                 minimum=0)
    max_stop_len: int = knob(MAX_STOP_LEN, "characters in one stop string", LIMITS, minimum=1)
    max_stop_token_ids: int = knob(MAX_STOP_TOKEN_IDS, "stop token ids in one request", LIMITS,
                                   minimum=0)
    max_n: int = knob(MAX_N, "most choices (sampling.n) one request may ask for", LIMITS,
                      minimum=1)
    lease_timeout_s: float = knob(LEASE_TIMEOUT_S, "seconds a decode worker keeps a "
                                  "reservation whose KV has not arrived", SCHEDULING, above=0)
    transfer_timeout_s: float = knob(TRANSFER_TIMEOUT_S, "seconds a KV channel operation may "
                                     "take", SCHEDULING, above=0)
    layerwise_transfer: bool = knob(LAYERWISE_TRANSFER, "a prefill worker sends layer l's KV "
                                    "while it computes layer l+1 (off: all of a prompt's KV "
                                    "after its last layer)", SCHEDULING)
    enable_prefix_caching: bool = knob(
        ENABLE_PREFIX_CACHING, "keep full KV blocks after their request ends, found again by "
        "their token prefix: a prompt that starts like an earlier one prefills only the "
        "rest, a decode worker that holds the prefix receives only the rest, and the router "
        "prefers the worker holding the longest prefix (vLLM's automatic prefix caching)",
        CACHE)
    torch_threads: int = knob(0, "CPU intra-op threads per worker; 0: cores / workers", WORKERS,
                              minimum=0)
    enforce_eager: bool = knob(False, "CUDA: decode without CUDA graphs (prefill workers "
                               "never capture any)", WORKERS)
    cuda_graph_max_batch: int = knob(CUDA_GRAPH_MAX_BATCH, "largest decode batch captured in "
                                     "a CUDA graph; bigger batches run eager", WORKERS,
                                     minimum=1)
    gpu_memory_utilization: float = knob(
        GPU_MEMORY_UTILIZATION, "CUDA, automatic KV pool size (0 blocks): the share of the "
        "GPU's memory a worker may hold (weights, activations, graphs, KV)", WORKERS,
        above=0.0, maximum=1.0)
    host: str = knob(HOST, "address the gRPC frontends listen on", SERVER)
    metrics_host: str = knob(HOST, "address /metrics listens on (apart from --host, so "
                             "serving gRPC on 0.0.0.0 does not publish the metrics)", SERVER)
    port: int = knob(50051, "gRPC port; 0: any free port", SERVER, minimum=0, maximum=65535)
    http_port: int = knob(0, "OpenAI-compatible HTTP API port on --host (/v1/chat/"
                          "completions, /v1/completions, /v1/models), served by the gRPC "
                          "frontends beside gRPC; 0: none", SERVER, minimum=0,
                          maximum=65535)
    served_model_name: str = knob("", "the model's name in the HTTP API (the requests' "
                                  "`model`, /v1/models); empty: the name the model's files "
                                  "give", SERVER, metavar="NAME")
    metrics_port: int = knob(9400, "Prometheus /metrics port; 0: any free port, -1: none",
                             SERVER, minimum=-1, maximum=65535)
    # More frontends stream more tokens a second (cluster.bench_router measures it).
    frontends: int = knob(1, "gRPC frontend processes sharing --port (SO_REUSEPORT); each "
                          "client connection is served by one", SERVER, minimum=1)
    namespace: str = knob("pdserve", "Ray namespace; also prefixes actor names", DEPLOYMENT)
    prefill_resource: str = knob(
        "", "a Ray custom resource each prefill worker asks one unit of, to place the pool "
        "on the nodes that offer it (e.g. pdserve_prefill); empty: any node with a GPU",
        DEPLOYMENT, metavar="NAME")
    decode_resource: str = knob(
        "", "the same for each decode worker (colocated replicas too), e.g. pdserve_decode",
        DEPLOYMENT, metavar="NAME")

    def __post_init__(self) -> None:
        if not isinstance(self.secret, Secret):
            raise ValueError("secret must be a Secret")
        if not isinstance(self.model, ModelSpec):
            raise ValueError(f"model must be a ModelSpec, got {self.model!r}")
        for name, kind in SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got "
                                 f"{getattr(self, name)!r}")
        check_values(self)  # types, choices and bounds, naming the field
        CacheConfig(self.block_size, self.prefill_blocks)  # validates block_size and counts
        CacheConfig(self.block_size, self.decode_blocks)
        if self.max_batch_tokens < self.block_size:
            raise ValueError(f"max_batch_tokens must be at least one block ({self.block_size} "
                             f"tokens), got {self.max_batch_tokens}")
        if self.http_port and self.http_port in (self.port, self.metrics_port):
            raise ValueError(f"http_port {self.http_port} is also the gRPC or metrics port")
        self.slo_class_set()  # the classes file reads, and names the default class
        if self.profile and not Path(self.profile).is_file():
            raise ValueError(f"profile: no such file {self.profile}")
        rule = self.local_prefill  # validates both thresholds (>= 0)
        if self.colocated:  # every prompt is prefilled locally there: a threshold means nothing
            for name in ("local_prefill_max_tokens", "prefill_queue_max_tokens"):
                if getattr(rule, name):
                    raise ValueError(f"{name} applies to disaggregated mode only (colocated "
                                     f"workers prefill every prompt); got {getattr(rule, name)}")

    def slo_class_set(self) -> SloClasses:
        """The SLO classes requests may name, from ``slo_classes`` (built in without one)."""
        classes = SloClasses()
        if self.slo_classes:
            path = Path(self.slo_classes)
            try:
                raw = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError) as e:
                raise ValueError(f"slo_classes: cannot read {path}: {e}") from None
            classes = SloClasses.from_mapping(raw or {}, f"slo_classes {path}")
        return classes.with_default(self.default_slo_class)

    def cost_profile(self, model_config: ModelConfig) -> Profile | None:
        """The cost model's profile: ``profile``'s file, else the shipped one for this
        device and model, else None (learned online)."""
        if self.profile:
            return Profile.load(self.profile)
        device = "cpu"
        if self.resolved_device() == "cuda":
            device = torch.cuda.get_device_name(0)
        return shipped_profile(device, model_config.name)

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
        disaggregation (by the thresholds, or by the cost model under the slo scheduler)."""
        return (self.colocated or self.local_prefill.enabled
                or (self.scheduler == "slo" and self.local_prefill_by_model))

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
            blocks = CPU_PREFILL_BLOCKS if role == "prefill" else CPU_DECODE_BLOCKS
        dtype = self.resolved_dtype()
        return WorkerConfig(
            model=self.model,
            cache=CacheConfig(self.block_size, blocks, dtype),
            run=RunnerConfig(self.resolved_device(), dtype, self.resolved_backend(),
                             self.threads_per_worker(cpus) if cpu else 0,
                             # A prefill worker never decodes: no graphs to capture.
                             enforce_eager=self.enforce_eager or role == "prefill",
                             cuda_graph_max_batch=self.cuda_graph_max_batch,
                             gpu_memory_utilization=self.gpu_memory_utilization),
            max_batch_tokens=self.max_batch_tokens, max_num_seqs=self.max_num_seqs,
            lease_timeout_s=self.lease_timeout_s, transfer_timeout_s=self.transfer_timeout_s,
            host=self.host, local_prefill=self.decode_prefills and role == "decode",
            layerwise_transfer=self.layerwise_transfer,
            enable_prefix_caching=self.enable_prefix_caching, secret=self.secret,
        )

    def router_config(self, profile: Profile | None) -> RouterConfig:
        """The router's part, calibrated by ``profile`` (``cost_profile``'s, when serving;
        ``pdserve tune`` passes the one it simulates with)."""
        return RouterConfig(max_waiting=self.max_waiting, max_attempts=self.max_attempts,
                            scheduler=self.scheduler, max_num_seqs=self.max_num_seqs,
                            max_batch_tokens=self.max_batch_tokens, block_size=self.block_size,
                            decode_prefills=self.decode_prefills, profile=profile,
                            local_prefill=self.local_prefill,
                            prefix_caching=self.enable_prefix_caching)

    def server_config(self, model_config: ModelConfig) -> ServerConfig:
        context = self.max_context or model_config.max_position
        limits = Limits(
            max_context=context, vocab_size=model_config.vocab_size,
            max_tokens_limit=min(self.max_tokens_limit, context),
            default_max_tokens=min(self.default_max_tokens, self.max_tokens_limit, context),
            max_stop_strings=self.max_stop_strings, max_stop_len=self.max_stop_len,
            max_stop_token_ids=self.max_stop_token_ids, max_n=self.max_n,
        )
        return ServerConfig(
            model=self.model, model_config=model_config, limits=limits,
            router=self.router_config(self.cost_profile(model_config)),
            block_size=self.block_size,
            dtype=str(self.resolved_dtype()).removeprefix("torch."), host=self.host,
            port=self.port, metrics_port=self.metrics_port, mode=self.mode,
            frontends=self.frontends, slo_classes=self.slo_class_set(),
            metrics_host=self.metrics_host, tls=self.security.tls(),
            auth=self.security.token_check(), secret=self.secret, http_port=self.http_port,
            served_model_name=self.served_model_name,
        )

    # -- YAML -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ServeConfig:
        known = {f.name for f in dataclasses.fields(cls)} - set(SECTIONS) - {"secret"}
        sections = {name: {f.name for f in dataclasses.fields(kind)}
                    for name, kind in SECTIONS.items()}
        unknown = set(raw) - known - set().union(*sections.values())
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        values: dict[str, Any] = {k: v for k, v in raw.items() if k in known}
        for name, kind in SECTIONS.items():  # flat keys, gathered into their section
            values[name] = kind(**{k: v for k, v in raw.items() if k in sections[name]})
        model = values.pop("model", None)
        if isinstance(model, dict):
            mk = {f.name for f in dataclasses.fields(ModelSpec)}
            if set(model) - mk:
                raise ValueError(f"unknown model keys: {sorted(set(model) - mk)}")
            if model.get("preset") is not None and "source" not in model:
                model = {**model, "source": "dummy"}  # a preset means dummy weights
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
