"""ServeConfig's conditional-disaggregation thresholds: validation, flags, YAML, and the
pieces they are cut into (decode workers' WorkerConfig, the router's RouterConfig)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pdserve.cluster.cli import build_parser, serve_config
from pdserve.cluster.config import ServeConfig
from pdserve.engine.config import PRESETS, ModelSpec
from pdserve.router.policy import LocalPrefillRule

FIELDS = ("local_prefill_max_tokens", "prefill_queue_max_tokens")


def test_thresholds_off_by_default_and_the_cost_model_decides() -> None:
    cfg = ServeConfig()
    assert cfg.local_prefill == LocalPrefillRule() and cfg.decode_prefills
    assert cfg.worker_config("decode", 2).local_prefill
    router = cfg.server_config(PRESETS["tiny"]).router
    assert router.local_prefill == LocalPrefillRule() and router.decode_prefills
    for off in (ServeConfig(scheduler="fifo"), ServeConfig(local_prefill_by_model=False)):
        assert not off.decode_prefills and not off.worker_config("decode", 2).local_prefill
        assert not off.server_config(PRESETS["tiny"]).router.decode_prefills


@pytest.mark.parametrize("field", FIELDS)
def test_thresholds_reach_the_router_and_the_decode_workers(field: str) -> None:
    cfg = ServeConfig(**{field: 512})  # type: ignore[arg-type]
    assert getattr(cfg.server_config(PRESETS["tiny"]).router.local_prefill, field) == 512
    assert cfg.decode_prefills
    assert cfg.worker_config("decode", 2).local_prefill
    assert not cfg.worker_config("prefill", 2).local_prefill


@pytest.mark.parametrize("field", FIELDS)
def test_negative_is_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ServeConfig(**{field: -1})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", FIELDS)
def test_colocated_mode_refuses_thresholds(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} applies to disaggregated mode only"):
        ServeConfig(mode="colocated", **{field: 64})  # type: ignore[arg-type]
    colocated = ServeConfig(mode="colocated", **{field: 0})  # type: ignore[arg-type]
    assert colocated.worker_config("decode", 2).local_prefill  # it prefills every prompt


def test_flags_and_yaml(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["serve", "--local-prefill-max-tokens", "128", "--prefill-queue-max-tokens", "8192"])
    cfg = serve_config(args)
    assert (cfg.local_prefill_max_tokens, cfg.prefill_queue_max_tokens) == (128, 8192)
    assert serve_config(build_parser().parse_args(["serve"])) == ServeConfig()
    path = tmp_path / "serve.yaml"
    path.write_text("local_prefill_max_tokens: 32\nprefill_queue_max_tokens: 4096\n")
    assert ServeConfig.from_yaml(path) == dataclasses.replace(
        ServeConfig(), local_prefill_max_tokens=32, prefill_queue_max_tokens=4096)
    # A flag overrides the file; the other threshold keeps the file's value.
    args = build_parser().parse_args(["serve", "--config", str(path),
                                      "--local-prefill-max-tokens", "0"])
    assert serve_config(args).local_prefill == LocalPrefillRule(0, 4096)


def test_a_preset_means_dummy_weights() -> None:
    """--preset without --load-format dummy served the default SmolLM2 instead."""
    dummy = ModelSpec(source="dummy", preset="tiny")
    for argv in (["--preset", "tiny"], ["--preset", "tiny", "--load-format", "dummy"]):
        assert serve_config(build_parser().parse_args(["serve", *argv])).model == dummy


@pytest.mark.parametrize(("argv", "names"), [
    (["--preset", "tiny", "--model", "/models/x.gguf"], "--preset .*--model"),
    (["--preset", "tiny", "--load-format", "gguf"], "--preset .*--load-format gguf"),
    (["--preset", "tiny", "--load-format", "hf"], "--preset .*--load-format hf"),
])
def test_a_preset_with_real_weights_is_an_error(argv: list[str], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        serve_config(build_parser().parse_args(["serve", *argv]))


def test_a_yaml_preset_means_dummy_weights(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("model:\n  preset: tiny\n")
    assert ServeConfig.from_yaml(path).model == ModelSpec(source="dummy", preset="tiny")
    path.write_text("model:\n  source: gguf\n  preset: tiny\n")
    with pytest.raises(ValueError, match=r"preset 'tiny'.*source must be dummy"):
        ServeConfig.from_yaml(path)
    path.write_text("model:\n  preset: tiny\n  path: /models/x.gguf\n")
    with pytest.raises(ValueError, match="dummy model reads no path"):
        ServeConfig.from_yaml(path)


def test_metrics_stay_on_localhost_when_grpc_listens_everywhere() -> None:
    server = ServeConfig(host="0.0.0.0").server_config(PRESETS["tiny"])
    assert (server.host, server.metrics_host) == ("0.0.0.0", "127.0.0.1")
    opened = ServeConfig(metrics_host="0.0.0.0").server_config(PRESETS["tiny"])
    assert opened.metrics_host == "0.0.0.0"


def test_http_port_from_flags_and_yaml_reaches_the_frontends(tmp_path: Path) -> None:
    assert ServeConfig().server_config(PRESETS["tiny"]).http_port == 0  # off by default
    args = build_parser().parse_args(["serve", "--http-port", "8000",
                                      "--served-model-name", "tiny"])
    scfg = serve_config(args).server_config(PRESETS["tiny"])
    assert (scfg.http_port, scfg.served_model_name) == (8000, "tiny")
    path = tmp_path / "serve.yaml"
    path.write_text("http_port: 8001\n")
    assert ServeConfig.from_yaml(path).http_port == 8001
    for bad in (dict(http_port=50051), dict(http_port=9400), dict(http_port=70000)):
        with pytest.raises(ValueError, match="http_port"):
            ServeConfig(**bad)  # type: ignore[arg-type]
