"""Triton KV store (slot scatter) and KV pack/unpack against their references, including
offsets past 2**31 elements (int64 index math) on a large, mostly untouched cache."""

import pytest
import torch

from pdserve.kernels.attention_decode import decode_attention, decode_attention_ref
from pdserve.kernels.attention_prefill import prefill_attention, prefill_attention_ref
from pdserve.kernels.kv_pack import pack_kv, pack_kv_ref, unpack_kv, unpack_kv_ref
from pdserve.kernels.kv_store import store_kv, store_kv_ref
from pdserve_testing.kernels import attention_case

pytestmark = pytest.mark.usefixtures("triton_interpreter")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv(dtype: torch.dtype, block_size: int) -> None:
    gen = torch.Generator().manual_seed(block_size)
    tokens, hk, d, num_blocks = 9, 3, 64, 6
    # k and v as strided views of a fused qkv projection.
    qkv = torch.randn(tokens, (4 + 2 * hk) * d, generator=gen).to(dtype)
    k = qkv[:, 4 * d : (4 + hk) * d].view(tokens, hk, d)
    v = qkv[:, (4 + hk) * d :].view(tokens, hk, d)
    pool = torch.zeros(2, 2, num_blocks, block_size, hk, d, dtype=dtype)  # [L, 2, N, ...]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[2, 5]] = -1  # padding tokens
    expect = pool.clone()
    store_kv(k, v, pool[1, 0], pool[1, 1], slots)
    store_kv_ref(k, v, expect[1, 0], expect[1, 1], slots)
    assert torch.equal(pool, expect)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_unpack(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(3, 2, 10, 16, 2, 32, generator=gen).to(dtype)  # [L, 2, N, bs, Hk, D]
    ids = torch.tensor([7, 0, 9, 3])
    buf = torch.empty(2, 4, 16, 2, 32, dtype=dtype)
    buf_ref = torch.empty_like(buf)
    pack_kv(src[1], ids, buf)
    pack_kv_ref(src[1], ids, buf_ref)
    assert torch.equal(buf, buf_ref)
    dst = torch.zeros(3, 2, 12, 16, 2, 32, dtype=dtype)
    dst_ref = dst.clone()
    dst_ids = torch.tensor([11, 2, 5, 4])
    unpack_kv(buf, dst[2], dst_ids)
    unpack_kv_ref(buf_ref, dst_ref[2], dst_ids)
    assert torch.equal(dst, dst_ref)


def test_pack_empty() -> None:
    cache = torch.zeros(2, 4, 16, 1, 32)
    buf = torch.empty(2, 0, 16, 1, 32)
    pack_kv(cache, torch.empty(0, dtype=torch.int64), buf)
    unpack_kv(buf, cache, torch.empty(0, dtype=torch.int64))


# --- int64 index math -------------------------------------------------------------------
# A cache [N, bs, Hk, D] with N * bs * Hk * D > 2**31 elements. torch.empty maps it without
# touching its pages and the interpreter reads the tensors in place, so only the blocks the
# test writes cost memory. With 32-bit offsets, block id x block stride wraps negative and the
# kernel reads or writes the wrong place (or faults).
BS, HK, D = 16, 1, 32
BIG_N = 2**31 // (BS * HK * D) + 64


@pytest.fixture(scope="module")
def big_pool() -> torch.Tensor:
    return torch.empty(2, BIG_N, BS, HK, D, dtype=torch.float16)  # 8 GiB virtual


def test_int64_store_and_pack(big_pool: torch.Tensor) -> None:
    assert big_pool[0].numel() > 2**31
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(3, HK, D, generator=gen).half()
    v = torch.randn(3, HK, D, generator=gen).half()
    last = BIG_N - 1
    slots = torch.tensor([last * BS + 5, 7, (BIG_N - 40) * BS])
    store_kv(k, v, big_pool[0], big_pool[1], slots)
    assert torch.equal(big_pool[0, last, 5], k[0]) and torch.equal(big_pool[1, last, 5], v[0])
    assert torch.equal(big_pool[1, BIG_N - 40, 0], v[2])
    ids = torch.tensor([last, BIG_N - 40])
    buf = torch.empty(2, 2, BS, HK, D, dtype=torch.float16)
    pack_kv(big_pool, ids, buf)
    assert torch.equal(buf, big_pool[:, ids])
    unpack_kv(buf.flip(1), big_pool, ids)  # swap the two blocks
    assert torch.equal(big_pool[:, last], buf[:, 1])


def test_int64_attention(big_pool: torch.Tensor) -> None:
    # One sequence whose blocks sit at the end of the big pool: table ids * block stride
    # overflow int32 unless the kernel widens them first.
    c = attention_case([(5, 40)], 4, HK, D, BS, torch.float16, seed=2)
    n_blocks = 3
    far = torch.arange(BIG_N - n_blocks, BIG_N)
    k_cache, v_cache = big_pool[0], big_pool[1]
    ids = c.block_tables[0, :n_blocks].long()
    k_cache[far] = c.k_cache[ids]
    v_cache[far] = c.v_cache[ids]
    tables = far.to(torch.int32)[None]
    args_p = (c.q, k_cache, v_cache, c.cu_seqlens_q, c.kv_lens, tables, 5, c.scale)
    torch.testing.assert_close(prefill_attention(*args_p, block_m=16, block_n=16),
                               prefill_attention_ref(*args_p), atol=2e-3, rtol=2e-3)
    q1 = c.q[-1:]
    args_d = (q1, k_cache, v_cache, tables, c.kv_lens, c.scale)
    torch.testing.assert_close(decode_attention(*args_d, 2, block_n=16),
                               decode_attention_ref(*args_d), atol=2e-3, rtol=2e-3)
