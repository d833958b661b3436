"""The router actor's body: the request state machine, /metrics, and the link to the gRPC
frontends (``router.frontend``) that face the clients.

A frontend hands the router a validated, tokenized ``Submission``; the router streams back
``StreamItem``s, gathered per frontend while the event loop handles a batch of worker reports
and written as one frame per frontend on its feed connection (``router.stream``). The
per-message gRPC work (one response per request per step) runs in the frontends, so more of
them stream more tokens a second; the router keeps the per-token work of the state machine
and the detokenizer.

Every request that ends with an error status is counted once in
``request_failure_total{code}``, by the process that ends it: the router for what it refuses
at submission (RESOURCE_EXHAUSTED, ALREADY_EXISTS, UNAVAILABLE) or ends later (UNAVAILABLE,
DEADLINE_EXCEEDED), and for a client that went away (``client_gone``: CANCELLED or
DEADLINE_EXCEEDED); a frontend, which has no metrics of its own, reports what it refuses
before submitting (INVALID_ARGUMENT and the other validation codes, ALREADY_EXISTS) through
``count_failure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry

from pdserve.engine.messages import FirstToken, StepReport, TransferDone
from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from pdserve.router import pools
from pdserve.router.capacity import TooLarge
from pdserve.router.config import ServerConfig
from pdserve.router.fanout import child_id, child_sampling
from pdserve.router.load import LoadSnapshot
from pdserve.router.metrics import Metrics
from pdserve.router.request import Chunk, Request
from pdserve.router.router import Router, set_deadline
from pdserve.router.scheduler import Refused
from pdserve.router.stream import StreamEnd, StreamItem, Submission, encode, feed_hello

log = logging.getLogger("pdserve.server")

VERSION = "0.1.0"


class RouterService:
    """The router actor's body: request state machine + metrics + delivery to frontends."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.started = time.monotonic()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, slo_classes=cfg.slo_classes.names)
        self.tokenizer: Tokenizer | None = None
        self.router: Router | None = None
        self.frontends: list[Any] = []
        self.feeds: list[asyncio.StreamWriter] = []
        self.metrics_port = 0
        self._outbox: dict[int, list[StreamItem]] = {}
        self._flush_due = False

    # -- lifecycle (Ray calls from cluster.launch) -------------------------------------------
    async def start(self) -> int:
        """Load the tokenizer (for detokenizing) and start /metrics; returns its port."""
        loop = asyncio.get_running_loop()
        self.tokenizer = await loop.run_in_executor(
            None, load_tokenizer, self.cfg.model, self.cfg.model_config
        )
        if self.cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.start_http_server(
                self.cfg.metrics_port, self.cfg.metrics_host
            )
        return self.metrics_port

    async def attach_frontends(self, frontends: list[Any], feed_ports: list[int]) -> None:
        """The frontend actors, by index (``Submission``s name theirs), and their feed
        ports (on this node's loopback: they run beside the router)."""
        self.frontends = list(frontends)
        for i, port in enumerate(feed_ports):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(feed_hello(self.cfg.secret, i))
            self.feeds.append(writer)

    async def attach(self, prefill: dict[str, Any], decode: dict[str, Any]) -> None:
        """Hand over the worker pools (actor handles by name)."""
        self.router = Router(prefill, decode, self.cfg.router, self.metrics, self._out)
        for name, handle in {**prefill, **decode}.items():
            pools.watch(self.router, name, handle)
        pools.pools_changed(self.router)  # the pool gauges from the start

    async def open_channels(self) -> None:
        assert self.router is not None
        await self.router.open_channels()

    async def channel_endpoints(self) -> dict[str, str]:
        """'prefill->decode': the host:port each KV channel opened at (the decode worker's
        store, on that worker's node)."""
        assert self.router is not None
        return {f"{p}->{d}": e for (p, d), e in self.router.dispatcher.endpoints.items()}

    async def add_worker(self, role: str, name: str, handle: Any) -> None:
        """A started worker joins its pool (``router.pools``)."""
        assert self.router is not None
        await pools.add_worker(self.router, role, name, handle)

    async def drain_worker(self, name: str, timeout_s: float) -> pools.Drained:
        """Drain ``name`` out of the deployment; its actor is the caller's to stop."""
        assert self.router is not None
        return await pools.drain(self.router, name, timeout_s)

    async def load_snapshot(self) -> LoadSnapshot:
        assert self.router is not None
        return pools.load_snapshot(self.router)

    async def record_scaling(self, targets: dict[str, int], starting: dict[str, int],
                             moves: dict[str, int]) -> None:
        """The autoscaler's reading: per role its target size, the workers starting, and
        the change it just made (+n added, -n drained)."""
        for role, n in targets.items():
            self.metrics.set_autoscaler_target(role, n)
        for role, n in starting.items():
            self.metrics.set_workers(role, "starting", n)
        for role, n in moves.items():
            if n:  # one decision, whatever number of workers it moves
                self.metrics.observe_scaling(role, "up" if n > 0 else "down")

    async def set_serving(self) -> None:
        """Workers are warm: the frontends report SERVING."""
        await asyncio.gather(*(f.set_serving.remote(True) for f in self.frontends))

    async def stop(self, grace_s: float = 2.0) -> None:
        """NOT_SERVING, end every request (its client gets UNAVAILABLE), stop the
        frontends' servers once those last messages are out."""
        await asyncio.gather(*(f.set_serving.remote(False) for f in self.frontends))
        if self.router is not None:
            self.router.abort_all("the server is shutting down")
        self._flush()
        for feed in self.feeds:
            with contextlib.suppress(ConnectionError):
                await feed.drain()
        await asyncio.gather(*(f.stop.remote(grace_s) for f in self.frontends))
        for feed in self.feeds:
            feed.close()
        self.metrics.stop_http_server()

    # -- worker reports ---------------------------------------------------------------------
    async def on_first_token(self, msg: FirstToken) -> None:
        assert self.router is not None
        self.router.on_first_token(msg)

    async def on_step(self, report: StepReport) -> None:
        assert self.router is not None
        self.router.on_step(report)

    async def on_transfer_done(self, msg: TransferDone) -> None:
        assert self.router is not None
        self.router.on_transfer_done(msg)

    # -- frontend calls ---------------------------------------------------------------------
    async def submit(self, sub: Submission, frontend: int) -> tuple[str, str] | None:
        """Admit a request whose stream is on ``frontend``; None, or the (gRPC status name,
        message) the stream ends with at once (counted as a failure here)."""
        refused = self._admit(sub, frontend)
        if refused is not None:
            self.metrics.observe_failure(refused[0])
        return refused

    def _admit(self, sub: Submission, frontend: int) -> tuple[str, str] | None:
        router = self.router
        if router is None or self.tokenizer is None:
            return "UNAVAILABLE", "the server is starting"
        now = time.monotonic()
        family = sub.n > 1
        reqs = [Request(
            request_id=child_id(sub.request_id, i) if family else sub.request_id,
            prompt_ids=sub.prompt_ids, sampling=child_sampling(sub.sampling, i),
            stop=sub.stop, slo=sub.slo, arrival=now - sub.waited_s,
            detok=IncrementalDetokenizer(self.tokenizer, sub.prompt_ids), frontend=frontend,
            parent=sub.request_id if family else "", index=i,
        ) for i in range(sub.n)]
        try:
            # An id names one call: a family's children go by {id}-{i}, so both maps hold it.
            if sub.request_id in router.requests or sub.request_id in router.families:
                raise ValueError(f"request_id {sub.request_id!r} is already in flight")
            if family:
                router.families.admit(sub.request_id, reqs, router.admit, router.withdraw)
            else:
                router.admit(reqs[0])
        except TooLarge as e:
            return "INVALID_ARGUMENT", str(e)
        except Refused as e:
            return "RESOURCE_EXHAUSTED", str(e)
        except ValueError as e:
            return "ALREADY_EXISTS", f"request_id: {e}"
        if sub.deadline_s is not None:
            for req in reqs:
                set_deadline(router, req, sub.deadline_s)
        return None

    async def cancel(self, request_id: str) -> bool:
        """The Abort RPC: end the request (every choice of it) now; its stream ends with
        finish_reason ``abort``."""
        router = self.router
        if router is None:
            return False
        ids = router.families.children(request_id) or [request_id]
        return any([router.abort(rid) for rid in ids])

    async def client_gone(self, request_id: str, code: str) -> bool:
        """The client's call ended (``code``: CANCELLED on a cancel or disconnect,
        DEADLINE_EXCEEDED after its deadline) while the request ran: free its work, count
        the failure (unless the request had ended already: it was counted then)."""
        router = self.router
        if router is None:
            return False
        ids = router.families.children(request_id) or [request_id]
        return any([router.client_gone(rid, code) for rid in ids])

    async def count_failure(self, code: str) -> None:
        """A frontend refused a call before submitting it (validation, a duplicate id)."""
        self.metrics.observe_failure(code)

    async def server_info(self) -> tuple[int, int, float]:
        """(prefill workers, decode workers, uptime in s)."""
        router = self.router
        return (len(router.prefill) if router else 0, len(router.decode) if router else 0,
                time.monotonic() - self.started)

    # -- output -----------------------------------------------------------------------------
    def _out(self, req: Request, chunk: Chunk) -> None:
        end = None if chunk.finish_reason is None and chunk.error is None \
            else _end(req, chunk)
        self._outbox.setdefault(req.frontend, []).append(
            (req.parent or req.request_id, chunk.token_ids, chunk.text, end, req.index,
             chunk.logprobs))
        if not self._flush_due:  # once the reports now on the loop are handled
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        box, self._outbox = self._outbox, {}
        for i, items in box.items():
            self.feeds[i].write(encode(items))


def _end(req: Request, chunk: Chunk) -> StreamEnd:
    if chunk.error is not None:
        return StreamEnd(error=chunk.error)
    n = len(req.output_ids)
    return StreamEnd(
        finish_reason=chunk.finish_reason or "", matched_stop=chunk.matched_stop,
        prompt_tokens=len(req.prompt_ids), completion_tokens=n, queue_s=req.queue_s,
        prefill_s=req.prefill_s, kv_transfer_s=req.transfer_s,
        ttft_s=req.t_first - req.arrival if req.t_first else 0.0,
        mean_tpot_s=(req.t_last - req.t_first) / (n - 1) if n > 1 else 0.0,
        e2e_s=time.monotonic() - req.arrival,
    )
