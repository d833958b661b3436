"""Workloads for `pdserve bench`: prompt and output lengths (random distributions or a
chat-like mix), random token prompts, JSONL files, and request arrival times."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdserve.proto import pdserve_pb2 as pb

DATASETS = ("random", "chat", "jsonl", "multiturn")  # multiturn: cluster.bench.multiturn
LENGTH_DISTS = ("fixed", "uniform", "normal", "lognormal")
TOKEN_ID_LOW = 1000  # random prompt ids start here: special tokens sit at the low ids

# The `chat` dataset: (input tokens, output tokens, weight) buckets shaped like ShareGPT
# conversations (most prompts short with medium answers, a tail of long contexts with short
# answers). A sample picks a bucket by weight, then scales both lengths by U(0.75, 1.25).
CHAT_MIX: tuple[tuple[int, int, float], ...] = (
    (16, 64, 0.10),  # one-line question, short answer
    (32, 160, 0.20),  # short question, paragraph answer
    (64, 256, 0.20),  # question with some context
    (160, 320, 0.15),  # follow-up turn with history
    (320, 384, 0.12),  # multi-turn history
    (640, 256, 0.10),  # pasted text or code, explanation
    (1200, 512, 0.06),  # long context, long answer
    (2400, 160, 0.04),  # document, summary
    (4000, 256, 0.03),  # long document, summary
)


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Prompt:
    """One request of the workload: exactly one of token_ids, text, messages."""

    output_len: int  # max_tokens
    token_ids: tuple[int, ...] | None = None
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    slo_class: str = ""  # the SLO class it is sent with ("": none named)


def sample_lengths(rng: np.random.Generator, mean: int, dist: str, range_ratio: float,
                   n: int) -> np.ndarray:
    """n lengths >= 1 around `mean`. uniform: integers in [mean(1-r), mean(1+r)]; normal:
    std r*mean; lognormal: mean `mean`, log-space std r (a right tail, like real traffic)."""
    r = range_ratio
    if dist == "fixed" or r == 0:
        x = np.full(n, float(mean))
    elif dist == "uniform":
        x = rng.integers(math.floor(mean * (1 - r)), math.ceil(mean * (1 + r)) + 1, n)
    elif dist == "normal":
        x = rng.normal(mean, r * mean, n)
    elif dist == "lognormal":
        x = rng.lognormal(math.log(mean) - r * r / 2, r, n)
    else:
        raise ValueError(f"unknown length distribution {dist!r}")
    return np.maximum(np.rint(x), 1).astype(np.int64)


def chat_lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(input, output) lengths drawn from CHAT_MIX."""
    w = np.array([b[2] for b in CHAT_MIX])
    pick = rng.choice(len(CHAT_MIX), size=n, p=w / w.sum())
    base = np.array([[b[0], b[1]] for b in CHAT_MIX], dtype=np.float64)[pick]
    scaled = base * rng.uniform(0.75, 1.25, size=(n, 2))
    lengths = np.maximum(np.rint(scaled), 1).astype(np.int64)
    return lengths[:, 0], lengths[:, 1]


def token_prompts(rng: np.random.Generator, input_lens: np.ndarray, output_lens: np.ndarray,
                  info: pb.ModelInfo) -> list[Prompt]:
    """Random token-id prompts, lengths clamped to the server's limits."""
    vocab, ctx = int(info.vocab_size), int(info.max_context_length)
    cap = min(int(info.max_tokens_limit or ctx), ctx - 1)
    low = min(TOKEN_ID_LOW, vocab // 2)
    eos = set(info.eos_token_ids)
    out: list[Prompt] = []
    for i_len, o_len in zip(input_lens.tolist(), output_lens.tolist(), strict=True):
        o = max(1, min(o_len, cap))
        ids = rng.integers(low, vocab, size=max(1, min(i_len, ctx - o))).tolist()
        out.append(Prompt(o, token_ids=tuple(low if t in eos else t for t in ids)))
    return out


def _positive_int(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")
    return v


def parse_jsonl_line(line: str, default_output_len: int) -> Prompt:
    """One JSONL record: {"prompt": str} or {"messages": [{"role", "content"}, ...]}, and
    optionally "max_tokens" or "output_len". ValueError says what is wrong."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    if ("prompt" in d) == ("messages" in d):
        raise ValueError('give exactly one of "prompt" and "messages"')
    if "max_tokens" in d and "output_len" in d:
        raise ValueError('give "max_tokens" or "output_len", not both')
    key = "max_tokens" if "max_tokens" in d else "output_len"
    out = _positive_int(d[key], f'"{key}"') if key in d else default_output_len
    if "prompt" in d:
        if not isinstance(d["prompt"], str) or not d["prompt"]:
            raise ValueError('"prompt" must be a non-empty string')
        return Prompt(out, text=d["prompt"])
    msgs = d["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError('"messages" must be a non-empty list')
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"]
                and isinstance(m.get("content"), str)):
            raise ValueError(f'"messages"[{i}] must be {{"role": str, "content": str}}')
        turns.append((m["role"], m["content"]))
    return Prompt(out, messages=tuple(turns))


def load_jsonl(path: str | Path, n: int | None, default_output_len: int) -> list[Prompt]:
    """The first n records of a JSONL file (repeated in order if it has fewer; None: every
    record once); blank lines are skipped. DatasetError names the file and the line at
    fault."""
    records: list[Prompt] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror or e}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(parse_jsonl_line(line, default_output_len))
        except ValueError as e:
            raise DatasetError(f"{path}, line {lineno}: {e}") from None
        if len(records) == n:
            break
    if not records:
        raise DatasetError(f"{path}: no records")
    return records if n is None else [records[i % len(records)] for i in range(n)]


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send times (s after the start) of n requests: gaps ~ Gamma(shape=burstiness,
    mean=1/rate), so burstiness 1 is a Poisson process, < 1 burstier, > 1 more regular."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), n)
    return np.concatenate(([0.0], np.cumsum(gaps[:-1])))
