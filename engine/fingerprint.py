"""What a worker serves, as one short hash: the model's shape, its weights and its tokenizer.
Two ends of a KV channel must agree on it (``ChannelSpec.fingerprint``): a prefill worker with
other weights (another checkpoint of the same shape, a different quantization) or another
tokenizer would hand the decode worker KV it cannot continue from.

- Weights: per tensor (in name order) its name, dtype, shape and a checksum of its bytes,
  computed once at load where the weights live: on a GPU the position-sensitive checksum
  of the KV payloads (``kernels.kv_checksum``, milliseconds), on the CPU CRC-32. Workers of
  one deployment run on one kind of device, so they compute the same kind.
- Tokenizer: the bytes of a Hugging Face folder's tokenizer files, or a GGUF file's
  ``tokenizer.*`` metadata; dummy weights stand in with the default GGUF's tokenizer (the
  one ``engine.tokenizer`` serves them with) or, offline, the byte-level one.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import torch

from pdserve.engine.config import ModelConfig, ModelSpec
from pdserve.engine.model_files import default_gguf_path, resolve_gguf_path
from pdserve.engine.weights import gguf_tokenizer_digest
from pdserve.kernels.kv_checksum import kv_checksum

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{_checksum(t)};".encode())
    return h.hexdigest()[:16]


def _checksum(t: torch.Tensor) -> str:
    """On a GPU, the KV payload's checksum kernel; on the CPU, CRC-32 of the bytes (one
    pass at memory speed: the int64 torch reference takes seconds for a small model)."""
    if t.is_cuda:
        return f"k{int(kv_checksum(t))}"
    return f"c{zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data)}"


def tokenizer_digest(spec: ModelSpec) -> str:
    if spec.source == "hf":
        assert spec.path is not None
        folder = Path(spec.path)
        h = hashlib.sha256()
        for name in HF_TOKENIZER_FILES:
            f = folder / name
            if f.is_file():
                h.update(name.encode() + b"\0" + f.read_bytes())
        return h.hexdigest()[:16]
    try:
        path = default_gguf_path() if spec.source == "dummy" else resolve_gguf_path(spec.path)
    except (RuntimeError, OSError):
        if spec.source != "dummy":
            raise
        return "byte-level"  # engine.tokenizer's offline stand-in for dummy weights
    return gguf_tokenizer_digest(path)


def serving_fingerprint(model: ModelConfig, weights: str, tokenizer: str) -> str:
    """The one hash of shape, weights and tokenizer that the KV handshake compares."""
    blob = f"{model.fingerprint()}:{weights}:{tokenizer}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
