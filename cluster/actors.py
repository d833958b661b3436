"""The worker classes as Ray hosts them: each binds its KV channel endpoints (the decode
side's TCPStore and doorbell, either side's Gloo device) to the address of the node Ray
placed it on, and hands that address to its peer.

The workers themselves know no Ray: they bind to ``WorkerConfig.host``. Which node an actor
lands on is known only inside it, so the actor sets ``host`` to its node's address (Ray's
``get_node_ip_address``, the address the node joined the cluster with) before the worker
starts. With one node that is the node's own address; across nodes, the prefill worker on
one reaches the decode worker's store on another (the single configured address, 127.0.0.1
by default, only ever served one node)."""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import ray

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import WorkerConfig
from pdserve.prefill_worker.worker import PrefillWorker


def on_this_node(cfg: WorkerConfig) -> WorkerConfig:
    """``cfg`` with its channel address set to the address of the node this runs on."""
    return dataclasses.replace(cfg, host=ray.util.get_node_ip_address())


class _OnNode:
    """What both actors add: the address their channel endpoints bind to, and a call that
    lasts as long as the worker (the router's liveness watch: it returns at shutdown, and
    fails as soon as Ray sees the actor's process die)."""

    cfg: WorkerConfig
    _gone: threading.Event

    def node_address(self) -> str:
        return self.cfg.host

    def watch(self) -> None:
        self._gone.wait()

    def pid(self) -> int:
        return os.getpid()


class PrefillActor(_OnNode, PrefillWorker):
    """A prefill worker in a Ray actor, its channel endpoints on its node's address."""

    def __init__(self, name: str, cfg: WorkerConfig, router: Any) -> None:
        self._gone = threading.Event()
        super().__init__(name, on_this_node(cfg), router)

    def shutdown(self) -> None:
        super().shutdown()
        self._gone.set()


class DecodeActor(_OnNode, DecodeWorker):
    """A decode worker in a Ray actor, its channel endpoints on its node's address."""

    def __init__(self, name: str, cfg: WorkerConfig, router: Any, epoch: int = 0) -> None:
        self._gone = threading.Event()
        super().__init__(name, on_this_node(cfg), router, epoch)

    def shutdown(self) -> None:
        super().shutdown()
        self._gone.set()
