"""Model and cache configuration: frozen dataclasses, validated once at construction."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from pdserve.engine.secret import Secret
from pdserve.kernels.rope_scaling import RopeScaling

# Serving defaults, each written once. ServeConfig's fields (cluster/config.py) default to
# these, and so do the component configs below and the schedulers that callers (tests,
# benchmarks) build without a ServeConfig.
BLOCK_SIZE = 16  # tokens per KV block
MAX_BATCH_TOKENS = 2048  # tokens in one prefill step
MAX_NUM_SEQS = 64  # sequences in one step or one running decode batch
LEASE_TIMEOUT_S = 30.0  # a decode reservation whose KV has not arrived expires
TRANSFER_TIMEOUT_S = 60.0  # KV channel operations
CUDA_GRAPH_MAX_BATCH = 256  # largest decode batch captured in a CUDA graph
GPU_MEMORY_UTILIZATION = 0.85  # share of the GPU an automatically sized worker may hold
LAYERWISE_TRANSFER = True  # a prefill worker sends layer l's KV while layer l+1 computes
ENABLE_PREFIX_CACHING = True  # full KV blocks stay cached by token prefix (engine.prefix_cache)
CPU_PREFILL_BLOCKS = 512  # KV pool of a prefill worker on CPU (no device memory to size from)
CPU_DECODE_BLOCKS = 1024  # and of a decode worker
HOST = "127.0.0.1"  # default address of the gRPC frontends, /metrics and the workers' channels


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3, Qwen2, Mistral, SmolLM2)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def fingerprint(self) -> str:
        """A short stable hash of every field: two workers with the same one run the same
        model shape (the KV handshake compares it)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks of ``block_size`` tokens that ``num_tokens`` tokens occupy."""
    return (num_tokens + block_size - 1) // block_size


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool of one worker: ``[num_layers, 2, num_blocks, block_size, kv_heads,
    head_dim]``."""

    block_size: int = BLOCK_SIZE
    # 0 = auto: sized from free GPU memory (ModelRunner.num_blocks)
    num_blocks: int = CPU_DECODE_BLOCKS
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be positive or 0 (auto), got {self.num_blocks}")

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)


PRESETS: dict[str, ModelConfig] = {
    # Dummy-weight presets at real shapes (vLLM's --load-format dummy).
    "llama-3.1-8b": ModelConfig(
        name="llama-3.1-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-3.2-1b": ModelConfig(
        name="llama-3.2-1b", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, max_position=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "qwen2.5-7b": ModelConfig(
        name="qwen2.5-7b", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, max_position=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=True,
        eos_token_ids=(151643, 151645),
    ),
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,),
    ),
    # Small shapes for tests (GQA 4/2, two layers).
    "tiny": ModelConfig(
        name="tiny", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=32, max_position=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,),
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """Where a worker's weights come from.

    ``source`` is ``gguf`` (a GGUF file: ``path`` is the file, or None for the embedded
    default SmolLM2-135M-Instruct), ``hf`` (an HF folder with config.json and *.safetensors)
    or ``dummy`` (seeded random weights at the shape of ``preset``). A ``preset`` goes with
    ``dummy`` only, and ``dummy`` reads no ``path``.
    """

    source: str = "gguf"
    path: str | None = None
    preset: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in ("gguf", "hf", "dummy"):
            raise ValueError(f"model source must be gguf, hf or dummy, got {self.source!r}")
        if self.path and not os.path.isabs(os.path.expanduser(self.path)):
            # The workers resolve it, and they do not run in this process's directory.
            object.__setattr__(self, "path", os.path.abspath(os.path.expanduser(self.path)))
        if self.source == "hf" and not self.path:
            raise ValueError("model source 'hf' needs a folder path")
        if self.source == "dummy" and self.preset not in PRESETS:
            raise ValueError(
                f"dummy model needs a preset, one of {sorted(PRESETS)}; got {self.preset!r}"
            )
        if self.preset is not None and self.source != "dummy":
            raise ValueError(f"model preset {self.preset!r} is a shape for dummy weights: "
                             f"source must be dummy, not {self.source!r}")
        if self.source == "dummy" and self.path:
            raise ValueError(f"a dummy model reads no path, got {self.path!r}")


@dataclass(frozen=True)
class RunnerConfig:
    """How a worker runs its model."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    backend: str = "torch"  # kernels backend: "torch" or "triton"
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = leave torch's default
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs
    cuda_graph_max_batch: int = CUDA_GRAPH_MAX_BATCH  # bigger decode batches run eager
    # CUDA, CacheConfig.num_blocks == 0: the share of the GPU's total memory this worker may
    # hold (weights, activations, graphs and the KV pool that fills the rest).
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "triton"):
            raise ValueError(f"backend must be torch or triton, got {self.backend!r}")
        if self.cuda_graph_max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch must be >= 1, got {self.cuda_graph_max_batch}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one prefill or decode worker needs, built once at the edge (CLI/YAML)."""

    model: ModelSpec
    cache: CacheConfig
    run: RunnerConfig
    max_batch_tokens: int = MAX_BATCH_TOKENS  # prefill: token budget of one step
    max_num_seqs: int = MAX_NUM_SEQS  # in one step (prefill) or one running batch (decode)
    lease_timeout_s: float = LEASE_TIMEOUT_S  # decode: an unfilled reservation expires
    transfer_timeout_s: float = TRANSFER_TIMEOUT_S  # KV channel operations
    # The address this worker's KV channel endpoints bind to (the decode side's store and
    # doorbell, either side's Gloo device); a Ray-hosted worker sets its node's.
    host: str = HOST
    # A decode worker that also prefills the prompts the router hands it (``submit``): all
    # of them in colocated mode, the short ones or the overflow under conditional
    # disaggregation. Its warm-up then compiles the prefill shapes too.
    local_prefill: bool = False
    layerwise_transfer: bool = LAYERWISE_TRANSFER  # prefill: send KV layer by layer
    enable_prefix_caching: bool = ENABLE_PREFIX_CACHING  # engine.prefix_cache
    # The deployment's key (engine.secret): only workers holding the same one pair up.
    secret: Secret = field(default_factory=Secret.generate, compare=False)

    def __post_init__(self) -> None:
        if self.max_batch_tokens < self.cache.block_size:
            raise ValueError("max_batch_tokens must be at least one block")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.lease_timeout_s <= 0 or self.transfer_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
