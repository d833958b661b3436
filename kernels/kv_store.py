# mypy: disable-error-code="no-untyped-def"
"""Scatter the new tokens' K/V into their slots of the paged cache."""

import torch

from pdserve.kernels._triton import check_last_dim_contiguous, check_launch, jit, next_pow2, tl


@jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    num_heads, head_dim, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_co, stride_ch,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token. Slots are int64 and so is every offset built from them: block id
    # x block stride passes 2**31 elements in a large pool.
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok)
    if slot < 0:  # padding token
        return
    block = slot // block_size
    offset = slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (d < head_dim)
    k = tl.load(k_ptr + tok * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + h * stride_vh + d, mask=mask)
    dst = block * stride_cb + offset * stride_co + h * stride_ch + d
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton launcher; same contract as :func:`store_kv_ref`. k and v may be strided views."""
    check_launch(k, v, k_cache, v_cache, slot_mapping)
    assert k.dim() == 3 and k.shape == v.shape, (k.shape, v.shape)
    tokens, num_heads, head_dim = k.shape
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_heads, head_dim), k_cache.shape
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert slot_mapping.shape == (tokens,) and slot_mapping.dtype == torch.int64
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_dim_contiguous(name, t)
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        num_heads, head_dim, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_H=next_pow2(num_heads), BLOCK_D=next_pow2(head_dim), num_warps=4,
    )


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Token ``t`` goes to block ``slot // block_size``, offset ``slot % block_size``.

    ``k, v: [T, Hk, D]``; ``k_cache, v_cache: [N, block_size, Hk, D]``; ``slot_mapping: [T]``
    int64, a negative slot marks a padding token that is skipped.
    """
    block_size = k_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[valid].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[valid].to(v_cache.dtype)
