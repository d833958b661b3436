"""The one interface through which the model calls its kernels.

``get_ops("torch")`` gives the torch references (any device; the CPU path and the oracle),
``get_ops("triton")`` the Triton kernels (GPU; on CPU tensors Triton's interpreter, which
must be on before triton is first imported, see ``kernels/_triton.py``). Both
obey the same contracts, documented on the protocols below. All tensors may be float32, bf16
or fp16; kernels compute in float32 and return the input dtype.

KV layout: a worker's pool is ``[L, 2, N, block_size, Hk, D]``; ``pool[l]`` is the
``layer_cache`` of pack/unpack and ``pool[l, 0]`` / ``pool[l, 1]`` are the ``k_cache`` /
``v_cache`` of store_kv and the attention ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pdserve.kernels.activation import silu_mul_ref
from pdserve.kernels.attention_decode import decode_attention_ref
from pdserve.kernels.attention_prefill import prefill_attention_ref
from pdserve.kernels.kv_pack import pack_kv_ref, unpack_kv_ref
from pdserve.kernels.kv_store import store_kv_ref
from pdserve.kernels.rms_norm import rms_norm_ref
from pdserve.kernels.rope import rope_cos_sin, rope_ref

__all__ = ["KernelOps", "get_ops", "rope_cos_sin"]


class RmsNormFn(Protocol):
    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [T, H]``, ``residual: [T, H]`` float32 (the residual stream), ``weight: [H]``.
        ``r = x (+ residual)`` in float32; returns ``(rmsnorm(r) * weight, r)``, the first
        in ``x``'s dtype (HF LlamaRMSNorm numerics in float32)."""
        ...


class RopeFn(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
    ) -> None:
        """In place on ``q: [T, Hq, D]`` and ``k: [T, Hk, D]``; ``positions: [T]`` int64;
        ``cos_sin: [max_pos, D]`` float32 from :func:`rope_cos_sin` (NeoX pairs (i, i+D/2))."""
        ...


class SiluMulFn(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [T, 2I]`` (gate, up) -> ``silu(gate) * up: [T, I]``."""
        ...


class StoreKvFn(Protocol):
    def __call__(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """``k, v: [T, Hk, D]`` -> ``[N, bs, Hk, D]`` caches at ``slot_mapping: [T]`` int64
        (block ``slot // bs``, offset ``slot % bs``; slot < 0 is skipped)."""
        ...


class PrefillAttentionFn(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        kv_lens: torch.Tensor,
        block_tables: torch.Tensor,
        max_seqlen_q: int,
        scale: float,
    ) -> torch.Tensor:
        """Varlen causal attention, K/V all from the paged cache. ``q: [T, Hq, D]``,
        ``cu_seqlens_q: [B+1]`` int32, ``kv_lens: [B]`` int32 (prefix + new),
        ``block_tables: [B, max_blocks]`` int32. Query ``j`` of sequence ``b`` is at position
        ``kv_lens[b] - q_len_b + j``. Returns ``[T, Hq, D]``."""
        ...


class DecodeAttentionFn(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        kv_lens: torch.Tensor,
        scale: float,
        num_splits: int = 0,
    ) -> torch.Tensor:
        """``q: [B, Hq, D]``, one query per sequence over its ``kv_lens[b]`` cached tokens.
        ``num_splits``: KV splits of flash-decoding, 0 = chosen from the SM count (fix it per
        batch size under CUDA graphs). Returns ``[B, Hq, D]``."""
        ...


class PackKvFn(Protocol):
    def __call__(
        self, layer_cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor
    ) -> None:
        """``layer_cache: [2, N, bs, Hk, D]``, ``block_ids: [n]`` int64 ->
        ``out: [2, n, bs, Hk, D]``."""
        ...


class UnpackKvFn(Protocol):
    def __call__(
        self, buf: torch.Tensor, layer_cache: torch.Tensor, block_ids: torch.Tensor
    ) -> None:
        """``buf: [2, n, bs, Hk, D]`` -> blocks ``block_ids: [n]`` int64 of
        ``layer_cache: [2, N, bs, Hk, D]``."""
        ...


@dataclass(frozen=True)
class KernelOps:
    """One backend's implementation of every op the model uses."""

    name: str  # "torch" or "triton"
    rms_norm: RmsNormFn
    rope: RopeFn
    silu_mul: SiluMulFn
    store_kv: StoreKvFn
    prefill_attention: PrefillAttentionFn
    decode_attention: DecodeAttentionFn
    pack_kv: PackKvFn
    unpack_kv: UnpackKvFn


TORCH_OPS = KernelOps(
    name="torch",
    rms_norm=rms_norm_ref,
    rope=rope_ref,
    silu_mul=silu_mul_ref,
    store_kv=store_kv_ref,
    prefill_attention=prefill_attention_ref,
    decode_attention=decode_attention_ref,
    pack_kv=pack_kv_ref,
    unpack_kv=unpack_kv_ref,
)


def _triton_ops() -> KernelOps:
    from pdserve.kernels._triton import require_triton

    require_triton()
    # Launchers live beside their references; imported here so that the torch backend never
    # depends on them at call time.
    from pdserve.kernels.activation import silu_mul
    from pdserve.kernels.attention_decode import decode_attention
    from pdserve.kernels.attention_prefill import prefill_attention
    from pdserve.kernels.kv_pack import pack_kv, unpack_kv
    from pdserve.kernels.kv_store import store_kv
    from pdserve.kernels.rms_norm import rms_norm
    from pdserve.kernels.rope import rope

    return KernelOps(
        name="triton",
        rms_norm=rms_norm,
        rope=rope,
        silu_mul=silu_mul,
        store_kv=store_kv,
        prefill_attention=prefill_attention,
        decode_attention=decode_attention,
        pack_kv=pack_kv,
        unpack_kv=unpack_kv,
    )


def get_ops(backend: str) -> KernelOps:
    """``"torch"`` (reference, any device) or ``"triton"`` (needs the triton package)."""
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        return _triton_ops()
    raise ValueError(f"unknown kernel backend {backend!r}; expected 'torch' or 'triton'")
