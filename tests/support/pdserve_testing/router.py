"""Stand-ins for the worker actors around a real Router (no Ray): ``handle.method.remote``
records the call and returns a resolved future; ``RouterSetup`` wires one prefill and one
decode worker to a Router with its own metrics registry."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from pdserve.engine.messages import FirstToken, Lease, Reservation
from pdserve.engine.sequence import SamplingParams
from pdserve.router.cost_model import Profile
from pdserve.router.metrics import Metrics
from pdserve.router.policy import LocalPrefillRule
from pdserve.router.request import Chunk, Request, State
from pdserve.router.router import Router, RouterConfig
from pdserve.router.slo import ValidSlo
from pdserve_testing.detok import CharDetok

_tids = itertools.count(100)
NO_SLO = ValidSlo(None, None)


class FakeWorker:
    """A worker actor handle: ``handle.method.remote(*args)`` records the call and returns
    a resolved future (decode workers grant every lease; every channel hosted gets a name of
    its own). ``failing[method] = n``: the next n calls of ``method`` fail."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.failing: dict[str, int] = {}

    def reply(self, method: str, args: tuple[Any, ...]) -> Any:
        if method == "reserve":
            r: Reservation = args[0]
            return Lease(self.name, r.request_id, next(_tids), 0, 4, 30.0)
        if method == "host_channel":
            return "127.0.0.1", 1, f"{args[0]}@{self.name}:e0.{next(_tids)}"
        return None

    def __getattr__(self, method: str) -> Any:
        worker = self

        class Method:
            def remote(self, *args: Any) -> asyncio.Future[Any]:
                worker.calls.append((method, args))
                fut = asyncio.get_running_loop().create_future()
                if worker.failing.get(method, 0) > 0:
                    worker.failing[method] -= 1
                    fut.set_exception(RuntimeError(f"{worker.name}.{method} failed"))
                else:
                    fut.set_result(worker.reply(method, args))
                return fut

        return Method()

    def called(self, method: str) -> list[tuple[Any, ...]]:
        return [args for name, args in self.calls if name == method]


class RouterSetup:
    """A Router over one fake prefill and one fake decode worker; what it streams is in
    ``out``. Prefix caching is off unless asked for: the fake prompts are ``range(3, 3+n)``,
    so any two share a prefix, and the queue accounting the other tests check would count
    the expected hits out (tests/router/test_prefix_routing.py covers that)."""

    def __init__(self, rule: LocalPrefillRule | None = None, max_attempts: int = 4,
                 profile: Profile | None = None,
                 slo_classes: tuple[str, ...] = ("default",),
                 clock: Callable[[], float] = time.monotonic,
                 prefix_caching: bool = False) -> None:
        self.clock = clock
        self.p, self.d = FakeWorker("prefill-0"), FakeWorker("decode-0")
        self.metrics = Metrics(CollectorRegistry(), slo_classes=slo_classes)
        self.out: list[tuple[Request, Chunk]] = []
        self.router = Router({"prefill-0": self.p}, {"decode-0": self.d},
                             RouterConfig(local_prefill=rule or LocalPrefillRule(),
                                          max_attempts=max_attempts, profile=profile,
                                          prefix_caching=prefix_caching),
                             self.metrics,
                             lambda req, chunk: self.out.append((req, chunk)), clock=clock)

    @property
    def queued(self) -> int:
        return self.router.dispatcher.p_load["prefill-0"].queued_tokens

    @property
    def local_prefills(self) -> float:
        return self.value("pdserve:local_prefills_total")

    def value(self, name: str, **labels: str) -> float:
        v = self.metrics.registry.get_sample_value(name, labels)
        assert v is not None, f"no sample {name}{labels}"
        return v

    def request(self, rid: str, n: int, slo: ValidSlo = NO_SLO,
                max_tokens: int = 8) -> Request:
        return Request(rid, list(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens), (),
                       slo, self.clock(), CharDetok())  # type: ignore[arg-type]

    async def admit(self, rid: str, n: int, slo: ValidSlo = NO_SLO) -> Request:
        req = self.request(rid, n, slo)
        self.router.admit(req)
        await settle()
        assert req.state == State.PREFILLING and req.lease is not None
        return req

    def first_token(self, worker: str, req: Request, token: int = 65,
                    finish_reason: str | None = None) -> None:
        assert req.lease is not None
        self.router.on_first_token(FirstToken(worker, req.request_id, req.lease.transfer_id,
                                              token, finish_reason, 0.0, 0.0))


async def settle() -> None:
    """Let the spawned dispatch tasks run (every fake call is already resolved)."""
    for _ in range(20):
        await asyncio.sleep(0)
