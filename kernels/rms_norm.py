# mypy: disable-error-code="no-untyped-def"
"""Fused residual-add + RMSNorm: ``r = x + residual; out = rmsnorm(r) * weight``."""

import torch

from kernels._triton import check_last_dim_contiguous, check_launch, jit, next_pow2, tl


@jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    hidden, eps,
    stride_x, stride_res, stride_out, stride_res_out,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per token row; the whole row fits in one block (hidden <= 16k).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Round the sum to the input dtype (what the model keeps as the residual stream)
        # before normalizing, as HF does.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / hidden
    h = (xf * tl.math.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * h.to(tl.float32)
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
        assert residual.shape == x.shape and residual.dtype == x.dtype
        check_last_dim_contiguous("residual", residual)
        res_out = torch.empty_like(x)
        res_in = residual
    else:
        res_out = x
        res_in = x
    if tokens == 0:
        return out, res_out
    block = next_pow2(hidden)
    assert block <= 65536, f"hidden size {hidden} too large for one block"
    _rms_norm_kernel[(tokens,)](
        x, res_in, weight, out, res_out,
        hidden, eps,
        x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out, res_out


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x (+ residual)``; returns ``(rmsnorm(r) * weight, r)``.

    Bit-for-bit HF ``LlamaRMSNorm`` in float32: normalize in float32, round to the input dtype,
    then scale by the weight.
    """
    r = x if residual is None else x + residual
    h = r.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (weight * h.to(r.dtype)).to(r.dtype)
    return out, r
