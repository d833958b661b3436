"""Multi-node: a Ray cluster of three nodes on this machine (head on 127.0.0.1, nodes on
127.0.0.2 and 127.0.0.3 offering the custom resources pdserve_prefill and pdserve_decode),
the prefill worker forced onto one node and the decode worker onto another by
``prefill_resource`` / ``decode_resource``. Greedy output equals the transformers
reference, and the KV channel opened at the decode node's address.

The deployment runs in a child process: this test session's driver is already connected
to its own local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve_testing.e2e import HFReference
from pdserve_testing.nodes import loopback_cluster

pytestmark = pytest.mark.e2e

SUPPORT = Path(__file__).resolve().parents[1] / "support"  # pdserve_testing, for the child
PROMPTS = ["Hello", "In 1969, the first humans landed on the Moon. The mission was"]
MAX_TOKENS = 10

DRIVER = """
import json, sys
import ray
from pdserve.cluster.launch import job_runtime_env, launch
from pdserve.proto.client import Client
from pdserve_testing.e2e import greedy_concurrently, serve_config
from pdserve_testing.nodes import wait_for_nodes
from pathlib import Path

address, gguf, ids, n = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
cfg = serve_config(Path(gguf), "e2e-multinode", prefill_resource="pdserve_prefill",
                   decode_resource="pdserve_decode")
ray.init(address=address, namespace=cfg.namespace, log_to_driver=False,
         runtime_env=job_runtime_env())
wait_for_nodes(3)
dep = launch(cfg, address=address)
try:
    with Client(dep.address) as client:
        out = greedy_concurrently(client, ids, n)
    nodes = {name: ray.get(h.node_address.remote())
             for name, h in {**dep.prefill, **dep.decode}.items()}
    endpoints = ray.get(dep.router.channel_endpoints.remote())
finally:
    dep.stop()
print("RESULT " + json.dumps({"out": out, "nodes": nodes, "endpoints": endpoints}))
"""


def test_prefill_and_decode_on_different_nodes(default_gguf: Path,
                                               hf_reference: HFReference) -> None:
    ids = [hf_reference.tokenizer(p)["input_ids"] for p in PROMPTS]
    with loopback_cluster([{"pdserve_prefill": 1}, {"pdserve_decode": 1}]) as cluster:
        run = subprocess.run(
            [sys.executable, "-P", "-c", DRIVER, cluster.address, str(default_gguf),
             json.dumps(ids), str(MAX_TOKENS)], capture_output=True, text=True, timeout=600,
            env={**os.environ, **cluster.env, "PYTHONPATH": str(SUPPORT)})
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["nodes"] == {"prefill-0": "127.0.0.2", "decode-0": "127.0.0.3"}
    host, _, port = result["endpoints"]["prefill-0->decode-0"].rpartition(":")
    assert host == "127.0.0.3" and int(port) > 0
    for i, got in enumerate(result["out"]):
        assert got == hf_reference.greedy(ids[i], MAX_TOKENS), f"prompt {i}"
