"""The one cost model (DESIGN.md section 6): predicted prefill, decode-step and KV-transfer
times, for the router's admission and placement, the autoscaler and ``pdserve tune``.

Pure Python (no Ray, gRPC, torch or protobuf), so the simulator and tests can run it alone.
The forms are DistServe's:

- prefill step seconds = a + b·tokens + c·attention, where a step that runs ``t_i`` new
  tokens of sequence i with ``start_i`` cached has tokens = Σ t_i and attention =
  Σ t_i·(start_i + t_i) (:func:`attention_work`; a prompt of n tokens from scratch: n²);
- decode step seconds = a + b·batch + c·context (context: Σ of the batch's context lengths);
- a decode worker's step with prompt chunks mixed in (local prefill): the decode step plus
  the prefill form's b·tokens + c·attention;
- KV transfer seconds = latency + bytes / bandwidth.

A :class:`Profile` (``pdserve profile``: one JSON per device and model; the CPU profile of
the demo model ships in ``router/profiles/``) calibrates the fits. :class:`CostModel`
corrects them online from the timings workers report: each worker's predictions are scaled
by an exponentially weighted mean of measured over predicted time, and each (prefill,
decode) pair's bandwidth likewise. Without a profile it learns the fits from those reports.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pdserve.engine.chunking import attention_work
from pdserve.router.fitting import (
    LinearFit,
    TransferFit,
    fit_linear,
    fit_transfer,
    median_relative_error,
)

__all__ = [
    "CostModel",
    "LinearFit",
    "Profile",
    "TransferFit",
    "attention_work",
    "fit_linear",
    "fit_transfer",
    "median_relative_error",
    "profile_filename",
    "shipped_profile",
]

PROFILE_FORMAT = 1
# engine.config.MAX_BATCH_TOKENS, written again because engine.config imports torch (a test
# checks that the two agree).
DEFAULT_MAX_BATCH_TOKENS = 2048
FACTOR_MIN, FACTOR_MAX = 0.2, 5.0  # a worker's (or pair's) correction stays within these
# Uncalibrated (no profile): the samples kept per kind, and when they are (re)fitted.
SAMPLE_WINDOW = 256  # the most recent samples of each kind
MIN_FIT_SAMPLES = 8  # a first fit needs this many samples ...
MIN_DISTINCT_X = 3  # ... at this many distinct x values (tokens, batch or bytes)
REFIT_EVERY = 16  # after that, refitted on the window every this many new samples


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """What ``pdserve profile`` measured on one device for one model: the fits, the setting
    they hold for, and the raw samples (``prefill``: [tokens, attention, s], ``decode``:
    [batch, context, s], ``transfer``: [bytes, s]). ``notes`` says how parts of it were
    obtained (e.g. a transfer prior instead of a measurement)."""

    device: str  # "cpu" or torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3"
    model: str  # the served model's name (ModelConfig.name)
    dtype: str
    block_size: int
    max_batch_tokens: int
    kv_bytes_per_token: int
    prefill: LinearFit  # x = new tokens in the step, y = attention work
    decode: LinearFit  # x = batch size, y = total context tokens
    transfer: TransferFit
    samples: dict[str, list[list[float]]]
    created: str = ""  # ISO date
    command: str = ""  # the command line that measured it
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.max_batch_tokens <= 0 or self.kv_bytes_per_token < 0:
            raise ValueError("profile: block_size and max_batch_tokens must be positive, "
                             "kv_bytes_per_token >= 0")
        for name in ("prefill", "decode"):
            fit = getattr(self, name)
            if min(fit.a, fit.b, fit.c) < 0:
                raise ValueError(f"profile: the {name} fit has a negative coefficient: {fit}")

    def to_json(self) -> dict[str, Any]:
        p, d, t = self.prefill, self.decode, self.transfer
        return {
            "format": PROFILE_FORMAT, "device": self.device, "model": self.model,
            "dtype": self.dtype, "block_size": self.block_size,
            "max_batch_tokens": self.max_batch_tokens,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "prefill": {"a": p.a, "b": p.b, "c": p.c},
            "decode": {"a": d.a, "b": d.b, "c": d.c},
            "transfer": {"latency_s": t.latency_s, "bytes_per_s": t.bytes_per_s},
            "created": self.created, "command": self.command, "notes": dict(self.notes),
            "samples": {k: [list(r) for r in v] for k, v in self.samples.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Profile:
        if d.get("format", PROFILE_FORMAT) != PROFILE_FORMAT:
            raise ValueError(f"profile format {d.get('format')} is not {PROFILE_FORMAT}")
        try:
            return cls(
                device=str(d["device"]), model=str(d["model"]), dtype=str(d["dtype"]),
                block_size=int(d["block_size"]), max_batch_tokens=int(d["max_batch_tokens"]),
                kv_bytes_per_token=int(d["kv_bytes_per_token"]),
                prefill=LinearFit(**{k: float(d["prefill"][k]) for k in "abc"}),
                decode=LinearFit(**{k: float(d["decode"][k]) for k in "abc"}),
                transfer=TransferFit(float(d["transfer"]["latency_s"]),
                                     float(d["transfer"]["bytes_per_s"])),
                samples={str(k): [[float(x) for x in r] for r in v]
                         for k, v in d.get("samples", {}).items()},
                created=str(d.get("created", "")), command=str(d.get("command", "")),
                notes={str(k): str(v) for k, v in d.get("notes", {}).items()},
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a pdserve profile: missing or malformed {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        """Indented JSON with each sample row on one line (a profile is read by people too)."""
        text = json.dumps(self.to_json(), indent=1)
        text = re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]",
                      lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
        Path(path).write_text(text + "\n")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.casefold()).strip("-") or "unnamed"


def profile_filename(device: str, model: str) -> str:
    """The file name of a profile, ``<device>-<model>.json`` in lower case with runs of
    other characters as '-' (the shipped ones are named so)."""
    return f"{_slug(device)}-{_slug(model)}.json"


def _same_device(profiled: str, device: str) -> bool:
    """``device`` is the profile's: the same name, or a description that contains it (a
    worker's ``describe_device``, 'cuda:0 NVIDIA H200 (CUDA_VISIBLE_DEVICES=1)')."""
    a, b = (" ".join(s.casefold().split()) for s in (profiled, device))
    return a == b or (len(a) > 3 and a in b)


def shipped_profile(device: str, model: str) -> Profile | None:
    """The profile shipped in ``router/profiles/`` for ``device`` and ``model`` (the served
    ModelConfig's name), or None."""
    folder = resources.files(__package__ or "pdserve.router").joinpath("profiles")
    if not folder.is_dir():
        return None
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        profile = Profile.from_json(json.loads(entry.read_text()))
        if profile.model == model and _same_device(profile.device, device):
            return profile
    return None


# --------------------------------------------------------------------------- the model


class _Samples:
    """One kind's recent samples while uncalibrated, and when to fit them again."""

    def __init__(self) -> None:
        self.rows: deque[tuple[float, ...]] = deque(maxlen=SAMPLE_WINDOW)
        self._new = 0  # samples since the last fit
        self._fitted = False

    def add(self, row: tuple[float, ...]) -> bool:
        """Keep ``row``; True when the window is due for a (re)fit."""
        self.rows.append(row)
        self._new += 1
        if self._fitted and self._new < REFIT_EVERY:
            return False
        if len(self.rows) < MIN_FIT_SAMPLES or len({r[0] for r in self.rows}) < MIN_DISTINCT_X:
            return False
        self._new, self._fitted = 0, True
        return True


def _ewma(old: float, ratio: float, alpha: float) -> float:
    return min(FACTOR_MAX, max(FACTOR_MIN, (1 - alpha) * old + alpha * ratio))


class CostModel:
    """Predicted step and transfer times, corrected online.

    ``profile`` None: uncalibrated; the fits are learned from the observations (a fit once
    ``MIN_FIT_SAMPLES`` samples span ``MIN_DISTINCT_X`` distinct x values, refitted on the
    last ``SAMPLE_WINDOW`` every ``REFIT_EVERY`` new ones). Until a fit is known the
    predictions that need it are 0.0 and ``calibrated`` is False (the router then admits
    everything). ``alpha`` weighs each observation in the per-worker and per-pair
    corrections; ``max_batch_tokens`` (default: the profile's) is a prefill step's token
    budget; ``kv_bytes_per_token`` (default: the profile's) turns tokens into transfer bytes.
    """

    def __init__(self, profile: Profile | None, alpha: float = 0.1,
                 max_batch_tokens: int | None = None, *, kv_bytes_per_token: int = 0) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.profile = profile
        self.alpha = alpha
        self._max_batch_tokens = max_batch_tokens or (
            profile.max_batch_tokens if profile else DEFAULT_MAX_BATCH_TOKENS)
        if self._max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.kv_bytes_per_token = kv_bytes_per_token or (
            profile.kv_bytes_per_token if profile else 0)
        self.prefill_fit: LinearFit | None = profile.prefill if profile else None
        self.decode_fit: LinearFit | None = profile.decode if profile else None
        self.transfer_fit: TransferFit | None = profile.transfer if profile else None
        self._factors: dict[str, float] = {}
        self._bandwidth_factors: dict[tuple[str, str], float] = {}
        # Online fitting only without a profile: a profile's fits stay, corrected per worker.
        self._learn = profile is None
        self._samples = {k: _Samples() for k in ("prefill", "decode", "transfer")}

    @property
    def calibrated(self) -> bool:
        """Both the prefill and the decode fit are known (from the profile or learned)."""
        return self.prefill_fit is not None and self.decode_fit is not None

    @property
    def max_batch_tokens(self) -> int:
        return self._max_batch_tokens

    def factor(self, worker: str) -> float:
        """Measured over predicted time of ``worker``'s steps, smoothed (1.0 before any)."""
        return self._factors.get(worker, 1.0)

    def bandwidth_factor(self, pair: tuple[str, str]) -> float:
        """Measured over predicted bytes-over-bandwidth time of ``pair``'s transfers."""
        return self._bandwidth_factors.get(pair, 1.0)

    def _scale(self, worker: str | None) -> float:
        return 1.0 if worker is None else self.factor(worker)

    # -- predictions ------------------------------------------------------------------------
    def prefill_step_s(self, tokens: int, attention: int, worker: str | None = None) -> float:
        if self.prefill_fit is None or tokens <= 0:
            return 0.0
        return self.prefill_fit(tokens, attention) * self._scale(worker)

    def decode_step_s(self, batch: int, context: int, worker: str | None = None) -> float:
        if self.decode_fit is None:
            return 0.0
        return self.decode_fit(batch, context) * self._scale(worker)

    def prefill_token_s(self, worker: str | None = None) -> float:
        """What one more prompt token adds to a step (the prefill fit's b, corrected)."""
        if self.prefill_fit is None:
            return 0.0
        return self.prefill_fit.b * self._scale(worker)

    def mixed_step_s(self, batch: int, context: int, prefill_tokens: int,
                     prefill_attention: int, worker: str | None = None) -> float:
        """A decode step with ``prefill_tokens`` prompt tokens mixed in (local prefill)."""
        p, d = self.prefill_fit, self.decode_fit
        if p is None or d is None:
            return 0.0
        base = d(batch, context) + p.b * prefill_tokens + p.c * prefill_attention
        return base * self._scale(worker)

    def transfer_s(self, num_tokens: int, pair: tuple[str, str] | None = None) -> float:
        """The KV of ``num_tokens`` tokens over ``pair``'s channel (0.0 while unknown)."""
        fit = self.transfer_fit
        if fit is None or not self.kv_bytes_per_token or num_tokens <= 0:
            return 0.0
        per_byte = 1.0 if pair is None else self.bandwidth_factor(pair)
        return fit.latency_s + num_tokens * self.kv_bytes_per_token / fit.bytes_per_s * per_byte

    def queue_prefill_s(self, queued_tokens: int, queued_attention: int, num_tokens: int,
                        worker: str | None = None, cached: int = 0) -> float:
        """Until a prompt of ``num_tokens``, queued behind ``queued_tokens`` (of attention
        work ``queued_attention``) on a prefill worker, is prefilled: queue and prompt in
        steps of ``max_batch_tokens``, ceil(T/B)·a + b·T + c·(queued_attention + n²).
        ``cached``: the prompt's leading tokens the worker holds in its prefix cache; only
        the other m = n - cached are computed, of attention work m·n."""
        fit = self.prefill_fit
        if fit is None:
            return 0.0
        new = num_tokens - cached
        total = queued_tokens + new
        steps = math.ceil(total / self._max_batch_tokens)
        work = queued_attention + new * num_tokens
        return (steps * fit.a + fit.b * total + fit.c * work) * self._scale(worker)

    def local_prefill_s(self, queued_tokens: int, queued_attention: int, num_tokens: int,
                        batch: int, context: int, worker: str | None = None,
                        cached: int = 0) -> float:
        """The same on a decode worker that mixes prompt chunks into its decode steps: each
        step runs max(1, B - batch) prompt tokens with the decode batch as it is now
        (``batch`` sequences, ``context`` tokens); ``cached`` as in ``queue_prefill_s``."""
        p, d = self.prefill_fit, self.decode_fit
        if p is None or d is None:
            return 0.0
        new = num_tokens - cached
        total = queued_tokens + new
        steps = math.ceil(total / max(1, self._max_batch_tokens - batch))
        work = queued_attention + new * num_tokens
        base = steps * d(batch, context) + p.b * total + p.c * work
        return base * self._scale(worker)

    # -- observations -----------------------------------------------------------------------
    def _correct(self, worker: str, predicted: float, seconds: float) -> None:
        if predicted > 0:
            self._factors[worker] = _ewma(self.factor(worker), seconds / predicted, self.alpha)

    def observe_prefill_step(self, worker: str, tokens: int, attention: int,
                             seconds: float) -> None:
        """A prefill step ``worker`` ran (``FirstToken.step``)."""
        if tokens <= 0 or seconds <= 0:
            return
        if self.prefill_fit is not None:
            self._correct(worker, self.prefill_fit(tokens, attention), seconds)
        if self._learn and self._samples["prefill"].add((tokens, attention, seconds)):
            self.prefill_fit = fit_linear(self._samples["prefill"].rows)

    def observe_decode_step(self, worker: str, batch: int, context: int, seconds: float,
                            prefill_tokens: int = 0, prefill_attention: int = 0) -> None:
        """A decode worker's step (``StepReport``). One without a decode batch is a prefill
        step; a mixed one (both) corrects the worker's factor but is not fitted, as its
        time cannot be split between the two forms."""
        if seconds <= 0:
            return
        if batch <= 0:
            self.observe_prefill_step(worker, prefill_tokens, prefill_attention, seconds)
            return
        if prefill_tokens > 0:
            self._correct(worker, self.mixed_step_s(batch, context, prefill_tokens,
                                                    prefill_attention), seconds)
            return
        if self.decode_fit is not None:
            self._correct(worker, self.decode_fit(batch, context), seconds)
        if self._learn and self._samples["decode"].add((batch, context, seconds)):
            self.decode_fit = fit_linear(self._samples["decode"].rows)

    def observe_transfer(self, pair: tuple[str, str], nbytes: int, seconds: float) -> None:
        """A KV transfer over ``pair`` (``TransferDone``). It corrects the pair's bandwidth
        when its bytes-over-bandwidth time is at least the latency (a smaller transfer says
        more about the latency than about the bandwidth)."""
        if nbytes <= 0 or seconds <= 0:
            return
        fit = self.transfer_fit
        if fit is not None:
            byte_s = nbytes / fit.bytes_per_s
            if byte_s >= fit.latency_s and byte_s > 0:
                ratio = max(seconds - fit.latency_s, 0.0) / byte_s
                self._bandwidth_factors[pair] = _ewma(self.bandwidth_factor(pair), ratio,
                                                      self.alpha)
        if self._learn and self._samples["transfer"].add((nbytes, seconds)):
            self.transfer_fit = fit_transfer(self._samples["transfer"].rows)

    def fit_quality(self) -> dict[str, float]:
        """Median relative error of each known fit over the samples kept (learned fits) or
        the profile's (calibrated ones), by kind."""
        out: dict[str, float] = {}
        fits = {"prefill": self.prefill_fit, "decode": self.decode_fit,
                "transfer": self.transfer_fit}
        for kind, fit in fits.items():
            rows: Sequence[Sequence[float]] = (
                list(self._samples[kind].rows) if self._learn
                else (self.profile.samples.get(kind, []) if self.profile else []))
            if fit is not None and rows:
                out[kind] = median_relative_error(fit, rows)
        return out
