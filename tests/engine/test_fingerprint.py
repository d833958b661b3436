"""What the KV handshake compares covers the weights and the tokenizer, not only the shape:
workers of the same shape with other weights (or another tokenizer) do not pair up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import PRESETS, ModelSpec
from pdserve.engine.fingerprint import serving_fingerprint, tokenizer_digest, weights_digest
from pdserve.engine.kv import HandshakeError
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve_testing.workers import FakeRouter, worker_config


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"embed": torch.randn(8, 4, generator=g), "head": torch.randn(4, 8, generator=g)}


def test_the_weights_digest_sees_a_value_a_dtype_and_a_name() -> None:
    w = weights()
    base = weights_digest(w)
    assert weights_digest(weights()) == base  # the same values: the same digest
    nudged = {**w, "embed": w["embed"].clone()}
    nudged["embed"][3, 1] += 1e-3
    assert weights_digest(nudged) != base
    swapped = {**w, "embed": w["embed"].flip(0).contiguous()}  # same values, other places
    assert weights_digest(swapped) != base
    assert weights_digest({**w, "embed": w["embed"].to(torch.bfloat16)}) != base
    assert weights_digest({"embedding": w["embed"], "head": w["head"]}) != base


def test_the_tokenizer_digest_reads_the_hf_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (tmp_path / "config.json").write_text("{}")
    spec = ModelSpec("hf", str(tmp_path))
    base = tokenizer_digest(spec)
    (tmp_path / "config.json").write_text('{"x": 1}')  # not the tokenizer's
    assert tokenizer_digest(spec) == base
    (tmp_path / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')
    assert tokenizer_digest(spec) != base


def test_the_serving_fingerprint_covers_shape_weights_and_tokenizer() -> None:
    tiny, other = PRESETS["tiny"], dataclasses.replace(PRESETS["tiny"], num_layers=3)
    base = serving_fingerprint(tiny, "w", "t")
    assert serving_fingerprint(tiny, "w", "t") == base
    for changed in (serving_fingerprint(other, "w", "t"), serving_fingerprint(tiny, "w2", "t"),
                    serving_fingerprint(tiny, "w", "t2")):
        assert changed != base


def test_workers_with_other_weights_of_the_same_shape_refuse_to_pair() -> None:
    cfg = worker_config()
    p = PrefillWorker("prefill-0", cfg, FakeRouter())
    same = DecodeWorker("decode-0", cfg, FakeRouter())
    other = DecodeWorker("decode-1", dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, seed=cfg.model.seed + 1)), FakeRouter())
    assert p.runner.fingerprint == same.runner.fingerprint != other.runner.fingerprint
    try:
        host, port, name = other.host_channel(p.name)
        with pytest.raises(HandshakeError, match="fingerprint: prefill="):
            p.connect(other.name, host, port, name)
    finally:
        for w in (p, same, other):
            w.shutdown()
