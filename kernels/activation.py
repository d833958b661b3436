# mypy: disable-error-code="no-untyped-def"
"""SiLU-and-mul: the gated MLP activation ``silu(gate) * up``."""

import torch
import torch.nn.functional as F

from pdserve.kernels._triton import (
    cdiv,
    check_last_dim_contiguous,
    check_launch,
    jit,
    next_pow2,
    tl,
)


@jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton launcher; same contract as :func:`silu_mul_ref`."""
    check_launch(x)
    assert x.dim() == 2 and x.shape[1] % 2 == 0, x.shape
    check_last_dim_contiguous("x", x)
    tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    block = min(1024, next_pow2(inter))
    _silu_mul_kernel[(tokens, cdiv(inter, block))](
        x, out, inter, x.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``x: [T, 2I]`` (gate first, up second) -> ``silu(gate) * up: [T, I]``."""
    inter = x.shape[-1] // 2
    gate, up = x[..., :inter].float(), x[..., inter:].float()
    return (F.silu(gate) * up).to(x.dtype)
