"""router.metrics: names, buckets, event methods, and the /metrics HTTP endpoint."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pdserve.router.metrics import ITL_BUCKETS, TTFT_BUCKETS, Metrics
from pdserve.router.slo import ValidSlo
from pdserve.router.slo_metrics import ERROR_BUCKETS, RATIO_BUCKETS


@pytest.fixture()
def metrics() -> Iterator[Metrics]:
    m = Metrics(CollectorRegistry())
    yield m
    m.stop_http_server()


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    assert v is not None, f"no sample {name}{labels}"
    return v


def test_exposed_names(metrics: Metrics) -> None:
    names = {s.name for f in metrics.registry.collect() for s in f.samples}
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds",
                 "kv_transfer_seconds", "time_per_output_token_seconds",
                 "request_kv_transfer_time_seconds", "request_first_decode_step_seconds",
                 "ttft_prediction_ratio", "tpot_prediction_ratio",
                 "ttft_prediction_relative_error", "tpot_prediction_relative_error"):
        for suffix in ("_bucket", "_count", "_sum"):
            assert f"pdserve:{hist}{suffix}" in names
    for name in ("num_requests_running", "num_requests_waiting", "prompt_tokens_total",
                 "generation_tokens_total", "kv_transfer_bytes_total", "slo_attained_total",
                 "slo_violated_total", "num_preemptions_total", "local_prefills_total",
                 "goodput_requests_total"):
        assert f"pdserve:{name}" in names, name
    assert not any(n.endswith("_total_total") for n in names)


def test_buckets(metrics: Metrics) -> None:
    def bounds(name: str) -> list[float]:
        fam = next(f for f in metrics.registry.collect() if f.name == name)
        return [float(s.labels["le"]) for s in fam.samples if s.name.endswith("_bucket")]

    assert bounds("pdserve:time_to_first_token_seconds") == [*TTFT_BUCKETS, float("inf")]
    assert bounds("pdserve:inter_token_latency_seconds") == [*ITL_BUCKETS, float("inf")]
    assert TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 2560.0 and len(TTFT_BUCKETS) == 22
    assert ITL_BUCKETS[0] == 0.01 and ITL_BUCKETS[-1] == 80.0 and len(ITL_BUCKETS) == 19


def test_events(metrics: Metrics) -> None:
    m = metrics
    m.observe_first_token(0.05, 0.01, 0.03)
    m.observe_first_token(0.5, 0.2, 0.1)
    m.observe_first_token(0.5, 0.2, 0.1)
    assert value(m, "pdserve:time_to_first_token_seconds_count") == 3
    assert value(m, "pdserve:time_to_first_token_seconds_bucket", le="0.06") == 1
    assert value(m, "pdserve:request_queue_time_seconds_sum") == pytest.approx(0.41)
    assert value(m, "pdserve:request_kv_transfer_time_seconds_count") == 0
    m.observe_request_transfer(0.002)
    assert value(m, "pdserve:request_kv_transfer_time_seconds_count") == 1
    m.observe_first_decode_step(0.03)
    assert value(m, "pdserve:request_first_decode_step_seconds_count") == 1
    assert value(m, "pdserve:request_first_decode_step_seconds_bucket", le="0.02") == 0
    assert value(m, "pdserve:request_first_decode_step_seconds_bucket", le="0.04") == 1

    m.observe_tokens([0.02, 0.03, 0.2])
    m.observe_tokens([])
    assert value(m, "pdserve:inter_token_latency_seconds_count") == 3
    assert value(m, "pdserve:inter_token_latency_seconds_bucket", le="0.05") == 2

    slo = ValidSlo(ttft_ms=100.0, tpot_ms=20.0)
    m.observe_finished("stop", 1.0, 0.9, 0.015, 10, 61, slo, 0.05)  # both met
    m.observe_finished("length", 2.0, 1.5, 0.025, 20, 61, slo, 0.5)  # both missed
    m.observe_finished("abort", 0.3, 0.0, 0.0, 30, 0, slo, None)  # nothing to judge
    m.observe_finished("stop", 0.1, 0.0, 0.0, 5, 1, ValidSlo(None, None), 0.1)
    c = "default"
    assert value(m, "pdserve:e2e_request_latency_seconds_count") == 4
    assert value(m, "pdserve:time_per_output_token_seconds_count") == 2  # only with >1 token
    assert value(m, "pdserve:prompt_tokens_total") == 65
    assert value(m, "pdserve:generation_tokens_total") == 123
    assert value(m, "pdserve:request_success_total", finished_reason="stop") == 2
    assert value(m, "pdserve:request_success_total", finished_reason="length") == 1
    assert value(m, "pdserve:request_success_total", finished_reason="abort") == 1
    for phase in ("ttft", "tpot"):
        assert value(m, "pdserve:slo_attained_total", slo_class=c, phase=phase) == 1
        assert value(m, "pdserve:slo_violated_total", slo_class=c, phase=phase) == 1
    assert value(m, "pdserve:goodput_requests_total", slo_class=c) == 1

    m.observe_failure(grpc.StatusCode.RESOURCE_EXHAUSTED)
    m.observe_failure("INVALID_ARGUMENT")
    m.observe_failure("INVALID_ARGUMENT")
    assert value(m, "pdserve:request_failure_total", code="RESOURCE_EXHAUSTED") == 1
    assert value(m, "pdserve:request_failure_total", code="INVALID_ARGUMENT") == 2

    m.set_queue(running=3, waiting=7)
    assert value(m, "pdserve:num_requests_running") == 3
    assert value(m, "pdserve:num_requests_waiting") == 7

    m.set_kv_usage("decode-0", 0.25)
    m.set_kv_usage("decode-1", 1.0)
    m.set_kv_usage("decode-0", 0.5)
    assert value(m, "pdserve:kv_cache_usage_perc", worker="decode-0") == 0.5
    m.forget_worker("decode-1")
    m.forget_worker("never-seen")
    assert m.registry.get_sample_value("pdserve:kv_cache_usage_perc",
                                       {"worker": "decode-1"}) is None

    m.observe_transfer(0.0015, 512 << 20)
    m.observe_transfer(0.003, 1 << 20)
    assert value(m, "pdserve:kv_transfer_seconds_count") == 2
    assert value(m, "pdserve:kv_transfer_bytes_total") == (512 << 20) + (1 << 20)

    m.observe_preemption()
    assert value(m, "pdserve:num_preemptions_total") == 1

    assert value(m, "pdserve:local_prefills_total") == 0
    m.observe_local_prefill()
    m.observe_local_prefill()
    assert value(m, "pdserve:local_prefills_total") == 2


def test_pool_and_autoscaler_metrics(metrics: Metrics) -> None:
    m = metrics
    get = m.registry.get_sample_value
    # Nothing reported yet: no pool series (not "zero workers"); decisions start at zero.
    assert get("pdserve:num_workers", {"role": "decode", "state": "serving"}) is None
    assert get("pdserve:autoscaler_target_workers", {"role": "decode"}) is None
    for role in ("prefill", "decode"):
        for direction in ("up", "down"):
            assert value(m, "pdserve:autoscaler_decisions_total", role=role,
                         direction=direction) == 0

    m.set_workers("decode", "serving", 2)
    m.set_workers("decode", "starting", 1)
    m.set_workers("prefill", "serving", 1)
    m.set_workers("decode", "starting", 0)
    m.set_workers("decode", "draining", 1)
    assert value(m, "pdserve:num_workers", role="decode", state="serving") == 2
    assert value(m, "pdserve:num_workers", role="decode", state="starting") == 0
    assert value(m, "pdserve:num_workers", role="decode", state="draining") == 1
    assert value(m, "pdserve:num_workers", role="prefill", state="serving") == 1
    assert get("pdserve:num_workers", {"role": "prefill", "state": "draining"}) is None

    m.set_autoscaler_target("decode", 3)
    m.set_autoscaler_target("prefill", 1)
    m.set_autoscaler_target("decode", 2)
    assert value(m, "pdserve:autoscaler_target_workers", role="decode") == 2
    assert value(m, "pdserve:autoscaler_target_workers", role="prefill") == 1

    m.observe_scaling("decode", "up")
    m.observe_scaling("decode", "up", 2)
    m.observe_scaling("prefill", "down")
    assert value(m, "pdserve:autoscaler_decisions_total", role="decode", direction="up") == 3
    assert value(m, "pdserve:autoscaler_decisions_total", role="decode", direction="down") == 0
    assert value(m, "pdserve:autoscaler_decisions_total", role="prefill",
                 direction="down") == 1
    names = {s.name for f in m.registry.collect() for s in f.samples}
    assert "pdserve:autoscaler_decisions_total" in names
    assert not any(n.startswith("pdserve:autoscaler_decisions_total_") for n in names)

    # Only the documented label values: a typo must not open a new series.
    for bad in (lambda: m.set_workers("router", "serving", 1),
                lambda: m.set_workers("decode", "stopped", 1),
                lambda: m.set_autoscaler_target("Decode", 1),
                lambda: m.observe_scaling("decode", "sideways")):
        with pytest.raises(ValueError):
            bad()
    assert get("pdserve:num_workers", {"role": "router", "state": "serving"}) is None

    # Pool series are per role, not per worker: forgetting a worker leaves them alone.
    m.forget_worker("decode-0")
    assert value(m, "pdserve:num_workers", role="decode", state="serving") == 2
    assert value(m, "pdserve:autoscaler_target_workers", role="decode") == 2


def test_slo_series_per_class_and_the_prediction_buckets() -> None:
    m = Metrics(CollectorRegistry(), slo_classes=("interactive", "batch"))
    names = {(s.name, tuple(sorted(s.labels.items())))
             for f in m.registry.collect() for s in f.samples}
    for cls in ("interactive", "batch"):
        assert ("pdserve:goodput_requests_total", (("slo_class", cls),)) in names
        for phase in ("ttft", "tpot"):
            for counter in ("slo_attained_total", "slo_violated_total"):
                assert (f"pdserve:{counter}", (("phase", phase), ("slo_class", cls))) in names
    assert not any(dict(labels).get("slo_class") == "default" for _, labels in names)

    def bounds(name: str) -> list[float]:
        fam = next(f for f in m.registry.collect() if f.name == name)
        return [float(s.labels["le"]) for s in fam.samples if s.name.endswith("_bucket")]

    for phase in ("ttft", "tpot"):
        assert bounds(f"pdserve:{phase}_prediction_ratio") == [*RATIO_BUCKETS, float("inf")]
        assert bounds(f"pdserve:{phase}_prediction_relative_error") == \
            [*ERROR_BUCKETS, float("inf")]
    assert RATIO_BUCKETS[0] == 0.25 and RATIO_BUCKETS[-1] == 4.0 and 1.0 in RATIO_BUCKETS
    assert ERROR_BUCKETS[0] == 0.01 and ERROR_BUCKETS[-1] == 2.0


def test_goodput_attainment_and_prediction_error() -> None:
    m = Metrics(CollectorRegistry(), slo_classes=("interactive",))
    fast = ValidSlo(ttft_ms=100.0, tpot_ms=20.0, class_name="interactive")
    # TTFT 50 ms predicted 100 ms (ratio 0.5, error 1.0); TPOT 10 ms predicted 10 ms.
    m.observe_finished("stop", 1.0, 0.9, 0.010, 10, 5, fast, 0.05,
                       predicted_ttft_s=0.1, predicted_tpot_s=0.010)
    # An abort is never judged, but its measurements still audit the predictions.
    m.observe_finished("abort", 1.0, 0.9, 0.010, 10, 5, fast, 0.05,
                       predicted_ttft_s=0.025, predicted_tpot_s=None)
    # Predictions of 0 or infinity are none; one-token answers have no TPOT.
    m.observe_finished("length", 1.0, 0.0, 0.0, 10, 1, fast, 0.2,
                       predicted_ttft_s=float("inf"), predicted_tpot_s=0.01)
    m.observe_finished("length", 1.0, 0.0, 0.0, 10, 1, fast, 0.2, predicted_ttft_s=0.0)
    assert value(m, "pdserve:goodput_requests_total", slo_class="interactive") == 1
    assert value(m, "pdserve:slo_attained_total", slo_class="interactive", phase="ttft") == 1
    assert value(m, "pdserve:slo_violated_total", slo_class="interactive", phase="ttft") == 2
    assert value(m, "pdserve:slo_attained_total", slo_class="interactive", phase="tpot") == 1
    assert value(m, "pdserve:slo_violated_total", slo_class="interactive", phase="tpot") == 0
    assert value(m, "pdserve:ttft_prediction_ratio_count") == 2
    assert value(m, "pdserve:ttft_prediction_ratio_sum") == pytest.approx(0.5 + 2.0)
    assert value(m, "pdserve:ttft_prediction_ratio_bucket", le="0.5") == 1
    assert value(m, "pdserve:ttft_prediction_relative_error_sum") == pytest.approx(1.0 + 0.5)
    assert value(m, "pdserve:tpot_prediction_ratio_count") == 1
    assert value(m, "pdserve:tpot_prediction_ratio_bucket", le="0.9") == 0
    assert value(m, "pdserve:tpot_prediction_ratio_bucket", le="1.0") == 1
    assert value(m, "pdserve:tpot_prediction_relative_error_bucket", le="0.01") == 1
    # A class the metrics were not told of gets its series when first used.
    m.observe_finished("stop", 1.0, 0.9, 0.010, 10, 5, ValidSlo(100.0, None, "other"), 0.05)
    assert value(m, "pdserve:goodput_requests_total", slo_class="other") == 1


def test_registries_are_independent() -> None:
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.observe_preemption()
    assert value(a, "pdserve:num_preemptions_total") == 1
    assert value(b, "pdserve:num_preemptions_total") == 0


def test_http_endpoint(metrics: Metrics) -> None:
    m = metrics
    port = m.start_http_server(0, "127.0.0.1")
    assert port > 0
    with pytest.raises(RuntimeError, match="already running"):
        m.start_http_server(0, "127.0.0.1")
    m.observe_first_token(0.05, 0.01, 0.03)
    m.observe_first_token(3.0, 1.0, 1.5)
    m.observe_tokens([0.02] * 5)
    m.observe_finished("stop", 1.0, 0.9, 0.02, 10, 6, ValidSlo(None, 50.0), 0.05)

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text) for s in fam.samples
    }
    assert samples[("pdserve:time_to_first_token_seconds_count", ())] == 2
    assert samples[("pdserve:time_to_first_token_seconds_bucket", (("le", "0.06"),))] == 1
    assert samples[("pdserve:inter_token_latency_seconds_count", ())] == 5
    assert samples[("pdserve:e2e_request_latency_seconds_count", ())] == 1
    assert samples[("pdserve:request_decode_time_seconds_count", ())] == 1
    assert samples[("pdserve:time_per_output_token_seconds_count", ())] == 1
    assert samples[("pdserve:request_success_total", (("finished_reason", "stop"),))] == 1
    default = ("slo_class", "default")
    assert samples[("pdserve:slo_attained_total", (("phase", "tpot"), default))] == 1
    assert samples[("pdserve:slo_violated_total", (("phase", "ttft"), default))] == 0
    assert samples[("pdserve:goodput_requests_total", (default,))] == 1

    # What Prometheus asks for: OpenMetrics first. prometheus_client's OpenMetrics output
    # turns the colons of sample names into underscores; /metrics answers in the classic
    # text format instead, so the names stay those the dashboard queries.
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
        "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    assert "\npdserve:time_to_first_token_seconds_count 2.0\n" in text
    assert "pdserve_" not in text and "# EOF" not in text

    m.stop_http_server()
    m.stop_http_server()  # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
