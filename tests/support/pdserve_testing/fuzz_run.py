"""Run fuzz cases (``pdserve_testing.fuzz``) against a live deployment: each case's status
code against the codes it allows, a greedy neighbour stream checked token-exact while they
run, then the deployment's health (every actor answers, in the process it had) and its free
KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import grpc.aio
import ray
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from pdserve.cluster.launch import Deployment
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.client import OWN_CONNECTION
from pdserve_testing.fuzz import OK, Case

GENERATE = "/pdserve.v1.Generation/Generate"
RawCall = Any  # grpc.aio.UnaryStreamMultiCallable[bytes, pb.GenerateResponse]


@dataclass(frozen=True)
class Outcome:
    """What came of one case (the ``index``-th sent): the status code, what was wrong
    ("" if nothing) and then the request, in short."""

    index: int
    category: str
    code: str
    problem: str
    seconds: float
    request: str = ""


@dataclass
class Neighbour:
    """A normal greedy stream sent over and over on a connection of its own while the
    fuzz runs; each must equal ``expected`` (the transformers reference)."""

    ids: list[int]
    expected: list[int]
    completed: int = 0
    problems: list[str] = field(default_factory=list)

    async def loop(self, call: RawCall, stop: asyncio.Event, deadline_s: float) -> None:
        req = pb.GenerateRequest(sampling=pb.SamplingParams(
            max_tokens=len(self.expected), temperature=0.0))
        req.token_ids.ids.extend(self.ids)
        raw = req.SerializeToString()
        while True:
            code, details, resps = await _stream(call, raw, deadline_s)
            got = [t for r in resps for t in r.token_ids]
            if code != OK or got != self.expected:
                self.problems.append(f"neighbour {self.completed}: {code} {details[:200]} "
                                     f"{got} != {self.expected}")
            self.completed += 1
            if stop.is_set():
                return


@dataclass
class Report:
    outcomes: list[Outcome]
    seconds: float
    neighbour: Neighbour
    dead: list[str]  # actors that did not answer, or answered from another process
    leaked_blocks: int  # KV blocks not free once the deployment was idle
    parallel: int

    def problems(self, skip: Sequence[str] = ()) -> list[str]:
        """Everything wrong, in case order."""
        bad = sorted((o for o in self.outcomes if o.problem and o.category not in skip),
                     key=lambda o: o.index)
        out = [f"#{o.index} {o.category}: {o.problem} after {o.seconds:.1f} s; {o.request}"
               for o in bad]
        out += self.neighbour.problems
        if not self.neighbour.completed:
            out.append("no neighbour stream completed")
        out += [f"actor {d} dead or restarted" for d in self.dead]
        if self.leaked_blocks:
            out.append(f"{self.leaked_blocks} KV blocks leaked")
        return out

    def table(self) -> str:
        """Requests by category and status code, then the totals and the health checks."""
        cats = sorted({o.category for o in self.outcomes})
        codes = sorted({o.code for o in self.outcomes}, key=lambda c: (c != OK, c))
        by = Counter((o.category, o.code) for o in self.outcomes)
        head = ["category", "n", *codes, "bad", "max_s"]
        rows = []
        for c in cats:
            mine = [o for o in self.outcomes if o.category == c]
            rows.append([c, str(len(mine)),
                         *(str(by[c, k] or "") for k in codes),
                         str(sum(1 for o in mine if o.problem) or ""),
                         f"{max(o.seconds for o in mine):.2f}"])
        total = Counter(o.code for o in self.outcomes)
        rows.append(["total", str(len(self.outcomes)), *(str(total[k]) for k in codes),
                     str(sum(1 for o in self.outcomes if o.problem)), ""])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(r: list[str]) -> str:
            return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(r, widths, strict=True)))

        n = len(self.outcomes)
        out = [line(head), *map(line, rows), "",
               f"{n} requests in {self.seconds:.1f} s ({n / self.seconds:.0f}/s, "
               f"{self.parallel} in flight)",
               f"neighbour streams: {self.neighbour.completed} completed, "
               f"{len(self.neighbour.problems)} wrong",
               f"actors alive: {'all' if not self.dead else 'NOT ' + ', '.join(self.dead)}",
               f"KV blocks leaked: {self.leaked_blocks}"]
        problems = self.problems()
        if problems:
            out += ["", f"problems ({len(problems)}; first 20):",
                    *problems[:20]]
        return "\n".join(out)


async def _stream(call: RawCall, payload: bytes, deadline_s: float
                  ) -> tuple[str, str, list[pb.GenerateResponse]]:
    resps: list[pb.GenerateResponse] = []
    try:
        async for r in call(payload, timeout=deadline_s):
            resps.append(r)
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details() or "", resps
    return OK, "", resps


def judge(case: Case, code: str, details: str, resps: Sequence[pb.GenerateResponse]) -> str:
    """What is wrong with this answer to ``case`` ("" if nothing)."""
    if code not in case.expect:
        return f"{code} ({details[:300]!r}), allowed {sorted(case.expect)}"
    if code != OK:
        words = case.expect[code]
        if words and not any(w in details for w in words):
            return f"{code} message {details[:300]!r} names none of {words}"
        return ""
    if not resps or not resps[-1].finished or any(r.finished for r in resps[:-1]):
        return "the stream has no single last response with finished = true"
    n = sum(len(r.token_ids) for r in resps)
    last = resps[-1]
    if not 0 < n <= case.max_tokens and not (n == 0 and last.finish_reason == "stop"):
        return f"{n} tokens, expected 1 to {case.max_tokens}"
    if last.usage.completion_tokens != n or last.finish_reason not in ("stop", "length"):
        return f"usage {last.usage.completion_tokens} for {n} tokens, finish " \
               f"{last.finish_reason!r}"
    return ""


async def _held(call: RawCall, raw: bytes, deadline_s: float, started: asyncio.Event
                ) -> str:
    """Stream ``raw`` to its end, setting ``started`` at its first response (or its end);
    what was wrong with it ("" if nothing)."""
    last: pb.GenerateResponse | None = None
    try:
        async for r in call(raw, timeout=deadline_s):
            last = r
            started.set()
    except grpc.aio.AioRpcError as e:
        return f"the held request failed: {e.code().name} {e.details()}"
    finally:
        started.set()
    return "" if last is not None and last.finished else "the held request did not finish"


def summary(payload: bytes, limit: int = 400) -> str:
    """The request in protobuf text format (or its first bytes, if it does not decode),
    cut to ``limit`` characters."""
    try:
        text = text_format.MessageToString(pb.GenerateRequest.FromString(payload),
                                           as_one_line=True)
    except DecodeError:
        text = f"undecodable {payload[:48].hex()}"
    return text if len(text) <= limit else text[:limit] + f"... ({len(payload)} bytes)"


async def run_case(call: RawCall, i: int, case: Case, deadline_s: float) -> Outcome:
    t0 = time.monotonic()
    holder: asyncio.Task[str] | None = None
    if case.holder is not None:  # in flight (its first token out) before the case is sent
        started = asyncio.Event()
        holder = asyncio.create_task(_held(call, case.holder, deadline_s, started))
        await started.wait()
    code, details, resps = await _stream(call, case.payload, deadline_s)
    if holder is not None and holder.done() and code == OK:
        # The held stream ended before this one did (its first response may have been its
        # last, or this call waited on the frontend): the id may have been free again when
        # this one was admitted. (Both in flight at once shows as the holder's problem.)
        case = replace(case, expect={**case.expect, OK: ()})
    problem = judge(case, code, details, resps)
    if holder is not None:
        problem = problem or await holder
    return Outcome(i, case.category, code, problem, time.monotonic() - t0,
                   summary(case.payload) if problem else "")


async def fuzz(address: str, cases: Iterable[Case], neighbour: Neighbour, parallel: int,
               deadline_s: float) -> tuple[list[Outcome], float]:
    """Send ``cases`` (drawn as they go), ``parallel`` at a time, while ``neighbour``
    streams."""
    async with grpc.aio.insecure_channel(address) as ch, \
            grpc.aio.insecure_channel(address, options=OWN_CONNECTION) as nch:
        call = ch.unary_stream(GENERATE, request_serializer=None,
                               response_deserializer=pb.GenerateResponse.FromString)
        ncall = nch.unary_stream(GENERATE, request_serializer=None,
                                 response_deserializer=pb.GenerateResponse.FromString)
        stop = asyncio.Event()
        side = asyncio.create_task(neighbour.loop(ncall, stop, deadline_s))
        todo = enumerate(cases)
        outcomes: list[Outcome] = []

        async def sender() -> None:
            for i, case in todo:  # the senders share one iterator
                outcomes.append(await run_case(call, i, case, deadline_s))

        t0 = time.monotonic()
        await asyncio.gather(*(sender() for _ in range(parallel)))
        seconds = time.monotonic() - t0
        stop.set()
        await side
    return outcomes, seconds


def actor_pids(dep: Deployment) -> dict[str, int]:
    """Each actor's process id (by name), asked of the actor itself."""
    actors = {"router": dep.router, **{f"frontend-{i}": f for i, f in enumerate(dep.frontends)},
              **dep.prefill, **dep.decode}
    refs = {name: h.__ray_call__.remote(lambda _self: os.getpid())
            for name, h in actors.items()}
    out: dict[str, int] = {}
    for name, ref in refs.items():
        with contextlib.suppress(Exception):  # a dead actor: missing from the answer
            out[name] = ray.get(ref, timeout=60)
    return out


def leaked_blocks(dep: Deployment, timeout_s: float = 60.0) -> int:
    """KV blocks still held once the deployment is idle (waits up to ``timeout_s`` for the
    last frees)."""
    end = time.monotonic() + timeout_s
    while True:
        held = sum(s.num_blocks - s.num_free_blocks for s in dep.worker_stats())
        if held == 0 or time.monotonic() > end:
            return held
        time.sleep(0.1)


def run(dep: Deployment, cases: Iterable[Case], neighbour: Neighbour, parallel: int = 48,
        deadline_s: float = 300.0) -> Report:
    """The whole check: the cases with the neighbour, then the deployment's health."""
    before = actor_pids(dep)
    outcomes, seconds = asyncio.run(fuzz(dep.address, cases, neighbour, parallel, deadline_s))
    after = actor_pids(dep)
    dead = sorted(n for n, pid in before.items() if after.get(n) != pid)
    return Report(outcomes, seconds, neighbour, dead, leaked_blocks(dep), parallel)
