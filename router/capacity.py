"""Requests that no worker of the deployment could ever hold, refused at admission.

The context check of validation (``router.validation``) is the model's: a prompt and its
``max_tokens`` within the model's context pass it. A worker's KV pool may hold fewer
tokens than that (a small device, a small ``--num-blocks``): a request whose prompt does
not fit the largest prefill worker's pool, or whose prompt plus ``max_tokens`` does not fit
the largest decode worker's, would wait for room that never comes, or preempt itself at the
end of the pool and wait then. Such a request ends INVALID_ARGUMENT at once, the message
naming the field and the pool (as vLLM refuses a request past ``max_model_len``). A pool
whose sizes are not known yet (no worker reported) refuses nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from pdserve.engine.config import blocks_for
from pdserve.router.policy import DecodeLoad, PrefillLoad


class TooLarge(Exception):
    """The request cannot fit any worker's KV pool (INVALID_ARGUMENT); the message names
    the field."""


def check_fits(prompt_tokens: int, max_tokens: int, prefill: Iterable[PrefillLoad],
               decode: Iterable[DecodeLoad], block_size: int) -> None:
    """Raise :class:`TooLarge` if the prompt fits no prefill worker's pool, or prompt +
    ``max_tokens`` no decode worker's (in colocated mode the decode workers prefill too)."""
    for role, loads, tokens, what in (
            ("prefill", prefill, prompt_tokens, f"the prompt's {prompt_tokens} tokens"),
            ("decode", decode, prompt_tokens + max_tokens,
             f"the prompt's {prompt_tokens} tokens + sampling.max_tokens={max_tokens}")):
        largest = max((w.num_blocks for w in loads), default=0)
        need = blocks_for(tokens, block_size)
        if largest and need > largest:
            field = "input" if role == "prefill" or prompt_tokens > largest * block_size \
                else "sampling.max_tokens"
            raise TooLarge(
                f"{field}: {what} need {need} KV blocks of {block_size} tokens; the largest "
                f"{role} worker holds {largest} ({largest * block_size} tokens)")
