"""Batched sampling: penalties, min_tokens, greedy, temperature, min_p, top-k, top-p,
per-request seeds, logprobs.

The steps, in vLLM V1's order: logprobs of the raw logits (the model's distribution, before
any processing: vLLM's default ``raw_logprobs`` mode) for the rows that ask; min_tokens
masking and the penalties (``engine.logits_processors``); argmax for greedy rows; for the
others temperature, min_p, top-k and top-p, and a draw. A step pays for each stage only if
a row of it uses that stage (a plain batch runs what it ran before: no token counts, no
log_softmax, no extra device sync).

A seeded request draws its n-th token from a generator seeded by (seed, n), not from a
generator that lives with the sequence. The draw therefore does not depend on which worker
samples the token, on the batch it shares, or on a preemption and re-prefill in between:
the same seed gives the same stream wherever the request runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.logits_processors import (
    apply_min_p,
    apply_penalties,
    logprobs_of,
    mask_tokens,
    token_counts,
)
from pdserve.engine.messages import TokenLogprobs
from pdserve.engine.sequence import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step) over 64 bits
_MASK64 = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    """The generator seed for output token ``step`` of a request seeded with ``seed``."""
    return ((seed * _SEED_MIX) ^ (step * 0xBF58476D1CE4E5B9 + 1)) & _MASK64


@dataclass(frozen=True)
class Sampled:
    """One token per row, and per row its logprobs (None where the row did not ask)."""

    tokens: list[int]
    logprobs: list[TokenLogprobs | None]


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]
) -> list[int]:
    """The tokens of ``sample_batch`` for rows that need no token history."""
    return sample_batch(logits, params, steps).tokens


def sample_batch(
    logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int],
    histories: Sequence[Sequence[int] | None] | None = None,
) -> Sampled:
    """Sample one token per row of ``logits`` [B, V].

    ``steps[i]`` is how many tokens row i's request has generated before this one (it picks
    the seeded generator's stream position, and says whether min_tokens still holds);
    ``histories[i]``, needed where ``params[i].uses_penalties``, is the request's prompt
    followed by those ``steps[i]`` output tokens.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(steps):
        raise ValueError(
            f"logits {tuple(logits.shape)} does not match {len(params)} params/{len(steps)} steps"
        )
    logits = logits.float()
    raw = logits
    logits = _process(logits, params, steps, histories)
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        sub = logits.index_select(0, idx)
        temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        sub = sub / temps[:, None]
        min_ps = [params[i].min_p for i in rows]
        if any(m > 0 for m in min_ps):
            sub = apply_min_p(sub, torch.tensor(min_ps, device=logits.device))
        probs = _filtered_probs(
            sub, [params[i].top_k for i in rows], [params[i].top_p for i in rows],
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
    return Sampled([int(t) for t in out.tolist()], _logprobs(raw, out, params))


def _process(logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int],
             histories: Sequence[Sequence[int] | None] | None) -> torch.Tensor:
    """min_tokens masking and penalties, on the rows that use them."""
    under = [i for i, p in enumerate(params) if steps[i] < p.min_tokens and p.stop_ids()]
    pen = [i for i, p in enumerate(params) if p.uses_penalties]
    if not (under or pen):
        return logits
    logits = logits.clone()
    mask_tokens(logits, under, [params[i].stop_ids() for i in under])
    if pen:
        if histories is None or any(histories[i] is None for i in pen):
            raise ValueError("penalties need the token history of their rows")
        dev = logits.device
        counts, seen = token_counts([histories[i] or () for i in pen], [steps[i] for i in pen],
                                    logits.shape[-1], dev)
        idx = torch.tensor(pen, device=dev)
        penalized = apply_penalties(
            logits.index_select(0, idx), counts, seen,
            torch.tensor([params[i].repetition_penalty for i in pen], device=dev),
            torch.tensor([params[i].presence_penalty for i in pen], device=dev),
            torch.tensor([params[i].frequency_penalty for i in pen], device=dev),
        )
        logits.index_copy_(0, idx, penalized)
    return logits


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor,
              params: Sequence[SamplingParams]) -> list[TokenLogprobs | None]:
    """The raw distribution's logprobs of ``tokens`` for the rows that asked (one device
    read for all of them)."""
    rows = [i for i, p in enumerate(params) if p.logprobs]
    result: list[TokenLogprobs | None] = [None] * len(params)
    if not rows:
        return result
    idx = torch.tensor(rows, device=raw.device)
    k = min(max(params[i].top_logprobs for i in rows), raw.shape[-1])
    chosen, top_ids, top_lps = logprobs_of(raw.index_select(0, idx), tokens[idx], k)
    # [R, 1 + 2k] float64 (token ids are exact in it): one read back for the whole batch.
    packed = torch.cat([chosen[:, None].double(), top_ids.double(), top_lps.double()], dim=1)
    for j, row in enumerate(packed.tolist()):
        n = params[rows[j]].top_logprobs
        result[rows[j]] = TokenLogprobs(row[0], tuple(int(t) for t in row[1:1 + n]),
                                        tuple(row[1 + k:1 + k + n]))
    return result


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
