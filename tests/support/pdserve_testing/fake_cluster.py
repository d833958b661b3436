"""Ray's real autoscaler on this machine: a head started with ``RAY_FAKE_CLUSTER=1`` and an
autoscaling config of provider type ``fake_multinode`` (deploy/ray-fake-multinode.yaml). When
demand asks for a node type's resources (``ray.autoscaler.sdk.request_resources``, or a
pending task/actor), the head's autoscaler (monitor process) launches a "node": another raylet
with its agents, started from inside the monitor process, that registers with the head's GCS
under a fixed fake node id (fff...00001, fff...00002, ...); when the node has been idle for
``idle_timeout_minutes`` the autoscaler drains it and kills its processes.

All of it runs in the head's ``ray start --block`` process group (the fake nodes' raylets and
agents are children of the monitor), except Ray's worker processes (``ray::IDLE``, actors),
which each get a session of their own; every process carries this cluster's
``RAY_AUTH_TOKEN`` in its environment, which is how teardown finds what is left of it."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml

from pdserve_testing.nodes import ADDRESS_FILE, LoopbackCluster, _start_node, _stop, free_port

FAKE_MULTINODE_CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "ray-fake-multinode.yaml"
HEAD_TYPE = "ray.head.default"  # the node type the fake provider registers the head as
TOKEN_VAR = "RAY_AUTH_TOKEN"


def _head_args(head: dict[str, Any]) -> list[str]:
    """``ray start`` resource flags for what the config says the head offers."""
    res = dict(head.get("resources", {}))
    args = ["--num-cpus", str(int(res.pop("CPU", 0))), "--num-gpus", str(int(res.pop("GPU", 0)))]
    if "object_store_memory" in res:
        args += ["--object-store-memory", str(int(res.pop("object_store_memory")))]
    if "memory" in res:
        args += ["--memory", str(int(res.pop("memory")))]
    if res:
        args += ["--resources", json.dumps(res)]
    return args


def processes_of(cluster: LoopbackCluster) -> list[int]:
    """Pids of the live processes that run with this cluster's token (its raylets, GCS,
    monitor, agents and workers, the fake nodes' included)."""
    marker = f"{TOKEN_VAR}={cluster.env[TOKEN_VAR]}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with suppress(OSError):  # gone, or not ours to read
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
    return pids


def _sweep(cluster: LoopbackCluster, grace_s: float) -> None:
    """Wait up to ``grace_s`` for the cluster's processes to exit, then SIGKILL the rest."""
    end = time.monotonic() + grace_s
    while processes_of(cluster) and time.monotonic() < end:
        time.sleep(0.5)
    for pid in processes_of(cluster):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 10
    while processes_of(cluster) and time.monotonic() < end:
        time.sleep(0.2)


def _dump_logs(session_logs: Path) -> None:
    """The autoscaler's own log, for a failing test (pytest shows captured stderr)."""
    for name in ("monitor.log", "monitor.err"):
        log = session_logs / name
        if log.exists():
            print(f"--- {log} (tail)\n" + log.read_text(errors="replace")[-4000:],
                  file=sys.stderr)


@contextmanager
def fake_autoscaling_cluster(config: Path = FAKE_MULTINODE_CONFIG, timeout_s: float = 120.0,
                             update_interval_s: int = 1) -> Iterator[LoopbackCluster]:
    """Start a head with the autoscaler on ``config`` (a fake_multinode autoscaling config);
    yields its address and driver environment once the head is up (no worker nodes yet:
    the autoscaler launches them on demand). On exit, stops the head and every node the
    autoscaler started, and waits until no process of the cluster is left.

    ``update_interval_s`` is the autoscaler's loop period (AUTOSCALER_UPDATE_INTERVAL_S,
    whole seconds; Ray's default is 5)."""
    raw = yaml.safe_load(config.read_text())
    if raw.get("head_node_type") != HEAD_TYPE or HEAD_TYPE not in raw["available_node_types"]:
        raise ValueError(f"{config}: the fake_multinode head node type must be {HEAD_TYPE!r}")
    port = free_port()
    address = f"127.0.0.1:{port}"
    # The provider connects the nodes it starts to <this machine's IP>:6379 unless told.
    raw["provider"]["gcs_address"] = address
    before = ADDRESS_FILE.read_text() if ADDRESS_FILE.exists() else None
    ray_env = {"RAY_AUTH_MODE": "token", TOKEN_VAR: secrets.token_hex(32),
               "RAY_USAGE_STATS_ENABLED": "0"}
    cluster = LoopbackCluster(address, ray_env)
    # The fake nodes are started by the head's monitor process and inherit its environment:
    # the token reaches them from here.
    env = {**os.environ, **ray_env, "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": str(update_interval_s),
           # On SIGTERM `ray start` first asks the GCS to drain its node, and with the GCS
           # (same process group) going down too it waits out the whole drain timeout (30 s).
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="pdserve-fake-") as tmp:
        work = Path(tmp)
        cfg = work / "autoscaling.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        # Ray's temp dir of its own: sessions, sockets, logs and ray_current_cluster of this
        # cluster (the fake nodes use the head's) stay out of /tmp/ray.
        ray_tmp = work / "ray"
        try:
            procs.append(_start_node(
                ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                 "--include-dashboard", "false",
                 # Fixed by default (8265, 10001): distinct, for other Rays on this machine.
                 "--dashboard-port", str(free_port()),
                 "--ray-client-server-port", str(free_port()),
                 "--autoscaling-config", str(cfg), "--temp-dir", str(ray_tmp),
                 "--block", "--disable-usage-stats", *_head_args(
                     raw["available_node_types"][HEAD_TYPE])],
                env, work / "head.log", timeout_s))
            yield cluster
        except BaseException:
            _dump_logs(ray_tmp / "session_latest" / "logs")
            raise
        finally:
            _stop(procs)
            _sweep(cluster, grace_s=30)
            # With its own temp dir the head does not write /tmp/ray's address file; should
            # it have, it goes back to what it was.
            if ADDRESS_FILE.exists() and ADDRESS_FILE.read_text().endswith(f":{port}"):
                if before is None:
                    ADDRESS_FILE.unlink(missing_ok=True)
                else:
                    ADDRESS_FILE.write_text(before)
