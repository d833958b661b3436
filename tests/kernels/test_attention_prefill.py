"""Triton varlen causal prefill attention over the paged cache against float64 math."""

import pytest
import torch
from kernel_testlib import attention_case, fa3_check

from kernels.attention_prefill import prefill_attention, prefill_attention_ref

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
