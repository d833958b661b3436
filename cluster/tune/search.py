"""The search of ``pdserve tune``: which deployment of N GPUs (one worker per GPU) has the
highest predicted goodput.

The space: N colocated replicas, and every xPyD split with x + y = N; for each, the batch
caps (``max_num_seqs`` x ``max_batch_tokens`` from a small grid; ``pdserve serve`` gives
both pools the same caps) and, for a split, the conditional-disaggregation rule (off, the
cost model's choice, or a prompt-length threshold). Searched in stages, each seeded by the
one before, so that the caps and rules are tried where they can matter:

1. every split, at the base caps and rule (the serve defaults unless the grid leaves
   them out), from the cost model's capacity estimate;
2. every other caps pair of the grid, on the colocated deployment and the
   ``FINALISTS`` best splits;
3. every other rule on the ``FINALISTS`` best split deployments so far.

Each deployment's rate search (``tune.goodput``) starts from its stage's seed rate; the
deployments of a stage run in parallel over ``jobs`` processes.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.cluster.bench.records import Slo
from pdserve.cluster.config import ServeConfig
from pdserve.cluster.tune.goodput import Point, Search, capacity_estimate, find_goodput, measure
from pdserve.cluster.tune.settings import FINALISTS, RULE_MODEL, RULE_OFF, TARGET, TOLERANCE
from pdserve.cluster.tune.sim import SimulationError
from pdserve.cluster.tune.workload import Workload
from pdserve.router.cost_model import Profile


@dataclass(frozen=True)
class Space:
    """What the search may choose: the GPUs, the caps grid, the rules (``off``, ``model``
    or a prompt-length threshold, as a string), and the fixed part of every deployment
    (``base``: KV pools, scheduler, profile file)."""

    gpus: int
    max_num_seqs: tuple[int, ...]
    max_batch_tokens: tuple[int, ...]
    rules: tuple[str, ...]
    base: ServeConfig

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"--gpus must be >= 1, got {self.gpus}")
        if not self.max_num_seqs or not self.max_batch_tokens or not self.rules:
            raise ValueError("the caps grid and the rules need at least one value each")
        for rule in self.rules:
            if rule not in (RULE_OFF, RULE_MODEL) and not (rule.isdigit() and int(rule) > 0):
                raise ValueError(f"a rule is off, model or a token count > 0, got {rule!r}")
        for seqs in self.max_num_seqs:
            for tokens in self.max_batch_tokens:
                self.deployment(0, self.gpus, seqs, tokens, self.rules[0])  # validates

    def deployment(self, num_prefill: int, num_decode: int, seqs: int, tokens: int,
                   rule: str) -> ServeConfig:
        """``num_prefill`` 0: ``num_decode`` colocated replicas."""
        over: dict[str, object] = dict(max_num_seqs=seqs, max_batch_tokens=tokens,
                                       num_decode=num_decode)
        if num_prefill == 0:
            over.update(mode="colocated", num_prefill=1, local_prefill_max_tokens=0,
                        local_prefill_by_model=True)
        else:
            over.update(mode="disaggregated", num_prefill=num_prefill,
                        local_prefill_by_model=rule == RULE_MODEL,
                        local_prefill_max_tokens=int(rule) if rule.isdigit() else 0)
        return dataclasses.replace(self.base, **over)  # type: ignore[arg-type]

    def splits(self) -> list[tuple[int, int]]:
        """(prefill, decode) workers: colocated (0, N) first, then 1PyD up to (N-1)P1D."""
        return [(0, self.gpus)] + [(x, self.gpus - x) for x in range(1, self.gpus)]


@dataclass(frozen=True)
class Outcome:
    """One deployment's predicted goodput."""

    serve: ServeConfig
    stage: int
    search: Search

    @property
    def goodput(self) -> float:
        return self.search.goodput


def rule_of(serve: ServeConfig) -> str:
    if serve.colocated:
        return "-"
    if serve.local_prefill_max_tokens:
        return str(serve.local_prefill_max_tokens)
    return RULE_MODEL if serve.local_prefill_by_model else RULE_OFF


def split_of(serve: ServeConfig) -> str:
    return (f"colocated x{serve.num_decode}" if serve.colocated
            else f"{serve.num_prefill}P{serve.num_decode}D")


@dataclass(frozen=True)
class Job:
    """What every simulated run of one ``pdserve tune`` shares."""

    profile: Profile
    workload: Workload
    slo: Slo
    target: float = TARGET
    tolerance: float = TOLERANCE


_JOB: Job | None = None  # a search process's (set once, when the pool starts it)


def _set_job(job: Job) -> None:
    global _JOB
    _JOB = job


def _job() -> Job:
    assert _JOB is not None, "no job: Runner sets it"
    return _JOB


def _search(task: tuple[ServeConfig, float | None]) -> Search:
    serve, start = task
    job = _job()
    if start is None:
        start = capacity_estimate(serve, job.profile, job.workload, job.slo)
    try:
        return find_goodput(
            lambda rate: measure(serve, job.profile, job.workload, rate, job.slo, job.target),
            start, job.target, job.tolerance)
    except SimulationError as e:  # e.g. a prompt larger than a worker's KV pool
        return Search(0.0, False, (), error=str(e))


def _measure(task: tuple[ServeConfig, float]) -> Point:
    serve, rate = task
    job = _job()
    return measure(serve, job.profile, job.workload, rate, job.slo, job.target,
                   stop_early=False)


class Runner:
    """Runs simulations in ``jobs`` processes (forked, so the imports are paid once), or in
    this one when ``jobs`` is 1. A context manager: the processes end with it."""

    def __init__(self, job: Job, jobs: int = 0) -> None:
        self.job = job
        self.jobs = jobs or len(os.sched_getaffinity(0))
        _set_job(job)
        self._pool = (multiprocessing.get_context("fork").Pool(self.jobs, _set_job, (job,))
                      if self.jobs > 1 else None)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()

    def searches(self, tasks: Sequence[tuple[ServeConfig, float | None]]) -> list[Search]:
        """Each deployment's goodput, its rate search from the given start (None: the
        capacity estimate)."""
        if self._pool is None:
            return [_search(t) for t in tasks]
        return self._pool.map(_search, tasks, chunksize=1)

    def sweep(self, serve: ServeConfig, rates: Sequence[float]) -> list[Point]:
        """Full runs (no early stop) of ``serve`` at each rate, for the attainment curve."""
        tasks = [(serve, r) for r in rates]
        if self._pool is None:
            return [_measure(t) for t in tasks]
        return self._pool.map(_measure, tasks, chunksize=1)


def search(space: Space, runner: Runner,
           progress: Callable[[str], None] | None = None) -> list[Outcome]:
    """Every deployment the stages tried, best first (ties: fewer prefill workers)."""
    outcomes: list[Outcome] = []

    def run(stage: int, tasks: Sequence[tuple[ServeConfig, float | None]]) -> None:
        seen = {o.serve for o in outcomes}
        tasks = [t for t in tasks if t[0] not in seen]
        found = runner.searches(tasks)
        outcomes.extend(Outcome(s, stage, r) for (s, _), r in zip(tasks, found, strict=True))
        if progress is not None:
            progress(f"stage {stage}: {len(tasks)} deployments")

    seqs0, tokens0 = space.max_num_seqs[0], space.max_batch_tokens[0]
    rule0 = RULE_MODEL if RULE_MODEL in space.rules else space.rules[0]
    run(1, [(space.deployment(x, y, seqs0, tokens0, rule0), None) for x, y in space.splits()])
    ranked = _ranked(outcomes)
    finalists = [o for o in ranked if o.serve.colocated][:1] + \
        [o for o in ranked if not o.serve.colocated][:FINALISTS]
    run(2, [(space.deployment(0 if o.serve.colocated else o.serve.num_prefill,
                              o.serve.num_decode, seqs, tokens, rule0), o.goodput or None)
            for o in finalists for seqs in space.max_num_seqs
            for tokens in space.max_batch_tokens])
    best = [o for o in _ranked(outcomes) if not o.serve.colocated][:FINALISTS]
    run(3, [(space.deployment(o.serve.num_prefill, o.serve.num_decode, o.serve.max_num_seqs,
                              o.serve.max_batch_tokens, rule), o.goodput or None)
            for o in best for rule in space.rules])
    return _ranked(outcomes)


def _ranked(outcomes: Sequence[Outcome]) -> list[Outcome]:
    return sorted(outcomes, key=lambda o: (-o.goodput, o.serve.num_prefill
                                           if not o.serve.colocated else 0, o.stage))
