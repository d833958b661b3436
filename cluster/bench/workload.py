"""The prompts of a `pdserve bench` sweep, drawn as the rates need them.

How many requests a rate sends is known only once the previous rate has run (``steady``), so
the workload is drawn on demand, in chunks of ``CHUNK`` prompts from one seeded stream:
prompt i is the same however many are taken, and every rate of a sweep sends the same first
prompts (a longer rate sends more of the same sequence). Each prompt carries the SLO class it
is sent with (``classes``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pdserve.cluster.bench.classes import ServerSlo, assign_classes
from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.data import (
    Prompt,
    chat_lengths,
    load_jsonl,
    sample_lengths,
    token_prompts,
)
from pdserve.cluster.bench.multiturn import MultiTurn
from pdserve.proto import pdserve_pb2 as pb

CHUNK = 256


class Workload:
    """The sweep's prompts (``take(n)``: the first n), with their SLO classes."""

    def __init__(self, cfg: BenchConfig, info: pb.ModelInfo,
                 server: ServerSlo | None = None) -> None:
        self.cfg = cfg
        self.info = info
        self._rng = np.random.default_rng(cfg.seed)
        self._prompts: list[Prompt] = []
        self._file: list[Prompt] = []
        self._chat = (MultiTurn(self._rng, cfg.multiturn, info) if cfg.dataset == "multiturn"
                      else None)
        if cfg.dataset == "jsonl":
            assert cfg.dataset_path is not None
            self._file = load_jsonl(cfg.dataset_path, None, cfg.output_len)
        server = server or ServerSlo()
        # a fixed class (or the server's default) unless a mix draws one per request
        self._fixed = "" if cfg.class_mix else server.resolve(cfg.slo_class)
        for name, _ in cfg.class_mix:
            server.resolve(name)  # ValueError for a class the server does not have

    def take(self, n: int) -> list[Prompt]:
        while len(self._prompts) < n:
            self._prompts += self._chunk(len(self._prompts))
        classes = (assign_classes(n, self.cfg.class_mix, self.cfg.seed) if self.cfg.class_mix
                   else [self._fixed] * n)
        return [replace(p, slo_class=c) for p, c in zip(self._prompts[:n], classes, strict=True)]

    def _chunk(self, start: int) -> list[Prompt]:
        cfg = self.cfg
        if self._file:
            return [self._file[(start + i) % len(self._file)] for i in range(CHUNK)]
        if self._chat is not None:
            return self._chat.draw(CHUNK)
        inp, out = workload_lengths(cfg, self._rng, CHUNK)
        return token_prompts(self._rng, inp, out, self.info)


def workload_lengths(cfg: BenchConfig, rng: np.random.Generator,
                     n: int) -> tuple[np.ndarray, np.ndarray]:
    """(input, output) token lengths of ``n`` prompts of the ``random`` or ``chat`` dataset,
    drawn from ``rng`` (``pdserve tune`` simulates the same distributions)."""
    if cfg.dataset == "chat":
        return chat_lengths(rng, n)
    if cfg.dataset != "random":
        raise ValueError(f"dataset {cfg.dataset!r} has no length distribution")
    r = cfg.range_ratio
    inp = sample_lengths(rng, cfg.input_len, cfg.input_len_dist, r, n)
    out = sample_lengths(rng, cfg.output_len, cfg.output_len_dist, r, n)
    return inp, out
