"""Load on pdserve's OpenAI-compatible HTTP API through the official ``openai`` client:
CONCURRENCY workers, each sending streamed chat completions back to back until REQUESTS
have been sent; prints TTFT and TPOT percentiles, throughput and the errors by type.

    python deploy/http_load.py --base-url http://127.0.0.1:8000/v1 --concurrency 8 \\
        --requests 64 --max-tokens 64

TTFT is the time to the first chunk with text; TPOT is (last text - first text) / (tokens
- 1), the tokens from the usage chunk (``stream_options.include_usage``). deploy/http-load.sh
starts a server and runs this against it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import openai

TOPICS = ("rivers", "mountains", "the sea", "bread", "trains", "clocks", "bees", "glass")


@dataclass
class Record:
    ttft_s: float
    tpot_s: float | None
    tokens: int


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one(client: openai.AsyncOpenAI, model: str, i: int, max_tokens: int) -> Record:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0.7, seed=i, stream=True,
        messages=[{"role": "user", "content": f"Write a short note about {TOPICS[i % 8]}."}],
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if first is None or last is None:
        raise RuntimeError("a stream without text")
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Record(first - start, tpot, tokens)


async def run(args: argparse.Namespace) -> int:
    client = openai.AsyncOpenAI(base_url=args.base_url, max_retries=0, timeout=args.timeout,
                                api_key=os.environ.get("PDSERVE_AUTH_TOKEN", "none"))
    model = (await client.models.list()).data[0].id
    records: list[Record] = []
    errors: Counter[str] = Counter()
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while sent < args.requests:
            i, sent = sent, sent + 1
            try:
                records.append(await one(client, model, i, args.max_tokens))
            except openai.APIError as e:
                errors[f"{type(e).__name__} {getattr(e, 'status_code', '')}".strip()] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    ttft = [r.ttft_s * 1e3 for r in records]
    tpot = [r.tpot_s * 1e3 for r in records if r.tpot_s is not None]
    print(f"model {model!r}, {args.concurrency} concurrent streams, {args.requests} requests "
          f"of {args.max_tokens} tokens, {wall:.1f} s")
    print(f"completed {len(records)}, errors {sum(errors.values())} {dict(errors)}")
    if records:
        print(f"TTFT ms  p50 {_pct(ttft, 0.5):8.1f}  p90 {_pct(ttft, 0.9):8.1f}  "
              f"mean {statistics.fmean(ttft):8.1f}")
        print(f"TPOT ms  p50 {_pct(tpot, 0.5):8.1f}  p90 {_pct(tpot, 0.9):8.1f}  "
              f"mean {statistics.fmean(tpot):8.1f}")
        out = sum(r.tokens for r in records)
        print(f"output {out} tokens, {out / wall:.1f} tok/s, {len(records) / wall:.2f} req/s")
    return 1 if errors else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
