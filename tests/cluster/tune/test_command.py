"""`pdserve tune` through its command line: a small search prints a table, the winner and a
`pdserve serve` command that the real serve parser reads back as the winning deployment;
--json and --plot write what they say."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from pdserve.cluster.cli import build_parser, main, serve_config
from pdserve.cluster.config import ServeConfig
from pdserve.cluster.tune.report import serve_command
from pdserve_testing.tune import cpu_profile, deployment


def parsed(command: str) -> ServeConfig:
    argv = shlex.split(command)
    assert argv[:2] == ["pdserve", "serve"]
    return serve_config(build_parser().parse_args(argv[1:]))


@pytest.mark.parametrize("over", [
    dict(mode="colocated", num_decode=8, max_batch_tokens=128),
    dict(num_prefill=3, num_decode=5, max_num_seqs=16, local_prefill_by_model=False),
    dict(num_prefill=2, num_decode=6, local_prefill_max_tokens=40, scheduler="fifo"),
    dict(num_prefill=1, num_decode=1),  # the defaults: only the pools and the profile
])
def test_the_serve_command_parses_back_to_the_deployment(over: dict[str, object],
                                                          tmp_path: Path) -> None:
    serve = deployment(cpu_profile(), tmp_path, **over)
    assert parsed(serve_command(serve)) == serve


def test_a_small_search_prints_its_winner_and_a_serve_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "cpu.json"
    cpu_profile().save(profile)
    out_json, plots = tmp_path / "tune.json", tmp_path / "plots"
    rc = main(["tune", "--profile", str(profile), "--gpus", "2", "--slo-ttft-ms", "2000",
               "--slo-tpot-ms", "200", "--input-len", "64", "--output-len", "16",
               "--num-prompts", "30", "--min-window-s", "0", "--max-num-seqs", "64",
               "--max-batch-tokens", "2048,128", "--rules", "model,off", "--jobs", "1",
               "--json", str(out_json), "--plot", str(plots)])
    assert rc == 0
    out = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    # stage 1: colocated x2 and 1P1D; stage 2: each at 128 tokens; stage 3: rule off on the
    # two best split deployments (here 1P1D at either step budget)
    deps = data["deployments"]
    assert sorted((d["deployment"], d["max_batch_tokens"], d["rule"]) for d in deps) == [
        ("1P1D", 128, "model"), ("1P1D", 128, "off"), ("1P1D", 2048, "model"),
        ("1P1D", 2048, "off"), ("colocated x2", 128, "-"), ("colocated x2", 2048, "-")]
    assert [d["stage"] for d in deps if d["rule"] == "off"] == [3, 3]
    best = data["best"]
    assert best["goodput"] == max(d["goodput"] for d in data["deployments"]) > 0
    assert best["goodput_per_gpu"] == pytest.approx(best["goodput"] / 2)
    at = best["at_goodput"]
    assert at["attainment"] >= 0.9 and at["stable"] and not at["partial"]
    assert at["ttft"]["p50_ms"] <= at["ttft"]["p90_ms"] <= at["ttft"]["p99_ms"]
    # The printed command is the winner's, and `pdserve serve` reads it as that deployment.
    command = next(line.strip() for line in out.splitlines()
                   if line.strip().startswith("pdserve serve"))
    assert command == best["serve_command"]
    serve = parsed(command)
    assert serve.mode == best["mode"] and serve.num_decode == best["num_decode"]
    assert serve.max_batch_tokens == best["max_batch_tokens"]
    assert serve.profile == str(profile.resolve())
    assert "searched 6 deployments in" in out
    assert (plots / "slo_attainment.png").stat().st_size > 0
    assert any(s["label"].startswith(best["deployment"]) for s in data["sweeps"])


def test_bad_flags_exit_2_naming_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--profile", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    profile = tmp_path / "cpu.json"
    cpu_profile().save(profile)
    assert main(["tune", "--profile", str(profile), "--rules", "sometimes"]) == 2
    assert "sometimes" in capsys.readouterr().err
