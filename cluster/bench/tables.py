"""The tables `pdserve bench` prints: a vLLM-style block per rate (with its steadiness check
and its SLO classes), and a line per rate of the sweep with the goodput."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pdserve.cluster.bench.report import Goodput, RunReport, fmt_rate

NOT_STEADY_STATE = ("Short windows (--smoke): NOT steady state. These figures measure how big "
                    "a burst the batch absorbs, not the rate the deployment sustains.")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _row(name: str, value: object) -> str:
    return f"{name:<40}{value!s:>20}"


def format_report(r: RunReport) -> str:
    """A vLLM-style block for one run."""
    title = f" {r.label}: request rate {fmt_rate(r.request_rate)} req/s "
    if r.max_concurrency is not None:
        title += f"(max concurrency {r.max_concurrency}) "
    lines = [title.center(60, "="),
             _row("Successful requests:", r.completed),
             _row("Failed requests:", r.failed)]
    if r.failed:
        lines.append(f"{'  by status:':<40}{', '.join(f'{k} {v}' for k, v in r.failures.items())}")
        lines.append(f"  first error: {r.first_error[:200]}")
    lines += [
        _row("Benchmark duration (s):", f"{r.duration_s:.2f}"),
        _row("Total input tokens:", r.total_input_tokens),
        _row("Total generated tokens:", r.total_output_tokens),
        _row("Request throughput (req/s):", f"{r.request_throughput:.2f}"),
        _row("Output token throughput (tok/s):", f"{r.output_throughput:.2f}"),
        _row("Total token throughput (tok/s):", f"{r.total_token_throughput:.2f}"),
    ]
    lines += _steady_lines(r)
    for name, s in (("TTFT", r.ttft), ("TPOT", r.tpot), ("ITL", r.itl), ("E2E latency", r.e2e)):
        lines.append(f" {name} (ms, counted) ".center(60, "-"))
        for stat, v in (("Mean", s.mean_ms), ("P50", s.p50_ms), ("P90", s.p90_ms),
                        ("P99", s.p99_ms)):
            lines.append(_row(f"{stat} {name} (ms):", _ms(v)))
    slo = f"TTFT<={_ms(r.slo_ttft_ms)} ms, TPOT<={_ms(r.slo_tpot_ms)} ms"
    if any(r.classes):  # requests sent with a named class: its objectives, or these over them
        slo = ("per class" if r.slo_ttft_ms is None and r.slo_tpot_ms is None
               else f"{slo} over each class's")
    lines += [f" SLO ({slo}, counted) ".center(60, "-"),
              _row("Attainment (both):", f"{r.attainment:.1%}"),
              _row("Attainment TTFT / TPOT:", f"{r.attainment_ttft:.1%} / {r.attainment_tpot:.1%}"),
              _row("SLO goodput throughput (req/s):", f"{r.slo_goodput_throughput:.2f}"),
              _row("Request goodput (req/s, all requests):", f"{r.request_goodput:.2f}")]
    lines += _class_lines(r)
    lines.append("=" * 60)
    return "\n".join(lines)


def _steady_lines(r: RunReport) -> list[str]:
    s = r.steadiness
    head = f" Steady state (after the first {r.warmup_fraction:.0%} of arrivals) "
    lines = [head.center(60, "-"),
             _row("Counted requests:", r.counted_requests),
             _row("Counted window (s):", f"{r.window_s:.2f}")]
    if s is None:
        return lines
    ratio = "" if s.completion_ratio is None else f" ({s.completion_ratio:.0%})"
    lines += [_row("Arrivals / answers (req/s):",
                   f"{_num(s.arrival_rate)} / {_num(s.answer_rate)}{ratio}"),
              _row("TTFT p50 first / last third (ms):",
                   f"{_num(s.ttft_p50_first_ms, '.1f')} / {_num(s.ttft_p50_last_ms, '.1f')}"),
              _row("Steady:", "yes" if s.steady else "NO")]
    if not s.steady:
        lines.append(f"  {s.reason}")
    return lines


def _class_lines(r: RunReport) -> list[str]:
    if not r.classes or list(r.classes) == [""]:
        return []
    head = (f"{'class':<12} {'TTFT/TPOT SLO':>14} {'req':>6} {'refused':>7} {'attain':>7} "
            f"{'good/s':>7}")
    lines = [" SLO classes (counted) ".center(60, "-"), head]
    for c in r.classes.values():
        slo = f"{_num(c.slo_ttft_ms, 'g')}/{_num(c.slo_tpot_ms, 'g')}"
        lines.append(f"{c.name or '(none)':<12} {slo:>14} {c.requests:>6} {c.refused:>7} "
                     f"{c.attainment:>7.1%} {c.goodput_throughput:>7.2f}")
    return lines


def format_sweep(reports: Sequence[RunReport], goodput: Goodput,
                 server: Mapping[str, Any] | None = None, steady_state: bool = True) -> str:
    """One line per rate, then the goodput."""
    head = (f"{'rate':>7} {'ok':>5} {'fail':>5} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} "
            f"{'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'ITL p99':>8} {'attain':>7} "
            f"{'good/s':>7} {'steady':>6}")
    lines = []
    if server:
        lines.append(f"server: scheduler {server.get('scheduler') or '?'}, mode "
                     f"{server.get('mode') or '?'}")
    lines += [head, "-" * len(head)]
    for r in reports:
        lines.append(
            f"{fmt_rate(r.request_rate):>7} {r.completed:>5} {r.failed:>5} "
            f"{r.request_throughput:>7.2f} {r.output_throughput:>10.1f} {_ms(r.ttft.p50_ms):>9} "
            f"{_ms(r.ttft.p99_ms):>9} {_ms(r.tpot.p50_ms):>9} {_ms(r.tpot.p99_ms):>9} "
            f"{_ms(r.itl.p99_ms):>8} {r.attainment:>7.1%} {r.slo_goodput_throughput:>7.2f} "
            f"{'yes' if r.steady else 'NO':>6}")
    rate = "none" if goodput.rate is None else f"{fmt_rate(goodput.rate)} req/s"
    lines.append(f"Goodput (>= {goodput.target:.0%} meet the SLOs, steady): {rate} "
                 f"({goodput.note})")
    for r in reports:
        if r.steadiness is not None and not r.steady:
            lines.append(f"  {fmt_rate(r.request_rate)} req/s not steady: {r.steadiness.reason}")
    if not steady_state:
        lines.append(NOT_STEADY_STATE)
    return "\n".join(lines)
