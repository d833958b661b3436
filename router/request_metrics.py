"""What the router records in ``Metrics`` of a request's end and of its KV transfer.

Every admitted request ends once, on the router: with a finish reason (``finished``: the
latency histograms, token counters, ``request_success_total``, the SLO judgement and the
prediction error) or with an error status (``failed``: ``request_failure_total{code}``
only). A client that went away counts as a failure with the status its call ended with
(CANCELLED, DEADLINE_EXCEEDED), not as finished.

The per-request KV transfer histogram takes one transfer per request: the first that a
prefill worker reports done for the request's current attempt. That report comes after the
first token, and may come after the request ended (a short answer can finish on its decode
worker before the prefill worker hears that its send completed): an ended request whose
transfer is still to be reported is remembered by (request id, transfer id), a bounded
number of them, until the report comes.
"""

from __future__ import annotations

from collections.abc import Container

from pdserve.engine.messages import FirstToken, TransferDone
from pdserve.router.metrics import Metrics
from pdserve.router.request import Request

# Ended requests whose transfer report is still to come; a report that never comes (its
# prefill worker died) leaves its entry until this many newer ones pushed it out.
LATE_TRANSFERS_MAX = 4096


class RequestMetrics:
    """The router's per-request observations, into ``metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # (request id, transfer id) of ended requests awaiting their transfer report, oldest
        # first (a dict keeps insertion order).
        self._late: dict[tuple[str, int], None] = {}

    def transfer_done(self, req: Request | None, msg: TransferDone) -> None:
        """A prefill worker's transfer report; ``req``: the request of that id in flight,
        if any (perhaps a later one that reuses the id)."""
        key = (msg.request_id, msg.transfer_id)
        if key in self._late:
            del self._late[key]
            if msg.ok:
                self.metrics.observe_request_transfer(msg.seconds)
            return
        if msg.ok and req is not None and not req.transfer_observed \
                and req.lease is not None and req.lease.transfer_id == msg.transfer_id:
            req.transfer_observed = True
            self.metrics.observe_request_transfer(msg.seconds)

    def prefilled(self, msg: FirstToken, decode_workers: Container[str]) -> None:
        """An attempt's prompt was prefilled (its first token): the prefix cache's queries
        and hits, labelled by the role of the worker that prefilled it."""
        role = "decode" if msg.worker in decode_workers else "prefill"
        self.metrics.observe_prefix_cache(role, msg.num_tokens, msg.cached_tokens)

    def finished(self, req: Request, reason: str, now: float) -> None:
        """``req`` ended with finish reason ``reason`` (``stop``, ``length``, ``abort``)."""
        self._await_transfer(req)
        n = len(req.output_ids)
        tpot = (req.t_last - req.t_first) / (n - 1) if n > 1 and req.t_first else 0.0
        ttft = req.t_first - req.arrival if req.t_first else None
        self.metrics.observe_finished(
            reason=reason, e2e_s=now - req.arrival,
            decode_s=(req.t_last - req.t_first) if req.t_first else 0.0, mean_tpot_s=tpot,
            prompt_tokens=len(req.prompt_ids), completion_tokens=n,
            slo=req.slo, ttft_s=ttft,
            predicted_ttft_s=req.predicted_ttft_s, predicted_tpot_s=req.predicted_tpot_s,
        )

    def failed(self, req: Request, code: str) -> None:
        """``req`` ended with the gRPC status ``code`` (or its client went away with it)."""
        self._await_transfer(req)
        self.metrics.observe_failure(code)

    def _await_transfer(self, req: Request) -> None:
        # The prefill worker sent the current attempt's first token, so its transfer report
        # is on its way (done or failed); a prompt still prefilling when the request ended
        # is dropped there unreported.
        if req.transfer_observed or req.lease is None or not req.prefill_worker \
                or req.awaiting_first:
            return
        self._late[(req.request_id, req.lease.transfer_id)] = None
        if len(self._late) > LATE_TRANSFERS_MAX:
            del self._late[next(iter(self._late))]
