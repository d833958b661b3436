"""The runner's CPU-checkable parts: the CUDA-graph ladder, the fixed-buffer inputs and their
padding (run eagerly, without capture), and the automatic KV pool size arithmetic."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import PRESETS, CacheConfig, ModelSpec, RunnerConfig
from pdserve.engine.cuda_graphs import (
    DecodeGraphs,
    graph_batch_sizes,
    pack_block_table,
    pack_decode_inputs,
)
from pdserve.engine.runner import (
    DecodeItem,
    ModelRunner,
    PrefillItem,
    activation_reserve_bytes,
    auto_num_blocks,
)

TINY = PRESETS["tiny"]
BS = 16


def test_graph_ladder() -> None:
    assert graph_batch_sizes(64, 256) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert graph_batch_sizes(256, 256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192,
                                           224, 256]
    assert graph_batch_sizes(100, 256)[-3:] == [64, 96, 100]
    assert graph_batch_sizes(512, 128)[-1] == 128
    assert graph_batch_sizes(3, 256) == [1, 2, 3]
    assert graph_batch_sizes(1, 256) == [1]


def test_pack_inputs_pads_with_no_write_rows() -> None:
    items = [DecodeItem(7, 17, [5, 9]), DecodeItem(8, 0, [3])]
    flat = pack_decode_inputs(items, 4, BS)
    ids, pos, slots, lens = flat[0:4], flat[4:8], flat[8:12], flat[12:16]
    assert ids == [7, 8, 0, 0]
    assert pos == [17, 0, 0, 0]
    assert slots == [9 * BS + 1, 3 * BS, -1, -1]  # padding rows write no KV
    assert lens == [18, 1, 1, 1]  # ...and attend to one key (no empty softmax)


def test_pack_block_table_uses_only_needed_blocks() -> None:
    items = [DecodeItem(1, 15, [4, 6, 8]), DecodeItem(1, 16, [2, 3, 7])]
    flat, width = pack_block_table(items, BS)
    assert width == 2
    assert flat == [4, 0, 2, 3]


def test_prefill_inputs_match_the_per_token_definition() -> None:
    """A mixed prefill batch (a whole prompt, a chunk starting mid-block, a one-token chunk
    deep in a sequence): every token's position and slot, the block tables (zero-padded),
    kv lens, cu_seqlens and the last rows, against their per-token definitions."""
    runner = ModelRunner(TINY, CacheConfig(BS, 64), ModelSpec("dummy", preset="tiny"),
                         RunnerConfig("cpu", torch.float32, "torch"), progress=False)
    items = [PrefillItem(list(range(100, 140)), 0, [9, 2, 31]),
             PrefillItem([7, 8, 9, 10, 11], 13, [4, 60]),
             PrefillItem([5], 50, [1, 3, 5, 7])]
    ids, meta, last = runner.prefill_inputs(items)
    want_pos = [p for it in items for p in range(it.start, it.start + len(it.token_ids))]
    want_slots = [it.block_ids[p // BS] * BS + p % BS
                  for it in items for p in range(it.start, it.start + len(it.token_ids))]
    assert ids.tolist() == [x for it in items for x in it.token_ids]
    assert meta.positions.tolist() == want_pos
    assert meta.slot_mapping.tolist() == want_slots
    assert meta.positions.dtype == meta.slot_mapping.dtype == torch.int64
    assert meta.block_tables.tolist() == [[9, 2, 31, 0], [4, 60, 0, 0], [1, 3, 5, 7]]
    assert meta.block_tables.dtype == torch.int32
    assert meta.kv_lens.tolist() == [40, 18, 51] and meta.kv_lens.dtype == torch.int32
    assert meta.cu_seqlens_q is not None
    assert meta.cu_seqlens_q.tolist() == [0, 40, 45, 46]
    assert meta.cu_seqlens_q.dtype == torch.int32
    assert meta.max_seqlen_q == 40 and meta.is_prefill
    assert last.tolist() == [39, 44, 45]
    with pytest.raises(ValueError, match="too few blocks"):
        runner.prefill_inputs([PrefillItem([1] * 17, 0, [3])])
    with pytest.raises(ValueError, match="empty"):
        runner.prefill_inputs([PrefillItem([], 0, [3])])


def test_auto_num_blocks() -> None:
    gib = 1 << 30
    # 80 GiB card, 20 GiB in use, 1 GiB reserve, 0.85 -> 68 - 20 - 1 = 47 GiB of blocks
    assert auto_num_blocks(60 * gib, 80 * gib, 0.85, gib, 2 << 20) == 47 * 512
    with pytest.raises(RuntimeError, match="no GPU memory left"):
        auto_num_blocks(10 * gib, 80 * gib, 0.85, gib, 2 << 20)
    small = activation_reserve_bytes(TINY, torch.bfloat16, 2048, 64, 64)
    assert small > 0
    assert activation_reserve_bytes(TINY, torch.bfloat16, 8192, 64, 64) > small
    assert activation_reserve_bytes(TINY, torch.bfloat16, 2048, 64, 256) > small


def test_config_validation() -> None:
    assert CacheConfig(16, 0).num_blocks == 0  # auto
    assert CacheConfig(16, 0).blocks_for(33) == 3
    with pytest.raises(ValueError):
        CacheConfig(16, -1)
    with pytest.raises(ValueError):
        RunnerConfig(gpu_memory_utilization=0.0)
    with pytest.raises(ValueError):
        RunnerConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError):
        RunnerConfig(cuda_graph_max_batch=0)


def _runner(backend: str = "torch", num_blocks: int = 64) -> ModelRunner:
    return ModelRunner(TINY, CacheConfig(BS, num_blocks), ModelSpec("dummy", preset="tiny"),
                       RunnerConfig("cpu", torch.float32, backend), progress=False,
                       max_num_seqs=8)


def test_auto_blocks_need_cuda() -> None:
    with pytest.raises(ValueError, match="auto"):
        _runner(num_blocks=0)


def _prefilled(runner: ModelRunner, lens: list[int]) -> list[DecodeItem]:
    """Prefill sequences of ``lens`` tokens in scattered blocks; the decode items that
    follow each one."""
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(runner.num_blocks - 1, generator=gen).add(1).tolist()  # not block 0
    items = []
    for n in lens:
        blocks = [perm.pop() for _ in range(n // BS + 1)]
        toks = torch.randint(3, TINY.vocab_size, (n + 1,), generator=gen).tolist()
        runner.prefill([PrefillItem(toks[:n], 0, blocks)])
        items.append(DecodeItem(toks[n], n, blocks))
    return items


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fixed_buffers_match_eager(backend: str) -> None:
    """The graph body on its fixed buffers (padded from 3 rows to 4, a block table wider
    than the batch needs, a fixed split count) gives the eager decode's logits, and its
    padding rows write no KV and stay finite."""
    if backend == "triton":
        from pdserve.kernels._triton import HAS_TRITON, interpreting

        if not HAS_TRITON or not interpreting():
            pytest.skip("needs triton's interpreter in this process")
    runner = _runner(backend)
    assert runner.graph_sizes == []  # CPU: no graphs
    runner.warmup()  # a no-op on CPU
    items = _prefilled(runner, [5, 40, 17])
    before = runner.kv_pool.clone()
    graphs = DecodeGraphs(runner.model, runner.kv_pool, BS, [1, 2, 4, 8], max_blocks_per_seq=16)
    assert graphs.size_for(3) == 4
    assert graphs.num_splits[1] > 1  # step2's size: the fixed split path over a padded table
    assert graphs.fits(items)
    assert not graphs.fits([DecodeItem(1, 16 * BS, list(range(17)))])
    got = graphs.run(items).clone()
    assert torch.isfinite(graphs.logits[:4]).all()
    written = runner.kv_pool.clone()
    changed = (written != before).flatten(4).any(-1)  # [L, 2, N, bs]
    want = torch.zeros_like(changed)
    for it in items:
        want[:, :, it.block_ids[it.position // BS], it.position % BS] = True
    assert torch.equal(changed, want)
    ref = runner.decode_eager(items)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # A second, smaller step through the same buffers: stale rows and columns are harmless.
    step2 = [DecodeItem(it.token, it.position, it.block_ids) for it in items[:1]]
    torch.testing.assert_close(graphs.run(step2), runner.decode_eager(step2),
                               rtol=1e-5, atol=1e-5)


def test_decode_is_eager_on_cpu() -> None:
    runner = _runner()
    items = _prefilled(runner, [3, 20])
    assert runner.graphs is None
    a = runner.decode(items)
    b = runner.decode_eager(items)
    assert torch.equal(a, b)
    assert a.dtype == torch.float32 and a.shape == (2, TINY.vocab_size)
