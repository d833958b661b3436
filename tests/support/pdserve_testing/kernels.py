"""Shared builders and oracles for the kernel tests (paged caches, naive attention, the
FlashAttention-3 tolerance check). Used by tests/kernels (interpreter) and tests/gpu."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def paged_kv(
    kv_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    spare_blocks: int = 3,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Random K/V for each sequence scattered over a randomly permuted block pool.

    Returns ``k_cache, v_cache: [N, bs, Hk, D]``, ``block_tables: [B, max_blocks]`` int32 and
    the contiguous per-sequence ``[kv_len, Hk, D]`` K/V. Every unused cache slot and the junk
    block that unused table entries point at hold NaN, so any read past a sequence's end
    shows up in the output (the kernels must mask V loads, not only scores).
    """
    need = [cdiv(n, block_size) for n in kv_lens]
    num_blocks = sum(need) + spare_blocks + 1
    junk = num_blocks - 1
    perm = torch.randperm(num_blocks - 1, generator=gen)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"),
                         dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    tables = torch.full((len(kv_lens), max(need) + 1), junk, dtype=torch.int32)
    ks, vs = [], []
    used = 0
    for b, n in enumerate(kv_lens):
        ids = perm[used : used + need[b]]
        used += need[b]
        tables[b, : need[b]] = ids.to(torch.int32)
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(n)
        k_cache[ids[pos // block_size], pos % block_size] = k
        v_cache[ids[pos // block_size], pos % block_size] = v
        ks.append(k)
        vs.append(v)
    dev = torch.device(device)
    return (k_cache.to(dev), v_cache.to(dev), tables.to(dev), [k.to(dev) for k in ks],
            [v.to(dev) for v in vs])


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, upcast: bool = True
) -> torch.Tensor:
    """Math attention of ``q: [q_len, Hq, D]`` over ``k, v: [kv_len, Hk, D]``, the queries
    being the last ``q_len`` positions (causal with offset ``kv_len - q_len``).

    ``upcast``: in float64 (the reference ``out_ref``); otherwise in the inputs' own dtype
    (FlashAttention-3's ``out_pt``: what a plain same-dtype PyTorch implementation gets).
    """
    q_len, hq, _ = q.shape
    kv_len, hk, _ = k.shape
    group = hq // hk
    dt = torch.float64 if upcast else q.dtype
    qd = q.to(dt).transpose(0, 1)  # [Hq, q_len, D]
    kd = k.to(dt).repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, kv_len, D]
    vd = v.to(dt).repeat_interleave(group, dim=1).transpose(0, 1)
    s = (qd * scale) @ kd.transpose(1, 2)  # [Hq, q_len, kv_len]
    pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
    allowed = torch.arange(kv_len, device=q.device)[None, :] <= pos[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ vd).transpose(0, 1)  # [q_len, Hq, D]


def fa3_check(out: torch.Tensor, out_pt: torch.Tensor, out_ref: torch.Tensor) -> None:
    """FlashAttention-3's tolerance: the kernel's error against the float64 reference is at
    most 2x (max) and 1.5x (mean) that of a same-dtype PyTorch implementation, plus the
    dtype's rounding at the output's scale."""
    assert out.shape == out_ref.shape, (out.shape, out_ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in the kernel's output"
    ref = out_ref.double()
    ref_d = out_ref.to(out.dtype)
    atol = 2 * ((ref_d + 0.3 - 0.3).double() - ref).abs().max().item()
    err = (out.double() - ref).abs()
    err_pt = (out_pt.double() - ref).abs()
    assert err.max().item() <= 2 * err_pt.max().item() + atol, (
        f"max error {err.max().item():.3g} vs torch {err_pt.max().item():.3g} (atol {atol:.3g})"
    )
    assert err.mean().item() <= 1.5 * err_pt.mean().item() + atol, (
        f"mean error {err.mean().item():.3g} vs torch {err_pt.mean().item():.3g}"
    )


@dataclass
class AttnCase:
    """A batch of sequences for the attention ops, with both FA3 references ``[T, Hq, D]``."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    kv_lens: torch.Tensor
    max_seqlen_q: int
    scale: float
    out_ref: torch.Tensor  # float64
    out_pt: torch.Tensor  # same dtype as q


def attention_case(
    seqs: list[tuple[int, int]],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    device: str | torch.device = "cpu",
) -> AttnCase:
    """``seqs``: (new tokens, kv len) per sequence; decode is all ``(1, kv_len)``."""
    gen = torch.Generator().manual_seed(seed)
    kv_lens = [kv for _, kv in seqs]
    k_cache, v_cache, tables, ks, vs = paged_kv(
        kv_lens, block_size, num_kv_heads, head_dim, dtype, gen, device=device
    )
    tokens = sum(n for n, _ in seqs)
    q = torch.randn(tokens, num_q_heads, head_dim, generator=gen).to(dtype).to(device)
    cu = [0]
    for n, _ in seqs:
        cu.append(cu[-1] + n)
    scale = head_dim**-0.5
    refs, pts = [], []
    for b in range(len(seqs)):
        qb = q[cu[b] : cu[b + 1]]
        refs.append(naive_attention(qb, ks[b], vs[b], scale, upcast=True))
        pts.append(naive_attention(qb, ks[b], vs[b], scale, upcast=False))
    return AttnCase(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables,
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
        max_seqlen_q=max(n for n, _ in seqs), scale=scale,
        out_ref=torch.cat(refs), out_pt=torch.cat(pts),
    )
