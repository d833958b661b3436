"""The cost model: fits, profiles, predictions against hand-computed values, and the online
correction and learning from worker timings."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.engine.config import MAX_BATCH_TOKENS
from pdserve.router.cost_model import (
    DEFAULT_MAX_BATCH_TOKENS,
    FACTOR_MAX,
    MIN_FIT_SAMPLES,
    CostModel,
    LinearFit,
    Profile,
    TransferFit,
    _same_device,
    attention_work,
    fit_linear,
    fit_transfer,
    median_relative_error,
    profile_filename,
    shipped_profile,
)
from pdserve.router.fitting import MAX_BYTES_PER_S

PREFILL = LinearFit(a=2e-3, b=1e-4, c=2e-8)
DECODE = LinearFit(a=5e-3, b=2e-4, c=1e-6)
TRANSFER = TransferFit(latency_s=1e-3, bytes_per_s=5e9)


def prefill_rows(fit: LinearFit, noise: float = 0.0, seed: int = 0) -> list[list[float]]:
    """Single prompts 16..2048, chunks after a cached prefix, batches: as profile measures."""
    rng = random.Random(seed)
    steps: list[list[tuple[int, int]]] = [[(0, 16 << i)] for i in range(8)]
    steps += [[(s, n)] for s in (512, 1024, 3072) for n in (256, 1024)]
    steps += [[(0, 2048 // k)] * k for k in (2, 4, 8, 16)]
    rows = []
    for chunks in steps:
        t, w = sum(n for _, n in chunks), attention_work(chunks)
        rows.append([t, w, fit(t, w) * (1 + rng.uniform(-noise, noise))])
    return rows


def decode_rows(fit: LinearFit, noise: float = 0.0, seed: int = 1) -> list[list[float]]:
    rng = random.Random(seed)
    rows = []
    for b in (1, 2, 4, 8, 16, 32, 64):
        for ctx in (16, 64, 256, 1024):
            rows.append([b, b * ctx, fit(b, b * ctx) * (1 + rng.uniform(-noise, noise))])
    return rows


def profile(**over: object) -> Profile:
    values: dict[str, object] = dict(
        device="cpu", model="m", dtype="float32", block_size=16, max_batch_tokens=512,
        kv_bytes_per_token=1000, prefill=LinearFit(0.01, 0.001, 1e-6),
        decode=LinearFit(0.005, 0.0002, 1e-6), transfer=TransferFit(0.001, 1e9),
        samples={"prefill": [[16.0, 256.0, 0.03]], "decode": [], "transfer": []},
    )
    values.update(over)
    return Profile(**values)  # type: ignore[arg-type]


def close(x: float, y: float, rel: float) -> bool:
    return abs(x - y) <= rel * abs(y)


# --------------------------------------------------------------------------- fits


def test_attention_work() -> None:
    assert attention_work([]) == 0
    assert attention_work([(0, 16)]) == 16 * 16  # a prompt from scratch: n²
    assert attention_work([(64, 6), (0, 10)]) == 6 * 70 + 10 * 10
    assert attention_work(iter([(100, 1)] * 3)) == 3 * 101  # three decode-like rows


def test_fit_recovers_coefficients_exactly_without_noise() -> None:
    for fit, rows in ((PREFILL, prefill_rows(PREFILL)), (DECODE, decode_rows(DECODE))):
        got = fit_linear(rows)
        for name in "abc":
            assert close(getattr(got, name), getattr(fit, name), 1e-6), (name, got, fit)


def test_fit_recovers_coefficients_with_noise() -> None:
    for seed in range(3):
        got = fit_linear(prefill_rows(PREFILL, noise=0.03, seed=seed))
        assert close(got.a, PREFILL.a, 0.15) and close(got.b, PREFILL.b, 0.1)
        assert close(got.c, PREFILL.c, 0.15)
        got = fit_linear(decode_rows(DECODE, noise=0.03, seed=seed))
        assert close(got.a, DECODE.a, 0.1) and close(got.b, DECODE.b, 0.15)
        assert close(got.c, DECODE.c, 0.1)
        rows = prefill_rows(PREFILL, noise=0.03, seed=seed)
        assert median_relative_error(got := fit_linear(rows), rows) < 0.03
        assert median_relative_error(LinearFit(got.a, got.b * 2, got.c), rows) > 0.2


def test_fit_keeps_coefficients_non_negative() -> None:
    # Time that falls with y: least squares would fit c < 0; the non-negative fit holds c at
    # 0 and fits a + b·x alone, as well as that form allows.
    rows = [[x, y, 0.01 + 1e-4 * x - 1e-7 * y] for x in (10, 100, 1000) for y in (0, 1e4, 5e4)]
    got = fit_linear(rows)
    assert got.c == 0.0 and got.a >= 0 and got.b > 0
    assert got == fit_linear([[x, 0.0, s] for x, _, s in rows])
    # Time that falls with x: b = 0; constant time: a alone.
    got = fit_linear([[x, 0, 1.0 - 1e-4 * x] for x in (1, 10, 100, 1000)])
    assert got.b == 0.0 and got.c == 0.0 and got.a > 0
    assert fit_linear([[x, x * x, 0.5] for x in (1, 2, 3)]) == LinearFit(0.5, 0.0, 0.0)
    with pytest.raises(ValueError):
        fit_linear([])


def test_fit_transfer() -> None:
    rng = random.Random(0)
    sizes = [1 << p for p in range(12, 30, 2)]
    got = fit_transfer([[n, TRANSFER(n)] for n in sizes])
    assert close(got.latency_s, 1e-3, 1e-6) and close(got.bytes_per_s, 5e9, 1e-6)
    got = fit_transfer([[n, TRANSFER(n) * (1 + rng.uniform(-0.03, 0.03))] for n in sizes])
    assert close(got.latency_s, 1e-3, 0.1) and close(got.bytes_per_s, 5e9, 0.1)
    flat = fit_transfer([[n, 2e-3] for n in sizes])  # no per-byte cost at all
    assert flat.latency_s == pytest.approx(2e-3) and flat.bytes_per_s == MAX_BYTES_PER_S


# --------------------------------------------------------------------------- profiles


def test_profile_json_round_trip(tmp_path: Path) -> None:
    p = profile(created="2026-12-06", command="pdserve profile --quick",
                notes={"transfer": "prior"})
    assert Profile.from_json(json.loads(json.dumps(p.to_json()))) == p
    p.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == p
    raw = p.to_json()
    del raw["decode"]
    with pytest.raises(ValueError, match="decode"):
        Profile.from_json(raw)
    with pytest.raises(ValueError, match="negative"):
        profile(prefill=LinearFit(0.01, -1.0, 0.0))


def test_profile_filename_and_devices() -> None:
    assert profile_filename("cpu", "Smollm2 135M 8k") == "cpu-smollm2-135m-8k.json"
    assert profile_filename("NVIDIA H100 80GB HBM3", "llama-3.1-8b") == \
        "nvidia-h100-80gb-hbm3-llama-3.1-8b.json"
    assert _same_device("cpu", "CPU") and not _same_device("cpu", "cuda:0 NVIDIA H100")
    assert _same_device("NVIDIA H200", "cuda:0 NVIDIA H200 (CUDA_VISIBLE_DEVICES=1)")
    assert not _same_device("NVIDIA H200", "NVIDIA H100 80GB HBM3")


def test_shipped_cpu_profile_of_the_demo_model() -> None:
    # The name the router knows: the GGUF's general.name (ModelConfig.name).
    demo = "Smollm2 135M 8k Lc100K Mix1 Ep2"
    p = shipped_profile("cpu", demo)
    assert p is not None and p.device == "cpu" and p.model == demo and p.dtype == "float32"
    assert p.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4  # layers, K+V, kv heads, head dim, fp32
    assert p.prefill(2048, 2048**2) > p.prefill(16, 256) > 0
    assert p.decode(64, 64 * 256) > p.decode(1, 16) > 0
    assert len(p.samples["prefill"]) >= 10 and len(p.samples["decode"]) >= 10
    assert shipped_profile("cpu", "no such model") is None
    assert shipped_profile("NVIDIA H100 80GB HBM3", demo) is None


def test_cost_model_imports_no_torch() -> None:
    code = ("import sys, pdserve.router.cost_model; "
            "bad = {'torch', 'ray', 'grpc', 'google.protobuf'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-P", "-c", code], check=True)


def test_default_budget_is_the_engines() -> None:
    assert DEFAULT_MAX_BATCH_TOKENS == MAX_BATCH_TOKENS
    assert CostModel(None).max_batch_tokens == MAX_BATCH_TOKENS
    assert CostModel(profile()).max_batch_tokens == 512
    assert CostModel(profile(), max_batch_tokens=64).max_batch_tokens == 64


# --------------------------------------------------------------------------- predictions


def test_predictions_by_hand() -> None:
    m = CostModel(profile())  # prefill 0.01 + 1e-3·t + 1e-6·w, decode 5e-3 + 2e-4·b + 1e-6·c
    assert m.calibrated
    assert m.prefill_step_s(100, 10_000) == pytest.approx(0.01 + 0.1 + 0.01)
    assert m.decode_step_s(12, 3000) == pytest.approx(0.005 + 0.0024 + 0.003)
    assert m.mixed_step_s(12, 3000, 100, 10_000) == pytest.approx(0.0104 + 0.1 + 0.01)
    # 1000 bytes a token at 1 GB/s after 1 ms
    assert m.transfer_s(2000) == pytest.approx(0.001 + 2e6 / 1e9)
    assert m.transfer_s(0) == 0.0


def test_queue_prefill_by_hand() -> None:
    m = CostModel(profile(), alpha=1.0)  # alpha 1: a factor is the last ratio measured
    # 1000 queued + 100 new tokens in steps of 512: 3 steps
    want = 3 * 0.01 + 0.001 * 1100 + 1e-6 * (200_000 + 100**2)
    assert m.queue_prefill_s(1000, 200_000, 100) == pytest.approx(want)
    assert m.queue_prefill_s(0, 0, 512) == pytest.approx(0.01 + 0.512 + 1e-6 * 512**2)
    assert m.queue_prefill_s(0, 0, 513) == pytest.approx(0.02 + 0.513 + 1e-6 * 513**2)
    m.observe_prefill_step("p0", 100, 10_000, 2 * m.prefill_step_s(100, 10_000))
    assert m.factor("p0") == pytest.approx(2.0)
    assert m.queue_prefill_s(1000, 200_000, 100, "p0") == pytest.approx(2 * want)
    assert m.queue_prefill_s(1000, 200_000, 100, "p1") == pytest.approx(want)


def test_local_prefill_by_hand() -> None:
    m = CostModel(profile())
    decode = 0.005 + 0.0002 * 12 + 1e-6 * 3000
    # 12 decoding sequences leave 500 of the 512-token budget: 1 step for 100 tokens ...
    assert m.local_prefill_s(0, 0, 100, 12, 3000) == pytest.approx(
        decode + 0.001 * 100 + 1e-6 * 100**2)
    # ... 3 steps for 200 queued + 810 new (2 would do without the decode batch)
    assert m.local_prefill_s(200, 40_000, 810, 12, 3000) == pytest.approx(
        3 * decode + 0.001 * 1010 + 1e-6 * (40_000 + 810**2))
    # a batch that fills the budget still takes one prompt token a step
    full = 0.005 + 0.0002 * 600 + 1e-6 * 6000
    assert m.local_prefill_s(0, 0, 4, 600, 6000) == pytest.approx(
        4 * full + 0.004 + 1e-6 * 16)


# --------------------------------------------------------------------------- online


def test_factor_converges_to_a_slowed_worker() -> None:
    m = CostModel(profile(prefill=PREFILL, decode=DECODE))
    rows = prefill_rows(PREFILL, noise=0.05)
    for i in range(100):
        t, w, s = rows[i % len(rows)]
        m.observe_prefill_step("slow", int(t), int(w), 2.0 * s)  # twice as slow, noisy
        m.observe_prefill_step("same", int(t), int(w), s)
    assert m.factor("slow") == pytest.approx(2.0, rel=0.05)
    assert m.factor("same") == pytest.approx(1.0, rel=0.05)
    assert m.factor("unseen") == 1.0
    assert m.prefill_step_s(1024, 1024**2, "slow") == pytest.approx(
        2 * PREFILL(1024, 1024**2), rel=0.05)
    assert m.prefill_step_s(1024, 1024**2) == PREFILL(1024, 1024**2)  # the fit itself stays
    for _ in range(100):  # ten times slower: clamped
        m.observe_decode_step("stuck", 8, 800, 10 * DECODE(8, 800))
    assert m.factor("stuck") == FACTOR_MAX
    assert m.decode_step_s(8, 800, "stuck") == pytest.approx(FACTOR_MAX * DECODE(8, 800))


def test_mixed_steps_correct_the_decode_workers_factor() -> None:
    m = CostModel(profile())
    for _ in range(100):
        m.observe_decode_step("d0", 4, 400, 3 * m.mixed_step_s(4, 400, 64, 4096),
                              prefill_tokens=64, prefill_attention=4096)
    assert m.factor("d0") == pytest.approx(3.0, rel=0.01)
    assert m.local_prefill_s(0, 0, 64, 4, 400, "d0") == pytest.approx(
        3 * m.local_prefill_s(0, 0, 64, 4, 400), rel=0.01)


def test_pair_bandwidth_converges() -> None:
    m = CostModel(profile(transfer=TRANSFER, kv_bytes_per_token=10_000))
    slow = ("p0", "d1")
    for i in range(100):
        nbytes = (1 + i % 5) * 50_000_000
        m.observe_transfer(slow, nbytes, TRANSFER.latency_s + nbytes / 2e9)  # 2 GB/s, not 5
        m.observe_transfer(("p0", "d0"), nbytes, TRANSFER(nbytes))
    assert m.bandwidth_factor(slow) == pytest.approx(2.5, rel=0.01)
    assert m.transfer_s(40_000, slow) == pytest.approx(1e-3 + 4e8 / 2e9, rel=0.01)
    assert m.transfer_s(40_000, ("p0", "d0")) == pytest.approx(TRANSFER(4e8), rel=0.01)
    assert m.transfer_s(40_000) == pytest.approx(TRANSFER(4e8))
    m.observe_transfer(("p1", "d0"), 1000, 1.0)  # latency-bound: says nothing of bandwidth
    assert m.bandwidth_factor(("p1", "d0")) == 1.0


def test_uncalibrated_until_enough_distinct_samples() -> None:
    m = CostModel(None, kv_bytes_per_token=10_000)
    assert not m.calibrated
    assert m.prefill_step_s(100, 10_000) == 0.0 and m.decode_step_s(4, 400) == 0.0
    assert m.queue_prefill_s(0, 0, 100) == 0.0 and m.local_prefill_s(0, 0, 10, 1, 10) == 0.0
    assert m.transfer_s(100) == 0.0
    for _ in range(2 * MIN_FIT_SAMPLES):  # many samples, but two distinct sizes only
        for t in (64, 128):
            m.observe_prefill_step("p0", t, t * t, PREFILL(t, t * t))
    assert m.prefill_fit is None
    for t, w, s in prefill_rows(PREFILL):
        m.observe_prefill_step("p0", int(t), int(w), s)
    assert m.prefill_fit is not None and not m.calibrated  # no decode fit yet
    assert m.prefill_step_s(1000, 10**6) == pytest.approx(PREFILL(1000, 10**6), rel=1e-3)
    rows = decode_rows(DECODE)
    for b, c, s in rows[: MIN_FIT_SAMPLES - 1]:
        m.observe_decode_step("d0", int(b), int(c), s)
    assert not m.calibrated
    for b, c, s in rows[MIN_FIT_SAMPLES - 1:]:
        m.observe_decode_step("d0", int(b), int(c), s)
    assert m.calibrated
    assert m.decode_step_s(10, 5000) == pytest.approx(DECODE(10, 5000), rel=1e-3)
    assert m.factor("d0") == pytest.approx(1.0, abs=1e-3)  # the fit matches its steps
    for n in range(1, 11):
        m.observe_transfer(("p0", "d0"), n * 10**7, TRANSFER(n * 10**7))
    assert m.transfer_s(1000) == pytest.approx(TRANSFER(10**7), rel=1e-3)
    assert set(m.fit_quality()) == {"prefill", "decode", "transfer"}


def test_learned_fit_tracks_a_change() -> None:
    """Without a profile the window is refitted as samples come: after the workers slow
    down for good, the fit follows (the factors alone would stop at their clamp)."""
    m = CostModel(None)
    slower = LinearFit(DECODE.a * 3, DECODE.b * 3, DECODE.c * 3)
    for fit in (DECODE, slower):
        for _ in range(10):
            for b, c, s in decode_rows(fit):
                m.observe_decode_step("d0", int(b), int(c), s)
    assert m.decode_fit is not None
    assert m.decode_fit(16, 16 * 256) == pytest.approx(slower(16, 16 * 256), rel=0.05)
    assert not math.isclose(m.decode_step_s(16, 16 * 256), 0.0)
