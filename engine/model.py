"""Llama-family decoder (Llama 2/3, Qwen2, Mistral, SmolLM2) written on ``kernels.ops``.

Plain tensors and functions, no nn.Module: the runner owns the buffers, the model owns the
weights, and every op goes through one ``KernelOps`` so the torch and Triton backends are
interchangeable. Tokens of all sequences in a batch are flattened to one dimension T.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.config import ModelConfig
from pdserve.kernels.ops import KernelOps, rope_cos_sin


@dataclass
class BatchMeta:
    """Where each token of a flattened batch goes and what it attends to.

    Prefill: ``cu_seqlens_q`` [B+1] splits the T new tokens by sequence; ``kv_lens`` [B]
    counts each sequence's cached + new tokens. Decode: one token per sequence (T == B).
    """

    is_prefill: bool
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, -1 = padding
    block_tables: torch.Tensor  # [B, max_blocks] int32
    kv_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor | None = None  # [B+1] int32, prefill only
    max_seqlen_q: int = 1
    num_splits: int = 0  # decode split-K override (fixed per CUDA-graph batch size)


LayerHook = Callable[[int], None]


class LlamaModel:
    """Weights plus the forward pass; see ``engine.weights`` for the tensor names."""

    def __init__(
        self, config: ModelConfig, weights: dict[str, torch.Tensor], ops: KernelOps
    ) -> None:
        self.config = config
        self.ops = ops
        self.w = weights
        self.embed = weights["embed"]
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        self.scale = config.head_dim ** -0.5
        self.cos_sin = rope_cos_sin(
            config.head_dim, config.max_position, config.rope_theta, config.rope_scaling
        ).to(self.device)
        self.layers = [
            (
                weights[f"layers.{i}.input_norm"],
                weights[f"layers.{i}.qkv"],
                weights.get(f"layers.{i}.qkv_bias"),
                weights[f"layers.{i}.o"],
                weights[f"layers.{i}.post_norm"],
                weights[f"layers.{i}.gate_up"],
                weights[f"layers.{i}.down"],
            )
            for i in range(config.num_layers)
        ]

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: BatchMeta,
        kv_pool: torch.Tensor,
        on_layer_done: LayerHook | None = None,
    ) -> torch.Tensor:
        """Run the decoder over T tokens; returns the final-normed hidden states [T, H].

        Each layer stores its new K/V into ``kv_pool`` [L, 2, N, bs, Hk, D] before attending,
        then calls ``on_layer_done(layer)`` (the prefill worker streams that layer's KV).
        """
        cfg, ops = self.config, self.ops
        eps = cfg.rms_norm_eps
        t = input_ids.shape[0]
        x = self.embed.index_select(0, input_ids)  # [T, H]
        residual: torch.Tensor | None = None
        for i, (w_in, w_qkv, b_qkv, w_o, w_post, w_gu, w_down) in enumerate(self.layers):
            h, residual = ops.rms_norm(x, w_in, eps, residual)
            qkv = F.linear(h, w_qkv, b_qkv)
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = q.reshape(t, cfg.num_heads, cfg.head_dim)  # [T, Hq, D]
            k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)  # [T, Hk, D]
            v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
            ops.rope(q, k, meta.positions, self.cos_sin)
            k_cache, v_cache = kv_pool[i, 0], kv_pool[i, 1]
            ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            if meta.is_prefill:
                assert meta.cu_seqlens_q is not None
                o = ops.prefill_attention(
                    q, k_cache, v_cache, meta.cu_seqlens_q, meta.kv_lens, meta.block_tables,
                    meta.max_seqlen_q, self.scale,
                )
            else:
                o = ops.decode_attention(
                    q, k_cache, v_cache, meta.block_tables, meta.kv_lens, self.scale,
                    meta.num_splits,
                )
            x = F.linear(o.reshape(t, cfg.q_size), w_o)
            h, residual = ops.rms_norm(x, w_post, eps, residual)
            x = F.linear(ops.silu_mul(F.linear(h, w_gu)), w_down)
            if on_layer_done is not None:
                on_layer_done(i)
        out, _ = ops.rms_norm(x, self.w["norm"], eps, residual)
        return out

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Project hidden states [N, H] to float32 logits [N, V] (into ``out`` [N, V] float32
        when given: a CUDA graph's fixed output buffer). On a GPU a bf16/fp16 model's GEMM
        accumulates and writes float32 directly: rounding the logits to bf16 first (2**-8
        relative) would turn near-ties into flips of the top token."""
        logits = _linear_f32(hidden, self.w["lm_head"])
        return logits if out is None else out.copy_(logits)


def _linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` as float32. Low-precision CUDA inputs use cuBLAS's float32 output
    (``torch.mm(..., out_dtype=)``) where this torch has it; elsewhere the product is
    computed in the inputs' dtype and widened."""
    global _F32_MM
    if x.dtype == torch.float32 or not x.is_cuda or _F32_MM is False:
        return F.linear(x, w).float()
    if _F32_MM is None:  # probed once, eagerly (warm-up runs before any graph capture)
        try:
            y = torch.mm(x, w.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _F32_MM = False
            return F.linear(x, w).float()
        _F32_MM = True
        return y
    return torch.mm(x, w.t(), out_dtype=torch.float32)


_F32_MM: bool | None = None  # whether torch.mm takes out_dtype on this build
