"""Bring a deployment up on Ray: the router actor (/metrics) and its gRPC frontends, the
prefill and decode worker actors, their warm-up, and the KV channels between them; and take
it down again."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pdserve.cluster.config import ServeConfig
from pdserve.cluster.pools import create_worker, next_name, stop_worker
from pdserve.engine.config import ModelConfig
from pdserve.engine.model_files import cache_dir
from pdserve.engine.secret import Secret
from pdserve.engine.weights import load_model_config
from pdserve.router.frontend import Frontend
from pdserve.router.pools import Drained
from pdserve.router.server import RouterService

log = logging.getLogger("pdserve.launch")


@dataclass
class Deployment:
    """Handles of a running deployment."""

    cfg: ServeConfig
    router: Any
    frontends: list[Any]
    prefill: dict[str, Any]
    decode: dict[str, Any]
    port: int
    metrics_port: int
    started_ray: bool
    retired: set[str] = field(default_factory=set)  # names of workers removed since launch

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def pool(self, role: str) -> dict[str, Any]:
        """The ``role`` ("prefill" or "decode") pool's handles by name."""
        return self.prefill if role == "prefill" else self.decode

    def add_worker(self, role: str) -> str:
        """Grow ``role``'s pool by one worker (started, warmed up, its channels open);
        returns its name. In colocated mode the pool is ``decode``."""
        if role == "prefill" and self.cfg.colocated:
            raise ValueError("a colocated deployment has no prefill pool")
        name = next_name(role, {*self.prefill, *self.decode, *self.retired})
        handle = create_worker(self.cfg, role, name, self.router)
        try:
            ray.get(handle.start.remote())
            ray.get(self.router.add_worker.remote(role, name, handle))
        except BaseException:
            stop_worker(name, handle)
            raise
        self.pool(role)[name] = handle
        return name

    def remove_worker(self, name: str, timeout_s: float = 60.0) -> Drained:
        """Drain ``name`` (its requests finish, or migrate after ``timeout_s``), then stop
        its actor, which releases its GPU."""
        pool = self.prefill if name in self.prefill else self.decode
        if name not in pool:
            raise ValueError(f"no worker named {name!r}")
        drained: Drained = ray.get(self.router.drain_worker.remote(name, timeout_s))
        stop_worker(name, pool.pop(name))
        self.retired.add(name)
        return drained

    def worker_stats(self) -> list[Any]:
        handles = [*self.prefill.values(), *self.decode.values()]
        return list(ray.get([h.stats.remote() for h in handles]))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving, stop the workers, and shut Ray down if we started it.

        Every worker is told at once and waited for together, so the two ends of a KV
        channel tear down at the same time (stopped one after the other, the first could
        wait on its peer until the timeout) and a worker that hangs costs ``timeout_s`` once,
        not once per worker. Hung workers are killed like the rest."""
        try:
            ray.get(self.router.stop.remote(), timeout=timeout_s)
        except Exception:
            log.exception("router did not stop cleanly")
        workers = {**self.prefill, **self.decode}
        calls = {h.shutdown.remote(): name for name, h in workers.items()}
        done, late = ray.wait(list(calls), num_returns=len(calls), timeout=timeout_s)
        for ref in done:
            try:
                ray.get(ref)
            except Exception:
                log.exception("worker %s did not stop cleanly", calls[ref])
        for ref in late:
            log.error("worker %s did not stop within %.3g s", calls[ref], timeout_s)
        for h in [self.router, *self.frontends, *workers.values()]:
            ray.kill(h)
        if self.started_ray:
            ray.shutdown()


def job_runtime_env() -> dict[str, Any]:
    """The runtime environment of pdserve's Ray job: an empty working directory of its own.

    Without a ``working_dir``, Ray puts the driver's current directory first on every
    worker's ``sys.path`` and starts the workers in it. Started from a checkout of pdserve,
    the checkout's top-level folders (``kernels/``, ``engine/``, ``proto/``, ...) would then
    shadow installed packages of the same names in every actor: Hugging Face's ``kernels``,
    which transformers imports while loading a model class. The workers need nothing from
    the driver's folder (everything they run is the installed ``pdserve``), so they get an
    empty one. Model paths are absolute by then (``ModelSpec``)."""
    empty = cache_dir() / "ray-working-dir"
    empty.mkdir(parents=True, exist_ok=True)
    return {"working_dir": str(empty)}


def init_ray(address: str | None, cfg: ServeConfig) -> bool:
    """Join ``address`` or start a local Ray instance; True if we started it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, namespace=cfg.namespace, log_to_driver=True,
                 runtime_env=job_runtime_env())
        return False
    cpus = os.cpu_count() or 2
    ray.init(
        # A Ray of our own, even where another one runs on this machine (without "local",
        # ray.init joins the one /tmp/ray/ray_current_cluster names, and refuses num_cpus).
        address="local",
        namespace=cfg.namespace, include_dashboard=False, log_to_driver=True,
        runtime_env=job_runtime_env(),
        # Every actor asks for one CPU; leave room for all of them on a small machine.
        num_cpus=max(cpus, cfg.num_workers + 2),
        object_store_memory=256 * 1024 * 1024,
    )
    return True


def launch(cfg: ServeConfig, address: str | None = None) -> Deployment:
    """Start every actor, warm the workers up, open the KV channels, then report SERVING."""
    started = init_ray(address, cfg)
    try:
        return _launch(cfg, started)
    except BaseException:
        if started:
            ray.shutdown()
        raise


def start_router(cfg: ServeConfig, model_config: ModelConfig) -> tuple[Any, list[Any], int, int]:
    """The router actor and its gRPC frontends, listening (NOT_SERVING until
    ``set_serving``), on this node: (router, frontends, gRPC port, metrics port)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    scfg = cfg.server_config(model_config)
    router: Any = (
        ray.remote(RouterService)
        .options(name=f"{cfg.namespace}-router", num_cpus=0, max_concurrency=10000,
                 scheduling_strategy=here)
        .remote(scfg)
    )
    metrics_port = ray.get(router.start.remote())
    frontends: list[Any] = [
        ray.remote(Frontend)
        .options(name=f"{cfg.namespace}-frontend-{i}", num_cpus=0, max_concurrency=10000,
                 scheduling_strategy=here)
        .remote(i, scfg, router)
        for i in range(cfg.frontends)
    ]
    # The first binds the port (perhaps any free one); the others share it.
    port, feed = ray.get(frontends[0].start.remote(cfg.port))
    feeds = [feed, *(f for _, f in ray.get([f.start.remote(port) for f in frontends[1:]]))]
    ray.get(router.attach_frontends.remote(frontends, feeds))
    return router, frontends, port, metrics_port


def _launch(cfg: ServeConfig, started_ray: bool) -> Deployment:
    cfg = dataclasses.replace(cfg, secret=Secret.generate())  # this deployment's own
    model_config = load_model_config(cfg.model)
    router, frontends, port, metrics_port = start_router(cfg, model_config)

    prefill = {} if cfg.colocated else {
        f"prefill-{i}": create_worker(cfg, "prefill", f"prefill-{i}", router)
        for i in range(cfg.num_prefill)}
    decode = {f"decode-{i}": create_worker(cfg, "decode", f"decode-{i}", router)
              for i in range(cfg.num_decode)}
    ray.get([h.start.remote() for h in [*prefill.values(), *decode.values()]])
    ray.get(router.attach.remote(prefill, decode))
    ray.get(router.open_channels.remote())
    ray.get(router.set_serving.remote())
    return Deployment(cfg, router, frontends, prefill, decode, port, metrics_port, started_ray)
