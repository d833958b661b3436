"""`pdserve bench`: a load generator for a running pdserve server, like `vllm bench serve`.

It builds a workload (random token prompts of chosen length distributions, a built-in chat-like
length mix, or a JSONL file), sends it over gRPC at Poisson or gamma arrivals for each request
rate of a sweep (optionally capped by a concurrency limit), records every response's arrival,
and reports latency percentiles, throughput, SLO attainment and goodput (see bench_report).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc.aio
import numpy as np

from cluster.bench_plot import format_report, format_sweep, plot_results
from cluster.bench_report import (
    TIMING_FIELDS,
    BenchResult,
    RequestRecord,
    RunReport,
    Slo,
    make_report,
    sweep_goodput,
)
from proto import pdserve_pb2 as pb
from proto.client import AsyncClient, build_request

DATASETS = ("random", "chat", "jsonl")
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


@dataclass(frozen=True)
class BenchConfig:
    """One `pdserve bench` invocation (a sweep of one or more request rates)."""

    server: str = "127.0.0.1:50051"
    label: str = "pdserve"
    dataset: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 100
    input_len: int = 512
    output_len: int = 128
    input_len_dist: str = "fixed"
    output_len_dist: str = "fixed"
    range_ratio: float = 0.0
    request_rates: tuple[float, ...] = (math.inf,)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = False  # chat/jsonl; random always ignores EOS
    slo: Slo = field(default_factory=Slo)
    goodput_attainment: float = 0.9
    request_timeout_s: float | None = None
    ready_timeout_s: float = 60.0
    result_json: str | None = None
    plot_dir: str | None = None
    plot_rate: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}")
        if (self.dataset == "jsonl") != (self.dataset_path is not None):
            raise ValueError("--dataset-path is needed with --dataset jsonl, and only there")
        for dist in (self.input_len_dist, self.output_len_dist):
            if dist not in LENGTH_DISTS:
                raise ValueError(f"length distribution must be one of {LENGTH_DISTS}: {dist!r}")
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        if not self.request_rates or any(not r > 0 for r in self.request_rates):
            raise ValueError(f"--request-rate values must be > 0, got {self.request_rates}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")
        if not 0 < self.goodput_attainment <= 1:
            raise ValueError("--goodput-attainment must be in (0, 1]")
        if self.temperature < 0:
            raise ValueError("--temperature must be >= 0")


def parse_rates(s: str) -> tuple[float, ...]:
    """"1,2,4" or "inf" -> request rates (req/s)."""
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--request-rate takes numbers or inf, comma-separated: {s!r}") from None


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


def load_jsonl(path: str | Path, n: int, default_output_len: int) -> list[Prompt]:
    """The first n records of a JSONL file (repeated in order if it has fewer); blank lines
    are skipped. DatasetError names the file and the line at fault."""
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
    return [records[i % len(records)] for i in range(n)]


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send times (s after the start) of n requests: gaps ~ Gamma(shape=burstiness,
    mean=1/rate), so burstiness 1 is a Poisson process, < 1 burstier, > 1 more regular."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), n)
    return np.concatenate(([0.0], np.cumsum(gaps[:-1])))


def build_workload(cfg: BenchConfig, info: pb.ModelInfo) -> list[Prompt]:
    """The prompts of every run (the same for each rate of a sweep)."""
    rng = np.random.default_rng(cfg.seed)
    if cfg.dataset == "jsonl":
        assert cfg.dataset_path is not None
        return load_jsonl(cfg.dataset_path, cfg.num_prompts, cfg.output_len)
    if cfg.dataset == "chat":
        inp, out = chat_lengths(rng, cfg.num_prompts)
    else:
        r = cfg.range_ratio
        inp = sample_lengths(rng, cfg.input_len, cfg.input_len_dist, r, cfg.num_prompts)
        out = sample_lengths(rng, cfg.output_len, cfg.output_len_dist, r, cfg.num_prompts)
    return token_prompts(rng, inp, out, info)


def _request(cfg: BenchConfig, p: Prompt, i: int) -> pb.GenerateRequest:
    return build_request(
        token_ids=p.token_ids, text=p.text, messages=p.messages, max_tokens=p.output_len,
        temperature=cfg.temperature, seed=cfg.seed + i if cfg.temperature > 0 else None,
        ignore_eos=cfg.ignore_eos or cfg.dataset == "random",
        ttft_ms=cfg.slo.ttft_ms or 0.0, tpot_ms=cfg.slo.tpot_ms or 0.0,
    )


async def _one(client: AsyncClient, req: pb.GenerateRequest, i: int, t0: float,
               timeout: float | None) -> RequestRecord:
    chunks: list[tuple[float, int]] = []
    last: pb.GenerateResponse | None = None
    send = time.perf_counter() - t0
    status, error = "OK", ""
    try:
        async for resp in client.send(req, timeout=timeout):
            chunks.append((time.perf_counter() - t0, len(resp.token_ids)))
            last = resp
    except grpc.aio.AioRpcError as e:
        status, error = e.code().name, e.details() or ""
    end = time.perf_counter() - t0
    if status == "OK" and (last is None or not last.finished):
        status, error = "INCOMPLETE", "the stream ended without a finished response"
    elif status == "OK" and last is not None and last.finish_reason == "abort":
        status, error = "ABORTED", "the server aborted the request"
    ok = status == "OK" and last is not None
    return RequestRecord(
        index=i, max_tokens=req.sampling.max_tokens, send_s=send, end_s=end,
        chunks=tuple(chunks), ok=ok, status=status, error=error,
        prompt_tokens=last.usage.prompt_tokens if ok and last else len(req.token_ids.ids),
        output_tokens=sum(n for _, n in chunks),
        finish_reason=last.finish_reason if last else "",
        server_timing={k: getattr(last.timing, k) for k in TIMING_FIELDS} if ok and last else {},
    )


async def run_rate(client: AsyncClient, cfg: BenchConfig, prompts: list[Prompt],
                   rate: float) -> list[RequestRecord]:
    """Send the workload at `rate` (capped by max_concurrency) and wait for every answer."""
    from tqdm import tqdm

    offsets = arrival_offsets(len(prompts), rate, cfg.burstiness, cfg.seed)
    sem = asyncio.Semaphore(cfg.max_concurrency or len(prompts))
    bar = tqdm(total=len(prompts), desc=f"{cfg.label} @ {rate:g} req/s", unit="req",
               file=sys.stderr, disable=not cfg.progress)
    t0 = time.perf_counter()

    async def task(i: int) -> RequestRecord:
        async with sem:
            rec = await _one(client, _request(cfg, prompts[i], i), i, t0, cfg.request_timeout_s)
        bar.update(1)
        return rec

    tasks: list[asyncio.Task[RequestRecord]] = []
    for i, at in enumerate(offsets.tolist()):
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(task(i)))
    records = await asyncio.gather(*tasks)
    bar.close()
    return list(records)


async def bench_async(cfg: BenchConfig) -> BenchResult:
    async with AsyncClient(cfg.server) as client:
        await client.wait_ready(cfg.ready_timeout_s)
        info = await client.model_info(timeout=30)
        prompts = build_workload(cfg, info)
        reports: list[RunReport] = []
        records: list[list[RequestRecord]] = []
        for rate in cfg.request_rates:
            recs = await run_rate(client, cfg, prompts, rate)
            records.append(recs)
            reports.append(make_report(cfg.label, rate, cfg.burstiness, cfg.max_concurrency,
                                       recs, cfg.slo))
    model = {"model_name": info.model_name, "vocab_size": info.vocab_size,
             "max_context_length": info.max_context_length, "dtype": info.dtype}
    goodput = sweep_goodput([(r.request_rate, r.attainment) for r in reports],
                            cfg.goodput_attainment)
    return BenchResult(cfg, model, reports, records, goodput)


def run_bench(cfg: BenchConfig) -> BenchResult:
    """What `pdserve bench` does: run the sweep, print the tables, write JSON and plots."""
    result = asyncio.run(bench_async(cfg))
    for rep in result.reports:
        print(format_report(rep))
    print(format_sweep(result.reports, result.goodput))
    data = result.to_json()
    if cfg.result_json:
        path = Path(cfg.result_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"results: {path}", file=sys.stderr)
    if cfg.plot_dir:
        for png in plot_results([data], cfg.plot_dir, cfg.plot_rate, cfg.goodput_attainment):
            print(f"plot: {png}", file=sys.stderr)
    return result
