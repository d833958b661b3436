"""A Ray cluster of several nodes on this machine, each a `ray start --block` process on
its own loopback address (127.0.0.1 the head, 127.0.0.2, ... the others), with custom
resources; stopped by signalling those processes (``ray stop`` would stop every Ray on
the machine, the test session's own included)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

# Ray's token authentication stays on (pdserve documents it so); a driver of the cluster runs
# with the same environment.
ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")  # Ray's default temp dir
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


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


def _listening(host: str, port: int, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the Ray head did not listen on {host}:{port} in {timeout_s} s")


def wait_for_nodes(expected: int, timeout_s: float = 120.0) -> None:
    """In a driver connected to the cluster: until ``expected`` nodes are alive."""
    import ray

    end = time.monotonic() + timeout_s
    alive = 0
    while time.monotonic() < end:
        alive = sum(1 for n in ray.nodes() if n["Alive"])
        if alive >= expected:
            return
        time.sleep(0.5)
    raise AssertionError(f"{alive} of {expected} Ray nodes alive after {timeout_s} s")


@contextmanager
def loopback_cluster(nodes: Sequence[Mapping[str, float]], num_cpus: int = 4,
                     timeout_s: float = 120.0) -> Iterator[str]:
    """Start a head on 127.0.0.1 and one node per entry of ``nodes`` (its custom resources)
    on 127.0.0.2, 127.0.0.3, ...; yields the head's address (host:port) once the head
    listens (a driver waits for the rest with ``wait_for_nodes``)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # The head writes its address where a later ``ray.init()`` on this machine looks for a
    # cluster to join; the file goes back to what it was once this cluster is gone.
    before = ADDRESS_FILE.read_text() if ADDRESS_FILE.exists() else None
    env = {**os.environ, **RAY_ENV}
    common = ["--block", "--num-cpus", str(num_cpus), "--num-gpus", "0",
              "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
    procs = [subprocess.Popen(
        [_ray(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--include-dashboard", "false", *common, *_node_ports("127.0.0.1")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)]
    try:
        _listening("127.0.0.1", port, timeout_s)
        for i, resources in enumerate(nodes):
            ip = f"127.0.0.{i + 2}"
            procs.append(subprocess.Popen(
                [_ray(), "start", "--address", address, "--node-ip-address", ip,
                 "--resources", json.dumps(dict(resources)), *common, *_node_ports(ip)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
        yield address
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if before is None:
            ADDRESS_FILE.unlink(missing_ok=True)
        else:
            ADDRESS_FILE.write_text(before)
