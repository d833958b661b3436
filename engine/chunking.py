"""Chunked prefill: a prompt longer than what is left of a step's token budget is cached a
chunk per step, each chunk attending to the KV of the chunks before it.

Pure Python, shared by the prefill worker's scheduler and by a decode worker that prefills
prompts itself (colocated mode, conditional disaggregation). The caller's sequence type is
the key: sequences are entities compared by identity, so a sequence dropped and admitted
again is a new prompt here.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

S = TypeVar("S", bound=Hashable)


def attention_work(chunks: Iterable[tuple[int, int]]) -> int:
    """A prefill step's attention work: for each ``(start, length)`` chunk (``length`` new
    tokens after ``start`` cached ones), ``length * (start + length)`` query-key pairs, its
    rows times the keys the last row sees. A prompt of n tokens from scratch is n**2.

    The workers report it with each step's timing and the router's cost model
    (``router.cost_model``, DistServe's prefill form) is fitted on it; one definition here
    serves both, since the engine may not import the router.
    """
    return sum(length * (start + length) for start, length in chunks)


@dataclass(frozen=True)
class PromptChunk(Generic[S]):
    """``length`` prompt tokens of ``seq`` from position ``start``."""

    seq: S
    start: int
    length: int
    prompt: Sequence[int] = field(repr=False)  # the whole prompt, sliced only on demand

    @property
    def token_ids(self) -> Sequence[int]:
        return self.prompt[self.start:self.start + self.length]

    @property
    def is_last(self) -> bool:
        """This chunk completes the prompt (its last row's logits give the first token)."""
        return self.start + self.length == len(self.prompt)


class PromptChunker(Generic[S]):
    """Prompts being prefilled, oldest first, and how many tokens of each are cached."""

    def __init__(self) -> None:
        self._prompts: dict[S, tuple[Sequence[int], int]] = {}  # seq -> (prompt, cached)

    def add(self, seq: S, prompt: Sequence[int], cached: int = 0) -> None:
        """Start prefilling ``prompt`` for ``seq`` from position ``cached`` (the KV of the
        tokens before it is in place already: a prefix cache hit)."""
        if not 0 <= cached < len(prompt):
            raise ValueError(f"cached prefix {cached} out of range for a prompt of "
                             f"{len(prompt)} tokens")
        self._prompts[seq] = (prompt, cached)

    def discard(self, seq: S) -> None:
        """Stop prefilling ``seq`` (aborted or released); a no-op if it is not here."""
        self._prompts.pop(seq, None)

    def __contains__(self, seq: object) -> bool:
        return seq in self._prompts

    def __iter__(self) -> Iterator[S]:
        return iter(self._prompts)

    def __len__(self) -> int:
        return len(self._prompts)

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens not cached yet."""
        return sum(len(prompt) - cached for prompt, cached in self._prompts.values())

    def schedule(self, budget: int) -> list[PromptChunk[S]]:
        """The next step's chunks, oldest prompt first, under ``budget`` tokens (none when
        the budget is spent)."""
        chunks = []
        for seq, (prompt, cached) in self._prompts.items():
            if budget <= 0:
                break
            n = min(len(prompt) - cached, budget)
            chunks.append(PromptChunk(seq, cached, n, prompt))
            budget -= n
        return chunks

    def complete(self, chunks: list[PromptChunk[S]]) -> list[S]:
        """Record that ``chunks`` ran; returns the sequences whose whole prompt is cached now
        (they leave the chunker)."""
        finished = []
        for c in chunks:
            entry = self._prompts.get(c.seq)
            if entry is None:
                continue  # dropped during the step
            prompt = entry[0]
            cached = c.start + c.length
            if cached == len(prompt):
                del self._prompts[c.seq]
                finished.append(c.seq)
            else:
                self._prompts[c.seq] = (prompt, cached)
        return finished
