"""PNG figures of `pdserve bench` results that overlay several configurations (one result
JSON each): SLO attainment against request rate, and TTFT/TPOT CDFs at one rate.
`pdserve bench plot A.json B.json --out DIR` draws them from saved results (the printed
tables are ``tables``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.cluster.bench.records import RequestRecord
from pdserve.cluster.bench.report import fmt_rate

ATTAINMENT_PNG = "slo_attainment.png"
CDF_PNG = "latency_cdf.png"


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
