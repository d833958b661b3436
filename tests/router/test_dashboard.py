"""deploy/grafana/pdserve-dashboard.json queries only what the router exports: every metric
name in its PromQL, and every label it selects or groups by, exists in a Metrics registry
(a renamed metric or label fails here, not silently in Grafana); deploy/prometheus.yml
scrapes the router's default metrics port."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from pdserve.cluster.config import ServeConfig
from pdserve.router.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "pdserve-dashboard.json"

NAME = re.compile(r"pdserve:[A-Za-z0-9_:]+")
SELECTOR = re.compile(r"(pdserve:[A-Za-z0-9_:]+)\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def exported() -> dict[str, set[str]]:
    """Every sample name a router's registry exposes, with the labels it carries."""
    m = Metrics(CollectorRegistry(), slo_classes=("default",))
    # Labelled series appear with their first value: give each labelled metric one.
    m.observe_failure("UNAVAILABLE")
    m.set_kv_usage("decode-0", 0.5)
    m.success.labels(finished_reason="stop")
    m.set_workers("decode", "serving", 1)
    m.set_autoscaler_target("decode", 1)
    out: dict[str, set[str]] = {}
    for fam in m.registry.collect():
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL expression in a dashboard (targets, rows' panels, template queries)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def problems(dashboard: Any, names: dict[str, set[str]]) -> list[str]:
    """What in ``dashboard``'s queries the registry ``names`` lacks."""
    out = []
    for expr in expressions(dashboard):
        if not _balanced(expr):
            out.append(f"unbalanced brackets in {expr!r}")
        used = NAME.findall(expr)
        if not used:
            out.append(f"no pdserve metric in {expr!r}")
        for name in used:
            if name not in names:
                out.append(f"{name} is not exported (in {expr!r})")
        for name, matchers in SELECTOR.findall(expr):
            for label in MATCHER.findall(matchers):
                if name in names and label not in names[name]:
                    out.append(f"{name} has no label {label!r}")
        labels = set().union(*(names.get(n, set()) for n in used))
        for group in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                if label not in labels:
                    out.append(f"no metric of {expr!r} has the label {label!r}")
    return out


def _balanced(expr: str) -> bool:
    """Brackets pair up (no PromQL parser here: promtool is not installed)."""
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"[^"]*"', "", expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


@pytest.fixture(scope="module")
def dashboard() -> Any:
    return json.loads(DASHBOARD.read_text())


def test_every_query_of_the_dashboard_is_exported(dashboard: Any) -> None:
    exprs = list(expressions(dashboard))
    assert len(exprs) >= 20
    assert problems(dashboard, exported()) == []


def test_the_check_catches_a_rotten_query() -> None:
    names = exported()
    rotten = {"panels": [{"type": "row", "panels": [{"targets": [
        {"expr": "sum(rate(pdserve:goodput_total[5m]))"},
        {"expr": 'sum(rate(pdserve:slo_attained_total{klass="x"}[5m]))'},
        {"expr": "sum by (slo_class) (rate(pdserve:request_failure_total[5m]))"},
        {"expr": "vector(1)"},
        {"expr": "sum(rate(pdserve:prompt_tokens_total[5m])"},
    ]}]}]}
    assert problems(rotten, names) == [
        "pdserve:goodput_total is not exported (in 'sum(rate(pdserve:goodput_total[5m]))')",
        "pdserve:slo_attained_total has no label 'klass'",
        "no metric of 'sum by (slo_class) (rate(pdserve:request_failure_total[5m]))' has "
        "the label 'slo_class'",
        "no pdserve metric in 'vector(1)'",
        "unbalanced brackets in 'sum(rate(pdserve:prompt_tokens_total[5m])'",
    ]


def test_the_dashboard_shows_what_operators_look_for(dashboard: Any) -> None:
    text = " ".join(expressions(dashboard))
    for name in ("time_to_first_token_seconds_bucket", "time_per_output_token_seconds_bucket",
                 "goodput_requests_total", "slo_attained_total", "slo_violated_total",
                 "request_queue_time_seconds_sum", "request_prefill_time_seconds_sum",
                 "request_first_decode_step_seconds_sum",
                 "request_kv_transfer_time_seconds_bucket",
                 "ttft_prediction_relative_error_bucket", "tpot_prediction_relative_error_bucket",
                 "request_failure_total", "num_requests_running", "num_requests_waiting",
                 "kv_cache_usage_perc", "inter_token_latency_seconds_bucket",
                 "request_kv_transfer_time_seconds_sum", "kv_transfer_bytes_total",
                 "num_workers", "autoscaler_target_workers", "autoscaler_decisions_total"):
        assert f"pdserve:{name}" in text, name
    for q in ("0.5", "0.9", "0.99"):
        for hist in ("time_to_first_token", "time_per_output_token", "inter_token_latency"):
            assert f"histogram_quantile({q}, sum by (le) (rate(pdserve:{hist}" in text
    for group in ("slo_class", "slo_class, phase", "role, state", "role, direction"):
        assert f"sum by ({group})" in text, group


def test_the_dashboard_is_importable(dashboard: Any) -> None:
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for p in panels:
        assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p.get("targets", []):
            assert t["refId"] and t["datasource"]["uid"] == "${datasource}"
    # No two panels share a grid cell (Grafana would push one down on import).
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = p["title"]


def test_prometheus_scrapes_the_routers_default_metrics_port() -> None:
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    default_port = next(f.default for f in dataclasses.fields(ServeConfig)
                        if f.name == "metrics_port")
    (job,) = cfg["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets and all(t.rsplit(":", 1)[1] == str(default_port) for t in targets)
