"""How `pdserve bench` results look: the printed tables, and PNG figures that overlay several
configurations (one result JSON each): SLO attainment against request rate, and TTFT/TPOT CDFs
at one rate. `pdserve bench plot A.json B.json --out DIR` draws them from saved results."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.cluster.bench.records import RequestRecord
from pdserve.cluster.bench.report import Goodput, RunReport, fmt_rate

ATTAINMENT_PNG = "slo_attainment.png"
CDF_PNG = "latency_cdf.png"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_report(r: RunReport) -> str:
    """A vLLM-style block for one run."""
    title = f" {r.label}: request rate {fmt_rate(r.request_rate)} req/s "
    if r.max_concurrency is not None:
        title += f"(max concurrency {r.max_concurrency}) "
    lines = [title.center(60, "="),
             f"{'Successful requests:':<40}{r.completed:>20}",
             f"{'Failed requests:':<40}{r.failed:>20}"]
    if r.failed:
        lines.append(f"{'  by status:':<40}{', '.join(f'{k} {v}' for k, v in r.failures.items())}")
        lines.append(f"  first error: {r.first_error[:200]}")
    lines += [
        f"{'Benchmark duration (s):':<40}{r.duration_s:>20.2f}",
        f"{'Total input tokens:':<40}{r.total_input_tokens:>20}",
        f"{'Total generated tokens:':<40}{r.total_output_tokens:>20}",
        f"{'Request throughput (req/s):':<40}{r.request_throughput:>20.2f}",
        f"{'Output token throughput (tok/s):':<40}{r.output_throughput:>20.2f}",
        f"{'Total token throughput (tok/s):':<40}{r.total_token_throughput:>20.2f}",
    ]
    for name, s in (("TTFT", r.ttft), ("TPOT", r.tpot), ("ITL", r.itl), ("E2E latency", r.e2e)):
        lines.append(f" {name} (ms) ".center(60, "-"))
        for stat, v in (("Mean", s.mean_ms), ("P50", s.p50_ms), ("P90", s.p90_ms),
                        ("P99", s.p99_ms)):
            lines.append(f"{stat + ' ' + name + ' (ms):':<40}{_ms(v):>20}")
    slo = f"TTFT<={_ms(r.slo_ttft_ms)} ms, TPOT<={_ms(r.slo_tpot_ms)} ms"
    lines += [f" SLO ({slo}) ".center(60, "-"),
              f"{'Attainment (both, all requests):':<40}{r.attainment:>20.1%}",
              f"{'Attainment TTFT / TPOT:':<40}"
              f"{f'{r.attainment_ttft:.1%} / {r.attainment_tpot:.1%}':>20}",
              f"{'Request goodput (req/s):':<40}{r.request_goodput:>20.2f}", "=" * 60]
    return "\n".join(lines)


def format_sweep(reports: Sequence[RunReport], goodput: Goodput) -> str:
    """One line per rate, then the goodput."""
    head = (f"{'rate':>7} {'ok':>5} {'fail':>5} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} "
            f"{'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'ITL p99':>8} {'attain':>7}")
    lines = [head, "-" * len(head)]
    for r in reports:
        lines.append(
            f"{fmt_rate(r.request_rate):>7} {r.completed:>5} {r.failed:>5} "
            f"{r.request_throughput:>7.2f} {r.output_throughput:>10.1f} {_ms(r.ttft.p50_ms):>9} "
            f"{_ms(r.ttft.p99_ms):>9} {_ms(r.tpot.p50_ms):>9} {_ms(r.tpot.p99_ms):>9} "
            f"{_ms(r.itl.p99_ms):>8} {r.attainment:>7.1%}")
    rate = "none" if goodput.rate is None else f"{fmt_rate(goodput.rate)} req/s"
    lines.append(f"Goodput (>= {goodput.target:.0%} meet the SLOs): {rate} ({goodput.note})")
    return "\n".join(lines)


def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Result files written by `pdserve bench --result-json`."""
    out: list[dict[str, Any]] = []
    for p in paths:
        try:
            d = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: cannot read a bench result: {e}") from None
        if not isinstance(d, dict) or "runs" not in d or "label" not in d:
            raise ValueError(f"{p}: not a pdserve bench result (no label/runs)")
        out.append(d)
    return out


def _rate(run: dict[str, Any]) -> float:
    return float(run["report"]["request_rate"])  # "inf" reads back as inf


def _slo(result: dict[str, Any], name: str) -> float | None:
    v = result["config"]["slo"].get(name)
    return None if v is None else float(v)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attainment(results: Sequence[dict[str, Any]], path: Path, target: float) -> None:
    """SLO attainment (both objectives) against request rate, a line per configuration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for d in results:
        pts = sorted((_rate(r), float(r["report"]["attainment"])) for r in d["runs"]
                     if math.isfinite(_rate(r)))  # "all at once" has no place on a rate axis
        if pts:
            ax.plot([x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=d["label"])
    ax.axhline(100 * target, ls="--", color="gray", label=f"{target:.0%} target")
    slos = [f"{name} <= {v:g} ms" for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"))
            if (v := _slo(results[0], key)) is not None]
    ax.set_title(f"SLO attainment ({', '.join(slos) or 'no SLO: completed requests'})",
                 fontsize=10)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("requests meeting both SLOs (%)")
    ax.set_ylim(0, 103)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pick_run(result: dict[str, Any], rate: float | None) -> dict[str, Any] | None:
    runs: list[dict[str, Any]] = result["runs"]
    if rate is None:
        return max(runs, key=_rate) if runs else None
    return next((r for r in runs if math.isclose(_rate(r), rate)), None)


def plot_cdfs(results: Sequence[dict[str, Any]], path: Path, rate: float | None) -> None:
    """TTFT and TPOT CDFs per configuration at `rate` (None: the highest rate all share, else
    each one's highest). The y axis counts all requests, so failures keep a curve below 1."""
    if rate is None:
        shared = set.intersection(*({_rate(r) for r in d["runs"]} for d in results))
        rate = max(shared) if shared else None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for d in results:
        run = _pick_run(d, rate)
        if run is None:
            continue
        recs = [RequestRecord.from_json(x) for x in run["requests"]]
        failed = sum(1 for r in recs if not r.ok)
        ttft = [v for r in recs if (v := r.ttft_s) is not None]
        tpot = [v for r in recs if (v := r.tpot_s) is not None]
        for ax, vals in zip(axes, (ttft, tpot), strict=True):
            if vals:
                x = np.sort(np.asarray(vals)) * 1e3
                x = np.concatenate((x[:1], x))  # start the curve at 0
                y = np.arange(0, len(x)) / (len(x) - 1 + failed)
                ax.step(x, y, where="post", label=f"{d['label']} @ {fmt_rate(_rate(run))} req/s")
    for ax, name in zip(axes, ("ttft_ms", "tpot_ms"), strict=True):
        slo = _slo(results[0], name)
        if slo is not None:
            ax.axvline(slo, ls="--", color="gray", label=f"SLO {slo:g} ms")
        ax.set_xlabel(f"{name[:4].upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_results(results: Sequence[dict[str, Any]], out_dir: str | Path,
                 rate: float | None = None, target: float | None = None) -> list[Path]:
    """Both figures into out_dir; target: attainment line (default: the first result's)."""
    if not results:
        raise ValueError("no results to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if target is None:
        target = float(results[0]["config"].get("goodput_attainment", 0.9))
    paths = [out / ATTAINMENT_PNG, out / CDF_PNG]
    plot_attainment(results, paths[0], target)
    plot_cdfs(results, paths[1], rate)
    return paths
