"""The torch references against HF transformers (bit for bit) and naive float64 math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.kernels.ops import get_ops, rope_cos_sin
from pdserve.kernels.rope_scaling import RopeScaling
from pdserve_testing.kernels import cdiv, naive_attention, paged_kv

OPS = get_ops("torch")


def test_get_ops() -> None:
    assert OPS.name == "torch"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_ops("cuda")


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_hf(with_residual: bool) -> None:
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=gen)
    res = torch.randn(7, 96, generator=gen) if with_residual else None
    norm = llama.LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=gen))
        r = x if res is None else res + x
        expect = norm(r)
    out, r_out = OPS.rms_norm(x, norm.weight.detach(), 1e-5, res)
    assert torch.equal(out, expect)
    assert torch.equal(r_out, r)


def test_silu_mul() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2 * 48, generator=gen)
    assert torch.equal(OPS.silu_mul(x), F.silu(x[:, :48]) * x[:, 48:])
    xb = x.bfloat16()
    assert OPS.silu_mul(xb).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "theta,scaling", [(10000.0, None), (500000.0, RopeScaling(8.0, 1.0, 4.0, 8192))]
)
def test_rope_matches_hf(theta: float, scaling: RopeScaling | None) -> None:
    tf = pytest.importorskip("transformers")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    head_dim, max_pos = 64, 9000
    params: dict[str, object] = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        params = {
            "rope_type": "llama3", "rope_theta": theta, "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position,
        }
    cfg = tf.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=head_dim, max_position_embeddings=max_pos,
                         rope_parameters=params)
    rot = llama.LlamaRotaryEmbedding(cfg)
    cos_sin = rope_cos_sin(head_dim, max_pos, theta, scaling)
    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 5, 17, 4095, 8191, 8999])
    q = torch.randn(len(positions), 4, head_dim, generator=gen)
    k = torch.randn(len(positions), 2, head_dim, generator=gen)
    cos, sin = rot(q, positions[None])
    # HF layout: [1, H, T, D]
    q_hf, k_hf = llama.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                            cos, sin)
    OPS.rope(q, k, positions, cos_sin)
    assert torch.equal(q, q_hf[0].transpose(0, 1))
    assert torch.equal(k, k_hf[0].transpose(0, 1))


def test_store_kv_skips_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(4, 2, 8, generator=gen)
    v = torch.randn(4, 2, 8, generator=gen)
    kc = torch.zeros(3, 4, 2, 8)
    vc = torch.zeros(3, 4, 2, 8)
    slots = torch.tensor([5, -1, 11, 0])
    OPS.store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc[1, 1], k[0]) and torch.equal(kc[2, 3], k[2])
    assert torch.equal(vc[0, 0], v[3])
    assert int((kc != 0).any(-1).any(-1).sum()) == 3


def test_pack_unpack_roundtrip() -> None:
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(2, 2, 9, 4, 2, 8, generator=gen)  # [L, 2, N, bs, Hk, D]
    ids = torch.tensor([7, 2, 4])
    buf = torch.empty(2, 3, 4, 2, 8)
    OPS.pack_kv(pool[1], ids, buf)
    assert torch.equal(buf, pool[1][:, ids])
    dst = torch.zeros(2, 2, 6, 4, 2, 8)
    OPS.unpack_kv(buf, dst[0], torch.tensor([0, 5, 3]))
    assert torch.equal(dst[0][:, [0, 5, 3]], buf)
    assert torch.equal(dst[1], torch.zeros_like(dst[1]))


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2), (8, 1)])
def test_prefill_ref(block_size: int, hq: int, hk: int) -> None:
    gen = torch.Generator().manual_seed(1)
    d = 16
    seqs = [(1, 40), (5, 18), (29, 29), (1, 1), (17, 33)]  # (new tokens, kv len)
    kv_lens = [kv for _, kv in seqs]
    kc, vc, tables, ks, vs = paged_kv(kv_lens, block_size, hk, d, torch.float32, gen)
    q = torch.randn(sum(n for n, _ in seqs), hq, d, generator=gen)
    cu = torch.tensor([0] + [n for n, _ in seqs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out = OPS.prefill_attention(q, kc, vc, cu, torch.tensor(kv_lens, dtype=torch.int32), tables,
                                max(n for n, _ in seqs), 0.25)
    for b, (n, _) in enumerate(seqs):
        expect = naive_attention(q[cu[b] : cu[b] + n], ks[b], vs[b], 0.25)
        torch.testing.assert_close(out[cu[b] : cu[b] + n].double(), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2), (8, 1)])
def test_decode_ref(block_size: int, hq: int, hk: int) -> None:
    gen = torch.Generator().manual_seed(2)
    d = 16
    kv_lens = [1, 40, 16, 7, 33]
    kc, vc, tables, ks, vs = paged_kv(kv_lens, block_size, hk, d, torch.float32, gen)
    q = torch.randn(len(kv_lens), hq, d, generator=gen)
    out = OPS.decode_attention(q, kc, vc, tables, torch.tensor(kv_lens, dtype=torch.int32), 0.3)
    assert out.shape == q.shape
    for b in range(len(kv_lens)):
        expect = naive_attention(q[b : b + 1], ks[b], vs[b], 0.3)[0]
        torch.testing.assert_close(out[b].double(), expect, atol=1e-5, rtol=1e-5)
    assert cdiv(max(kv_lens), block_size) <= tables.shape[1]


def test_decode_ref_bf16() -> None:
    gen = torch.Generator().manual_seed(3)
    kv_lens = [3, 20]
    kc, vc, tables, ks, vs = paged_kv(kv_lens, 8, 2, 16, torch.bfloat16, gen)
    q = torch.randn(2, 4, 16, generator=gen).bfloat16()
    out = OPS.decode_attention(q, kc, vc, tables, torch.tensor(kv_lens, dtype=torch.int32), 0.25)
    assert out.dtype == torch.bfloat16
    for b in range(2):
        expect = naive_attention(q[b : b + 1], ks[b], vs[b], 0.25)[0]
        torch.testing.assert_close(out[b].double(), expect, atol=2e-2, rtol=2e-2)
