"""Every Prometheus metric of pdserve, owned by one object on the router.

Names follow vLLM's with a `pdserve:` prefix, so its dashboards carry over. Workers do not
export metrics themselves: their figures ride on the messages they already send the router,
which records them here. All durations are seconds from monotonic clocks read in one process.

prometheus_client appends `_total` to counter names itself (and strips it if given), so the
counters below are declared without it and exposed as e.g. `pdserve:prompt_tokens_total`.
Colons are legal in metric names (reserved for recording rules by convention, used by vLLM).

/metrics always answers in the classic text format (0.0.4), whatever the scraper asks for:
prometheus_client's OpenMetrics output, which Prometheus asks for first, turns the colon of
every sample name into an underscore (``pdserve_...``, while its HELP and TYPE lines keep
``pdserve:...``; prometheus/client_python#1177), so no query of the dashboard would match.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from pdserve.router.slo import DEFAULT_CLASS, ValidSlo
from pdserve.router.slo_metrics import SloMetrics

PREFIX = "pdserve:"
ABORT = "abort"  # the finish reason of an aborted request: never judged against its SLO

# vLLM's buckets.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)
# One request's KV over NVLink takes about a millisecond (512 MiB: 1.5 ms), over a network
# up to seconds.
KV_TRANSFER_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)

# The label values of the pool and autoscaler series (anything else is a bug: ValueError).
ROLES = ("prefill", "decode")
WORKER_STATES = ("serving", "draining", "starting")
SCALING_DIRECTIONS = ("up", "down")


class Metrics:
    """The router's metrics, registered on `registry` (never the global default one, so that
    tests and several routers in one process each have their own). `slo_classes`: the SLO
    class names whose per-class series exist from the start (see `router.slo_metrics`)."""

    def __init__(self, registry: CollectorRegistry,
                 slo_classes: Sequence[str] = (DEFAULT_CLASS,)) -> None:
        self.registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

        def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=registry)

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labelnames=labels, registry=registry)

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, labelnames=labels, registry=registry)

        # Latency histograms. TTFT = queue + prefill + the rest (routing, streaming); the KV
        # transfer ends after the first token on pdserve's path (the prefill worker streams
        # the token first), inside the first decode step. The split shares TTFT's buckets.
        self.ttft = hist("time_to_first_token_seconds",
                         "Time from request arrival to its first token.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds",
                        "Time between consecutive tokens of a request.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds",
                        "Time from request arrival to its last token.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds",
                               "Time a request waited for admission and a prefill worker.",
                               TTFT_BUCKETS)
        self.prefill_time = hist("request_prefill_time_seconds",
                                 "Prompt forward time of a request on its prefill worker.",
                                 TTFT_BUCKETS)
        self.decode_time = hist("request_decode_time_seconds",
                                "Time from a request's first token to its last.",
                                REQUEST_LATENCY_BUCKETS)
        self.request_transfer_time = hist(
            "request_kv_transfer_time_seconds",
            "Time a request's KV cache took to leave its prefill worker for its decode "
            "worker, once per request (a decode worker's own prefill has no transfer).",
            KV_TRANSFER_BUCKETS,
        )
        self.first_decode_step = hist(
            "request_first_decode_step_seconds",
            "Time from a request's first token to its second, as the router receives them "
            "(the KV transfer's end, the decode worker taking the request in, its first "
            "decode step).", TTFT_BUCKETS)
        self.kv_transfer_time = hist("kv_transfer_seconds",
                                     "Duration of one KV cache transfer, prefill to decode.",
                                     KV_TRANSFER_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds",
                         "Mean time per output token after the first, per request.",
                         ITL_BUCKETS)

        # Load.
        self.running = gauge("num_requests_running", "Requests prefilling or decoding.")
        self.waiting = gauge("num_requests_waiting", "Requests queued for admission.")
        self.kv_usage = gauge("kv_cache_usage_perc",
                              "Fraction of a worker's KV cache blocks in use (1 = full).",
                              ("worker",))

        # Counters.
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of ended requests.")
        self.generation_tokens = counter("generation_tokens",
                                         "Generated tokens of ended requests.")
        self.success = counter("request_success",
                               "Requests that ended with a finish reason.", ("finished_reason",))
        self.failure = counter("request_failure",
                               "Requests that ended with a gRPC error status.", ("code",))
        self.kv_transfer_bytes = counter("kv_transfer_bytes",
                                         "KV cache bytes moved from prefill to decode workers.")
        self.preemptions = counter("num_preemptions",
                                   "Sequences a decode worker handed back for recompute.")
        self.retries = counter("request_retries",
                               "Re-dispatches after a failed or refused KV transfer or an "
                               "expired lease (preemptions not included).")
        self.local_prefills = counter(
            "local_prefills",
            "Prompts the router had their decode worker prefill instead of a prefill worker "
            "(conditional disaggregation; re-dispatches included, colocated mode not counted).")
        # The prefix cache (vLLM's names): per role of the worker that prefilled (a decode
        # worker: its own prefill), in tokens; the hit rate is hits / queries.
        self.prefix_queries = counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache of the worker that prefilled them "
            "(every attempt, re-prefills after a preemption included).", ("role",))
        self.prefix_hits = counter(
            "prefix_cache_hits",
            "Prompt tokens found in the prefix cache of the worker that prefilled them (not "
            "computed).", ("role",))
        for role in ROLES:
            self.prefix_queries.labels(role=role)
            self.prefix_hits.labels(role=role)
        # Pools (they grow and shrink at runtime) and the autoscaler. Not per worker: a
        # removed worker leaves nothing behind for `forget_worker`. The gauges appear when
        # first set (no pool reported yet reads as no data, not as zero workers); the
        # decisions start at zero for every role and direction, so rate() works from the start.
        self.num_workers = gauge("num_workers",
                                 "Workers of a pool (role) in a state: serving, draining "
                                 "(finishing what it holds, taking nothing new), starting.",
                                 ("role", "state"))
        self.autoscaler_target = gauge("autoscaler_target_workers",
                                       "Workers the autoscaler wants in a pool (role).",
                                       ("role",))
        self.autoscaler_decisions = counter("autoscaler_decisions",
                                            "Autoscaler decisions to grow (up) or shrink "
                                            "(down) a pool (role).", ("role", "direction"))
        for role in ROLES:
            for direction in SCALING_DIRECTIONS:
                self.autoscaler_decisions.labels(role=role, direction=direction)
        # Goodput, attainment per class and phase, prediction error.
        self.slo = SloMetrics(registry, PREFIX, slo_classes)

    # ------------------------------------------------------------------ events

    def observe_first_token(self, ttft_s: float, queue_s: float, prefill_s: float) -> None:
        """A request's first token reached the router, `ttft_s` after its arrival, having
        waited `queue_s` for admission and a worker and taken `prefill_s` to prefill."""
        self.ttft.observe(ttft_s)
        self.queue_time.observe(queue_s)
        self.prefill_time.observe(prefill_s)

    def observe_first_decode_step(self, seconds: float) -> None:
        """A request's second token reached the router, `seconds` after its first."""
        self.first_decode_step.observe(seconds)

    def observe_request_transfer(self, seconds: float) -> None:
        """The KV transfer of a request, as its prefill worker timed it (from the header to
        the last byte leaving; layer-wise streaming overlaps it with the prompt's forward
        pass). Once per request: see `RequestMetrics.transfer_done`."""
        self.request_transfer_time.observe(seconds)

    def observe_tokens(self, itl_values: Sequence[float]) -> None:
        """Inter-token latencies of the tokens in one decode-step message (any requests)."""
        observe = self.itl.observe
        for v in itl_values:
            observe(v)

    def observe_finished(
        self,
        reason: str,
        e2e_s: float,
        decode_s: float,
        mean_tpot_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        slo: ValidSlo,
        ttft_s: float | None,
        predicted_ttft_s: float | None = None,
        predicted_tpot_s: float | None = None,
    ) -> None:
        """A request ended with a finish reason ("stop", "length", "abort").

        SLOs are judged on what was measured: TTFT if a first token came (`ttft_s` not None),
        TPOT if there were at least two tokens; a phase with no objective is not counted; an
        aborted request is not judged at all (`router.slo_metrics`). The predictions (None:
        none made) are compared with the same measurements.
        """
        self.e2e.observe(e2e_s)
        self.decode_time.observe(decode_s)
        if completion_tokens > 1:
            self.tpot.observe(mean_tpot_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.success.labels(finished_reason=reason).inc()
        tpot_s = mean_tpot_s if completion_tokens > 1 else None
        if reason != ABORT:
            self.slo.judge(slo, ttft_s, tpot_s)
        self.slo.observe_prediction("ttft", predicted_ttft_s, ttft_s)
        self.slo.observe_prediction("tpot", predicted_tpot_s, tpot_s)

    def observe_failure(self, code: grpc.StatusCode | str) -> None:
        """A request ended with an error status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
        DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE, ...), refused or after admission; counted
        once per request, by whichever process ended it (see `router.server`)."""
        name = code.name if isinstance(code, grpc.StatusCode) else code
        self.failure.labels(code=name).inc()

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def set_kv_usage(self, worker: str, frac: float) -> None:
        """Fraction (0..1, as vLLM's `kv_cache_usage_perc`) of `worker`'s KV blocks in use."""
        self.kv_usage.labels(worker=worker).set(frac)

    def forget_worker(self, worker: str) -> None:
        """Drop a removed worker's series."""
        with contextlib.suppress(KeyError):  # never reported, or already forgotten
            self.kv_usage.remove(worker)

    def set_workers(self, role: str, state: str, n: int) -> None:
        """`n` workers of the `role` pool ("prefill", "decode") are in `state` ("serving",
        "draining", "starting"); set every state of a pool when it changes."""
        _check("role", role, ROLES)
        _check("state", state, WORKER_STATES)
        self.num_workers.labels(role=role, state=state).set(n)

    def set_autoscaler_target(self, role: str, n: int) -> None:
        """The autoscaler wants `n` workers in the `role` pool."""
        _check("role", role, ROLES)
        self.autoscaler_target.labels(role=role).set(n)

    def observe_scaling(self, role: str, direction: str, n: int = 1) -> None:
        """The autoscaler decided to grow ("up") or shrink ("down") the `role` pool: `n`
        (default 1) more in the count."""
        _check("role", role, ROLES)
        _check("direction", direction, SCALING_DIRECTIONS)
        self.autoscaler_decisions.labels(role=role, direction=direction).inc(n)

    def observe_transfer(self, seconds: float, nbytes: int) -> None:
        """One KV transfer completed (first prefill or a recompute after preemption)."""
        self.kv_transfer_time.observe(seconds)
        self.kv_transfer_bytes.inc(nbytes)

    def observe_preemption(self) -> None:
        self.preemptions.inc()

    def observe_retry(self) -> None:
        self.retries.inc()

    def observe_prefix_cache(self, role: str, queried: int, hits: int) -> None:
        """A worker of ``role`` prefilled a prompt of ``queried`` tokens, ``hits`` of them
        found in its prefix cache."""
        _check("role", role, ROLES)
        self.prefix_queries.labels(role=role).inc(queried)
        self.prefix_hits.labels(role=role).inc(hits)

    def observe_local_prefill(self) -> None:
        """A disaggregated deployment's router sent a prompt to its decode worker."""
        self.local_prefills.inc()

    # ------------------------------------------------------------------ exposition

    def start_http_server(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics of this registry on a daemon thread, in the classic text format
        (see the module's docstring); return the port bound (pass 0 to pick a free one)."""
        if self._server is not None:
            raise RuntimeError("the metrics HTTP server is already running")
        family, _, _, _, sockaddr = socket.getaddrinfo(
            addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

        class Server(_ThreadingWSGIServer):
            address_family = family

        server = make_server(str(sockaddr[0]), port, _classic_text_app(self.registry), Server,
                             handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name="pdserve-metrics",
                                  daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        return int(server.server_port)

    def stop_http_server(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None


_WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _classic_text_app(registry: CollectorRegistry) -> _WsgiApp:
    """prometheus_client's /metrics app, answering every request as one that asked for no
    format in particular: the classic text format, colons kept."""
    app = make_wsgi_app(registry)

    def classic(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ.pop("HTTP_ACCEPT", None)
        return app(environ, start_response)

    return classic


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """A thread per scrape (as prometheus_client's own server), never waited for at exit."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no line per scrape on stderr
        pass


def _check(label: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{label} must be one of {allowed}, got {value!r}")
