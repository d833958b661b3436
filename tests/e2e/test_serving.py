"""The whole system on the CPU: Ray actors, KV over the Gloo channel, gRPC streaming."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from pdserve.cluster.launch import Deployment
from pdserve.proto.client import Client, collect
from pdserve_testing.e2e import (
    HFReference,
    all_blocks_free,
    failure_counts,
    metric_values,
    run_concurrently,
    wait_for,
)

pytestmark = pytest.mark.e2e

PROMPTS = [
    "Hi",
    "The capital of France is",
    "List three colors:",
    "Write a short poem about the moon and the stars over a quiet lake at night.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Translate to French: The weather is nice today and I would like to go for a walk.",
    "Q: What is 12 times 12?\nA:",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "woodcutter and his three children. Every morning the woodcutter went into the forest "
    "to cut wood, and every evening he came home tired. One day, his youngest daughter asked",
    "Explain the difference between a list and a tuple in Python. Give an example of each, "
    "and say when you would prefer one over the other. Keep the answer brief and clear, "
    "suitable for a beginner who has just started learning the language this week. Mention "
    "mutability, hashing, performance and typical idioms such as returning several values "
    "from a function, and close with one sentence on named tuples and data classes.",
]
N_TOKENS = 20


def test_health_serving_and_reflection(deployment: Deployment) -> None:
    with grpc.insecure_channel(deployment.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "pdserve.v1.Generation"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
        assert "pdserve.v1.Generation" in services
        assert "grpc.health.v1.Health" in services


def test_model_and_server_info(client: Client) -> None:
    info = client.model_info()
    assert info.vocab_size == 49152 and info.max_context_length == 8192
    assert list(info.eos_token_ids) == [2]
    server = client.server_info()
    assert server.num_prefill_workers == 1 and server.num_decode_workers == 1


def test_greedy_matches_transformers_token_for_token(
    client: Client, hf_reference: HFReference
) -> None:
    tok = hf_reference.tokenizer
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    lengths = [len(ids) for ids in prompt_ids]
    # Different lengths, some crossing 16-token block boundaries, one longer than the
    # 64-token prefill budget (chunked prefill).
    assert len(set(lengths)) == len(lengths)
    assert any(n > 16 and n % 16 for n in lengths) and max(lengths) > 64
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        stream = client.generate(token_ids=prompt_ids[i], max_tokens=N_TOKENS, temperature=0.0)
        results[i] = collect(stream).token_ids

    run_concurrently(run, len(PROMPTS))
    for i, ids in enumerate(prompt_ids):
        assert results[i] == hf_reference.greedy(ids, N_TOKENS), f"prompt {i} diverged"


def test_text_and_chat_inputs_stream_decoded_text(client: Client) -> None:
    done = collect(client.generate(messages=[("user", "Say hello.")], max_tokens=12,
                                   temperature=0.0))
    assert done.usage.completion_tokens == len(done.token_ids) > 0
    assert done.finish_reason in ("stop", "length")
    assert done.num_responses >= 2  # streamed, not one blob
    raw = collect(client.generate(text="The capital of France is", max_tokens=5,
                                  temperature=0.0))
    assert raw.text.strip() != ""
    assert raw.timing.ttft_s > 0 and raw.timing.e2e_s >= raw.timing.ttft_s


def test_sixteen_concurrent_streams(client: Client, deployment: Deployment) -> None:
    outs: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            outs[i] = collect(client.generate(
                text=f"Count from {i} to {i + 10}:", max_tokens=12 + i % 5, temperature=0.7,
                seed=i))
        except Exception as e:  # surfaced below
            outs[i] = e

    run_concurrently(run, 16)
    for i in range(16):
        done = outs[i]
        assert not isinstance(done, Exception), done
        assert done.finish_reason in ("stop", "length")  # type: ignore[attr-defined]
        assert done.usage.completion_tokens == len(done.token_ids)  # type: ignore[attr-defined]
        assert len(done.token_ids) <= 12 + i % 5  # type: ignore[attr-defined]
    wait_for(lambda: all_blocks_free(deployment), what="all blocks free after 16 streams")


def test_seeded_sampling_is_reproducible(client: Client) -> None:
    def once() -> list[int]:
        return collect(client.generate(text="Tell me a story", max_tokens=16, temperature=1.0,
                                       top_p=0.9, seed=7, ignore_eos=True)).token_ids

    assert once() == once()


def test_stop_string_does_not_leak(client: Client, hf_reference: HFReference) -> None:
    ids = hf_reference.tokenizer("Q: What is 12 times 12?\nA:")["input_ids"]
    free_text = collect(client.generate(token_ids=ids, max_tokens=20, temperature=0.0)).text
    assert len(free_text) > 6
    stop = free_text[3:6]
    done = collect(client.generate(token_ids=ids, max_tokens=20, temperature=0.0, stop=[stop]))
    assert done.finish_reason == "stop" and done.matched_stop == stop
    assert done.text == free_text[: free_text.index(stop)]


def test_cancelled_stream_returns_every_block(client: Client, deployment: Deployment) -> None:
    stream = client.generate(text="Write a very long essay about rivers.", max_tokens=400,
                             temperature=0.0, ignore_eos=True)
    got = 0
    for resp in stream:
        got += len(resp.token_ids)
        if got >= 3:
            break
    stream.cancel()
    wait_for(lambda: all_blocks_free(deployment), what="blocks freed after cancel")


def test_abort_by_id_returns_every_block(client: Client, deployment: Deployment) -> None:
    rid = "abort-me-1"
    stream = client.generate(text="Describe the ocean in detail.", max_tokens=400,
                             temperature=0.0, ignore_eos=True, request_id=rid)
    it = iter(stream)
    first = next(it)
    assert first.request_id == rid
    assert client.abort(rid)
    rest = list(it)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert not client.abort(rid)  # already gone
    wait_for(lambda: all_blocks_free(deployment), what="blocks freed after abort")


def test_deadline_exceeded_frees_blocks(client: Client, deployment: Deployment) -> None:
    with pytest.raises(grpc.RpcError) as err:
        collect(client.generate(text="Go on forever.", max_tokens=2000, temperature=0.0,
                                ignore_eos=True, timeout=1.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: all_blocks_free(deployment), what="blocks freed after deadline")


BAD = [
    (dict(text=""), "text"),
    (dict(token_ids=[]), "token_ids"),
    (dict(token_ids=[1, 2, 49152]), "token_ids.ids[2]"),
    (dict(token_ids=[1] * 8000, max_tokens=500), "max_tokens"),
    (dict(text="hi", temperature=-0.5), "temperature"),
    (dict(text="hi", top_p=0.0), "top_p"),
    (dict(text="hi", top_p=1.5), "top_p"),
    (dict(text="hi", max_tokens=0), "max_tokens"),
    (dict(text="hi", max_tokens=100000), "max_tokens"),
    (dict(messages=[]), "messages"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_rejected_and_neighbour_completes(
    client: Client, kwargs: dict[str, object], field: str
) -> None:
    neighbour = client.generate(text="Name a fruit.", max_tokens=8, temperature=0.0,
                                ignore_eos=True)
    with pytest.raises(grpc.RpcError) as err:
        collect(client.generate(**kwargs))  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")
    done = collect(neighbour)
    assert done.finish_reason == "length" and len(done.token_ids) == 8


def test_metrics_histograms_count_requests(client: Client, deployment: Deployment) -> None:
    collect(client.generate(text="Hello there", max_tokens=4, temperature=0.0))
    url = f"http://127.0.0.1:{deployment.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"):
        counts = [line for line in body.splitlines()
                  if line.startswith(f"pdserve:{name}_count")]
        assert counts and float(counts[0].split()[-1]) >= 1, name
    assert "pdserve:num_requests_running" in body
    assert 'pdserve:kv_cache_usage_perc{worker="decode-0"}' in body
    # Disaggregated: the request's KV moved (its report may come after the answer), and
    # its second token came after a first decode step.
    for name in ("request_kv_transfer_time_seconds_count",
                 "request_first_decode_step_seconds_count"):
        wait_for(lambda name=name: metric_values(deployment, f"pdserve:{name}")[()] >= 1,
                 what=name)


def test_every_error_status_is_counted_once_by_code(
    client: Client, deployment: Deployment
) -> None:
    """Refused by a frontend (validation), cut by the client's deadline, cancelled by the
    client: each counted once, by the router actor, whichever process ended it."""
    before = failure_counts(deployment)
    with pytest.raises(grpc.RpcError) as err:
        collect(client.generate(text="hi", temperature=-1.0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        collect(client.generate(text="Go on forever.", max_tokens=2000, temperature=0.0,
                                ignore_eos=True, timeout=1.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stream = client.generate(text="Write a very long essay about rivers.", max_tokens=400,
                             temperature=0.0, ignore_eos=True)
    for resp in stream:
        if resp.token_ids:
            break
    stream.cancel()
    want = {"INVALID_ARGUMENT": 1.0, "DEADLINE_EXCEEDED": 1.0, "CANCELLED": 1.0}

    def added() -> dict[str, float]:
        now = failure_counts(deployment)
        return {c: v - before.get(c, 0.0) for c, v in now.items() if v != before.get(c, 0.0)}

    wait_for(lambda: all(added().get(c, 0.0) >= 1 for c in want), what=f"{want} counted")
    wait_for(lambda: all_blocks_free(deployment), what="blocks freed")
    assert added() == want  # once each, and not again as the last reports land


def test_prompts_filling_whole_blocks(client: Client, hf_reference: HFReference,
                                      deployment: Deployment) -> None:
    # A prompt of exactly k blocks: the lease holds one more block for the first generated
    # token than the KV that arrives; the transfer must still be accepted the first time.
    for n in (16, 32, 64):
        ids = [(37 * i) % 4000 + 300 for i in range(n)]
        done = collect(client.generate(token_ids=ids, max_tokens=6, temperature=0.0))
        assert done.token_ids == hf_reference.greedy(ids, 6), n
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{deployment.metrics_port}/metrics", timeout=5).read().decode()
    retries = [line for line in body.splitlines()
               if line.startswith("pdserve:request_retries_total")]
    assert retries == ["pdserve:request_retries_total 0.0"]
