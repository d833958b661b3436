"""`pdserve bench compare A.json B.json`: two saved results side by side, per offered rate
(the rates both ran, matched by value): SLO goodput throughput (counted requests meeting
their objectives per second of the counted window) of A and of B and the ratio B/A, in total
and per SLO class. At a fixed offered rate this is the figure that tells two schedulers
apart (e.g. A run against `pdserve serve --scheduler fifo`, B against `--scheduler slo`).

Each result is rescored from its own per-request records with its own objectives and warm-up
share, so files written by older versions compare too (their whole window counted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.cluster.bench.classes import Objectives
from pdserve.cluster.bench.records import RequestRecord, Slo
from pdserve.cluster.bench.report import RunReport, fmt_rate, make_report

TOTAL = "total"


@dataclass(frozen=True)
class Side:
    """One result: its label, what served it, and its runs rescored, by offered rate."""

    label: str
    scheduler: str
    mode: str
    steady_state: bool
    objectives: Objectives
    runs: dict[float, RunReport]


def side(result: Mapping[str, Any]) -> Side:
    objectives = Objectives.from_result(result)
    warmup = float(result.get("config", {}).get("warmup_fraction", 0.0))
    runs: dict[float, RunReport] = {}
    for run in result["runs"]:
        rate = float(run["report"]["request_rate"])
        records = [RequestRecord.from_json(r) for r in run["requests"]]
        runs[rate] = make_report(str(result.get("label", "")), rate, 1.0, None, records,
                                 objectives, warmup)
    server = result.get("server") or {}
    return Side(str(result.get("label", "")), str(server.get("scheduler") or "?"),
                str(server.get("mode") or "?"), bool(result.get("steady_state", False)),
                objectives, runs)


def ratio(a: float, b: float) -> str:
    if a > 0:
        return f"{b / a:.2f}"
    return "-" if b == 0 else "inf"


def goodput_by_class(rep: RunReport) -> dict[str, float]:
    """Total, then each named class (a run sent without classes has the total only)."""
    out = {TOTAL: rep.slo_goodput_throughput}
    out.update({name: c.goodput_throughput for name, c in rep.classes.items() if name})
    return out


def _match(rate: float, rates: list[float]) -> float | None:
    return next((r for r in rates if r == rate or math.isclose(r, rate, rel_tol=1e-9)), None)


def compare_results(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """The comparison table (markdown) and its notes."""
    sa, sb = side(a), side(b)
    lines = [f"A: {sa.label} (scheduler {sa.scheduler}, mode {sa.mode})",
             f"B: {sb.label} (scheduler {sb.scheduler}, mode {sb.mode})", "",
             "| rate req/s | class | A goodput req/s | B goodput req/s | B/A |",
             "|---|---|---|---|---|"]
    b_rates = sorted(sb.runs)
    matched: list[float] = []
    unsteady: list[str] = []
    for rate in sorted(sa.runs):
        rb = _match(rate, b_rates)
        if rb is None:
            continue
        matched.append(rb)
        ra_rep, rb_rep = sa.runs[rate], sb.runs[rb]
        ga, gb = goodput_by_class(ra_rep), goodput_by_class(rb_rep)
        star = "" if ra_rep.steady and rb_rep.steady else " *"
        for which, rep in (("A", ra_rep), ("B", rb_rep)):
            if not rep.steady and rep.steadiness is not None:
                unsteady.append(f"{which} at {fmt_rate(rate)} req/s: {rep.steadiness.reason}")
        for name in [TOTAL, *sorted((set(ga) | set(gb)) - {TOTAL})]:
            va, vb = ga.get(name, 0.0), gb.get(name, 0.0)
            lines.append(f"| {fmt_rate(rate)}{star} | {name} | {va:.2f} | {vb:.2f} | "
                         f"{ratio(va, vb)} |")
    if not matched:
        lines.append("| - | - | - | - | - |")
    lines.append("")
    lines.append("Goodput: counted requests meeting their objectives per second of the counted "
                 "window (after each rate's warm-up share); B/A: B over A.")
    only_a = [fmt_rate(r) for r in sorted(sa.runs) if _match(r, b_rates) is None]
    only_b = [fmt_rate(r) for r in b_rates if r not in matched]
    for who, rates in (("A", only_a), ("B", only_b)):
        if rates:
            lines.append(f"- rates in {who} only (not compared): {', '.join(rates)} req/s")
    for note in unsteady:
        lines.append(f"- * not steady, {note}")
    for who, s in (("A", sa), ("B", sb)):
        if not s.steady_state:
            lines.append(f"- {who} ran short windows (--smoke or an older version): not "
                         "steady state")
    if sa.objectives != sb.objectives:
        lines.append("- the two results scored their requests against different objectives "
                     f"(A: {_objectives(sa.objectives)}; B: {_objectives(sb.objectives)})")
    return "\n".join(lines)


def _objectives(o: Objectives) -> str:
    def one(s: Slo) -> str:
        return f"{s.ttft_ms or '-'}/{s.tpot_ms or '-'} ms"

    parts = [f"{k} {one(v)}" for k, v in sorted(o.by_class.items())]
    return ", ".join(parts) or f"all {one(o.fallback)}"
