"""Triton varlen causal prefill attention over the paged cache against float64 math."""

import pytest
import torch

from pdserve.kernels.attention_prefill import SCALE_MODES, prefill_attention, prefill_attention_ref
from pdserve_testing.kernels import attention_case, fa3_check

pytestmark = pytest.mark.usefixtures("triton_interpreter")

# (new tokens, kv len): decode-like, a short prompt, a chunk after a cached prefix, a full
# prompt, a lone token, a block-aligned prompt, a chunk whose prefix ends mid-block.
SEQS = [(1, 133), (5, 18), (29, 46), (40, 40), (1, 1), (16, 16), (13, 50)]
HEADS = [(2, 2), (6, 2), (8, 2), (8, 1)]  # GQA ratios 1, 3, 4, 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("hq,hk", HEADS)
@pytest.mark.parametrize("tiles", [(16, 16), (0, 0)])  # (block_m, block_n); 0 = default
def test_prefill_attention(
    dtype: torch.dtype, head_dim: int, block_size: int, hq: int, hk: int,
    tiles: tuple[int, int],
) -> None:
    c = attention_case(SEQS, hq, hk, head_dim, block_size, dtype,
                       seed=hq * 100 + head_dim + block_size)
    out = prefill_attention(c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.kv_lens,
                            c.block_tables, c.max_seqlen_q, c.scale,
                            block_m=tiles[0], block_n=tiles[1])
    assert out.dtype == dtype and out.shape == c.q.shape
    fa3_check(out, c.out_pt, c.out_ref)


def test_prefill_empty_sequence_in_batch() -> None:
    # A sequence with no new tokens owns no tile; its neighbours must be unaffected.
    c = attention_case([(3, 10), (1, 1), (4, 20)], 4, 2, 32, 16, torch.float32, seed=5)
    cu = torch.tensor([0, 3, 3, 4, 8], dtype=torch.int32)  # insert (0 new, 7 kv) second
    kv = torch.tensor([10, 7, 1, 20], dtype=torch.int32)
    tables = torch.cat([c.block_tables[:1], c.block_tables[:1], c.block_tables[1:]])
    out = prefill_attention(c.q, c.k_cache, c.v_cache, cu, kv, tables, 4, c.scale,
                            block_m=16, block_n=16)
    fa3_check(out, c.out_pt, c.out_ref)


def test_prefill_matches_ref() -> None:
    c = attention_case(SEQS, 8, 2, 32, 16, torch.float32, seed=3)
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.kv_lens, c.block_tables,
            c.max_seqlen_q, c.scale)
    torch.testing.assert_close(prefill_attention(*args), prefill_attention_ref(*args))


# --- tuning switches ----------------------------------------------------------------------
# The tests above run the defaults (heavy_first, "fma", per-key block ids, prefetched). These
# cover every other value, each with every GQA ratio: the old kernel's combination and two
# mixes. Layouts (page size, (block_m, block_n)) reach each addressing path of page_ids: one
# page per key tile, a key tile inside a page, and a default 64-key tile over four pages.
SWITCHES = [(False, "tile", False, False), (True, "q", True, True), (False, "fma", True, False)]
LAYOUTS = [(16, (16, 16)), (32, (16, 16)), (16, (0, 0))]
SWITCH_CASES = [
    (*switches, *LAYOUTS[(i + j) % len(LAYOUTS)], *heads)
    for i, switches in enumerate(SWITCHES)
    for j, heads in enumerate(HEADS)
]


@pytest.mark.parametrize(
    "heavy_first,scale_mode,page_ids,prefetch_ids,block_size,tiles,hq,hk", SWITCH_CASES
)
def test_prefill_switches(
    heavy_first: bool, scale_mode: str, page_ids: bool, prefetch_ids: bool, block_size: int,
    tiles: tuple[int, int], hq: int, hk: int,
) -> None:
    c = attention_case(SEQS, hq, hk, 32, block_size, torch.float16, seed=hq + block_size)
    out = prefill_attention(c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.kv_lens,
                            c.block_tables, c.max_seqlen_q, c.scale,
                            block_m=tiles[0], block_n=tiles[1], heavy_first=heavy_first,
                            scale_mode=scale_mode, page_ids=page_ids, prefetch_ids=prefetch_ids)
    fa3_check(out, c.out_pt, c.out_ref)


def test_prefill_switches_match_ref_fp32() -> None:
    # In fp32 every scale form is exact up to rounding: all agree with the reference closely.
    c = attention_case([(29, 46), (1, 1), (13, 50)], 6, 2, 32, 16, torch.float32, seed=7)
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.kv_lens, c.block_tables,
            c.max_seqlen_q, c.scale)
    ref = prefill_attention_ref(*args)
    for mode in SCALE_MODES:
        for prefetch in (False, True):
            out = prefill_attention(*args, block_m=32, block_n=16, scale_mode=mode,
                                    page_ids=True, prefetch_ids=prefetch)
            torch.testing.assert_close(out, ref)


def test_prefill_page_ids_odd_page_size() -> None:
    # page_ids needs a power-of-two page: with 24-token pages it falls back to per-key ids.
    c = attention_case(SEQS, 8, 2, 32, 24, torch.float16, seed=11)
    out = prefill_attention(c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.kv_lens,
                            c.block_tables, c.max_seqlen_q, c.scale, block_m=16, block_n=32,
                            page_ids=True)
    fa3_check(out, c.out_pt, c.out_ref)


# A pool [2, N, 16, 1, 32] with N * 16 * 32 > 2**31 elements per cache, mapped but untouched
# except for the blocks a test writes (as in test_kv_store_pack.py): block id x block stride
# overflows int32 unless the page-granular addressing widens it too.
BIG_N = 2**31 // (16 * 32) + 64


@pytest.fixture(scope="module")
def big_pool() -> torch.Tensor:
    return torch.empty(2, BIG_N, 16, 1, 32, dtype=torch.float16)  # 8 GiB virtual


@pytest.mark.parametrize("block_size,block_n,prefetch_ids", [(16, 16, False), (16, 32, True),
                                                              (32, 16, True)])
def test_prefill_page_ids_int64(
    big_pool: torch.Tensor, block_size: int, block_n: int, prefetch_ids: bool
) -> None:
    c = attention_case([(5, 40)], 4, 1, 32, block_size, torch.float16, seed=2)
    pool = big_pool.view(2, -1, block_size, 1, 32)  # the same memory in 16- or 32-token pages
    assert pool[0].numel() > 2**31
    n_blocks = (40 + block_size - 1) // block_size
    far = torch.arange(pool.shape[1] - n_blocks, pool.shape[1])
    ids = c.block_tables[0, :n_blocks].long()
    pool[0, far] = c.k_cache[ids]
    pool[1, far] = c.v_cache[ids]
    args = (c.q, pool[0], pool[1], c.cu_seqlens_q, c.kv_lens, far.to(torch.int32)[None], 5,
            c.scale)
    out = prefill_attention(*args, block_m=16, block_n=block_n, page_ids=True,
                            prefetch_ids=prefetch_ids)
    torch.testing.assert_close(out, prefill_attention_ref(*args), atol=2e-3, rtol=2e-3)
