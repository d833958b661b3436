"""`pdserve bench`: a load generator for a running pdserve server, like `vllm bench serve`.

It builds a workload (random token prompts of chosen length distributions, a built-in chat-like
length mix, or a JSONL file; ``workload``), sends it over gRPC at Poisson or gamma arrivals
for each request rate of a sweep (optionally capped by a concurrency limit), records every
response's arrival, and reports latency percentiles, throughput, SLO attainment and goodput
(see report). Each rate runs long enough to reach steady state, and its report says whether
it did (``steady``). Requests carry an SLO class (``classes``), scored against the objectives
the server lists for it. A sweep can stop at the first rate that misses its attainment
threshold or is not steady (rates then run in ascending order).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc.aio

from pdserve.cluster.bench.classes import Objectives, ServerSlo
from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.data import Prompt, arrival_offsets
from pdserve.cluster.bench.plot import plot_results
from pdserve.cluster.bench.records import TIMING_FIELDS, RequestRecord
from pdserve.cluster.bench.report import (
    BenchResult,
    RunReport,
    fmt_rate,
    jsonable,
    make_report,
    report_goodput,
)
from pdserve.cluster.bench.shards import ClientProcesses, Shard
from pdserve.cluster.bench.steady import arrival_window_s, requests_for_rate
from pdserve.cluster.bench.tables import format_report, format_sweep
from pdserve.cluster.bench.workload import Workload
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.client import AsyncClient, build_request
from pdserve.proto.credentials import ClientAuth

# Connections each client process spreads its requests over (see `connections`).
CONNECTIONS = 4


@dataclass(frozen=True)
class SweepStop:
    """Why a sweep stopped before its last rate, and the rates it then did not run."""

    reason: str
    skipped_rates: tuple[float, ...]


def sweep_order(cfg: BenchConfig) -> tuple[float, ...]:
    """The rates in the order they run: ascending when the sweep may stop early (so the rates
    it skips are the ones above the first that missed), else as given."""
    if cfg.stop_below_attainment is None:
        return cfg.request_rates
    return tuple(sorted(cfg.request_rates))


def sweep_stop(order: Sequence[float], attainments: Sequence[float],
               threshold: float | None, unsteady: Sequence[str] = ()) -> SweepStop | None:
    """After the first len(attainments) rates of `order` ran with these attainments: whether
    the sweep stops here. It stops after the first rate below `threshold` (None: never), or
    not steady (``unsteady``: the reason per rate run, "" when steady), when rates remain;
    the last rate missing skips nothing, so that is no early stop."""
    if threshold is None or not attainments or len(attainments) >= len(order):
        return None
    att = attainments[-1]
    why = unsteady[len(attainments) - 1] if len(unsteady) >= len(attainments) else ""
    if att >= threshold and not why:
        return None
    rate = order[len(attainments) - 1]
    reason = (f"SLO attainment {att:.1%} at {fmt_rate(rate)} req/s < {threshold:.0%}"
              if att < threshold else f"{fmt_rate(rate)} req/s not steady ({why})")
    return SweepStop(f"{reason} (--stop-below-attainment)", tuple(order[len(attainments):]))


def parse_rates(s: str) -> tuple[float, ...]:
    """"1,2,4" or "inf" -> request rates (req/s)."""
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--request-rate takes numbers or inf, comma-separated: {s!r}") from None


def _request(cfg: BenchConfig, p: Prompt, i: int) -> pb.GenerateRequest:
    return build_request(
        token_ids=p.token_ids, text=p.text, messages=p.messages, max_tokens=p.output_len,
        temperature=cfg.temperature, seed=cfg.seed + i if cfg.temperature > 0 else None,
        ignore_eos=cfg.ignore_eos or cfg.dataset in ("random", "multiturn"),
        ttft_ms=cfg.slo.ttft_ms or 0.0, tpot_ms=cfg.slo.tpot_ms or 0.0, slo_class=p.slo_class,
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
        slo_class=req.slo.class_name,
    )


async def _send_all(clients: Sequence[AsyncClient], cfg: BenchConfig,
                    requests: Sequence[tuple[int, float, Prompt]], start: float,
                    max_concurrency: int | None, on_done: Callable[[], object]
                    ) -> list[RequestRecord]:
    """Send each ``(index, offset_s, prompt)`` at ``start + offset_s`` (a perf_counter value;
    at most ``max_concurrency`` in flight) and wait for every answer; records count from
    ``start``."""
    sem = asyncio.Semaphore(max_concurrency or max(1, len(requests)))

    async def task(i: int, p: Prompt) -> RequestRecord:
        async with sem:
            client = clients[i % len(clients)]
            rec = await _one(client, _request(cfg, p, i), i, start, cfg.request_timeout_s)
        on_done()
        return rec

    tasks: list[asyncio.Task[RequestRecord]] = []
    for i, at, p in requests:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(task(i, p)))
    return list(await asyncio.gather(*tasks))


async def send_shard(cfg: BenchConfig, shard: Shard, done: Any) -> list[RequestRecord]:
    """A client process's part of one rate (``shards``); ``done`` counts the requests
    that finished, across processes."""
    def finished() -> None:
        with done.get_lock():
            done.value += 1

    # connected before the common start
    async with connections(cfg.server, cfg.ready_timeout_s, cfg.auth) as clients:
        return await _send_all(clients, cfg, shard.requests, shard.start, shard.max_concurrency,
                               finished)


@contextlib.asynccontextmanager
async def connections(server: str, ready_timeout_s: float,
                      auth: ClientAuth | None = None) -> AsyncIterator[list[AsyncClient]]:
    """CONNECTIONS clients of one process to ``server``, each on a connection of its own,
    ready. A server with several gRPC frontends serves each connection from one of them:
    requests sent over several connections spread over the frontends."""
    clients = [AsyncClient(server, own_connection=True, auth=auth) for _ in range(CONNECTIONS)]
    try:
        for c in clients:
            await c.wait_ready(ready_timeout_s)
        yield clients
    finally:
        for c in clients:
            await c.close()


async def run_rate(clients: Sequence[AsyncClient], cfg: BenchConfig, prompts: list[Prompt],
                   rate: float, procs: ClientProcesses | None = None) -> list[RequestRecord]:
    """Send the workload at `rate` (capped by max_concurrency) and wait for every answer:
    from this process, or split over the client processes ``procs``."""
    from tqdm import tqdm

    offsets = arrival_offsets(len(prompts), rate, cfg.burstiness, cfg.seed).tolist()
    bar = tqdm(total=len(prompts), desc=f"{cfg.label} @ {rate:g} req/s", unit="req",
               file=sys.stderr, disable=not cfg.progress)
    requests = list(zip(range(len(prompts)), offsets, prompts, strict=True))
    if procs is not None:
        records = await procs.run(requests, cfg.max_concurrency,
                                  on_progress=lambda n: bar.update(n - bar.n))
    else:
        records = await _send_all(clients, cfg, requests, time.perf_counter(),
                                  cfg.max_concurrency, lambda: bar.update(1))
    bar.close()
    return records


async def server_slo(client: AsyncClient) -> ServerSlo:
    """The server's SLO classes, scheduler and mode (none from a server without
    GetServerInfo)."""
    try:
        return ServerSlo.from_info(await client.server_info(timeout=30))
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        return ServerSlo()


async def bench_async(cfg: BenchConfig) -> BenchResult:
    with contextlib.ExitStack() as stack:
        async with connections(cfg.server, cfg.ready_timeout_s, cfg.auth) as clients:
            info = await clients[0].model_info(timeout=30)
            server = await server_slo(clients[0])
            objectives = Objectives.from_server(server, cfg.slo)
            workload = Workload(cfg, info, server)
            order = sweep_order(cfg)
            procs = (stack.enter_context(ClientProcesses(cfg, cfg.client_processes, send_shard))
                     if cfg.client_processes > 1 else None)
            reports: list[RunReport] = []
            records: list[list[RequestRecord]] = []
            windows: list[float] = []
            lifetime: float | None = None  # the median E2E of the last steady rate, s
            for rate in order:
                window = arrival_window_s(cfg.min_duration_s, cfg.duration_factor, lifetime)
                n = requests_for_rate(rate, window, cfg.min_requests)
                recs = await run_rate(clients, cfg, workload.take(n), rate, procs)
                rep = make_report(cfg.label, rate, cfg.burstiness, cfg.max_concurrency, recs,
                                  objectives, cfg.warmup_fraction)
                records.append(recs)
                reports.append(rep)
                windows.append(window)
                if rep.steady and rep.e2e.p50_ms is not None:
                    lifetime = rep.e2e.p50_ms / 1e3
                if _stop(cfg, order, reports):
                    break
    model = {"model_name": info.model_name, "vocab_size": info.vocab_size,
             "max_context_length": info.max_context_length, "dtype": info.dtype}
    # DistServe goodput over the rates that ran; skipped ones lie above one below the stop line
    goodput = report_goodput(reports, cfg.goodput_attainment)
    # the result keeps its records in the order of its config's rates: the swept order
    return BenchResult(replace(cfg, request_rates=order), model, reports, records, goodput,
                       dict(server.info), objectives, windows)


def _stop(cfg: BenchConfig, order: Sequence[float], reports: Sequence[RunReport]
          ) -> SweepStop | None:
    return sweep_stop(order, [r.attainment for r in reports], cfg.stop_below_attainment,
                      [r.steadiness.reason if r.steadiness else "" for r in reports])


def result_stop(result: BenchResult) -> SweepStop | None:
    """The early stop of a finished sweep (None: every rate ran)."""
    return _stop(result.config, result.config.request_rates, result.reports)


def run_bench(cfg: BenchConfig) -> BenchResult:
    """What `pdserve bench` does: run the sweep, print the tables, write JSON and plots."""
    result = asyncio.run(bench_async(cfg))
    for rep in result.reports:
        print(format_report(rep))
    print(format_sweep(result.reports, result.goodput, result.server, result.steady_state))
    stop = result_stop(result)
    if stop is not None:
        skipped = ", ".join(fmt_rate(r) for r in stop.skipped_rates)
        print(f"Stopped early: {stop.reason}; skipped {skipped} req/s")
    data = result.to_json()
    data["skipped_rates"] = jsonable(list(stop.skipped_rates) if stop else [])
    data["stopped_early"] = stop.reason if stop else None
    if cfg.result_json:
        path = Path(cfg.result_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"results: {path}", file=sys.stderr)
    if cfg.plot_dir:
        for png in plot_results([data], cfg.plot_dir, cfg.plot_rate, cfg.goodput_attainment):
            print(f"plot: {png}", file=sys.stderr)
    return result
