"""One deployment on simulated time: the real router over simulated workers.

:class:`Simulation` builds what ``pdserve serve`` would start for a ``ServeConfig`` (the
router with ``ServeConfig.router_config``, the prefill and decode workers with
``ServeConfig.worker_config``) on a :class:`~pdserve.cluster.tune.loop.SimLoop`: the router
is ``router.router.Router`` itself, running its admission, wait queue, placement and
dispatch on the simulated clock, and the workers are ``tune.prefill`` / ``tune.decode``,
which drive the real schedulers. Ray calls go over ``tune.calls``; reports reach the router
as the router actor hands them over (``RouterService.on_*``).

``run`` serves a list of requests, each sent at its arrival time with the SLO's objectives
(as ``pdserve bench`` sends them), and returns what a client would have recorded for each
(``bench.records.RequestRecord``), so that ``bench.report`` scores a simulated run exactly
as it scores a real one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

from prometheus_client import CollectorRegistry

from pdserve.cluster.bench.records import RequestRecord, Slo
from pdserve.cluster.config import ServeConfig
from pdserve.cluster.tune.calls import Network
from pdserve.cluster.tune.decode import SimDecodeWorker
from pdserve.cluster.tune.loop import SimLoop, Stalled
from pdserve.cluster.tune.prefill import SimPrefillWorker
from pdserve.cluster.tune.settings import CALL_LATENCY_S
from pdserve.cluster.tune.steps import DUMMY_TOKEN, StepTimes
from pdserve.engine.messages import FirstToken, StepReport, TransferDone
from pdserve.engine.sequence import SamplingParams
from pdserve.engine.tokenizer import IncrementalDetokenizer
from pdserve.router.capacity import TooLarge
from pdserve.router.cost_model import Profile
from pdserve.router.metrics import Metrics
from pdserve.router.request import Chunk, Request
from pdserve.router.router import Router
from pdserve.router.scheduler import Refused
from pdserve.router.slo import ValidSlo

ROUTER = "router"


class SimulationError(RuntimeError):
    """A simulated worker call raised (a defect, or a deployment that cannot serve the
    workload, e.g. a prompt larger than a worker's KV pool)."""


@dataclass(frozen=True)
class SimRequest:
    """One request of a simulated workload: sent ``arrival_s`` after the start."""

    index: int
    arrival_s: float
    input_len: int
    output_len: int


@dataclass(frozen=True)
class Watch:
    """The requests a run is about: indices in [first, last). The run ends when they all
    ended, or (``max_misses`` set) once more of them than that missed the SLO."""

    first: int
    last: int
    max_misses: int | None = None


@dataclass
class SimResult:
    """What a run saw of its watched requests."""

    records: list[RequestRecord]  # the watched requests that ended, by index
    stopped_early: bool  # max_misses was exceeded (or it stalled) before they all ended
    stalled: bool  # requests were left waiting on what no event would bring
    backlog: list[int]  # requests in flight on the router as each watched one arrived
    preemptions: int
    duration_s: float  # simulated


class _NoText:
    """The detokenizer of a simulated request: its tokens are dummies, it has no text."""

    def add(self, ids: list[int]) -> str:
        return ""

    def flush(self) -> str:
        return ""


@dataclass
class _Track:
    """One request as its client sees it."""

    req: SimRequest
    sent: float
    watched: bool
    chunks: list[tuple[float, int]] = field(default_factory=list)
    record: RequestRecord | None = None
    missed: bool = False


class _Unrecorded(Metrics):
    """The router's metrics without the per-token and per-step series (a simulation reads
    its latencies off the client records; those series only cost it time). Counters such
    as preemptions and local prefills stay."""

    def observe_first_token(self, ttft_s: float, queue_s: float, prefill_s: float) -> None:
        pass

    def observe_tokens(self, itl_values: Sequence[float]) -> None:
        pass

    def observe_finished(self, reason: str, e2e_s: float, decode_s: float, mean_tpot_s: float,
                         prompt_tokens: int, completion_tokens: int, slo: ValidSlo,
                         ttft_s: float | None, predicted_ttft_s: float | None = None,
                         predicted_tpot_s: float | None = None) -> None:
        pass

    def set_queue(self, running: int, waiting: int) -> None:
        pass

    def set_kv_usage(self, worker: str, frac: float) -> None:
        pass

    def observe_transfer(self, seconds: float, nbytes: int) -> None:
        pass


class _Reports:
    """The router actor's report methods (``RouterService.on_*``): a worker's report is
    applied to the router when its call arrives. The workers hold it before the router
    exists (the router is built over the workers' handles)."""

    def __init__(self) -> None:
        self.router: Router | None = None

    def _router(self) -> Router:
        assert self.router is not None, "a report before the router was attached"
        return self.router

    def on_first_token(self, msg: FirstToken) -> None:
        self._router().on_first_token(msg)

    def on_step(self, report: StepReport) -> None:
        self._router().on_step(report)

    def on_transfer_done(self, msg: TransferDone) -> None:
        self._router().on_transfer_done(msg)


class Simulation:
    """The deployment ``serve`` describes, calibrated by ``profile``, for one run."""

    def __init__(self, serve: ServeConfig, profile: Profile,
                 latency_s: float = CALL_LATENCY_S) -> None:
        self.serve = serve
        self.loop = SimLoop()
        self.net = Network(self.loop, latency_s)
        times = StepTimes(profile, serve.block_size)
        self._reports = _Reports()
        to_router = self.net.handle
        decode_cfg = serve.worker_config("decode", 1)
        self.decode = {
            name: SimDecodeWorker(name, decode_cfg, times, to_router(name, ROUTER, self._reports),
                                  self.loop, first_transfer_id=(i + 1) << 32)
            for i, name in enumerate(f"decode-{i}" for i in range(serve.num_decode))}
        prefill_cfg = serve.worker_config("prefill", 1)
        self.prefill = {} if serve.colocated else {
            name: SimPrefillWorker(name, prefill_cfg, times,
                                   to_router(name, ROUTER, self._reports), self.loop,
                                   self.decode)
            for name in (f"prefill-{i}" for i in range(serve.num_prefill))}
        self.router = Router(
            {n: self.net.handle(ROUTER, n, w) for n, w in self.prefill.items()},
            {n: self.net.handle(ROUTER, n, w) for n, w in self.decode.items()},
            # No prefix caching: the simulated workers keep no cache, and every simulated
            # prompt is the same token repeated (the index would see one shared prefix).
            replace(serve.router_config(profile), prefix_caching=False),
            _Unrecorded(CollectorRegistry()), self._out, clock=self.loop.time)
        self._reports.router = self.router
        self._tracks: dict[str, _Track] = {}
        self._watch = Watch(0, 0)
        self._slo = Slo()
        self._start = 0.0  # the run's start on the loop's clock
        self._left = 0
        self._misses = 0
        self._backlog: list[int] = []
        self._done: asyncio.Future[bool] | None = None
        self._pending: Iterator[SimRequest] = iter(())

    # -- a run ------------------------------------------------------------------------------
    def run(self, requests: Sequence[SimRequest], slo: Slo, watch: Watch) -> SimResult:
        """Serve ``requests`` (arrival times from the start) and return the watched ones'
        records. One run per Simulation. A run that stalls (nothing left to happen while
        watched requests wait, as a request no worker can ever seat waits in the real
        router) ends there, its waiting requests unrecorded."""
        self._slo, self._watch = slo, watch
        self._left = sum(1 for r in requests if watch.first <= r.index < watch.last)

        async def main() -> bool:
            self._done = self.loop.create_future()
            await self.router.open_channels()
            self._start = self.loop.time()
            self._pending = iter(sorted(requests, key=lambda r: r.arrival_s))
            self._next_arrival()
            if not self._left:
                return False
            return await self._done

        stalled = False
        try:
            stopped = self.loop.run_until_complete(main())
        except Stalled:  # requests wait for what never comes (e.g. a seat too small)
            stopped = stalled = True
        except RuntimeError as e:  # the network stopped the loop
            if self.net.error is None:
                raise
            raise SimulationError(f"{self.serve.mode} deployment: {self.net.error}") from e
        finally:
            self._close()
        records = sorted((t.record for t in self._tracks.values()
                          if t.watched and t.record is not None), key=lambda r: r.index)
        return SimResult(records, stopped, stalled, self._backlog,
                         sum(w.preemptions for w in self.decode.values()), self.loop.time())

    def _close(self) -> None:
        tasks = asyncio.all_tasks(self.loop)
        for t in tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    # -- the client side --------------------------------------------------------------------
    def _next_arrival(self) -> None:
        """Schedule the next request's arrival (one at a time: a short timer heap)."""
        r = next(self._pending, None)
        if r is not None:
            self.loop.call_at(self._start + r.arrival_s, self._arrive, r)

    def _arrive(self, r: SimRequest) -> None:
        self._next_arrival()
        now = self.loop.time()
        watched = self._watch.first <= r.index < self._watch.last
        if watched:
            self._backlog.append(len(self.router.requests))
        track = _Track(r, now - self._start, watched)
        rid = str(r.index)
        self._tracks[rid] = track
        req = Request(
            request_id=rid, prompt_ids=[DUMMY_TOKEN] * r.input_len,
            sampling=SamplingParams(max_tokens=r.output_len, ignore_eos=True), stop=(),
            slo=ValidSlo(self._slo.ttft_ms, self._slo.tpot_ms), arrival=now,
            detok=cast(IncrementalDetokenizer, _NoText()))
        try:
            self.router.admit(req)
        except TooLarge as e:  # no worker of this deployment could ever hold it: the run ends
            done = self._done
            if done is not None and not done.done():
                done.set_exception(SimulationError(f"{self.serve.mode} deployment: {e}"))
            return
        except Refused as e:
            self._end(track, "RESOURCE_EXHAUSTED", str(e), "")
            return
        if watched and self._slo.ttft_ms is not None:
            self.loop.call_later(self._slo.ttft_ms / 1e3, self._ttft_due, track)

    def _out(self, req: Request, chunk: Chunk) -> None:
        track = self._tracks[req.request_id]
        if chunk.token_ids:
            if not track.chunks and self._ttft_missed(track):
                self._miss(track)
            track.chunks.append((self.loop.time() - self._start, len(chunk.token_ids)))
        if chunk.error is not None:
            self._end(track, chunk.error[0], chunk.error[1], "")
        elif chunk.finish_reason == "abort":
            self._end(track, "ABORTED", "the server aborted the request", "abort")
        elif chunk.finish_reason is not None:
            self._end(track, "OK", "", chunk.finish_reason)

    def _ttft_missed(self, track: _Track) -> bool:
        objective = self._slo.ttft_ms
        elapsed = self.loop.time() - self._start - track.sent
        return objective is not None and elapsed * 1e3 > objective

    def _ttft_due(self, track: _Track) -> None:
        """The TTFT objective of a watched request passed: without a token it has missed."""
        if not track.chunks and track.record is None:
            self._miss(track)

    def _end(self, track: _Track, status: str, error: str, reason: str) -> None:
        r = track.req
        ok = status == "OK"
        track.record = RequestRecord(
            index=r.index, max_tokens=r.output_len, send_s=track.sent,
            end_s=self.loop.time() - self._start, chunks=tuple(track.chunks),
            prompt_tokens=r.input_len, output_tokens=sum(n for _, n in track.chunks), ok=ok,
            status=status, error=error, finish_reason=reason)
        if not track.watched:
            return
        if not all(self._slo.meets(track.record)):
            self._miss(track)
        self._left -= 1
        if self._left == 0:
            self._finish(False)

    def _miss(self, track: _Track) -> None:
        if track.missed or not track.watched:
            return
        track.missed = True
        self._misses += 1
        limit = self._watch.max_misses
        if limit is not None and self._misses > limit:
            self._finish(True)

    def _finish(self, early: bool) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(early)
