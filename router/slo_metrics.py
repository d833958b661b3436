"""The SLO part of the router's metrics: goodput and attainment per SLO class, and how far
the cost model's predictions fell from what happened (so the model can be audited).

Judged once per request, when it ends with a finish reason (``Metrics.observe_finished``):

- ``slo_attained_total{slo_class,phase}`` / ``slo_violated_total{slo_class,phase}``: a
  request that finished (``stop`` or ``length``) with an objective for the phase (``ttft``,
  ``tpot``) and a measurement of it (TTFT: always; TPOT: two tokens or more) counts in one
  of the two.
- ``goodput_requests_total{slo_class}``: a request that finished with at least one
  objective and missed none (a phase without an objective, or a TPOT a one-token answer
  cannot have, counts as met). A request without any objective is throughput, not goodput:
  it is counted in ``request_success_total`` only.
- A request ended by an abort (finish reason ``abort``: the Abort RPC) or with an error
  status (``request_failure_total{code}``: refused, failed, deadline, client gone) is judged
  in none of them: never attained, and not counted as violated either, so attainment is
  the share of *finished* requests that met the objective; what did not finish shows in
  the success and failure counters beside it.

``slo_class`` is the class the request was scheduled by: the one it named, or the server's
default class. A request's own ``slo.ttft_ms`` / ``slo.tpot_ms`` override its class's
objectives and are judged under that class's label (validation gives every request a class,
so there is no label for "no class"). Every configured class's series exist from the start
(zeros), so ``rate()`` works before the first request of a class.

Predictions (``*_prediction_ratio`` = actual / predicted, ``*_prediction_relative_error`` =
|predicted - actual| / actual) are observed for every request that ends with a finish
reason, aborts included (the measurement is as good), whose phase was both predicted by the
cost model (``Request.predicted_ttft_s``: at admission, from arrival; ``predicted_tpot_s``:
at its last dispatch) and measured. Predictions that are not finite and positive are
skipped (no prediction to audit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

from pdserve.router.slo import ValidSlo

SLO_PHASES = ("ttft", "tpot")

# actual / predicted: 1 is a perfect prediction; 2 means it took twice as long as predicted.
# Reciprocal pairs around 1, so over- and under-prediction read alike.
RATIO_BUCKETS = (0.25, 0.33, 0.5, 0.67, 0.8, 0.9, 1.0, 1.11, 1.25, 1.5, 2.0, 3.0, 4.0)
# |predicted - actual| / actual: 0.1 is 10% off.
ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


class SloMetrics:
    """Goodput, attainment and prediction-error metrics, registered on ``registry`` with
    ``prefix``; ``slo_classes``: the class names whose series start at zero."""

    def __init__(self, registry: CollectorRegistry, prefix: str,
                 slo_classes: Sequence[str]) -> None:
        def counter(name: str, doc: str, labels: Sequence[str]) -> Counter:
            return Counter(prefix + name, doc, labelnames=labels, registry=registry)

        def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(prefix + name, doc, buckets=buckets, registry=registry)

        self.goodput = counter(
            "goodput_requests",
            "Requests that finished (stop or length) meeting every objective they had "
            "(at least one).", ("slo_class",))
        self.attained = counter("slo_attained",
                                "Finished requests that met their objective for a phase.",
                                ("slo_class", "phase"))
        self.violated = counter("slo_violated",
                                "Finished requests that missed their objective for a phase.",
                                ("slo_class", "phase"))
        self.ratio = {
            phase: hist(f"{phase}_prediction_ratio",
                        f"Actual over predicted {phase.upper()} of a request (1: exact).",
                        RATIO_BUCKETS)
            for phase in SLO_PHASES
        }
        self.error = {
            phase: hist(f"{phase}_prediction_relative_error",
                        f"|predicted - actual| / actual {phase.upper()} of a request.",
                        ERROR_BUCKETS)
            for phase in SLO_PHASES
        }
        for name in slo_classes:
            self.goodput.labels(slo_class=name)
            for phase in SLO_PHASES:
                self.attained.labels(slo_class=name, phase=phase)
                self.violated.labels(slo_class=name, phase=phase)

    def judge(self, slo: ValidSlo, ttft_s: float | None, tpot_s: float | None) -> None:
        """A finished request's measured TTFT and mean TPOT (None: not measured) against
        its objectives."""
        missed = False
        for phase, objective_ms, actual_s in (("ttft", slo.ttft_ms, ttft_s),
                                              ("tpot", slo.tpot_ms, tpot_s)):
            if not objective_ms or actual_s is None:
                continue
            met = actual_s * 1e3 <= objective_ms
            missed = missed or not met
            (self.attained if met else self.violated).labels(
                slo_class=slo.class_name, phase=phase).inc()
        if (slo.ttft_ms or slo.tpot_ms) and not missed:
            self.goodput.labels(slo_class=slo.class_name).inc()

    def observe_prediction(self, phase: str, predicted_s: float | None,
                           actual_s: float | None) -> None:
        """One phase's prediction against its measurement (either None: nothing to do)."""
        if predicted_s is None or actual_s is None or actual_s <= 0 \
                or not (0 < predicted_s < math.inf):
            return
        self.ratio[phase].observe(actual_s / predicted_s)
        self.error[phase].observe(abs(predicted_s - actual_s) / actual_s)
