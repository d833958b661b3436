"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds.

A seeded request draws its n-th token from a generator seeded by (seed, n), not from a
generator that lives with the sequence. The draw therefore does not depend on which worker
samples the token, on the batch it shares, or on a preemption and re-prefill in between:
the same seed gives the same stream wherever the request runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.engine.sequence import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step) over 64 bits
_MASK64 = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    """The generator seed for output token ``step`` of a request seeded with ``seed``."""
    return ((seed * _SEED_MIX) ^ (step * 0xBF58476D1CE4E5B9 + 1)) & _MASK64


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]
) -> list[int]:
    """Sample one token per row of ``logits`` [B, V].

    ``steps[i]`` is how many tokens row i's request has generated before this one (it picks
    the seeded generator's stream position).
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(steps):
        raise ValueError(
            f"logits {tuple(logits.shape)} does not match {len(params)} params/{len(steps)} steps"
        )
    logits = logits.float()
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        sub = logits.index_select(0, idx)
        temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        probs = _filtered_probs(
            sub / temps[:, None],
            [params[i].top_k for i in rows],
            [params[i].top_p for i in rows],
        )
        noise = torch.empty_like(probs).exponential_()  # unseeded rows: one batched draw
        for j, i in enumerate(rows):
            seed = params[i].seed
            if seed is not None:  # seeded rows: their own (seed, step) stream
                gen = torch.Generator(device=logits.device).manual_seed(step_seed(seed, steps[i]))
                noise[j].exponential_(generator=gen)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (Gumbel-max in disguise).
        picked = (probs / noise).argmax(dim=-1)
        out[idx] = picked
    return [int(t) for t in out.tolist()]


def _filtered_probs(
    logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]
) -> torch.Tensor:
    """Softmax of ``logits`` [R, V] after per-row top-k then top-p truncation."""
    vocab = logits.shape[-1]
    need_k = any(0 < k < vocab for k in top_k)
    need_p = any(p < 1.0 for p in top_p)
    if not (need_k or need_p):
        return torch.softmax(logits, dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    if need_k:
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks >= ks[:, None], float("-inf"))
    if need_p:
        ps = torch.tensor(list(top_p), device=logits.device, dtype=torch.float32)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p; the first
        # token always survives.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill(before >= ps[:, None], float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(filtered, dim=-1)
