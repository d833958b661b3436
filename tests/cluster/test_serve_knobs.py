"""ServeConfig's knobs: each one a flag and a YAML key, checked where it is set, and handed
to the component config that uses it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pdserve.cluster.cli import build_parser, serve_config
from pdserve.cluster.config import ServeConfig
from pdserve.cluster.knobs import knobs
from pdserve.engine.config import PRESETS, RunnerConfig, WorkerConfig
from pdserve.router.config import RouterConfig
from pdserve.router.validation import Limits

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROFILES = sorted((Path(__file__).resolve().parents[2] / "router" / "profiles").glob("*.json"))

# A value other than the default, for the knobs that neither take a choice nor are a flag.
OTHER = {int: "3", float: "0.5", str: "10.0.0.7"}
SPECIAL = {"block_size": "32", "max_batch_tokens": "32",  # a power of two; one block
           "slo_classes": str(DEPLOY / "slo-classes.yaml"), "default_slo_class": "batch",
           "profile": str(PROFILES[0])}
# Knobs that only take a value together with another one: (flag, value, YAML line).
NEEDS = {"default_slo_class": ("--slo-classes", SPECIAL["slo_classes"],
                               f"slo_classes: {SPECIAL['slo_classes']}\n")}


def _flag_args(name: str, kind: type, default: object, choices: tuple[object, ...]) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        return [f"--no-{flag[2:]}" if default else flag]
    if choices:
        return [flag, str(next(c for c in choices if c != default))]
    return [flag, SPECIAL.get(name, OTHER[kind])]


@pytest.mark.parametrize("name", [f.name for f, _ in knobs(ServeConfig)])
def test_every_knob_is_a_flag_and_a_yaml_key(name: str, tmp_path: Path) -> None:
    f, kind = next((f, k) for f, k in knobs(ServeConfig) if f.name == name)
    flag, other, line = NEEDS.get(name, (None, None, ""))
    argv = ["serve", *_flag_args(name, kind, f.default, f.metadata["choices"])]
    if flag is not None:
        argv += [flag, str(other)]
    value = getattr(serve_config(build_parser().parse_args(argv)), name)
    assert value != f.default
    path = tmp_path / "serve.yaml"
    path.write_text(f"{line}{name}: {str(value).lower() if kind is bool else value}\n")
    assert getattr(ServeConfig.from_yaml(path), name) == value


def test_a_flag_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("max_attempts: 2\ngpu_memory_utilization: 0.5\nlayerwise_transfer: false\n")
    cfg = serve_config(build_parser().parse_args(
        ["serve", "--config", str(path), "--max-attempts", "6", "--layerwise-transfer"]))
    assert (cfg.max_attempts, cfg.gpu_memory_utilization, cfg.layerwise_transfer) == (6, 0.5, True)


def test_new_knobs_reach_their_components() -> None:
    cfg = ServeConfig(max_attempts=7, gpu_memory_utilization=0.6, cuda_graph_max_batch=32,
                      layerwise_transfer=False, enforce_eager=True, max_stop_strings=3,
                      max_stop_len=20, max_stop_token_ids=5)
    router = cfg.server_config(PRESETS["tiny"]).router
    assert router.max_attempts == 7
    limits = cfg.server_config(PRESETS["tiny"]).limits
    assert (limits.max_stop_strings, limits.max_stop_len, limits.max_stop_token_ids) == (3, 20, 5)
    decode = cfg.worker_config("decode", 2)
    assert (decode.run.gpu_memory_utilization, decode.run.cuda_graph_max_batch) == (0.6, 32)
    assert decode.run.enforce_eager and not decode.layerwise_transfer
    assert cfg.worker_config("prefill", 2).run.enforce_eager


def test_prefix_caching_reaches_the_workers_and_the_router() -> None:
    on = ServeConfig()
    assert on.enable_prefix_caching  # on by default, as in vLLM V1
    off = serve_config(build_parser().parse_args(["serve", "--no-enable-prefix-caching"]))
    for cfg, want in ((on, True), (off, False)):
        for role in ("prefill", "decode"):
            assert cfg.worker_config(role, 2).enable_prefix_caching is want
        assert cfg.server_config(PRESETS["tiny"]).router.prefix_caching is want


def test_defaults_agree_with_the_component_configs() -> None:
    cfg = ServeConfig()
    worker = cfg.worker_config("decode", 2)
    plain = WorkerConfig(worker.model, worker.cache, RunnerConfig())
    for name in ("max_batch_tokens", "max_num_seqs", "lease_timeout_s", "transfer_timeout_s",
                 "host", "layerwise_transfer", "enable_prefix_caching"):
        assert getattr(worker, name) == getattr(plain, name), name
    assert worker.run.gpu_memory_utilization == RunnerConfig().gpu_memory_utilization
    assert worker.run.cuda_graph_max_batch == RunnerConfig().cuda_graph_max_batch
    assert not worker.run.enforce_eager
    server = cfg.server_config(PRESETS["tiny"])
    assert server.router == RouterConfig()
    assert server.limits == Limits(server.limits.max_context, server.limits.vocab_size,
                                   server.limits.max_tokens_limit,
                                   server.limits.default_max_tokens)


@pytest.mark.parametrize(("over", "field"), [
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_attempts": 0}, "max_attempts"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
    ({"cuda_graph_max_batch": 0}, "cuda_graph_max_batch"),
    ({"lease_timeout_s": 0.0}, "lease_timeout_s"),
    ({"port": "50051"}, "port"),
    ({"layerwise_transfer": 1}, "layerwise_transfer"),
    ({"num_decode": True}, "num_decode"),
    ({"device": "tpu"}, "device"),
    ({"max_batch_tokens": 8}, "max_batch_tokens"),
])
def test_a_bad_value_names_its_field(over: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ServeConfig(**over)  # type: ignore[arg-type]


def test_yaml_refuses_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("max_attempt: 3\n")
    with pytest.raises(ValueError, match="max_attempt"):
        ServeConfig.from_yaml(path)
    path.write_text("transfer_timeout_s: soon\n")
    with pytest.raises(ValueError, match="transfer_timeout_s"):
        ServeConfig.from_yaml(path)
    path.write_text("lease_timeout_s: 5\n")  # an int is a float here
    assert ServeConfig.from_yaml(path).lease_timeout_s == 5


@pytest.mark.parametrize("name", ["serve-cpu.yaml", "serve-gpu-8b.yaml"])
def test_the_deploy_files_load(name: str) -> None:
    cfg = ServeConfig.from_yaml(DEPLOY / name)
    assert dataclasses.replace(cfg) == cfg
