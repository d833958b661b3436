# mypy: disable-error-code="no-untyped-def"
"""Rotary position embedding (NeoX / HF ``rotate_half`` style), in place on q and k."""

import math

import torch

from pdserve.kernels._triton import check_last_dim_contiguous, check_launch, jit, next_pow2, tl
from pdserve.kernels.rope_scaling import RopeScaling


@jit
def _rope_kernel(
    q_ptr, k_ptr, pos_ptr, cs_ptr,
    num_q_heads, num_k_heads, half,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # One program per token: rotate all its q and k heads with the same cos/sin row.
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    cos = tl.load(cs_ptr + pos * stride_cs + d, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + half + d, mask=d_mask, other=0.0)[None, :]

    hq = tl.arange(0, BLOCK_HQ)
    q_mask = (hq[:, None] < num_q_heads) & d_mask[None, :]
    q_off = q_ptr + tok * stride_qt + hq[:, None] * stride_qh + d[None, :]
    q1 = tl.load(q_off, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_off + half, mask=q_mask, other=0.0).to(tl.float32)
    tl.store(q_off, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_off + half, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=q_mask)

    hk = tl.arange(0, BLOCK_HK)
    k_mask = (hk[:, None] < num_k_heads) & d_mask[None, :]
    k_off = k_ptr + tok * stride_kt + hk[:, None] * stride_kh + d[None, :]
    k1 = tl.load(k_off, mask=k_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_off + half, mask=k_mask, other=0.0).to(tl.float32)
    tl.store(k_off, (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty), mask=k_mask)
    tl.store(k_off + half, (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty), mask=k_mask)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Triton launcher; same contract as :func:`rope_ref`. q and k may be strided views (of a
    fused qkv projection) as long as the head dim is contiguous."""
    check_launch(q, k, positions, cos_sin)
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0], (q.shape, k.shape)
    tokens, num_q_heads, head_dim = q.shape
    assert k.shape[2] == head_dim and head_dim % 2 == 0
    assert positions.shape == (tokens,) and positions.dtype == torch.int64
    assert cos_sin.dtype == torch.float32 and cos_sin.shape[1] == head_dim, cos_sin.shape
    check_last_dim_contiguous("q", q)
    check_last_dim_contiguous("k", k)
    check_last_dim_contiguous("cos_sin", cos_sin)
    if tokens == 0:
        return
    half = head_dim // 2
    _rope_kernel[(tokens,)](
        q, k, positions, cos_sin,
        num_q_heads, k.shape[1], half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        BLOCK_HQ=next_pow2(num_q_heads), BLOCK_HK=next_pow2(k.shape[1]),
        BLOCK_HALF=next_pow2(half), num_warps=4,
    )


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` float32, with Llama-3 frequency-dependent scaling.

    The operations (and their order) follow HF ``_compute_llama3_parameters`` so the float32
    result is the same bit for bit: high frequencies (short wavelengths) are kept, low ones are
    divided by ``factor``, and the band between is a linear blend of the two.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    ctx = scaling.original_max_position
    low_wavelen = ctx / scaling.low_freq_factor
    high_wavelen = ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_band = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(in_band, blended, scaled)


def rope_cos_sin(
    head_dim: int, max_position: int, theta: float, scaling: RopeScaling | None
) -> torch.Tensor:
    """The ``[max_position, head_dim]`` float32 cache: ``[:, :D/2]`` cos, ``[:, D/2:]`` sin of
    ``position * inv_freq``."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(max_position).float(), inv_freq)  # [P, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``x: [T, H, D]``, ``cos/sin: [T, 1, D/2]`` float32; rotates pairs ``(i, i + D/2)``."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    # Same products and sums as HF's ``x * cos + rotate_half(x) * sin`` in float32.
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x.copy_(out)


def rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """In place: ``q: [T, Hq, D]``, ``k: [T, Hk, D]``, ``positions: [T]`` int64,
    ``cos_sin: [max_pos, D]`` float32 from :func:`rope_cos_sin`."""
    half = q.shape[-1] // 2
    cs = cos_sin[positions.long()]  # [T, D]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    _rotate_ref(q, cos, sin)
    _rotate_ref(k, cos, sin)
