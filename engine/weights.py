"""Load a Llama-family model's config and weights: a GGUF file, an HF folder, or dummy weights.

Every source yields the same canonical, fused layout (HF orientation, ``y = x @ W.T``):

    embed [V, H]   norm [H]   lm_head [V, H] (the same tensor object as embed when tied)
    layers.{i}.input_norm [H]     layers.{i}.qkv [q_size + 2 * kv_size, H]  (rows: q, k, v)
    layers.{i}.qkv_bias [q_size + 2 * kv_size]  (only when config.attention_bias)
    layers.{i}.o [H, q_size]      layers.{i}.post_norm [H]
    layers.{i}.gate_up [2 * I, H] (gate rows, then up rows)       layers.{i}.down [H, I]

Tensors are converted one at a time straight to ``dtype`` on ``device``, so at most one
layer's pieces exist twice (before fusion) besides the result.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from pdserve.engine.config import PRESETS, ModelConfig, ModelSpec
from pdserve.engine.model_files import resolve_gguf_path
from pdserve.kernels.rope_scaling import RopeScaling

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

Weights = dict[str, torch.Tensor]

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral",
}
_GGUF_ARCHITECTURES = ("llama", "qwen2")


# --------------------------------------------------------------------------- config


def load_model_config(spec: ModelSpec) -> ModelConfig:
    """The model's shape and numerics, read from the GGUF metadata, the HF folder's
    config.json, or the dummy preset."""
    if spec.source == "dummy":
        assert spec.preset is not None  # ModelSpec validated it
        return PRESETS[spec.preset]
    if spec.source == "hf":
        assert spec.path is not None
        return _hf_config(Path(spec.path))
    return _gguf_config(resolve_gguf_path(spec.path))


def _gguf_config(path: Path) -> ModelConfig:
    info = _gguf_info(path)
    meta = info.meta
    arch = str(meta.get("general.architecture", ""))
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(_GGUF_ARCHITECTURES)})")

    def num(key: str, default: float | None = None) -> float:
        value = meta.get(key, default)
        if not isinstance(value, int | float):
            raise ValueError(f"{path}: GGUF metadata {key} is missing or not a number")
        return value

    tensor_names = info.tensor_names
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp stores Llama-3.1 RoPE scaling as a per-frequency factor tensor, which
        # RopeScaling cannot express; running without it would silently change every output.
        raise NotImplementedError(f"{path}: GGUF with rope_freqs (Llama-3.1 RoPE scaling) is "
                                  "not supported; load the HF folder instead")
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise NotImplementedError(f"{path}: GGUF RoPE scaling {scaling_type!r} not supported")

    hidden = int(num(f"{arch}.embedding_length"))
    num_heads = int(num(f"{arch}.attention.head_count"))
    head_dim = int(num(f"{arch}.attention.key_length", hidden // num_heads))
    rope_dim = int(num(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise NotImplementedError(f"{path}: partial rotary ({rope_dim} of {head_dim} dims)")
    vocab_size = info.num_tokens or int(num(f"{arch}.vocab_size"))
    # llama.cpp may split Llama-3 style stop tokens into eos and eot/eom; all of them end a turn.
    eos_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id")
    eos = tuple(dict.fromkeys(int(num(k)) for k in eos_keys if k in meta))
    bos_key = "tokenizer.ggml.bos_token_id"
    return ModelConfig(
        name=str(meta.get("general.name") or path.stem),
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(num(f"{arch}.feed_forward_length")),
        num_layers=int(num(f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(num(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        max_position=int(num(f"{arch}.context_length")),
        rms_norm_eps=float(num(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(num(f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=int(num(bos_key)) if bos_key in meta else None,
        eos_token_ids=eos,
    )


def _hf_config(folder: Path) -> ModelConfig:
    cfg = _read_json(folder / "config.json", what="HF model folder")
    archs = cfg.get("architectures") or []
    family = _HF_ARCHITECTURES.get(archs[0]) if archs else cfg.get("model_type")
    if family not in _HF_ARCHITECTURES.values():
        raise ValueError(f"{folder}: architecture {archs or cfg.get('model_type')} is not "
                         f"supported (supported: {', '.join(_HF_ARCHITECTURES)})")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
        raise NotImplementedError(f"{folder}: only SiLU MLPs without bias are supported")

    # transformers >= 5 writes rope_parameters (theta inside); older versions rope_theta and
    # rope_scaling.
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise NotImplementedError(f"{folder}: rope_type {rope_type!r} is not supported")

    num_heads = int(cfg["num_attention_heads"])
    max_position = int(cfg["max_position_embeddings"])
    window = cfg.get("sliding_window")
    if window and (family == "mistral" or cfg.get("use_sliding_window")):
        # We run full attention only; it equals sliding-window attention up to the window.
        max_position = min(max_position, int(window))
    eos = _as_ids(cfg.get("eos_token_id"))
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():  # instruct models often list their end-of-turn tokens only here
        eos += _as_ids(_read_json(gen_path, what="generation config").get("eos_token_id"))
    has_lm_head = "lm_head.weight" in _safetensors_index(folder)
    return ModelConfig(
        name=folder.resolve().name,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // num_heads),
        max_position=max_position,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)) or not has_lm_head,
        attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )


def _as_ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    raise ValueError(f"token id must be an int or a list of ints, got {value!r}")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


# --------------------------------------------------------------------------- weights


def load_weights(spec: ModelSpec, config: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str, progress: bool = True) -> Weights:
    """The model's weights in the canonical fused layout (module docstring), each tensor
    contiguous, in ``dtype`` on ``device``. ``progress`` shows a per-tensor bar on stderr."""
    device = torch.device(device)
    if spec.source == "dummy":
        weights = _dummy_weights(config, spec.seed, dtype, device, progress)
    elif spec.source == "hf":
        assert spec.path is not None
        weights = _hf_weights(Path(spec.path), config, dtype, device, progress)
    else:
        weights = _gguf_weights(resolve_gguf_path(spec.path), config, dtype, device, progress)
    _check_shapes(weights, config)
    return weights


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every canonical tensor for ``config``."""
    h, i, qkv = config.hidden_size, config.intermediate_size, config.q_size + 2 * config.kv_size
    shapes: dict[str, tuple[int, ...]] = {
        "embed": (config.vocab_size, h), "norm": (h,), "lm_head": (config.vocab_size, h),
    }
    for layer in range(config.num_layers):
        p = f"layers.{layer}."
        shapes |= {p + "input_norm": (h,), p + "qkv": (qkv, h), p + "o": (h, config.q_size),
                   p + "post_norm": (h,), p + "gate_up": (2 * i, h), p + "down": (h, i)}
        if config.attention_bias:
            shapes[p + "qkv_bias"] = (qkv,)
    return shapes


def _check_shapes(weights: Weights, config: ModelConfig) -> None:
    expected = expected_shapes(config)
    if missing := sorted(set(expected) - set(weights)):
        raise ValueError(f"model weights lack {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"weight {name} has shape {tuple(weights[name].shape)}, "
                             f"config {config.name!r} expects {shape}")


def _fuse(loaded: Weights, config: ModelConfig, get: Callable[[str], torch.Tensor | None],
          layer: int) -> None:
    """Read one layer through ``get`` (piece name, a key of ``_GGUF_PIECES``/``_HF_PIECES``
    -> tensor or None) and store it fused. Pieces are dropped as soon as they are fused."""
    p = f"layers.{layer}."

    def need(piece: str) -> torch.Tensor:
        t = get(piece)
        if t is None:
            raise ValueError(f"layer {layer}: weight {piece} is missing")
        return t

    loaded[p + "input_norm"] = need("input_norm")
    loaded[p + "qkv"] = torch.cat([need("q"), need("k"), need("v")])
    if config.attention_bias:
        loaded[p + "qkv_bias"] = torch.cat([need("q_bias"), need("k_bias"), need("v_bias")])
    loaded[p + "o"] = need("o")
    loaded[p + "post_norm"] = need("post_norm")
    loaded[p + "gate_up"] = torch.cat([need("gate"), need("up")])
    loaded[p + "down"] = need("down")


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, leave=False)


# GGUF ----------------------------------------------------------------------


_GGUF_PIECES = {
    "input_norm": "attn_norm.weight", "q": "attn_q.weight", "k": "attn_k.weight",
    "v": "attn_v.weight", "q_bias": "attn_q.bias", "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias", "o": "attn_output.weight", "post_norm": "ffn_norm.weight",
    "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
}


def _gguf_weights(path: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                  progress: bool) -> Weights:
    from gguf.quants import dequantize

    arch = str(_gguf_info(path).meta.get("general.architecture", ""))
    reader = _open_gguf(path)
    by_name = {t.name: t for t in reader.tensors}
    bar = _progress(len(by_name), f"loading {path.name}", progress)

    def read(name: str) -> torch.Tensor | None:
        t: ReaderTensor | None = by_name.get(name)
        if t is None:
            return None
        array = dequantize(t.data, t.tensor_type)  # float32; F32 tensors view the mmap
        if not array.flags.writeable:
            array = array.copy()
        # GGUF lists dims fastest-first (ggml's ne); torch wants them slowest-first.
        out = torch.from_numpy(array.reshape(tuple(int(d) for d in reversed(t.shape))))
        bar.update(1)
        return out.to(device=device, dtype=dtype)

    def required(name: str) -> torch.Tensor:
        t = read(name)
        if t is None:
            raise ValueError(f"{path}: GGUF tensor {name} is missing")
        return t

    def piece(layer: int) -> Callable[[str], torch.Tensor | None]:
        def get(name: str) -> torch.Tensor | None:
            t = read(f"blk.{layer}.{_GGUF_PIECES[name]}")
            # llama.cpp's converter interleaves each head's rotary halves in Q and K (for its
            # RoPE kernel); HF's rotate_half layout keeps them as two halves.
            if t is not None and arch == "llama" and name in ("q", "q_bias", "k", "k_bias"):
                heads = config.num_heads if name.startswith("q") else config.num_kv_heads
                t = _unpermute_rope(t, heads)
            return t
        return get

    with bar:
        weights: Weights = {"embed": required("token_embd.weight"),
                            "norm": required("output_norm.weight")}
        for layer in range(config.num_layers):
            _fuse(weights, config, piece(layer), layer)
        weights["lm_head"] = (weights["embed"] if config.tie_word_embeddings
                              else required("output.weight"))
    return weights


def _unpermute_rope(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert llama.cpp's Q/K row permutation: within each head, rows were reordered from
    [first half, second half] to interleaved pairs. Works for weights [rows, H] and biases."""
    rows = t.shape[0]
    half = rows // num_heads // 2
    # [rows, ...] -> [heads, half, 2, ...] -> [heads, 2, half, ...] -> [rows, ...]
    return t.reshape(num_heads, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _open_gguf(path: Path) -> GGUFReader:
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except Exception as exc:  # gguf raises assorted errors on corrupt files
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


@dataclass(frozen=True)
class _GGUFInfo:
    meta: dict[str, object]  # scalar and string metadata (arrays such as the vocab left out)
    tensor_names: frozenset[str]
    num_tokens: int  # length of tokenizer.ggml.tokens, 0 without one
    tokenizer_digest: str  # of every tokenizer.* field (engine.fingerprint)


def _gguf_info(path: Path) -> _GGUFInfo:
    """A GGUF file's metadata, parsed once per file version: parsing the vocabulary arrays
    takes seconds, and config, weights and tokenizer loading each ask."""
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = path.stat()
    return _gguf_info_cached(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _gguf_info_cached(path: Path, mtime_ns: int, size: int) -> _GGUFInfo:
    from gguf import GGUFValueType

    reader = _open_gguf(path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return _GGUFInfo(
        meta={name: field.contents() for name, field in reader.fields.items()
              if field.types and field.types[0] != GGUFValueType.ARRAY},
        tensor_names=frozenset(t.name for t in reader.tensors),
        num_tokens=0 if tokens is None else len(tokens.data),
        tokenizer_digest=_digest(
            key.encode() + b"\0" + b"".join(part.tobytes() for part in field.parts)
            for key, field in sorted(reader.fields.items()) if key.startswith("tokenizer.")),
    )


def _digest(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def gguf_tokenizer_digest(path: Path) -> str:
    """A hash of a GGUF file's tokenizer (its ``tokenizer.*`` metadata)."""
    return _gguf_info(path).tokenizer_digest


def read_gguf_string(path: Path, key: str) -> str | None:
    """One string from a GGUF file's metadata (e.g. ``tokenizer.chat_template``), or None."""
    value = _gguf_info(path).meta.get(key)
    return value if isinstance(value, str) else None


# HF safetensors --------------------------------------------------------------


_HF_PIECES = {
    "input_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
    "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias", "o": "self_attn.o_proj.weight",
    "post_norm": "post_attention_layernorm.weight", "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
}


def _safetensors_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file holding it (sharded or single-file folders)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, what="safetensors index")["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names |= dict.fromkeys(f.keys(), file)
    return names


def _hf_weights(folder: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                progress: bool) -> Weights:
    from safetensors import safe_open

    index = _safetensors_index(folder)
    wanted = [n for n in index if n.startswith("model.") or n == "lm_head.weight"]
    bar = _progress(len(wanted), f"loading {folder.name}", progress)
    with contextlib.ExitStack() as stack, bar:
        handles = {file: stack.enter_context(safe_open(file, framework="pt"))
                   for file in sorted(set(index.values()))}

        def read(name: str) -> torch.Tensor | None:
            file = index.get(name)
            if file is None:
                return None
            t = handles[file].get_tensor(name)
            bar.update(1)
            return t.to(device=device, dtype=dtype)

        def required(name: str) -> torch.Tensor:
            t = read(name)
            if t is None:
                raise ValueError(f"{folder}: tensor {name} is missing")
            return t

        weights: Weights = {"embed": required("model.embed_tokens.weight"),
                            "norm": required("model.norm.weight")}
        for layer in range(config.num_layers):
            _fuse(weights, config, functools.partial(_hf_piece, read, layer), layer)
        weights["lm_head"] = (weights["embed"] if config.tie_word_embeddings
                              else required("lm_head.weight"))
    return weights


def _hf_piece(read: Callable[[str], torch.Tensor | None], layer: int,
              piece: str) -> torch.Tensor | None:
    return read(f"model.layers.{layer}.{_HF_PIECES[piece]}")


# dummy -----------------------------------------------------------------------


def _dummy_weights(config: ModelConfig, seed: int, dtype: torch.dtype, device: torch.device,
                   progress: bool) -> Weights:
    """Seeded N(0, 0.02) matrices and unit norms, generated on ``device`` in ``dtype`` (no
    float32 or host copy of the model). Same seed, device and dtype -> same weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = expected_shapes(config)
    if config.tie_word_embeddings:
        del shapes["lm_head"]
    bar = _progress(len(shapes), f"dummy {config.name}", progress)
    weights: Weights = {}
    with bar:
        for name, shape in shapes.items():
            if name.endswith("norm"):
                weights[name] = torch.ones(shape, dtype=dtype, device=device)
            else:
                weights[name] = torch.empty(shape, dtype=dtype, device=device).normal_(
                    0.0, 0.02, generator=gen)
            bar.update(1)
    if config.tie_word_embeddings:
        weights["lm_head"] = weights["embed"]
    return weights

