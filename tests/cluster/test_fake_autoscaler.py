"""pdserve's autoscaler against Ray's real one, on this machine (the fake_multinode provider,
deploy/ray-fake-multinode.yaml: a head offering no ``pdserve_decode``, and a ``decode`` node
type that does). The decode pool asks for ``pdserve_decode``, so each decode worker needs a
node the Ray autoscaler launches.

A load step (more concurrent streams than one decode worker has seats; no admission
objective, so every request is admitted and none is refused) makes pdserve's autoscaler
grow the decode pool: it asks Ray for a second decode bundle, Ray launches a
node, the new worker starts there and joins. When the load stops, the newest worker drains,
its actor goes, and Ray releases the idle node. No request fails. The driver prints what it
measured (load step to the new worker serving, attainment before and after it, judged on
the client against the CPU demo's ``standard`` objectives, TTFT 5 s and TPOT 600 ms);
nothing here asserts on timings. The server then exports every metric the Grafana
dashboard queries (deploy/grafana/pdserve-dashboard.json), the pool and autoscaler series
included.

The driver runs in a child process: this test session may already be connected to a Ray of
its own. It runs in an empty folder and joins without a ``working_dir``: the fake nodes share
the head's Ray temp dir, and each node's runtime-env agent unpacking the job's working_dir
there replaces the folder under the workers already started in it (their current directory
gone, their imports fail). The empty folder keeps the checkout off the workers' sys.path as
``job_runtime_env`` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve_testing.fake_cluster import fake_autoscaling_cluster, processes_of

pytestmark = pytest.mark.e2e

SUPPORT = Path(__file__).resolve().parents[1] / "support"  # pdserve_testing, for the child
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pdserve-dashboard.json"

DRIVER = """
import json, re, sys, threading, time, urllib.request
from pathlib import Path
import ray
from pdserve.cluster.autoscale_config import AutoscaleConfig
from pdserve.cluster.launch import launch
from pdserve.cluster.scaling import Autoscaler
from pdserve.proto.client import Client
from pdserve_testing.e2e import serve_config, wait_for

address, gguf, dashboard = sys.argv[1], sys.argv[2], sys.argv[3]
auto = AutoscaleConfig(autoscale=True, min_prefill=1, max_prefill=1, min_decode=1,
                       max_decode=2, autoscale_interval_s=1.0, scale_up_cooldown_s=0.0,
                       scale_down_delay_s=5.0, drain_timeout_s=60.0,
                       worker_start_timeout_s=300.0)
cfg = serve_config(Path(gguf), "e2e-autoscale", decode_resource="pdserve_decode",
                   max_num_seqs=4, autoscaling=auto)
ray.init(address=address, namespace=cfg.namespace, log_to_driver=False)


def decode_nodes():
    return sorted(n["NodeID"] for n in ray.nodes()
                  if n["Alive"] and n["Resources"].get("pdserve_decode"))


dep = launch(cfg, address=address)  # decode-0 waits for the first decode node
first_nodes = decode_nodes()
scaler = Autoscaler.for_deployment(dep)
stop = threading.Event()
loop = threading.Thread(target=scaler.run, args=(stop,))
loop.start()
records, errors, load_on = [], [], threading.Event()
load_on.set()


def client_loop(i):
    with Client(dep.address, own_connection=True) as c:
        while load_on.is_set():
            t0 = time.monotonic()
            first, n = None, 0
            try:
                for r in c.generate(token_ids=[1, 504, 3458, 282, 4 + i], max_tokens=24,
                                    temperature=0.0, ignore_eos=True):
                    if r.token_ids and first is None:
                        first = time.monotonic()
                    n += len(r.token_ids)
                end = time.monotonic()
                records.append((t0, first - t0, (end - first) / max(n - 1, 1), n))
            except Exception as e:
                errors.append(repr(e))


def serving(name):
    return any(e.kind == "serving" and e.name == name for e in scaler.events)


t_step = time.monotonic()
clients = [threading.Thread(target=client_loop, args=(i,)) for i in range(10)]
for t in clients:
    t.start()
wait_for(lambda: serving("decode-1"), 300, what="decode-1 serving")
t_serving = next(e.at for e in scaler.events if e.kind == "serving" and e.name == "decode-1")
grown_nodes = decode_nodes()
time.sleep(10)  # the grown pool under the same load
load_on.clear()
for t in clients:
    t.join()
t_stop = time.monotonic()
wait_for(lambda: any(e.kind == "drained" for e in scaler.events), 120, what="a drain")
wait_for(lambda: len(decode_nodes()) == 1, 120, what="the idle node released")
t_released = time.monotonic()
stop.set()
loop.join()
snap = ray.get(dep.router.load_snapshot.remote())
# Every metric the Grafana dashboard queries, on this server's /metrics after all that.
exported = urllib.request.urlopen(
    f"http://127.0.0.1:{dep.metrics_port}/metrics", timeout=10).read().decode()
queried = set(re.findall(r"pdserve:[A-Za-z0-9_:]+", Path(dashboard).read_text()))
families = set(re.findall(r"^# TYPE (\\S+) ", exported, re.M))  # a labelled one may have no
samples = set(re.findall(r"^([^#{ ]+)", exported, re.M))  # sample yet (nothing failed)
missing = sorted(m for m in queried if m not in samples
                 and re.sub(r"_(bucket|sum|count)$", "", m) not in families | samples)
dep.stop()


def attainment(rows):
    ok = [ttft <= 5.0 and tpot <= 0.6 for _, ttft, tpot, _ in rows]
    return round(sum(ok) / len(ok), 3) if ok else None


before = [r for r in records if r[0] < t_serving]
after = [r for r in records if r[0] >= t_serving]
print("RESULT " + json.dumps({
    "step_to_serving_s": round(t_serving - t_step, 1),
    "stop_to_released_s": round(t_released - t_stop, 1),
    "requests": len(records), "errors": errors[:5], "tokens": sorted({r[3] for r in records}),
    "attainment_before": attainment(before), "attainment_after": attainment(after),
    "ttft_p50_before": sorted(r[1] for r in before)[len(before) // 2] if before else None,
    "ttft_p50_after": sorted(r[1] for r in after)[len(after) // 2] if after else None,
    "first_nodes": first_nodes, "grown_nodes": grown_nodes, "final_nodes": decode_nodes(),
    "events": [[e.kind, e.name, round(e.at - t_step, 1), e.detail] for e in scaler.events],
    "final_serving": snap.serving, "dashboard_metrics": len(queried),
    "dashboard_metrics_missing": missing,
}))
"""


def test_a_load_step_grows_the_decode_pool_onto_a_new_node_and_back(
        default_gguf: Path, tmp_path: Path) -> None:
    with fake_autoscaling_cluster() as cluster:
        run = subprocess.run(
            [sys.executable, "-P", "-c", DRIVER, cluster.address, str(default_gguf),
             str(DASHBOARD)],
            capture_output=True, text=True, timeout=900, cwd=tmp_path,
            env={**os.environ, **cluster.env, "PYTHONPATH": str(SUPPORT)})
        assert run.returncode == 0, run.stderr[-4000:]
    assert not processes_of(cluster), "processes of the cluster left after teardown"
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    print(json.dumps(result))
    assert result["errors"] == [] and result["tokens"] == [24]  # no request failed or cut
    assert len(result["first_nodes"]) == 1 and len(result["grown_nodes"]) == 2
    assert len(result["final_nodes"]) == 1
    kinds = [(k, name) for k, name, _, _ in result["events"]]
    assert kinds[:2] == [("start", "decode-1"), ("serving", "decode-1")]
    assert ("drain", "decode-1") in kinds and ("drained", "decode-1") in kinds
    assert result["final_serving"] == {"prefill": 1, "decode": 1}
    # A running server (its autoscaler included) exports every metric the dashboard queries.
    assert result["dashboard_metrics"] > 20 and result["dashboard_metrics_missing"] == []
