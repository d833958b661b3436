"""pdserve serve on two GPUs: the prefill worker on one, the decode worker on the other, the
KV cache over the NCCL channel, llama-3.1-8b shapes with dummy weights (bf16, Triton)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
import torch

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two GPUs (nvidia-h200-x2)"
)


@pytest.fixture(scope="module")
def deployment() -> Iterator[object]:
    from pdserve.cluster.config import ServeConfig
    from pdserve.cluster.launch import launch
    from pdserve.engine.config import ModelSpec

    cfg = ServeConfig(
        model=ModelSpec("dummy", preset="llama-3.1-8b"), device="cuda", dtype="bfloat16",
        backend="triton", prefill_blocks=0, decode_blocks=0, max_batch_tokens=8192,
        max_num_seqs=128, port=0, metrics_port=0, namespace="gpu-e2e",
    )
    t0 = time.monotonic()
    dep = launch(cfg)
    print(f"\nlaunch (weights, warm-up, CUDA graphs, channels): {time.monotonic() - t0:.1f} s")
    yield dep
    t0 = time.monotonic()
    dep.stop()
    print(f"\nshutdown (workers, channels, gRPC and metrics servers): "
          f"{time.monotonic() - t0:.1f} s")


def test_prefill_and_decode_on_different_gpus(deployment: object) -> None:
    stats = deployment.worker_stats()  # type: ignore[attr-defined]
    for s in stats:
        print(s)
    devices = {s.role: s.device for s in stats}
    assert "cuda" in devices["prefill"] and "cuda" in devices["decode"]
    assert devices["prefill"] != devices["decode"]  # different CUDA_VISIBLE_DEVICES


def test_llama_8b_serves_requests_end_to_end(deployment: object) -> None:
    from pdserve.proto.client import Client, collect

    address = deployment.address  # type: ignore[attr-defined]
    lengths = [17, 200, 1000, 4096, 33, 2048, 511, 3000]
    out: dict[int, object] = {}
    with Client(address) as client:
        info = client.model_info()
        assert info.vocab_size == 128256

        def run(i: int) -> None:
            ids = [(1000 + 7 * j * (i + 1)) % 120000 + 1000 for j in range(lengths[i])]
            out[i] = collect(client.generate(token_ids=ids, max_tokens=64, temperature=0.0,
                                             ignore_eos=True))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(lengths))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, n in enumerate(lengths):
        done = out[i]
        assert len(done.token_ids) == 64, (n, done)  # type: ignore[attr-defined]
        t = done.timing  # type: ignore[attr-defined]
        print(f"prompt {n:5d}: TTFT {t.ttft_s * 1e3:7.1f} ms  prefill {t.prefill_s * 1e3:7.1f} ms"
              f"  KV transfer {t.kv_transfer_s * 1e3:6.1f} ms  TPOT {t.mean_tpot_s * 1e3:6.2f} ms")
    port = deployment.metrics_port  # type: ignore[attr-defined]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    moved = [float(line.split()[-1]) for line in body.splitlines()
             if line.startswith("pdserve:kv_transfer_bytes_total")]
    print(f"KV bytes moved over NCCL: {moved}")
    # Llama-3.1-8B: 128 KiB of KV per token; every prompt's KV crossed the channel.
    assert moved and moved[0] >= sum(lengths) * 128 * 1024
