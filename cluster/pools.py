"""Worker actors of a deployment's pools: how one is created (at launch, or later when a
pool grows), and the Ray side of growing and shrinking a pool while it serves.

A worker asks Ray for one CPU, one GPU on CUDA, and one unit of its pool's custom resource
when the config names one (``prefill_resource`` / ``decode_resource``): the bundle the
autoscaler also asks Ray's autoscaler to provide (``worker_bundle``). Growing a pool starts an
actor, which may wait for a node to arrive, warms it up, then has the router add it
(``router.pools.add_worker``: channels first); shrinking drains a worker through the router,
then stops its actor, which gives its GPU back to Ray.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import ray

from pdserve.cluster.actors import DecodeActor, PrefillActor
from pdserve.cluster.config import ServeConfig

log = logging.getLogger("pdserve.pools")

ROLES = ("prefill", "decode")
# c10d logs a warning each time a store wait times out; the KV receivers wait on purpose.
WORKER_ENV = {"env_vars": {"TORCH_CPP_LOG_LEVEL": "ERROR"}}
STOP_TIMEOUT_S = 30.0


def worker_bundle(cfg: ServeConfig, role: str) -> dict[str, float]:
    """The resources one ``role`` worker asks Ray for."""
    bundle: dict[str, float] = {"CPU": 1.0}
    if cfg.resolved_device() == "cuda":
        bundle["GPU"] = 1.0
    resource = cfg.prefill_resource if role == "prefill" else cfg.decode_resource
    if resource:
        bundle[resource] = 1.0
    return bundle


def next_epoch() -> int:
    """A decode worker incarnation's epoch: larger than every one this process handed out
    before, and than the wall clock's milliseconds (so epochs grow across restarts of the
    serving process too). A lease carries its worker's epoch, every transfer header the
    lease's, and the worker refuses a transfer of another epoch."""
    global _last_epoch
    with _epoch_lock:
        _last_epoch = max(_last_epoch + 1, time.time_ns() // 1_000_000)
        return _last_epoch


_epoch_lock = threading.Lock()
_last_epoch = 0


def create_worker(cfg: ServeConfig, role: str, name: str, router: Any,
                  epoch: int | None = None) -> Any:
    """The actor of worker ``name`` (not started: its ``start`` warms it up). A decode
    worker runs under ``epoch``, by default a new one (:func:`next_epoch`): a worker that
    replaces another never shares its epoch."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    bundle = worker_bundle(cfg, role)
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    args: tuple[Any, ...] = (name, cfg.worker_config(role, os.cpu_count() or 2), router)
    if role == "decode":
        args += (next_epoch() if epoch is None else epoch,)
    cls = PrefillActor if role == "prefill" else DecodeActor
    return (
        ray.remote(cls)
        .options(name=f"{cfg.namespace}-{name}", num_cpus=bundle["CPU"],
                 num_gpus=bundle.get("GPU", 0), max_concurrency=16,
                 resources=custom or None, runtime_env=WORKER_ENV)
        .remote(*args)
    )


def next_name(role: str, taken: set[str]) -> str:
    """``role-N`` for the smallest N above every one in use or used before (a name is never
    reused: the router's per-worker corrections and Ray's actor names go by it)."""
    used = [int(n.rsplit("-", 1)[1]) for n in taken if n.startswith(f"{role}-")
            and n.rsplit("-", 1)[1].isdigit()]
    return f"{role}-{max(used, default=-1) + 1}"


def stop_worker(name: str, handle: Any, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Shut a worker down (its threads, its channels) and end its actor."""
    try:
        ray.get(handle.shutdown.remote(), timeout=timeout_s)
    except Exception:
        log.exception("worker %s did not stop cleanly", name)
    ray.kill(handle)
