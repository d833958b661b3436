"""The logits processors of the sampler, batched over rows, each with a torch reference.

Order (vLLM V1's): min_tokens masking and the penalties on the raw logits (they change the
argmax, so greedy rows get them too), then temperature, then min_p, then top-k / top-p
(``engine.sampler``). Every function takes only the rows that use it; the sampler calls
none of them for a batch where no row does, so plain requests pay nothing.

The ``*_ref`` functions are row-by-row versions written for clarity, for the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_counts(histories: Sequence[Sequence[int]], num_output: Sequence[int], vocab: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how often each token occurs in the row's output, and whether it occurs
    anywhere (prompt or output): ([R, V] int32 counts, [R, V] bool seen).

    ``histories[r]`` is the row's prompt followed by its output tokens so far, of which the
    last ``num_output[r]`` are output. One padded [R, L] tensor and two ``scatter_add_``
    calls (padding goes to an extra column that is dropped).
    """
    rows = len(histories)
    width = max((len(h) for h in histories), default=0)
    ids = torch.full((rows, max(width, 1)), vocab, dtype=torch.int64)
    out = torch.zeros((rows, max(width, 1)), dtype=torch.int32)
    for r, h in enumerate(histories):
        if h:
            ids[r, : len(h)] = torch.as_tensor(h, dtype=torch.int64)
            n = num_output[r]
            if n:
                out[r, len(h) - n: len(h)] = 1
    ids, out = ids.to(device), out.to(device)
    counts = torch.zeros((rows, vocab + 1), dtype=torch.int32, device=device)
    counts.scatter_add_(1, ids, out)
    seen = torch.zeros((rows, vocab + 1), dtype=torch.int32, device=device)
    seen.scatter_add_(1, ids, torch.ones_like(out))
    return counts[:, :vocab], seen[:, :vocab] > 0


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """Penalized ``logits`` [R, V]: the repetition penalty [R] on every ``seen`` token
    (divide a positive logit, multiply a negative one), then ``logit -= frequency * count
    + presence * (count > 0)`` over the output ``counts``."""
    rep = torch.where(seen, repetition[:, None], torch.ones_like(logits))
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    c = counts.to(logits.dtype)
    return logits - frequency[:, None] * c - presence[:, None] * (c > 0).to(logits.dtype)


def mask_tokens(logits: torch.Tensor, rows: Sequence[int],
                token_ids: Sequence[Sequence[int]]) -> None:
    """Set ``logits[rows[j], token_ids[j]]`` to -inf in place (min_tokens: the stop and
    EOS tokens of the rows still under it)."""
    r = [row for row, ids in zip(rows, token_ids, strict=True) for _ in ids]
    if not r:
        return
    c = [t for ids in token_ids for t in ids]
    logits[torch.tensor(r, device=logits.device),
           torch.tensor(c, device=logits.device)] = float("-inf")


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """``logits`` [R, V] (after temperature) with every token whose probability is below
    ``min_p`` [R] times the row's largest probability set to -inf."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax of ``logits`` [R, V] at ``tokens`` [R], and its ``k`` best (ids, values),
    best first: ([R], [R, k] int64, [R, k])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens[:, None]).squeeze(1)
    if k == 0:
        empty = lp.new_empty((lp.shape[0], 0))
        return chosen, empty.long(), empty
    top = lp.topk(k, dim=-1)
    return chosen, top.indices, top.values


# -- references (row by row, for the tests) ---------------------------------------------------
def penalties_ref(logits: torch.Tensor, prompt: Sequence[int], output: Sequence[int],
                  repetition: float, presence: float, frequency: float) -> torch.Tensor:
    """One row [V], as vLLM and OpenAI write it."""
    x = logits.clone()
    for t in set(prompt) | set(output):
        x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
    for t in set(output):
        x[t] -= frequency * list(output).count(t) + presence
    return x


def min_p_ref(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """One row [V]."""
    probs = torch.softmax(logits, dim=-1)
    keep = probs >= min_p * probs.max()
    return torch.where(keep, logits, torch.full_like(logits, float("-inf")))
