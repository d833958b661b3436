"""Profiles and deployments for the ``pdserve tune`` tests: the shipped CPU profile of the
demo model, and synthetic profiles whose step times are known by hand."""

from __future__ import annotations

from pathlib import Path

from pdserve.cluster.config import ServeConfig
from pdserve.router.cost_model import LinearFit, Profile, TransferFit, shipped_profile

CPU_MODEL = "Smollm2 135M 8k Lc100K Mix1 Ep2"  # the demo model's name in the shipped profile


def cpu_profile() -> Profile:
    profile = shipped_profile("cpu", CPU_MODEL)
    assert profile is not None, "the CPU profile of the demo model ships with pdserve"
    return profile


def synthetic_profile(prefill: tuple[float, float, float], decode: tuple[float, float, float],
                      transfer: tuple[float, float] = (0.0, 1e12),
                      kv_bytes_per_token: int = 1024, block_size: int = 16) -> Profile:
    """A profile with the given fits (prefill a, b, c; decode a, b, c; transfer latency and
    bytes/s)."""
    return Profile(
        device="synthetic", model="synthetic", dtype="float32", block_size=block_size,
        max_batch_tokens=2048, kv_bytes_per_token=kv_bytes_per_token,
        prefill=LinearFit(*prefill), decode=LinearFit(*decode),
        transfer=TransferFit(*transfer), samples={})


def deployment(profile: Profile, tmp_path: Path, **over: object) -> ServeConfig:
    """A ServeConfig calibrated by ``profile`` (saved under ``tmp_path``)."""
    path = tmp_path / f"{profile.device}-{abs(hash(profile.to_json().__repr__()))}.json"
    profile.save(path)
    base: dict[str, object] = dict(profile=str(path), prefill_blocks=512, decode_blocks=1024,
                                   block_size=profile.block_size)
    base.update(over)
    return ServeConfig(**base)  # type: ignore[arg-type]
