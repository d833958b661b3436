"""The Python half of ``deploy/prometheus-check.sh``: every PromQL query of the Grafana
dashboard, run against a real Prometheus that scrapes a running pdserve server.

Subcommands (``python -P tests/support/pdserve_testing/promcheck.py SUB --help``):

- ``free-port``: print a free TCP port on 127.0.0.1.
- ``wait-serving``: poll the server's gRPC health until SERVING; fail if its process exits.
- ``wait-scrapes``: wait until Prometheus is ready and has scraped the job N times.
- ``check``: run every ``expr`` of the dashboard (Grafana's variables replaced) as an
  instant query and print, per query, its status and the number of series it returned.

``check`` statuses: ``OK`` (a series with a number), ``NAN`` (series, but every value is
NaN: a quantile or a mean over a window without observations, 0/0), ``EMPTY`` (no series),
``ERROR`` (Prometheus refused the query, or a Grafana variable is left that this script
does not know). It exits 1 on an ERROR, or with ``--strict`` on an EMPTY or NAN whose
metric is not in ``EXPECTED_EMPTY``; EMPTY and NAN alone are reported, not failures.

Only the standard library and, for ``wait-serving``, ``pdserve.proto.client``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What a short CPU run can leave without data, and why (matched against the metric names a
# query uses). Counters whose series start at zero (preemptions, retries, local prefills,
# autoscaler decisions, goodput and attainment per configured class) never are: their
# rate() is 0, a value.
EXPECTED_EMPTY = {
    "pdserve:num_workers": "a (role, state) series is there once set: serving and draining "
                           "when the router's pools change, starting by the autoscaler "
                           "(no series = not reported, not 0)",
    "pdserve:autoscaler_target_workers": "set only by the autoscaler (serve --autoscale)",
    "pdserve:ttft_prediction": "no cost-model prediction in the window (the router predicts "
                               "only with a profile for its device and model)",
    "pdserve:tpot_prediction": "no cost-model prediction in the window (the router predicts "
                               "only with a profile for its device and model)",
    "pdserve:request_failure_total": "a status code's series appears with its first failure",
    "pdserve:request_kv_transfer_time": "every prompt prefilled by its decode worker "
                                        "(colocated, or conditional disaggregation)",
    "pdserve:kv_transfer": "no KV transfer (colocated, or every prompt prefilled locally)",
    "pdserve:kv_cache_usage_perc": "no step report from a worker yet",
}

NAME = re.compile(r"pdserve:[A-Za-z0-9_:]+")
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    legend: str
    expr: str


def queries(node: Any, panel: str = "") -> Iterator[Query]:
    """Every ``expr`` of a dashboard (panels, rows' collapsed panels, template queries),
    with the title of the panel it belongs to."""
    if isinstance(node, dict):
        title = node.get("title", panel) if "gridPos" in node else panel
        if isinstance(node.get("expr"), str):
            yield Query(title, str(node.get("refId", "")), str(node.get("legendFormat", "")),
                        node["expr"])
        for key, value in node.items():
            if key != "expr":
                yield from queries(value, title)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item, panel)


def grafana_variables(window_s: int) -> dict[str, str]:
    """What Grafana would put in for its built-in interval variables, with every rate over
    ``window_s`` seconds."""
    w = f"{window_s}s"
    return {"__rate_interval": w, "__interval": w, "__range": w, "__range_s": str(window_s),
            "__range_ms": str(window_s * 1000), "__interval_ms": str(window_s * 1000)}


def substitute(expr: str, values: dict[str, str]) -> tuple[str, list[str]]:
    """``expr`` with Grafana's ``$name`` / ``${name}`` replaced; and the names it did not
    know (left in place)."""
    unknown: list[str] = []

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in values:
            return values[name]
        unknown.append(name)
        return m.group(0)

    return VARIABLE.sub(one, expr), unknown


def classify(result: Any) -> tuple[str, int, list[float]]:
    """Status (OK, NAN, EMPTY), series count and values of an instant query's ``data``."""
    kind, res = result["resultType"], result["result"]
    if kind == "scalar":
        raw = [res[1]]
    elif kind == "vector":
        raw = [s["value"][1] for s in res]
    else:  # matrix or string: not what an instant query of a panel gives
        raw = [v[1] for s in res for v in s.get("values", [])] if kind == "matrix" else []
    n = len(res) if kind in ("vector", "matrix") else 1
    values = [float(v) for v in raw]
    if not values:
        return "EMPTY", 0, values
    if all(math.isnan(v) for v in values):
        return "NAN", n, values
    return "OK", n, values


def value_range(values: list[float]) -> str:
    """The finite values, as ``v`` or ``lo..hi``; "" if none."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return ""
    lo, hi = f"{finite[0]:.4g}", f"{finite[-1]:.4g}"
    return lo if lo == hi else f"{lo}..{hi}"


def expected_reason(expr: str) -> str | None:
    for name in NAME.findall(expr):
        for prefix, why in EXPECTED_EMPTY.items():
            if name.startswith(prefix):
                return why
    return None


def _get(url: str, timeout: float = 10.0) -> Any:
    """GET ``url`` and decode its JSON; a Prometheus error answer (HTTP 4xx with a JSON
    body) comes back as that body."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "error": f"HTTP {e.code}: {body[:200]!r}"}


def instant_query(prometheus: str, expr: str) -> Any:
    return _get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


def cmd_free_port(_: argparse.Namespace) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a child that exited but was not reaped yet is a zombie: gone for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def cmd_wait_serving(args: argparse.Namespace) -> int:
    import grpc

    from pdserve.proto.client import Client

    deadline = time.monotonic() + args.timeout
    last = "no answer"
    with Client(args.server) as client:
        while time.monotonic() < deadline:
            if args.pid and not _alive(args.pid):
                print(f"promcheck: the server (pid {args.pid}) exited before SERVING",
                      file=sys.stderr)
                return 1
            try:
                last = client.health(timeout=2.0)
            except grpc.RpcError as e:
                last = e.code().name
            if last == "SERVING":
                return 0
            time.sleep(1.0)
    print(f"promcheck: {args.server} not SERVING after {args.timeout:g} s ({last})",
          file=sys.stderr)
    return 1


def cmd_wait_scrapes(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    expr = f'count_over_time(up{{job="{args.job}"}}[10m]) and up{{job="{args.job}"}} == 1'
    seen = 0.0
    while time.monotonic() < deadline:
        try:
            ans = instant_query(args.prometheus, expr)
        except OSError:  # not listening yet
            time.sleep(0.5)
            continue
        if ans.get("status") == "success" and ans["data"]["result"]:
            seen = float(ans["data"]["result"][0]["value"][1])
            if seen >= args.scrapes:
                print(f"promcheck: {args.job} up, scraped {seen:g} times")
                return 0
        time.sleep(0.5)
    print(f"promcheck: {args.job} not scraped {args.scrapes} times with up == 1 after "
          f"{args.timeout:g} s ({seen:g})", file=sys.stderr)
    return 1


def cmd_check(args: argparse.Namespace) -> int:
    dashboard = json.loads(Path(args.dashboard).read_text())
    values = grafana_variables(args.window)
    counts = {"OK": 0, "NAN": 0, "EMPTY": 0, "ERROR": 0}
    unexpected: list[str] = []
    print(f"promcheck: {args.prometheus}, every rate over {args.window}s "
          f"($__rate_interval = {values['__rate_interval']})")
    print(f"{'status':<6} {'series':>6} {'value(s)':>17}  panel / query")
    for q in queries(dashboard):
        expr, unknown = substitute(q.expr, values)
        note = ""
        got: list[float] = []
        if unknown:
            status, n, note = "ERROR", 0, f"unknown Grafana variable(s) {sorted(set(unknown))}"
        else:
            try:
                ans = instant_query(args.prometheus, expr)
            except OSError as e:
                ans = {"status": "error", "error": str(e)}
            if ans.get("status") != "success":
                status, n = "ERROR", 0
                note = f"{ans.get('errorType', '')} {ans.get('error', ans)}".strip()
            else:
                status, n, got = classify(ans["data"])
                if ans.get("warnings"):
                    note = f"warnings: {ans['warnings']}"
        if status in ("EMPTY", "NAN"):
            why = expected_reason(expr)
            if why is None:
                unexpected.append(f"{q.panel} / {q.legend or q.ref}")
                note = "UNEXPECTED: no known reason for this to lack data"
            else:
                note = f"expected: {why}"
        counts[status] += 1
        label = f"{q.panel} / {q.legend or q.ref}"
        print(f"{status:<6} {n:>6} {value_range(got):>17}  {label}"
              + (f"  ({note})" if note else ""))
        if args.verbose or status == "ERROR":
            print(f"{'':33}{expr}")
    print("promcheck: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f" of {sum(counts.values())} queries")
    if unexpected:
        print(f"promcheck: {len(unexpected)} without data and no known reason: "
              + "; ".join(unexpected))
    if counts["ERROR"]:
        return 1
    return 1 if args.strict and unexpected else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="promcheck", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("free-port", help="print a free TCP port on 127.0.0.1")
    s.set_defaults(func=cmd_free_port)
    s = sub.add_parser("wait-serving", help="wait for the server's gRPC health: SERVING")
    s.add_argument("--server", required=True, help="host:port")
    s.add_argument("--pid", type=int, help="the server's process: fail once it is gone")
    s.add_argument("--timeout", type=float, default=600.0)
    s.set_defaults(func=cmd_wait_serving)
    s = sub.add_parser("wait-scrapes", help="wait for Prometheus to scrape a job N times")
    s.add_argument("--prometheus", required=True, help="http://host:port")
    s.add_argument("--job", default="pdserve")
    s.add_argument("--scrapes", type=int, default=3)
    s.add_argument("--timeout", type=float, default=60.0)
    s.set_defaults(func=cmd_wait_scrapes)
    s = sub.add_parser("check", help="run every query of the dashboard")
    s.add_argument("--prometheus", required=True, help="http://host:port")
    s.add_argument("--dashboard", required=True, help="the Grafana dashboard JSON")
    s.add_argument("--window", type=int, default=30,
                   help="seconds every rate() covers ($__rate_interval), default 30")
    s.add_argument("--strict", action="store_true",
                   help="also fail on a query without data that EXPECTED_EMPTY does not name")
    s.add_argument("-v", "--verbose", action="store_true", help="print each expression")
    s.set_defaults(func=cmd_check)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
