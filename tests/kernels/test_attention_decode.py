"""Triton paged decode attention (flash-decoding) against float64 math, FA3 tolerances."""

import pytest
import torch

from pdserve.kernels.attention_decode import (
    decode_attention,
    decode_attention_ref,
    plan_decode_splits,
)
from pdserve_testing.kernels import attention_case, fa3_check

pytestmark = pytest.mark.usefixtures("triton_interpreter")

# Scaled-down serving mix: a lone token, a long context, lengths that are and are not
# multiples of the block size.
KV_LENS = [1, 133, 18, 46, 32, 7]
HEADS = [(2, 2), (6, 2), (8, 2), (8, 1)]  # GQA ratios 1, 3, 4, 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("hq,hk", HEADS)
@pytest.mark.parametrize("num_splits", [1, 3, 0])
def test_decode_attention(
    dtype: torch.dtype, head_dim: int, block_size: int, hq: int, hk: int, num_splits: int
) -> None:
    c = attention_case([(1, n) for n in KV_LENS], hq, hk, head_dim, block_size, dtype,
                       seed=hq * 100 + head_dim + block_size)
    out = decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.kv_lens, c.scale,
                           num_splits, block_n=32)
    assert out.dtype == dtype and out.shape == c.q.shape
    fa3_check(out, c.out_pt, c.out_ref)


def test_decode_more_splits_than_tiles() -> None:
    # Splits past a sequence's end are empty (lse = -inf); the merge must give them weight 0.
    c = attention_case([(1, 1), (1, 17), (1, 3)], 4, 2, 32, 16, torch.float32, seed=7)
    out = decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.kv_lens, c.scale, 8,
                           block_n=16)
    fa3_check(out, c.out_pt, c.out_ref)


def test_decode_matches_ref() -> None:
    c = attention_case([(1, n) for n in KV_LENS], 8, 2, 32, 16, torch.float32, seed=3)
    args = (c.q, c.k_cache, c.v_cache, c.block_tables, c.kv_lens, c.scale)
    torch.testing.assert_close(decode_attention(*args), decode_attention_ref(*args))


def test_plan_decode_splits() -> None:
    # Enough (batch x kv head) programs to fill the GPU: no split.
    assert plan_decode_splits(64, 8, 4096, num_sms=132) == 1
    # Small batch, long context: fill ~2 programs per SM.
    assert plan_decode_splits(1, 8, 32768, num_sms=132) == 33
    # Short context: chunks stay >= 128 tokens.
    assert plan_decode_splits(1, 8, 300, num_sms=132) == 3
    assert plan_decode_splits(2, 8, 1, num_sms=132) == 1
    assert plan_decode_splits(1, 1, 10**6, num_sms=132) == 64  # capped
