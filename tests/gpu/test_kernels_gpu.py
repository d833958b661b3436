"""The Triton kernels on a real GPU at serving shapes, in bf16 and fp16, against float64
math with FlashAttention-3 tolerances; offsets past 2**31 elements on a real large pool;
decode under CUDA-graph capture.

Run in its own process (``pytest tests/gpu``): tests/kernels turns on triton's interpreter,
which is process-wide.
"""


import pytest
import torch

from pdserve.kernels.activation import silu_mul, silu_mul_ref
from pdserve.kernels.attention_decode import decode_attention, decode_attention_ref
from pdserve.kernels.attention_prefill import prefill_attention, prefill_attention_ref
from pdserve.kernels.kv_pack import pack_kv, unpack_kv
from pdserve.kernels.kv_store import store_kv, store_kv_ref
from pdserve.kernels.rms_norm import rms_norm, rms_norm_ref
from pdserve.kernels.rope import rope, rope_cos_sin, rope_ref
from pdserve.kernels.rope_scaling import RopeScaling
from pdserve_testing.kernels import attention_case, fa3_check

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _compiled() -> None:
    from pdserve.kernels._triton import HAS_TRITON, interpreting

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if interpreting():
        pytest.skip("triton's interpreter is on in this process: run tests/gpu on its own")


def _ulp_close(a: torch.Tensor, b: torch.Tensor, ulps: float = 1.0) -> None:
    rtol = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}[a.dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=2 * ulps * rtol, atol=1e-3)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("num_splits", [0, 1, 4])
def test_decode_b64_ctx4k(dtype: torch.dtype, num_splits: int) -> None:
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 4097, (64,), generator=gen).tolist()
    lens[:3] = [1, 4096, 4095]
    c = attention_case([(1, n) for n in lens], 32, 8, 128, 16, dtype, seed=1, device=DEV)
    out = decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.kv_lens, c.scale,
                           num_splits)
    fa3_check(out, c.out_pt, c.out_ref)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (9, 3, 64), (28, 4, 128), (32, 32, 64)])
def test_decode_small_batch_split(
    dtype: torch.dtype, block_size: int, hq: int, hk: int, d: int
) -> None:
    c = attention_case([(1, 3000), (1, 1), (1, 777)], hq, hk, d, block_size, dtype, seed=2,
                       device=DEV)
    out = decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.kv_lens, c.scale)
    fa3_check(out, c.out_pt, c.out_ref)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (9, 3, 64)])
def test_prefill_with_prefixes(
    dtype: torch.dtype, block_size: int, hq: int, hk: int, d: int
) -> None:
    # A full 2k prompt, a 1000-token chunk after a 1048-token cached prefix, a chunk ending
    # mid-block, a lone token, a short prompt.
    seqs = [(2048, 2048), (1000, 2048), (700, 1501), (1, 333), (17, 17)]
    c = attention_case(seqs, hq, hk, d, block_size, dtype, seed=3, device=DEV)
    out = prefill_attention(c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.kv_lens,
                            c.block_tables, c.max_seqlen_q, c.scale)
    fa3_check(out, c.out_pt, c.out_ref)


def test_attention_fp32_matches_refs() -> None:
    c = attention_case([(300, 700), (1, 1), (64, 64)], 8, 2, 64, 16, torch.float32, seed=4,
                       device=DEV)
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.kv_lens, c.block_tables,
            c.max_seqlen_q, c.scale)
    torch.testing.assert_close(prefill_attention(*args), prefill_attention_ref(*args),
                               atol=1e-5, rtol=1e-5)
    q1 = c.q[c.cu_seqlens_q[1:].long() - 1]
    args_d = (q1, c.k_cache, c.v_cache, c.block_tables, c.kv_lens, c.scale)
    torch.testing.assert_close(decode_attention(*args_d), decode_attention_ref(*args_d),
                               atol=1e-5, rtol=1e-5)


def test_decode_cuda_graph() -> None:
    # Fixed num_splits: the launch depends only on shapes, so it captures and replays.
    c = attention_case([(1, 900), (1, 33), (1, 4000), (1, 1)], 32, 8, 128, 16,
                       torch.bfloat16, seed=5, device=DEV)
    args = (c.q, c.k_cache, c.v_cache, c.block_tables, c.kv_lens, c.scale, 8)
    decode_attention(*args)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(*args)
    c.q.copy_(torch.randn_like(c.q))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, decode_attention(*args))


@pytest.mark.parametrize("dtype", LOW)
def test_elementwise(dtype: torch.dtype) -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(333, 4096, generator=gen, device=DEV).to(dtype)
    res = torch.randn(333, 4096, generator=gen, device=DEV)  # the float32 residual stream
    w = torch.randn(4096, generator=gen, device=DEV).to(dtype)
    out, r = rms_norm(x, w, 1e-5, res)
    out_ref, r_ref = rms_norm_ref(x, w, 1e-5, res)
    assert torch.equal(r, r_ref)
    _ulp_close(out, out_ref)
    g = torch.randn(333, 2 * 14336, generator=gen, device=DEV).to(dtype)
    _ulp_close(silu_mul(g), silu_mul_ref(g))
    cos_sin = rope_cos_sin(128, 131072, 500000.0, RopeScaling(8.0, 1.0, 4.0, 8192)).to(DEV)
    qkv = torch.randn(333, 48 * 128, generator=gen, device=DEV).to(dtype)
    q = qkv[:, : 32 * 128].view(333, 32, 128)
    k = qkv[:, 32 * 128 : 40 * 128].view(333, 8, 128)
    positions = torch.randint(0, 131072, (333,), generator=gen, device=DEV)
    q_ref, k_ref = q.clone(), k.clone()
    rope(q, k, positions, cos_sin)
    rope_ref(q_ref, k_ref, positions, cos_sin)
    _ulp_close(q, q_ref)
    _ulp_close(k, k_ref)


def test_store_pack_roundtrip() -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    pool = torch.zeros(2, 2, 4096, 16, 8, 128, dtype=torch.bfloat16, device=DEV)
    expect = pool.clone()
    k = torch.randn(1000, 8, 128, generator=gen, device=DEV).bfloat16()
    v = torch.randn(1000, 8, 128, generator=gen, device=DEV).bfloat16()
    slots = torch.randperm(4096 * 16, generator=gen, device=DEV)[:1000]
    slots[::7] = -1
    store_kv(k, v, pool[1, 0], pool[1, 1], slots)
    store_kv_ref(k, v, expect[1, 0], expect[1, 1], slots)
    assert torch.equal(pool, expect)
    ids = torch.unique(slots[slots >= 0] // 16)
    buf = torch.empty(2, len(ids), 16, 8, 128, dtype=torch.bfloat16, device=DEV)
    pack_kv(pool[1], ids, buf)
    assert torch.equal(buf, pool[1][:, ids])
    dst = torch.zeros_like(pool[0])
    dst_ids = torch.randperm(4096, generator=gen, device=DEV)[: len(ids)]
    unpack_kv(buf, dst, dst_ids)
    assert torch.equal(dst[:, dst_ids], buf)


def test_int64_offsets_real_pool() -> None:
    # One layer's K and V caches of [N, 16, 8, 128] bf16 with N * 16384 > 2**31 elements
    # (4.3 GB each): blocks at the end of the pool are addressed past int32.
    bs, hk, d = 16, 8, 128
    n = 2**31 // (bs * hk * d) + 256
    free, _ = torch.cuda.mem_get_info()
    if free < 2 * n * bs * hk * d * 2 + (2 << 30):
        pytest.skip("not enough GPU memory for a >2**31-element cache")
    layer = torch.empty(2, n, bs, hk, d, dtype=torch.bfloat16, device=DEV)
    assert layer[0].numel() > 2**31
    c = attention_case([(40, 300), (1, 77)], 32, hk, d, bs, torch.bfloat16, seed=6, device=DEV)
    used = torch.unique(c.block_tables.long())  # every id the tables name
    far = torch.arange(n - len(used), n, device=DEV)
    remap = torch.full((c.k_cache.shape[0],), n - 1, dtype=torch.long, device=DEV)
    remap[used] = far
    # Move the case's blocks to the far end of the big pool and attend there.
    for cache, src in ((layer[0], c.k_cache), (layer[1], c.v_cache)):
        cache[far] = src[used]
    tables = remap[c.block_tables.long()].to(torch.int32)
    out = prefill_attention(c.q, layer[0], layer[1], c.cu_seqlens_q, c.kv_lens, tables,
                            c.max_seqlen_q, c.scale)
    fa3_check(out, c.out_pt, c.out_ref)
    last_q = c.q[c.cu_seqlens_q[1:].long() - 1]
    dec = decode_attention(last_q, layer[0], layer[1], tables, c.kv_lens, c.scale, 4)
    dec_ref = decode_attention_ref(last_q, layer[0], layer[1], tables, c.kv_lens, c.scale)
    torch.testing.assert_close(dec, dec_ref, atol=2e-2, rtol=2e-2)
    kk = torch.randn(2, hk, d, device=DEV).bfloat16()
    slots = torch.tensor([(n - 1) * bs + 3, (n - 2) * bs], device=DEV)
    store_kv(kk, kk * 2, layer[0], layer[1], slots)
    assert torch.equal(layer[0, n - 1, 3], kk[0]) and torch.equal(layer[1, n - 2, 0], 2 * kk[1])
    ids = torch.tensor([n - 1, n - 2, 5], device=DEV)
    buf = torch.empty(2, 3, bs, hk, d, dtype=torch.bfloat16, device=DEV)
    pack_kv(layer, ids, buf)
    bits = torch.int16  # compare bit patterns: untouched blocks may hold NaN
    assert torch.equal(buf.view(bits), layer[:, ids].view(bits))
    unpack_kv(buf.flip(1), layer, ids)  # block n-1 <-> block 5
    assert torch.equal(layer[:, n - 1].view(bits), buf[:, 2].view(bits))
    assert torch.equal(layer[:, 5].view(bits), buf[:, 0].view(bits))
