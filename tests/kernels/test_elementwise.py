"""Triton RMSNorm, RoPE and SiLU-and-mul against their torch references (interpreter).

float32 and float16 must match to rounding; bfloat16 to two bf16 ulps: the triton
interpreter rounds float32 -> bfloat16 by truncation where the GPU (and torch) round to
nearest even, and RMSNorm rounds twice (normalized value, then times weight). The GPU tests
hold bf16 to the tighter bound.
"""

import pytest
import torch

from pdserve.kernels.activation import silu_mul, silu_mul_ref
from pdserve.kernels.rms_norm import rms_norm, rms_norm_ref
from pdserve.kernels.rope import rope, rope_cos_sin, rope_ref
from pdserve.kernels.rope_scaling import RopeScaling

pytestmark = pytest.mark.usefixtures("triton_interpreter")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.float32:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    else:  # an ulp of float16; two of bfloat16 (truncating interpreter, see above)
        rtol = 2.0**-10 if a.dtype == torch.float16 else 2.0**-6
        torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 576])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, hidden: int, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(7, hidden, generator=gen) * 3).to(dtype)
    res = torch.randn(7, hidden, generator=gen) if with_residual else None  # fp32 stream
    w = torch.randn(hidden, generator=gen).to(dtype)
    out, r = rms_norm(x, w, 1e-5, res)
    out_ref, r_ref = rms_norm_ref(x, w, 1e-5, res)
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, r_ref, atol=0, rtol=0)  # one float32 add, nothing rounded
    _close(out, out_ref)
    if res is None and dtype == torch.float32:
        assert r is x  # no copy of a float32 stream when nothing was added


def test_rms_norm_strided_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(5, 160, generator=gen)
    x = big[:, :128]  # row stride 160
    w = torch.randn(128, generator=gen)
    _close(rms_norm(x, w, 1e-6, None)[0], rms_norm_ref(x, w, 1e-6, None)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [48, 256, 1100])
def test_silu_mul(dtype: torch.dtype, inter: int) -> None:
    gen = torch.Generator().manual_seed(inter)
    x = (torch.randn(6, 2 * inter, generator=gen) * 4).to(dtype)
    _close(silu_mul(x), silu_mul_ref(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,head_dim", [(4, 4, 32), (9, 3, 64), (8, 2, 128)])
@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0, 1.0, 4.0, 64)])
def test_rope(
    dtype: torch.dtype, hq: int, hk: int, head_dim: int, scaling: RopeScaling | None
) -> None:
    gen = torch.Generator().manual_seed(hq)
    tokens = 11
    cos_sin = rope_cos_sin(head_dim, 4096, 500000.0, scaling)
    # q and k as strided views of one fused qkv projection, as the model produces them.
    qkv = torch.randn(tokens, (hq + 2 * hk) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(tokens, hk, head_dim)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, (hq + hk) * head_dim :].clone()
    rope(q, k, positions, cos_sin)
    rope_ref(q_ref, k_ref, positions, cos_sin)
    _close(q, q_ref)
    _close(k, k_ref)
    assert torch.equal(qkv[:, (hq + hk) * head_dim :], v_before)  # v untouched
