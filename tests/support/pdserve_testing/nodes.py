"""A Ray cluster of several nodes on this machine, each a `ray start --block` process on
its own loopback address (127.0.0.1 the head, 127.0.0.2, ... the others), with custom
resources; stopped by signalling those processes (``ray stop`` would stop every Ray on
the machine, the test session's own included)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pdserve_testing.e2e import wait_for

ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")  # Ray's default temp dir


@dataclass(frozen=True)
class LoopbackCluster:
    """The head's address and the environment a driver of the cluster runs with: Ray's
    token authentication stays on (pdserve documents it so), with this cluster's token."""

    address: str
    env: Mapping[str, str]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _node_ports(ip: str) -> list[str]:
    """Distinct ports for what each node would otherwise bind at its fixed defaults."""
    return ["--dashboard-agent-listen-port", str(free_port(ip)),
            "--dashboard-agent-grpc-port", str(free_port(ip)),
            "--runtime-env-agent-port", str(free_port(ip)),
            "--metrics-export-port", str(free_port(ip)),
            "--node-manager-port", str(free_port(ip)),
            "--object-manager-port", str(free_port(ip))]


STARTED = "Ray runtime started."  # what `ray start` prints once its node is registered
ATTEMPTS = 3


def _start_node(args: list[str], env: Mapping[str, str], log: Path,
                timeout_s: float) -> subprocess.Popen[bytes]:
    """``ray start --block ...`` until it reports its node registered with the GCS.

    On a loaded machine a raylet can miss the 30 s Ray gives it to register, and that
    ``ray start`` exits; its process group goes and the node starts again (fresh ports)."""
    for _ in range(ATTEMPTS):
        with log.open("wb") as out:
            proc = subprocess.Popen([_ray(), "start", *args, *_node_ports(_ip(args))],
                                    env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        wait_for(partial(_started, proc, log), timeout_s,
                 what=f"ray start {' '.join(args)} (log {log})")
        if proc.poll() is None:
            return proc
        _stop([proc])
    raise AssertionError(f"ray start failed {ATTEMPTS} times; the last log:\n"
                         + log.read_text(errors="replace")[-2000:])


def _started(proc: subprocess.Popen[bytes], log: Path) -> bool:
    return proc.poll() is not None or STARTED in log.read_text(errors="replace")


def _ip(args: list[str]) -> str:
    return args[args.index("--node-ip-address") + 1]


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):
        with suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def wait_for_nodes(expected: int, timeout_s: float = 120.0) -> None:
    """In a driver connected to the cluster: until ``expected`` nodes are alive."""
    import ray

    wait_for(lambda: sum(1 for n in ray.nodes() if n["Alive"]) >= expected, timeout_s,
             what=f"{expected} Ray nodes alive")


@contextmanager
def loopback_cluster(nodes: Sequence[Mapping[str, float]], num_cpus: int = 4,
                     timeout_s: float = 120.0) -> Iterator[LoopbackCluster]:
    """Start a head on 127.0.0.1 and one node per entry of ``nodes`` (its custom resources)
    on 127.0.0.2, 127.0.0.3, ...; yields the head's address (host:port) once every node
    has registered (a driver sees them all with ``wait_for_nodes``)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # The head writes its address where a later ``ray.init()`` on this machine looks for a
    # cluster to join; the file goes back to what it was once this cluster is gone.
    before = ADDRESS_FILE.read_text() if ADDRESS_FILE.exists() else None
    ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
               "RAY_USAGE_STATS_ENABLED": "0"}
    # On SIGTERM `ray start` first asks the GCS to drain its node; with the GCS going down
    # too it would wait out the whole drain timeout (30 s).
    env = {**os.environ, **ray_env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    common = ["--block", "--num-cpus", str(num_cpus), "--num-gpus", "0",
              "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="pdserve-nodes-") as logs:
        try:
            # One node at a time: started together on two cores, raylets miss their deadline.
            procs.append(_start_node(
                ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                 "--include-dashboard", "false", *common], env, Path(logs, "head.log"),
                timeout_s))
            for i, resources in enumerate(nodes):
                procs.append(_start_node(
                    ["--address", address, "--node-ip-address", f"127.0.0.{i + 2}",
                     "--resources", json.dumps(dict(resources)), *common], env,
                    Path(logs, f"node-{i + 1}.log"), timeout_s))
            yield LoopbackCluster(address, ray_env)
        finally:
            _stop(procs)
            if before is None:
                ADDRESS_FILE.unlink(missing_ok=True)
            else:
                ADDRESS_FILE.write_text(before)
