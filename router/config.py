"""The router's configuration: its admission and retry limits (RouterConfig), and what the
router actor and its gRPC frontends serve and where they listen (ServerConfig).

Both are built from a ServeConfig (``ServeConfig.server_config``) in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.config import (
    BLOCK_SIZE,
    ENABLE_PREFIX_CACHING,
    HOST,
    MAX_BATCH_TOKENS,
    MAX_NUM_SEQS,
    ModelConfig,
    ModelSpec,
)
from pdserve.engine.secret import Secret
from pdserve.router.cost_model import Profile
from pdserve.router.policy import LocalPrefillRule
from pdserve.router.security import TlsFiles, TokenCheck
from pdserve.router.slo import SloClasses
from pdserve.router.validation import Limits

MAX_WAITING = 256  # requests queued for a lease before RESOURCE_EXHAUSTED
MAX_ATTEMPTS = 4  # failed attempts of a request before it fails (preemptions do not count)
SCHEDULERS = ("slo", "fifo")  # see RouterConfig.scheduler


@dataclass(frozen=True)
class RouterConfig:
    """Admission and retry limits of the router, and where prompts are prefilled."""

    max_waiting: int = MAX_WAITING
    max_attempts: int = MAX_ATTEMPTS
    # "slo": admission by predicted TTFT, priority + EDF order, placement by the cost
    # model's headroom; "fifo": arrival order, least-loaded placement, no prediction.
    scheduler: str = "slo"
    # What the placer must know of the workers (the same values the workers run with).
    max_num_seqs: int = MAX_NUM_SEQS
    max_batch_tokens: int = MAX_BATCH_TOKENS
    block_size: int = BLOCK_SIZE
    decode_prefills: bool = True  # decode workers can prefill prompts themselves
    profile: Profile | None = None  # the cost model's calibration; None: learned online
    # Disaggregated mode: which prompts the decode worker prefills itself (off by default).
    local_prefill: LocalPrefillRule = field(default_factory=LocalPrefillRule)
    # The workers keep KV blocks by prefix: the router's prefix index prefers their holder.
    prefix_caching: bool = ENABLE_PREFIX_CACHING

    def __post_init__(self) -> None:
        if self.max_waiting < 1 or self.max_attempts < 1:
            raise ValueError("max_waiting and max_attempts must be >= 1")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, "
                             f"got {self.scheduler!r}")


@dataclass(frozen=True)
class ServerConfig:
    """What the router and its frontends need: where to listen, and what they serve."""

    model: ModelSpec
    model_config: ModelConfig
    limits: Limits
    router: RouterConfig
    block_size: int
    dtype: str
    host: str
    port: int  # 0 = any free port
    metrics_port: int  # 0 = any free port; -1 = no /metrics
    mode: str  # disaggregated or colocated
    frontends: int  # gRPC frontend processes sharing the port
    slo_classes: SloClasses = field(default_factory=SloClasses)
    metrics_host: str = HOST  # /metrics listens here, apart from the gRPC address
    tls: TlsFiles | None = None  # None: plaintext gRPC
    auth: TokenCheck | None = None  # None: no bearer token asked
    http_port: int = 0  # the OpenAI-compatible HTTP API's port on ``host``; 0: none
    served_model_name: str = ""  # the model's name in the HTTP API; "": model_config.name
    # The deployment's key: the router opens each frontend's feed with its tag.
    secret: Secret = field(default_factory=Secret.generate, compare=False)
