"""The autoscaler's loop, in the serving process (``pdserve serve --autoscale``): every
``autoscale_interval_s`` it reads the router's load (``router.pools.load_snapshot``), sizes
the pools (``cluster.autoscaler``), and acts through Ray.

- Growing a pool asks the Ray autoscaler for the pools' bundles
  (``ray.autoscaler.sdk.request_resources``: one bundle per worker of every pool's target
  size, so the nodes stay while the workers need them) and starts the new worker's actor,
  which waits for a node if none has room; once it has warmed up, the router adds it.
- Shrinking drains the pool's newest worker through the router, then stops its actor;
  the smaller bundle request lets the Ray autoscaler release the node once it is idle.

No node is provisioned here: nodes come from the Ray autoscaler (``ray up``'s cluster, or
``fake_multinode`` in the tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from pdserve.cluster.autoscale_config import AutoscaleConfig
from pdserve.cluster.autoscaler import Pacer, PoolShape, needed
from pdserve.cluster.config import ServeConfig
from pdserve.cluster.launch import Deployment
from pdserve.cluster.pools import create_worker, next_name, stop_worker, worker_bundle
from pdserve.engine.weights import load_model_config
from pdserve.router.cost_model import CostModel
from pdserve.router.load import LoadSnapshot
from pdserve.router.pools import Drained

log = logging.getLogger("pdserve.autoscaler")


@dataclass
class _Change:
    """A worker on its way in (``ref``: its start) or out (``ref``: its drain)."""

    role: str
    handle: Any
    ref: Any
    since: float


@dataclass(frozen=True)
class Event:
    """What the autoscaler did, for its log and the tests: ``kind`` is start, serving,
    drain, drained, lost (it died) or failed; ``at`` on its clock."""

    kind: str
    role: str
    name: str
    at: float
    detail: str = ""


def keeper(cfg: ServeConfig) -> AutoscaleConfig:
    """Without ``--autoscale``: the pools held at their configured sizes, a worker that died
    replaced at once."""
    return dataclasses.replace(
        cfg.autoscaling, min_prefill=cfg.num_prefill, max_prefill=cfg.num_prefill,
        min_decode=cfg.num_decode, max_decode=cfg.num_decode, scale_up_cooldown_s=0.0)


@dataclass
class Autoscaler:
    dep: Deployment
    cfg: AutoscaleConfig
    model: CostModel
    shape: PoolShape
    clock: Callable[[], float] = time.monotonic
    starting: dict[str, _Change] = field(default_factory=dict)
    draining: dict[str, _Change] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    last_load: LoadSnapshot | None = None

    def __post_init__(self) -> None:
        self.pacer = Pacer(self.cfg)

    @classmethod
    def for_deployment(cls, dep: Deployment, cfg: AutoscaleConfig | None = None) -> Autoscaler:
        """``cfg``: the deployment's own (``--autoscale``), else pools held at their launch
        sizes (``keeper``)."""
        scfg = dep.cfg
        classes = scfg.slo_class_set().classes
        tpots = [c.tpot_ms / 1e3 for c in classes if c.tpot_ms]
        shape = PoolShape(scfg.colocated, scfg.max_batch_tokens, scfg.max_num_seqs,
                          min(tpots) if tpots else None)
        model = CostModel(scfg.cost_profile(load_model_config(scfg.model)),
                          max_batch_tokens=scfg.max_batch_tokens)
        return cls(dep, cfg or scfg.autoscaling, model, shape)

    # -- one decision -----------------------------------------------------------------------
    def step(self) -> dict[str, int]:
        """Collect what started or drained, read the load, size, act; returns the moves."""
        now = self.clock()
        self._collect_started(now)
        self._collect_drained(now)
        load: LoadSnapshot = ray.get(self.dep.router.load_snapshot.remote())
        self.last_load = load
        self._forget_lost(load, now)
        need = needed(load, self.model, self.shape, self.cfg)
        current = {role: load.serving.get(role, 0) + self._count(self.starting, role)
                   for role in need}
        moves = self.pacer.moves(need, current, now)
        self._request(need)  # before new actors ask: their nodes are on their way
        for role, move in moves.items():
            for _ in range(max(move, 0)):
                self._start(role, now)
            if move < 0:
                self._drain_newest(role, now)
        starting = {role: self._count(self.starting, role) for role in need}
        self.dep.router.record_scaling.remote(need, starting, moves)
        return moves

    def run(self, stop: threading.Event) -> None:
        """Decide every ``autoscale_interval_s`` until ``stop``; then give up on the workers
        still starting (draining ones finish their drain)."""
        while not stop.wait(self.cfg.autoscale_interval_s):
            try:
                self.step()
            except Exception:
                log.exception("autoscaler step failed")
        self.close()

    def close(self) -> None:
        for name, ch in list(self.starting.items()):
            ray.kill(ch.handle)
            del self.starting[name]
        for name, ch in list(self.draining.items()):
            try:
                ray.get(ch.ref, timeout=self.cfg.drain_timeout_s + 30)
            except Exception:
                log.exception("drain of %s did not end", name)
            self._retire(name, ch)

    # -- Ray -------------------------------------------------------------------------------
    def _request(self, need: dict[str, int]) -> None:
        from ray.autoscaler.sdk import request_resources

        bundles = [worker_bundle(self.dep.cfg, role) for role, n in need.items()
                   for _ in range(n)]
        try:
            request_resources(bundles=bundles)
        except Exception:  # e.g. a local Ray without an autoscaler: nothing to ask
            log.debug("request_resources failed", exc_info=True)

    def _start(self, role: str, now: float) -> None:
        d = self.dep
        name = next_name(role, {*d.prefill, *d.decode, *d.retired, *self.starting})
        handle = create_worker(d.cfg, role, name, d.router)
        self.starting[name] = _Change(role, handle, handle.start.remote(), now)
        self._event("start", role, name, now)

    def _collect_started(self, now: float) -> None:
        for name, ch in list(self.starting.items()):
            ready, _ = ray.wait([ch.ref], timeout=0)
            if not ready:
                if now - ch.since > self.cfg.worker_start_timeout_s:
                    log.error("%s did not start in %.0f s; giving up on it", name,
                              self.cfg.worker_start_timeout_s)
                    ray.kill(ch.handle)
                    del self.starting[name]
                    self._event("failed", ch.role, name, now, "start timed out")
                continue
            del self.starting[name]
            try:
                ray.get(ch.ref)
                ray.get(self.dep.router.add_worker.remote(ch.role, name, ch.handle))
            except Exception as e:
                log.exception("%s failed to join", name)
                stop_worker(name, ch.handle)
                self._event("failed", ch.role, name, now, str(e))
                continue
            self.dep.pool(ch.role)[name] = ch.handle
            self._event("serving", ch.role, name, now, f"{now - ch.since:.1f} s after start")

    def _forget_lost(self, load: LoadSnapshot, now: float) -> None:
        """Workers the router let go of without a drain died (``router.pools.worker_lost``):
        their handles go too (the pool's size then asks for a replacement)."""
        for role in ("prefill", "decode"):
            pool = self.dep.pool(role)
            for name in [n for n in pool if n not in load.workers and n not in self.draining]:
                handle = pool.pop(name)
                self.dep.retired.add(name)
                with contextlib.suppress(Exception):  # gone already
                    ray.kill(handle)
                self._event("lost", role, name, now)

    def _drain_newest(self, role: str, now: float) -> None:
        pool = self.dep.pool(role)
        names = [n for n in pool if n not in self.draining]
        if len(names) <= 1:
            return
        name = max(names, key=lambda n: int(n.rsplit("-", 1)[1]))
        ref = self.dep.router.drain_worker.remote(name, self.cfg.drain_timeout_s)
        self.draining[name] = _Change(role, pool[name], ref, now)
        self._event("drain", role, name, now)

    def _collect_drained(self, now: float) -> None:
        for name, ch in list(self.draining.items()):
            ready, _ = ray.wait([ch.ref], timeout=0)
            if not ready:
                continue
            try:
                drained: Drained = ray.get(ch.ref)
                detail = (f"{drained.seconds:.1f} s, {drained.finished} finished, "
                          f"{drained.migrated} migrated")
            except Exception as e:  # e.g. it became the last of its pool: it stays
                log.exception("drain of %s failed", name)
                del self.draining[name]
                self._event("failed", ch.role, name, now, str(e))
                continue
            self._retire(name, ch)
            self._event("drained", ch.role, name, now, detail)

    def _retire(self, name: str, ch: _Change) -> None:
        self.draining.pop(name, None)
        self.dep.pool(ch.role).pop(name, None)
        self.dep.retired.add(name)
        stop_worker(name, ch.handle)

    @staticmethod
    def _count(changes: dict[str, _Change], role: str) -> int:
        return sum(1 for ch in changes.values() if ch.role == role)

    def _event(self, kind: str, role: str, name: str, at: float, detail: str = "") -> None:
        self.events.append(Event(kind, role, name, at, detail))
        log.info("autoscaler: %s %s %s %s", kind, role, name, detail)
