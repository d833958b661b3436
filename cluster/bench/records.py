"""One request of a `pdserve bench` run as the client saw it, and the latency objectives it is
scored against (the definitions of TTFT, TPOT and ITL are in ``report``'s docstring)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

TIMING_FIELDS = ("queue_s", "prefill_s", "kv_transfer_s", "ttft_s", "mean_tpot_s", "e2e_s")
# The status of a request the server refused at admission (its predicted TTFT misses the
# objective, or its queue is full): a miss in attainment and goodput, never left out.
REFUSED = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class RequestRecord:
    """One request of a run as the client saw it; times in seconds since the run started."""

    index: int
    max_tokens: int  # asked for
    send_s: float
    end_s: float  # last response, or the error
    chunks: tuple[tuple[float, int], ...] = ()  # (arrival time, token count) per response
    prompt_tokens: int = 0
    output_tokens: int = 0
    ok: bool = False
    status: str = "OK"  # "OK", a gRPC status code name, "INCOMPLETE" or "ABORTED"
    error: str = ""
    finish_reason: str = ""
    server_timing: dict[str, float] = field(default_factory=dict)  # Timing of the last response
    slo_class: str = ""  # the SLO class it was sent with ("": none named, a server without any)

    @property
    def first_token_s(self) -> float | None:
        for t, n in self.chunks:
            if n > 0:
                return t
        return self.chunks[0][0] if self.chunks else None

    @property
    def ttft_s(self) -> float | None:
        first = self.first_token_s
        return first - self.send_s if self.ok and first is not None else None

    @property
    def e2e_s(self) -> float | None:
        return self.end_s - self.send_s if self.ok else None

    @property
    def tpot_s(self) -> float | None:
        ttft, e2e = self.ttft_s, self.e2e_s
        if ttft is None or e2e is None or self.output_tokens < 2:
            return None
        return (e2e - ttft) / (self.output_tokens - 1)

    def itl_s(self) -> list[float]:
        """Inter-token latencies: each gap after the first token, spread over its chunk."""
        if not self.ok:
            return []
        out: list[float] = []
        last: float | None = None
        for t, n in self.chunks:
            if n <= 0:
                continue
            if last is not None:
                out.extend([(t - last) / n] * n)
            last = t
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["chunks"] = [[t, n] for t, n in self.chunks]
        for name in ("ttft", "tpot", "e2e"):  # derived, for readers of the file; not read back
            v = getattr(self, f"{name}_s")
            d[f"{name}_ms"] = None if v is None else round(v * 1e3, 3)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RequestRecord:
        return cls(
            index=int(d["index"]), max_tokens=int(d["max_tokens"]), send_s=float(d["send_s"]),
            end_s=float(d["end_s"]), chunks=tuple((float(t), int(n)) for t, n in d["chunks"]),
            prompt_tokens=int(d["prompt_tokens"]), output_tokens=int(d["output_tokens"]),
            ok=bool(d["ok"]), status=str(d["status"]), error=str(d["error"]),
            finish_reason=str(d["finish_reason"]),
            server_timing={k: float(v) for k, v in d["server_timing"].items()},
            slo_class=str(d.get("slo_class", "")),  # absent in results before SLO classes
        )


@dataclass(frozen=True)
class Slo:
    """Latency objectives in ms; None: no objective (always met)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name, v in (("ttft_ms", self.ttft_ms), ("tpot_ms", self.tpot_ms)):
            if v is not None and not v > 0:
                raise ValueError(f"SLO {name} must be > 0, got {v}")

    def meets(self, r: RequestRecord) -> tuple[bool, bool]:
        """(TTFT met, TPOT met); a failed request meets neither. TPOT of a request with one
        output token is undefined and meets any objective (as in vLLM)."""
        if not r.ok:
            return False, False
        ttft, tpot = r.ttft_s, r.tpot_s
        ttft_ok = self.ttft_ms is None or (ttft is not None and ttft * 1e3 <= self.ttft_ms)
        tpot_ok = self.tpot_ms is None or tpot is None or tpot * 1e3 <= self.tpot_ms
        return ttft_ok, tpot_ok
