"""`pdserve profile`: its measurement plans, a quick run on the tiny dummy model (CPU) that
writes a loadable profile, and the transfer samples through the real channel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.cluster.bench.profile import decode_plan, geometric, prefill_plan
from pdserve.cluster.bench.transfer_profile import measure_transfers, transfer_sizes
from pdserve.cluster.cli import main
from pdserve.engine.config import PRESETS, CacheConfig, blocks_for
from pdserve.engine.kv import ChannelSpec
from pdserve.engine.kv_cache import allocate_kv_pool
from pdserve.router.cost_model import CostModel, Profile, fit_transfer


def test_geometric() -> None:
    assert geometric(16, 2048, 2) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert geometric(16, 100, 4) == [16, 64, 100]
    assert geometric(1, 1, 2) == [1] and geometric(16, 8, 2) == []


def test_prefill_plan_spans_the_forms() -> None:
    steps = prefill_plan(2048, 64, 8192, 1024, 16, quick=False)
    assert [s[0][1] for s in steps if len(s) == 1 and s[0][0] == 0] == geometric(16, 2048, 2)
    assert any(len(s) == 1 and s[0][0] > 0 for s in steps)  # chunks after a cached prefix
    assert any(len(s) >= 4 for s in steps)  # batches
    assert len(steps) == len({tuple(s) for s in steps})
    for s in steps:
        assert sum(n for _, n in s) <= 2048
        assert max(start + n for start, n in s) <= 8192
        assert sum(blocks_for(start + n, 16) for start, n in s) <= 1024
    # a small pool and context cut the chunked steps that would not fit
    small = prefill_plan(2048, 64, 2048, 200, 16, quick=False)
    assert all(sum(blocks_for(st + n, 16) for st, n in s) <= 200 for s in small)
    assert all(max(st + n for st, n in s) <= 2048 for s in small)


def test_decode_plan_fits_the_pool() -> None:
    plan = decode_plan(64, 8192, 1024, 16, quick=False)
    assert sorted({b for b, _ in plan}) == [1, 2, 4, 8, 16, 32, 64]
    assert max(c for b, c in plan if b == 1) == 8192  # the model's context
    assert max(c for b, c in plan if b == 64) == 256  # what 1024 blocks hold for 64
    assert all(b * blocks_for(c, 16) <= 1024 and c <= 8192 for b, c in plan)


def test_quick_profile_of_the_tiny_model(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny.json"
    threads = torch.get_num_threads()  # as this process has it: the run leaves it so
    rc = main(["profile", "--load-format", "dummy", "--preset", "tiny", "--device", "cpu",
               "--max-batch-tokens", "256", "--torch-threads", str(threads), "--quick",
               "--no-transfer", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "prefill  s =" in printed and "decode   s =" in printed and str(out) in printed
    p = Profile.load(out)
    assert (p.device, p.model, p.dtype, p.block_size, p.max_batch_tokens) == (
        "cpu", "tiny", "float32", 16, 256)
    cfg = PRESETS["tiny"]
    assert p.kv_bytes_per_token == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert "--quick" in p.command and p.created
    assert "prior" in p.notes["transfer"] and p.samples["transfer"] == []
    for fit in (p.prefill, p.decode):
        assert min(fit.a, fit.b, fit.c) >= 0
    assert len({r[0] for r in p.samples["prefill"]}) >= 3
    assert len({r[0] for r in p.samples["decode"]}) >= 3
    for kind, fit in (("prefill", p.prefill), ("decode", p.decode)):
        for x, y, s in p.samples[kind]:
            assert 0 < s < 10 and 0 < fit(x, y) < 10  # seconds, sane for a 2-layer model
    assert 1e8 < p.transfer.bytes_per_s < 1e12 and p.transfer.latency_s == 1e-3
    m = CostModel(p)
    assert m.calibrated and m.queue_prefill_s(0, 0, 256) > 0 and m.transfer_s(256) > 0


def test_transfers_through_the_channel() -> None:
    cfg = PRESETS["tiny"]
    cache = CacheConfig(16, 64, torch.float32)
    spec = ChannelSpec.from_configs(cfg, cache)
    sizes = transfer_sizes(1024, 16, quick=True)
    assert sizes == [16, 256, 1024]
    got = measure_transfers(spec, allocate_kv_pool(cfg, cache, "cpu"), sizes, reps=1)
    assert got.prior is None and "Gloo" in got.note
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert [r[0] for r in got.rows] == [n * per_token for n in sizes]
    assert all(r[1] > 0 for r in got.rows)
    assert fit_transfer(got.rows).bytes_per_s > 0
