"""The ``multiturn`` dataset of `pdserve bench`: chat conversations that share one system
prompt, the workload prefix caching is for.

``users`` conversations run side by side, each ``turns`` turns long; request i is turn
``(i // users) % turns`` of conversation slot ``i % users``, so a conversation's turns
arrive in order, ``users`` requests apart, and after its last turn the slot starts a new
conversation. Turn t's prompt is the system prompt (random token ids, the same for every
conversation of the run), then the conversation so far (each earlier turn's user message and
answer), then a new user message: it extends turn t-1's prompt, as a chat client's does. The
answers in the history are random tokens of the turn's output length, standing in for the
model's own (the load is open loop: a turn is sent at its arrival time, not when the previous
one ends), so what a server can reuse is the system prompt and the earlier turns' prompts,
not the blocks it decoded. User messages are ``--input-len`` tokens and answers
``--output-len`` (both with their distributions); a conversation that would outgrow the
model's context starts over.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pdserve.cluster.bench.data import TOKEN_ID_LOW, Prompt, sample_lengths
from pdserve.proto import pdserve_pb2 as pb

SYSTEM_PROMPT_LEN = 1024
TURNS = 4
USERS = 8


@dataclass(frozen=True)
class MultiTurnShape:
    """The conversations' shape (``--system-prompt-len``, ``--turns``, ``--users``) and the
    lengths of each turn's message and answer."""

    system_prompt_len: int = SYSTEM_PROMPT_LEN
    turns: int = TURNS
    users: int = USERS
    input_len: int = 64
    output_len: int = 128
    input_len_dist: str = "fixed"
    output_len_dist: str = "fixed"
    range_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.system_prompt_len < 0:
            raise ValueError(f"--system-prompt-len must be >= 0, got {self.system_prompt_len}")
        for name in ("turns", "users"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


class MultiTurn:
    """Draws the dataset's prompts in order (``draw(n)``: the next n), from ``rng``."""

    def __init__(self, rng: np.random.Generator, shape: MultiTurnShape,
                 info: pb.ModelInfo) -> None:
        self.rng = rng
        self.shape = shape
        vocab, ctx = int(info.vocab_size), int(info.max_context_length)
        self.context = ctx
        self.cap = max(1, min(int(info.max_tokens_limit or ctx), ctx - 1))
        self.low, self.high = min(TOKEN_ID_LOW, vocab // 2), vocab
        self.eos = set(info.eos_token_ids)
        if shape.system_prompt_len + 2 > ctx:
            raise ValueError(f"--system-prompt-len {shape.system_prompt_len} does not fit the "
                             f"model's context of {ctx} tokens")
        self.system = self._tokens(shape.system_prompt_len)
        self._history: list[list[int]] = [[] for _ in range(shape.users)]
        self._next = 0

    def _tokens(self, n: int) -> list[int]:
        ids = self.rng.integers(self.low, self.high, size=n).tolist()
        return [self.low if t in self.eos else t for t in ids]

    def draw(self, n: int) -> list[Prompt]:
        s = self.shape
        msgs = sample_lengths(self.rng, s.input_len, s.input_len_dist, s.range_ratio, n)
        outs = sample_lengths(self.rng, s.output_len, s.output_len_dist, s.range_ratio, n)
        prompts = []
        for m_len, o_len in zip(msgs.tolist(), outs.tolist(), strict=True):
            slot, turn = self._next % s.users, (self._next // s.users) % s.turns
            self._next += 1
            out = max(1, min(o_len, self.cap))
            history = self._history[slot] if turn else []
            message = self._tokens(m_len)
            if len(self.system) + len(history) + len(message) + out > self.context:
                history = []  # outgrew the context: a new conversation in this slot
                message = message[:max(1, self.context - out - len(self.system))]
            prompt = self.system + history + message
            prompts.append(Prompt(out, token_ids=tuple(prompt)))
            self._history[slot] = history + message + self._tokens(out)
        return prompts
