# mypy: disable-error-code="no-untyped-def"
"""Fused residual-add + RMSNorm over a float32 residual stream:
``r = x + residual; out = rmsnorm(r) * weight``.

The residual stream stays in float32 whatever the model's dtype: the sum is never rounded to
bf16 between layers, and the norm rounds once, after the weight (HF rounds the sum to bf16
at every layer and the normalized row before the weight). On a bf16 model this halves the
logit error against a float32 reference for the price of an fp32 [T, H] read and write per
norm, small beside the layer's GEMMs (DESIGN.md section 4; docs/architecture.md).
"""

import torch

from pdserve.kernels._triton import check_last_dim_contiguous, check_launch, jit, next_pow2, tl


@jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    hidden, eps,
    stride_x, stride_res, stride_out, stride_res_out,
    HAS_RESIDUAL: tl.constexpr, WRITE_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per token row; the whole row fits in one block (hidden <= 64k).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    r = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r += tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
    if WRITE_RESIDUAL:
        tl.store(res_out_ptr + row * stride_res_out + cols, r, mask=mask)
    var = tl.sum(r * r, axis=0) / hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = w * (r * tl.math.rsqrt(var + eps))
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher; same contract as :func:`rms_norm_ref`."""
    check_launch(x)
    assert x.dim() == 2 and weight.shape == (x.shape[1],), (x.shape, weight.shape)
    check_last_dim_contiguous("x", x)
    assert weight.is_contiguous()
    tokens, hidden = x.shape
    out = torch.empty_like(x)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == torch.float32, residual.dtype
        check_last_dim_contiguous("residual", residual)
        res_out = torch.empty_like(residual)
    elif x.dtype == torch.float32:
        res_out = x  # already the float32 stream: no copy
    else:
        res_out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if tokens == 0:
        return out, res_out
    res_in = residual if residual is not None else res_out
    block = next_pow2(hidden)
    assert block <= 65536, f"hidden size {hidden} too large for one block"
    _rms_norm_kernel[(tokens,)](
        x, res_in, weight, out, res_out,
        hidden, eps,
        x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None, WRITE_RESIDUAL=res_out is not x, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out, res_out


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: [T, H]`` in the model's dtype, ``residual: [T, H]`` float32 or None.
    ``r = x (+ residual)`` in float32; returns ``(rmsnorm(r) * weight, r)``, the first in
    ``x``'s dtype, rounded once. In float32 this is bit-for-bit HF ``LlamaRMSNorm``."""
    r = x.float() if residual is None else x.float() + residual
    h = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(x.dtype), r
