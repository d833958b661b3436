"""What ``pdserve tune`` prints and writes: a table of every deployment searched, the
winner and the exact ``pdserve serve`` command that starts it, the JSON of it all, and the
predicted attainment-against-rate plot (``bench.plot``'s figure, so simulated and measured
curves look alike and overlay with ``pdserve bench plot``)."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdserve.cluster.bench.plot import ATTAINMENT_PNG, plot_attainment
from pdserve.cluster.bench.records import Slo
from pdserve.cluster.bench.report import LatencyStats, fmt_rate, jsonable
from pdserve.cluster.config import ServeConfig
from pdserve.cluster.knobs import knobs
from pdserve.cluster.tune.goodput import Point
from pdserve.cluster.tune.search import Outcome, rule_of, split_of


def serve_command(serve: ServeConfig) -> str:
    """``pdserve serve`` with a flag for every knob of ``serve`` that is not the default
    (``cluster.knobs`` names them, so the command parses as the serve flags do)."""
    default = ServeConfig()
    args = ["pdserve", "serve"]
    for f, kind in knobs(ServeConfig):
        value = getattr(serve, f.name)
        if value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return shlex.join(args)


def _ms(s: LatencyStats, q: str) -> str:
    v = getattr(s, f"{q}_ms")
    return "-" if v is None else f"{v:.0f}"


HEADER = (f"{'deployment':<14} {'seqs':>5} {'tokens':>6} {'rule':>6} {'goodput':>8} "
          f"{'/GPU':>7} {'TTFT p50':>8} {'p90':>6} {'p99':>6} {'TPOT p50':>8} {'p90':>5} "
          f"{'p99':>5} {'att':>5} {'pts':>4}")


def label(serve: ServeConfig) -> str:
    """A deployment in a few words: split, caps and rule."""
    rule = "" if serve.colocated else f", rule {rule_of(serve)}"
    return (f"{split_of(serve)} (seqs {serve.max_num_seqs}, tokens "
            f"{serve.max_batch_tokens}{rule})")


def format_row(o: Outcome, gpus: int) -> str:
    s = o.serve
    at = o.search.at_goodput
    if at is not None:
        cells = (f"{_ms(at.ttft, 'p50'):>8} {_ms(at.ttft, 'p90'):>6} {_ms(at.ttft, 'p99'):>6} "
                 f"{_ms(at.tpot, 'p50'):>8} {_ms(at.tpot, 'p90'):>5} {_ms(at.tpot, 'p99'):>5} "
                 f"{at.attainment:>5.0%}")
    else:
        cells = f"  {o.search.error or 'no rate met'}"[:53].ljust(53)
    mark = "+" if o.goodput and not o.search.bracketed else " "
    return (f"{split_of(s):<14} {s.max_num_seqs:>5} {s.max_batch_tokens:>6} {rule_of(s):>6} "
            f"{o.goodput:>7.3g}{mark} {o.goodput / gpus:>7.3g} {cells} "
            f"{len(o.search.points):>4}")


def format_table(outcomes: Sequence[Outcome], gpus: int) -> str:
    """One line per deployment, best first: goodput, per GPU, latencies at the goodput."""
    lines = [HEADER, "-" * len(HEADER), *(format_row(o, gpus) for o in outcomes)]
    lines.append("goodput in req/s; latencies in ms at the goodput rate; rule: conditional "
                 "disaggregation (off, model, or prompts <= N tokens prefilled on the decode "
                 "worker); + : not bracketed; pts: rates simulated")
    return "\n".join(lines)


def point_json(p: Point) -> dict[str, Any]:
    out: dict[str, Any] = jsonable(dataclasses.asdict(p))
    return out


def outcome_json(o: Outcome, gpus: int) -> dict[str, Any]:
    at = o.search.at_goodput
    return {
        "deployment": split_of(o.serve), "stage": o.stage, "mode": o.serve.mode,
        "num_prefill": 0 if o.serve.colocated else o.serve.num_prefill,
        "num_decode": o.serve.num_decode, "max_num_seqs": o.serve.max_num_seqs,
        "max_batch_tokens": o.serve.max_batch_tokens, "rule": rule_of(o.serve),
        "goodput": o.goodput, "goodput_per_gpu": o.goodput / gpus,
        "bracketed": o.search.bracketed, "error": o.search.error,
        "serve_command": serve_command(o.serve),
        "at_goodput": point_json(at) if at is not None else None,
        "points": [point_json(p) for p in o.search.points],
    }


def sweep_result(label: str, points: Sequence[Point], slo: Slo,
                 target: float) -> dict[str, Any]:
    """A sweep of simulated rates in the shape of a ``pdserve bench --result-json`` file
    (the fields ``bench.plot`` reads), so ``pdserve bench plot`` overlays it with measured
    ones."""
    return {
        "label": label,
        "config": {"slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
                   "goodput_attainment": target},
        "runs": [{"report": {"request_rate": p.rate, "attainment": p.attainment,
                             "stable": p.stable}, "requests": []} for p in points],
    }


def plot_sweeps(sweeps: Sequence[dict[str, Any]], out_dir: str | Path, target: float) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ATTAINMENT_PNG
    plot_attainment(sweeps, path, target)
    return path


def format_sweep_line(label: str, points: Sequence[Point]) -> str:
    cells = ", ".join(f"{fmt_rate(round(p.rate, 3))}: {p.attainment:.0%}"
                      + ("" if p.stable else " (backlog grows)") for p in points)
    return f"{label}: {cells}"
