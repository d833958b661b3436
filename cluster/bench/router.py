"""How many streamed tokens a second the router's side delivers, with no model in the way.

    python -P -m pdserve.cluster.bench.router --concurrency 256,512,1024 --step-ms 15 --duration-s 5

The decode workers here are null workers (``NullDecodeWorker``): Ray actors that answer the
router like colocated decode workers (``reserve``, ``submit``, ``abort``) and run a step
loop with no model, one ``StepReport`` every ``--step-ms`` with a random token for each
running sequence. So the tokens a second offered are set by the bench, not by a GPU:
``concurrency / step`` once every stream is running. Client processes keep
``--concurrency`` streams open over gRPC, each asking for ``--max-tokens`` tokens and
starting the next request when one ends.

Per concurrency it prints the tokens the workers emitted a second, the tokens the clients
received a second over the same window, their ratio (1.0: the router's side keeps up), the
responses a second and tokens per response (when the router falls behind, waiting tokens
are folded into fewer responses), the gap between a stream's responses (p50, p99: the
step time when it keeps up), and the cores used by the router actor and by the gRPC
frontends. The clients run
on the same machine: give it cores for them.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import ray

from pdserve.cluster.config import ServeConfig
from pdserve.cluster.launch import Deployment, init_ray, start_router
from pdserve.engine.config import ModelSpec
from pdserve.engine.messages import (
    FirstToken,
    Lease,
    PrefillTask,
    Reservation,
    StepReport,
    TokenOut,
    WorkerStats,
)
from pdserve.engine.weights import load_model_config

# Token ids streamed by the null workers: ids every tokenizer here decodes to text (the
# default one's, and the byte-level stand-in of a machine without it), so the router's
# detokenizer does its usual work.
TOKEN_RANGE = (33, 127)
START_LEAD_S = 0.5
WARMUP_S = 1.0  # of each level, before the window that counts
CHANNELS_PER_PROCESS = 4


class NullDecodeWorker:
    """A colocated decode worker without a model: every lease is granted, a submitted
    prompt's first token is reported at once, and each step gives every running sequence
    one token until its ``max_tokens``."""

    def __init__(self, name: str, router: Any, step_s: float) -> None:
        self.name = name
        self.router = router
        self.step_s = step_s
        self.running: dict[str, tuple[int, int]] = {}  # request id -> (transfer id, left)
        self.joined: list[str] = []
        self.tids = itertools.count(1)
        self.rng = random.Random(name)
        self.emitted = 0
        self.steps = 0
        self.late_s = 0.0  # summed lateness of steps against their schedule
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> WorkerStats:
        self.task = asyncio.get_running_loop().create_task(self._loop())
        return self.stats()

    def reserve(self, r: Reservation) -> Lease:
        return Lease(self.name, r.request_id, next(self.tids), 0, 1, 30.0)

    def submit(self, task: PrefillTask) -> None:
        left = task.sampling.max_tokens - task.num_generated - 1
        reason = None if left > 0 else "length"
        self.router.on_first_token.remote(FirstToken(
            self.name, task.request_id, task.lease.transfer_id, self._token(), reason, 0.0, 0.0))
        self.emitted += 1
        if left > 0:
            self.running[task.request_id] = (task.lease.transfer_id, left)
            self.joined.append(task.request_id)

    def abort(self, request_id: str, transfer_id: int | None = None) -> bool:
        return self.running.pop(request_id, None) is not None

    def counters(self) -> tuple[int, int, float]:
        """(tokens emitted, steps, summed step lateness in s) so far."""
        return self.emitted, self.steps, self.late_s

    def stats(self) -> WorkerStats:
        return WorkerStats(self.name, "decode", 1, 1, len(self.running), 0, 0.0, "null")

    def shutdown(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def _token(self) -> int:
        return self.rng.randrange(*TOKEN_RANGE)

    async def _loop(self) -> None:
        due = time.monotonic()
        while True:
            due += self.step_s
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            self.late_s += max(0.0, time.monotonic() - due)
            tokens = []
            for rid, (tid, left) in list(self.running.items()):
                last = left == 1
                tokens.append(TokenOut(rid, tid, self._token(), "length" if last else None))
                if last:
                    del self.running[rid]
                else:
                    self.running[rid] = (tid, left - 1)
            self.emitted += len(tokens)
            self.steps += 1
            if not tokens and not self.joined:
                continue  # nothing to say (also before the router has its workers)
            joined, self.joined = self.joined, []
            self.router.on_step.remote(StepReport(
                self.name, tokens, joined, num_running=len(self.running),
                num_free_blocks=1, kv_usage=0.0))


# -- clients ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientResult:
    tokens: int  # received inside the window
    responses: int
    gaps: list[float]  # seconds between a stream's responses inside the window (sampled)
    errors: int


async def _stream_loop(target: str, streams: int, prompt: list[int], max_tokens: int,
                       window: tuple[float, float], stop_at: float) -> ClientResult:
    from pdserve.proto.client import AsyncClient

    tokens = responses = errors = 0
    gaps: list[float] = []
    lo, hi = window
    # Connections of their own (not one shared by every channel of the process), so that
    # they spread over the frontends.
    clients = [AsyncClient(target, own_connection=True) for _ in range(CHANNELS_PER_PROCESS)]

    async def one_stream(client: AsyncClient) -> None:
        nonlocal tokens, responses, errors
        while time.monotonic() < stop_at:
            last = None
            try:
                # A stream the router side never answers ends with an error, not a hang.
                async for resp in client.generate(token_ids=prompt, max_tokens=max_tokens,
                                                  ignore_eos=True,
                                                  timeout=stop_at - time.monotonic() + 5.0):
                    now = time.monotonic()
                    if lo <= now < hi:
                        tokens += len(resp.token_ids)
                        responses += 1
                        if last is not None and len(gaps) < 200_000:
                            gaps.append(now - last)
                    last = now
            except Exception:
                errors += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(*(one_stream(clients[i % len(clients)]) for i in range(streams)))
    for c in clients:
        await c.close()
    return ClientResult(tokens, responses, gaps, errors)


def _client(conn: Connection, target: str, streams: int, prompt: list[int],
            max_tokens: int) -> None:
    """A client process: say it is ready (imports done), get the level's clock, run it."""
    conn.send("ready")
    start, window, stop_at = conn.recv()
    time.sleep(max(0.0, start - time.monotonic()))
    conn.send(asyncio.run(_stream_loop(target, streams, prompt, max_tokens, window, stop_at)))


def tokens_in(results: Sequence[ClientResult]) -> int:
    return sum(r.tokens for r in results)


# -- one level ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Level:
    concurrency: int
    offered_tok_s: float  # emitted by the workers in the window
    delivered_tok_s: float  # received by the clients in the window
    ratio: float
    responses_s: float
    tokens_per_response: float
    gap_p50_ms: float
    gap_p99_ms: float
    router_cpu: float  # cores used by the router actor in the window
    frontends_cpu: float  # by the gRPC frontends (0 where the router serves gRPC itself)
    errors: int
    worker_late_ms: float  # mean lateness of a worker step (their own loop kept up?)


def _actor_pids(prefix: str) -> list[int]:
    """Processes of the actors of class ``prefix``, found by the titles Ray gives actor
    processes."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if cmd.startswith(f"ray::{prefix}"):
            pids.append(int(d.name))
    return pids


def _cpu_s(pids: Sequence[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def run_level(dep: Deployment, workers: list[Any], concurrency: int, processes: int,
              max_tokens: int, duration_s: float, prompt: list[int]) -> Level:
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    per = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    for k, n in enumerate(per):
        if n == 0:
            continue
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_client, args=(child, dep.address, n, prompt, max_tokens),
                        name=f"bench-router-client-{k}", daemon=True)
        p.start()
        procs.append(p)
        conns.append(parent)
    for conn in conns:
        if conn.recv() != "ready":
            raise RuntimeError("a client process failed to start")
    # The clock starts once every process is ready (their imports take seconds).
    start = time.monotonic() + START_LEAD_S
    window = (start + WARMUP_S, start + WARMUP_S + duration_s)
    stop_at = window[1] + 0.2
    for conn in conns:
        conn.send((start, window, stop_at))
    pids = _actor_pids("RouterService"), _actor_pids("Frontend")
    time.sleep(max(0.0, window[0] - time.monotonic()))
    c0 = ray.get([w.counters.remote() for w in workers])
    cpu0 = [_cpu_s(p) for p in pids]
    time.sleep(max(0.0, window[1] - time.monotonic()))
    c1 = ray.get([w.counters.remote() for w in workers])
    cpu1 = [_cpu_s(p) for p in pids]
    results: list[ClientResult] = [conn.recv() for conn in conns]
    for p in procs:
        p.join(timeout=30)
    if not tokens_in(results):
        raise RuntimeError(f"no token reached a client at concurrency {concurrency}")
    emitted = sum(b[0] - a[0] for a, b in zip(c0, c1, strict=True))
    steps = sum(b[1] - a[1] for a, b in zip(c0, c1, strict=True))
    late = sum(b[2] - a[2] for a, b in zip(c0, c1, strict=True))
    tokens = tokens_in(results)
    responses = sum(r.responses for r in results)
    gaps = np.array([g for r in results for g in r.gaps] or [0.0])
    return Level(
        concurrency=concurrency, offered_tok_s=emitted / duration_s,
        delivered_tok_s=tokens / duration_s, ratio=tokens / emitted if emitted else 0.0,
        responses_s=responses / duration_s,
        tokens_per_response=tokens / responses if responses else 0.0,
        gap_p50_ms=float(np.percentile(gaps, 50) * 1e3),
        gap_p99_ms=float(np.percentile(gaps, 99) * 1e3),
        router_cpu=(cpu1[0] - cpu0[0]) / duration_s,
        frontends_cpu=(cpu1[1] - cpu0[1]) / duration_s, errors=sum(r.errors for r in results),
        worker_late_ms=late / steps * 1e3 if steps else 0.0,
    )


def launch_null(cfg: ServeConfig, step_s: float) -> tuple[Deployment, list[Any]]:
    """The real router (and its gRPC face) over ``cfg.num_decode`` null decode workers."""
    started = init_ray(None, cfg)
    model_config = load_model_config(cfg.model)
    router, frontends, port, metrics_port = start_router(cfg, model_config)
    decode: dict[str, Any] = {
        f"decode-{i}": ray.remote(NullDecodeWorker)
        .options(name=f"{cfg.namespace}-decode-{i}", num_cpus=0, max_concurrency=1000)
        .remote(f"decode-{i}", router, step_s)
        for i in range(cfg.num_decode)
    }
    ray.get([h.start.remote() for h in decode.values()])
    ray.get(router.attach.remote({}, decode))
    ray.get(router.set_serving.remote())
    dep = Deployment(cfg, router, frontends, {}, decode, port, metrics_port, started)
    return dep, list(decode.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -P -m pdserve.cluster.bench.router",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="128,256,512",
                    help="streams kept open, comma-separated levels")
    ap.add_argument("--step-ms", type=float, default=15.0, help="null decode step")
    ap.add_argument("--num-decode", type=int, default=2, help="null decode workers")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens per request")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--duration-s", type=float, default=5.0, help="measured window per level")
    ap.add_argument("--client-processes", type=int, default=4)
    ap.add_argument("--frontends", type=int, default=None,
                    help="gRPC frontend processes (default: the ServeConfig default)")
    ap.add_argument("--result-json", default="", help="write the levels here")
    args = ap.parse_args(argv)
    over: dict[str, Any] = {}
    if args.frontends is not None:
        over["frontends"] = args.frontends
    cfg = ServeConfig(model=ModelSpec("dummy", preset="smollm2-135m"), mode="colocated",
                      num_decode=args.num_decode, port=0, metrics_port=-1,
                      max_waiting=100_000, namespace=f"bench-router-{os.getpid()}", **over)
    dep, workers = launch_null(cfg, args.step_ms / 1e3)
    prompt = list(range(TOKEN_RANGE[0], TOKEN_RANGE[0] + args.prompt_len))
    levels = []
    try:
        head = ("conc", "offered tok/s", "delivered tok/s", "ratio", "resp/s", "tok/resp",
                "gap p50 ms", "gap p99 ms", "router cores", "frontend cores", "errors",
                "step late ms")
        print(" | ".join(head))
        for c in (int(x) for x in args.concurrency.split(",")):
            lv = run_level(dep, workers, c, args.client_processes, args.max_tokens,
                           args.duration_s, prompt)
            levels.append(lv)
            print(f"{lv.concurrency} | {lv.offered_tok_s:,.0f} | {lv.delivered_tok_s:,.0f} | "
                  f"{lv.ratio:.3f} | {lv.responses_s:,.0f} | {lv.tokens_per_response:.2f} | "
                  f"{lv.gap_p50_ms:.1f} | {lv.gap_p99_ms:.1f} | {lv.router_cpu:.2f} | "
                  f"{lv.frontends_cpu:.2f} | "
                  f"{lv.errors} | {lv.worker_late_ms:.2f}", flush=True)
    finally:
        dep.stop()
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(
            {"args": vars(args), "levels": [asdict(lv) for lv in levels]}, indent=2))


if __name__ == "__main__":
    main()
