"""SLO classes on the `pdserve bench` side: which class each request is sent with
(``--slo-class NAME`` or a seeded ``--class-mix``), and the objectives each request is scored
against, read from the server's ``GetServerInfo`` so that the benchmark judges a request by
the objectives the server schedules it by.

A request's objectives are its class's, each overridden by ``--slo-ttft-ms`` /
``--slo-tpot-ms`` where given: the same rule the server applies (``router.slo``), since the
benchmark sends the explicit objectives with every request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdserve.cluster.bench.records import REFUSED, RequestRecord, Slo
from pdserve.proto import pdserve_pb2 as pb

# The class-mix draw has a stream of its own (numpy seed sequence [seed, CLASS_STREAM]), so a
# mix leaves the prompts of a seed unchanged.
CLASS_STREAM = 0x51C
MIX_SUM_TOLERANCE = 1e-6


def parse_class_mix(s: str) -> tuple[tuple[str, float], ...]:
    """"interactive=0.3,batch=0.7" -> (("interactive", 0.3), ("batch", 0.7)): each share in
    (0, 1], names unique, shares summing to 1."""
    out: list[tuple[str, float]] = []
    for part in (p.strip() for p in s.split(",")):
        if not part:
            continue
        name, eq, share = part.partition("=")
        name = name.strip()
        try:
            v = float(share)
        except ValueError:
            v = math.nan
        if not eq or not name or not 0 < v <= 1:
            raise ValueError(f"--class-mix takes NAME=SHARE pairs with shares in (0, 1], "
                             f"comma-separated: {part!r} in {s!r}")
        out.append((name, v))
    check_class_mix(tuple(out))
    return tuple(out)


def check_class_mix(mix: Sequence[tuple[str, float]]) -> None:
    names = [n for n, _ in mix]
    if not mix:
        raise ValueError("--class-mix names no class")
    if len(set(names)) != len(names):
        raise ValueError(f"--class-mix names a class twice: {', '.join(names)}")
    if any(not 0 < v <= 1 for _, v in mix):
        raise ValueError(f"--class-mix shares must be in (0, 1]: {mix}")
    total = sum(v for _, v in mix)
    if abs(total - 1) > MIX_SUM_TOLERANCE:
        raise ValueError(f"--class-mix shares must sum to 1, got {total:g}")


def assign_classes(n: int, mix: Sequence[tuple[str, float]], seed: int) -> list[str]:
    """The class of each of n requests, drawn independently with the mix's shares from a
    stream seeded by ``seed``. The first k of n assignments are the assignments of k, so every
    rate of a sweep gives request i the same class."""
    if n <= 0:
        return []
    u = np.random.default_rng([seed, CLASS_STREAM]).random(n)  # one draw per request, in order
    edges = np.cumsum([v for _, v in mix])
    edges[-1] = math.inf  # shares summing to 1 - 1e-12 still cover every draw
    picks = np.searchsorted(edges, u, side="right")
    names = [name for name, _ in mix]
    return [names[int(k)] for k in picks]


@dataclass(frozen=True)
class ServerSlo:
    """What GetServerInfo says about scheduling: the SLO classes (name -> class), the
    default class, the scheduler and the mode ("" when the server does not say)."""

    classes: Mapping[str, pb.SloClass] = field(default_factory=dict)
    default_class: str = ""
    scheduler: str = ""
    mode: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)  # the ServerInfo, for the result

    @classmethod
    def from_info(cls, info: pb.ServerInfo | None) -> ServerSlo:
        if info is None:
            return cls()
        meta = {"version": info.version, "mode": info.mode, "scheduler": info.scheduler,
                "num_prefill_workers": info.num_prefill_workers,
                "num_decode_workers": info.num_decode_workers,
                "default_slo_class": info.default_slo_class,
                "slo_classes": [class_json(c) for c in info.slo_classes]}
        return cls({c.name: c for c in info.slo_classes}, info.default_slo_class,
                   info.scheduler, info.mode, meta)

    def resolve(self, name: str | None) -> str:
        """The class a request is sent with: ``name`` (None: the server's default). ValueError
        for a class the server does not have."""
        if name is None:
            return self.default_class
        if self.classes and name not in self.classes:
            raise ValueError(f"the server has no SLO class {name!r}; it has "
                             f"{', '.join(sorted(self.classes))}")
        if not self.classes:
            raise ValueError(f"SLO class {name!r} named, but the server lists no SLO classes "
                             "(GetServerInfo)")
        return name


def class_json(c: pb.SloClass) -> dict[str, Any]:
    return {"name": c.name, "ttft_ms": c.ttft_ms or None, "tpot_ms": c.tpot_ms or None,
            "priority": c.priority, "best_effort": c.best_effort}


@dataclass(frozen=True)
class Objectives:
    """The objectives a request is scored against, by the SLO class it was sent with; a
    class not listed (no classes: every request) gets ``fallback``."""

    by_class: Mapping[str, Slo] = field(default_factory=dict)
    fallback: Slo = field(default_factory=Slo)

    @classmethod
    def uniform(cls, slo: Slo) -> Objectives:
        return cls({}, slo)

    @classmethod
    def of(cls, slo: Slo | Objectives) -> Objectives:
        return slo if isinstance(slo, Objectives) else cls.uniform(slo)

    @classmethod
    def from_server(cls, server: ServerSlo, explicit: Slo) -> Objectives:
        """Each of the server's classes with ``explicit``'s objectives overriding its own."""
        by = {name: Slo(explicit.ttft_ms if explicit.ttft_ms is not None else c.ttft_ms or None,
                        explicit.tpot_ms if explicit.tpot_ms is not None else c.tpot_ms or None)
              for name, c in server.classes.items()}
        return cls(by, explicit)

    def slo_for(self, r: RequestRecord) -> Slo:
        return self.by_class.get(r.slo_class, self.fallback)

    def meets(self, r: RequestRecord) -> tuple[bool, bool]:
        return self.slo_for(r).meets(r)

    def met(self, r: RequestRecord) -> bool:
        a, b = self.meets(r)
        return a and b

    def to_json(self) -> dict[str, Any]:
        return {"by_class": {k: {"ttft_ms": v.ttft_ms, "tpot_ms": v.tpot_ms}
                             for k, v in self.by_class.items()},
                "fallback": {"ttft_ms": self.fallback.ttft_ms, "tpot_ms": self.fallback.tpot_ms}}

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> Objectives:
        """The objectives a saved result was scored with (results written before SLO classes:
        their one SLO, ``config.slo``)."""
        def slo(d: Mapping[str, Any]) -> Slo:
            return Slo(*(None if d.get(k) is None else float(d[k]) for k in ("ttft_ms", "tpot_ms")))

        saved = result.get("objectives")
        if saved is None:
            return cls.uniform(slo(result.get("config", {}).get("slo", {})))
        return cls({k: slo(v) for k, v in saved["by_class"].items()}, slo(saved["fallback"]))

    def overridden(self, explicit: Slo) -> Objectives:
        """These objectives with ``explicit``'s overriding each class's where it sets one."""
        def over(s: Slo) -> Slo:
            return Slo(explicit.ttft_ms if explicit.ttft_ms is not None else s.ttft_ms,
                       explicit.tpot_ms if explicit.tpot_ms is not None else s.tpot_ms)

        return Objectives({k: over(v) for k, v in self.by_class.items()}, over(self.fallback))


@dataclass(frozen=True)
class ClassReport:
    """One SLO class of a run, over the counted window (``steady``): its objectives, how many
    of its requests arrived, completed and were refused at admission, attainment (refused and
    failed requests are misses), and goodput throughput (its requests meeting their
    objectives per second of the counted window)."""

    name: str
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    requests: int
    completed: int
    refused: int  # RESOURCE_EXHAUSTED at admission
    attainment: float
    goodput_throughput: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None


def class_reports(counted: Sequence[RequestRecord], objectives: Objectives,
                  window_s: float) -> dict[str, ClassReport]:
    """Per SLO class ("" for requests sent without one), in the order first seen."""
    by: dict[str, list[RequestRecord]] = {}
    for r in counted:
        by.setdefault(r.slo_class, []).append(r)
    out: dict[str, ClassReport] = {}
    for name, recs in by.items():
        slo = objectives.slo_for(recs[0])
        met = sum(1 for r in recs if objectives.met(r))
        ttft = [v * 1e3 for r in recs if (v := r.ttft_s) is not None]
        out[name] = ClassReport(
            name=name, slo_ttft_ms=slo.ttft_ms, slo_tpot_ms=slo.tpot_ms, requests=len(recs),
            completed=sum(1 for r in recs if r.ok),
            refused=sum(1 for r in recs if r.status == REFUSED),
            attainment=met / len(recs), goodput_throughput=met / window_s if window_s > 0 else 0.0,
            ttft_p50_ms=float(np.percentile(ttft, 50)) if ttft else None,
            ttft_p99_ms=float(np.percentile(ttft, 99)) if ttft else None,
        )
    return out
