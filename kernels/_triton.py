"""Optional Triton import shared by the kernel files.

Triton is an optional dependency: the torch references in every kernel file (the CPU path and
the oracle in tests) must import without it. When Triton is missing, :func:`jit` leaves the
kernel definitions as plain functions so the files import, and every launcher calls
:func:`require_triton` first, which raises a clear error.

CPU tensors run the kernels in Triton's interpreter. Triton decides interpreter-or-compiler
once, when it is imported (its own ``tl.sum``/``tl.max`` are jit functions decorated then), so
``TRITON_INTERPRET=1`` must be set before the first ``import triton`` in the process. On a
machine without CUDA nothing can be compiled anyway, so if triton is not imported yet we turn
the interpreter on here.

Kernel files must not use ``from __future__ import annotations``: Triton reads the
``tl.constexpr`` annotations as objects.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

triton: Any
tl: Any

_NO_CHOICE_YET = "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ
if _NO_CHOICE_YET and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl
    HAS_TRITON = True
    _IMPORT_ERROR = ""
except ImportError as exc:  # pragma: no cover - exercised only without triton installed
    HAS_TRITON = False
    _IMPORT_ERROR = str(exc)

    class _MissingLanguage:
        # Only what kernel signatures evaluate at definition time.
        constexpr = object

    triton = None
    tl = _MissingLanguage()


def jit(fn: Callable[..., None] | None = None, *,
        do_not_specialize: tuple[str, ...] = ()) -> Any:
    """``triton.jit``, or the bare function when Triton is not installed. As
    ``@jit(do_not_specialize=(...))``: integer arguments Triton should not specialize on
    (by default it compiles a variant per value class: 1, a multiple of 16, other), for
    arguments that vary with the batch, where every new class is a compile in serving."""
    if fn is None:
        return functools.partial(jit, do_not_specialize=do_not_specialize)
    if not HAS_TRITON:
        return fn
    if do_not_specialize:
        return triton.jit(fn, do_not_specialize=list(do_not_specialize))
    return triton.jit(fn)


def require_triton() -> None:
    """Raise a clear error when a Triton launcher is used without Triton installed."""
    if not HAS_TRITON:
        raise RuntimeError(
            "the 'triton' kernel backend needs the triton package "
            f"(pip install 'pdserve[triton]'); import failed: {_IMPORT_ERROR}. "
            "Use the 'torch' backend instead."
        )


@functools.cache
def interpreting() -> bool:
    """Whether triton was imported in interpreter mode (its stdlib is interpreted). Fixed for
    the life of the process, so computed once (launchers call it on every launch)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.sum, InterpretedFunction)


def check_launch(*tensors: torch.Tensor) -> None:
    """Common launcher guard: triton present, all tensors on one device, and CPU tensors only
    under the interpreter."""
    require_triton()
    device = tensors[0].device
    for t in tensors:
        assert t.device == device, f"tensors on {device} and {t.device}"
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported in this process"
        )


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    assert t.stride(-1) == 1, f"{name} must be contiguous in its last dim, strides {t.stride()}"
