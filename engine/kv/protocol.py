"""The KV transfer wire protocol (DESIGN.md section 5): what goes over a KV channel
(:mod:`engine.kv`), and the pure pieces both ends share (spec, header, trailer, checksum,
errors, the header's match against a reservation).

Wire protocol of one transfer (rank 0 -> rank 1, tensors only, never pickle)::

    header    int64[16] (TransferHeader, little-endian bytes) over the doorbell connection
    message m uint8[k_m * bytes_per_layer]  (layers [m*k, m*k + k_m) as [k_m, 2, n, bs, Hk, D])
    trailer   int64[8]                      (status and the payload checksum)

The layers travel in **messages** of ``k = layers_per_message`` consecutive layers (the last
one may hold fewer). Layer-wise streaming during the forward pass sends one layer per message
(``k = 1``) as each layer finishes; a request whose KV is complete goes in a few large
messages, so per-message costs (a kernel launch, an NCCL operation, host work) stay small
against the bytes: 32 one-layer sends of a 4k-token prompt spent more time in fixed costs
than on NVLink.

The **doorbell** (:mod:`engine.kv.doorbell`, protocol 4) is a TCP connection of the
channel's own, from the prefill end to the decode end, that carries each transfer's header
before any data moves: the receiver learns the transfer's geometry and posts its first
receives at once. An idle receiver waits on it for as long as it likes (a posted Gloo/NCCL
receive that times out breaks the pair, and in a trial on two H200s an NCCL header receive
kept posted hung the idle decode process), and sees a dead sender as a closed connection.
Protocol 3 rang a ``TCPStore`` key instead, one hop more through the store server.

The **checksum** (:func:`kv_checksum`) covers the whole payload, the layers in order, as one
sequence of 32-bit words with a weight per position; a message adds its words' share at its
offset, computed in the same kernel pass that packs (sender) or unpacks (receiver) it, on the
tensors' device, so no payload is copied to the host and nothing is read twice. It goes in
the trailer because the header leaves before the (streamed) layers exist.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from pdserve.engine.config import CacheConfig, ModelConfig
from pdserve.kernels import kv_checksum as checksum_kernel
from pdserve.kernels.kv_pack import MESSAGE_BYTES, layers_per_message

PROTOCOL_VERSION = 4
KV_LAYOUT = "L,2,N,bs,Hk,D"

HEADER_MAGIC = 0x50444B56_48445231  # "PDKVHDR1"
TRAILER_MAGIC = 0x50444B56_54524C31  # "PDKVTRL1"
HEADER_SLOTS = 16
TRAILER_SLOTS = 8
_HEADER_STRUCT = struct.Struct(f"<{HEADER_SLOTS}q")

# Header slots.
_H_MAGIC, _H_VERSION, _H_TRANSFER_ID, _H_EPOCH = 0, 1, 2, 3
_H_NUM_BLOCKS, _H_NUM_LAYERS, _H_BYTES_PER_LAYER, _H_CHECK = 4, 5, 6, 7
_H_NUM_TOKENS, _H_FIRST_TOKEN, _H_LAYERS_PER_MESSAGE = 8, 9, 10
_H_SPARE = range(11, HEADER_SLOTS)

# Trailer slots. The sender writes every slot on the host but the checksum, which it takes on
# the device (TRAILER_CHECKSUM).
_T_MAGIC, _T_VERSION, _T_TRANSFER_ID, _T_EPOCH, _T_STATUS = 0, 1, 2, 3, 4
TRAILER_CHECKSUM = 5
_T_FIRST_TOKEN = 6  # set when the header left before the first token existed (layer-wise)
STATUS_OK = 0
STATUS_CANCELLED = 1

# Gloo tags (NCCL ignores them; there the order alone frames the stream).
TAG_TRAILER = 2
TAG_LAYER0 = 16

# The header's self-check: a Mersenne prime modulus keeps every product below 2**63.
CHECKSUM_PRIME = 2_147_483_647  # 2**31 - 1
_LAYER_MULT = 1_000_003


_INT64_MAX = (1 << 63) - 1


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class ChannelError(RuntimeError):
    """Base class of KV channel failures (also raised for misuse of the channel API)."""


class HandshakeError(ChannelError):
    """The two ends of a channel disagree on the model, dtype or KV geometry."""


class TransferError(ChannelError):
    """One transfer failed (bad header, mismatch with the reservation, checksum, cancel).

    Unless it is a :class:`ChannelClosed`, the channel is still in sync and usable."""


class TransferTimeout(TransferError):
    """No transfer started within the timeout. The channel is unaffected."""


class ChannelClosed(TransferError):
    """The channel is broken or closed; open a new one (under a new name)."""


# --------------------------------------------------------------------------------------
# Channel spec (compared in the handshake)
# --------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype name {name!r}")
    return dtype


@dataclass(frozen=True)
class ChannelSpec:
    """What both ends of a channel must agree on before any KV moves."""

    fingerprint: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_layout: str = KV_LAYOUT
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _dtype_from_name(self.dtype)
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ChannelSpec.{name} must be a positive int, got {value!r}")

    @classmethod
    def from_configs(cls, model: ModelConfig, cache: CacheConfig,
                     fingerprint: str | None = None) -> ChannelSpec:
        """``fingerprint``: what the worker serves (``engine.fingerprint``: shape, weights,
        tokenizer); the model's shape alone without one (benchmarks, tests)."""
        return cls(
            fingerprint=fingerprint or model.fingerprint(),
            dtype=dtype_name(cache.dtype),
            block_size=cache.block_size,
            num_layers=model.num_layers,
            num_kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _dtype_from_name(self.dtype)

    def layer_shape(self, num_blocks: int) -> tuple[int, int, int, int, int]:
        """Shape of one layer's payload: ``[2, n, bs, Hk, D]``."""
        return (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def layer_bytes(self, num_blocks: int) -> int:
        itemsize = self.torch_dtype.itemsize  # no tensor op: this runs on every transfer
        return 2 * num_blocks * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def spec_differences(prefill: dict[str, Any], decode: dict[str, Any]) -> list[str]:
    """``"field: prefill=x decode=y"`` for every field of two JSON specs that differs."""
    order = [f.name for f in dataclasses.fields(ChannelSpec)]
    order += sorted((set(prefill) | set(decode)) - set(order))
    missing = "<missing>"
    diffs = []
    for key in order:
        a, b = prefill.get(key, missing), decode.get(key, missing)
        if a != b:
            diffs.append(f"{key}: prefill={a} decode={b}")
    return diffs


# --------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------


def _header_check(values: Sequence[int]) -> int:
    """A self-check over every header slot except the check slot itself."""
    acc = 0
    for i, v in enumerate(values):
        if i != _H_CHECK:
            acc = (acc * _LAYER_MULT + v % CHECKSUM_PRIME + i) % CHECKSUM_PRIME
    return acc


@dataclass(frozen=True)
class TransferHeader:
    """The fixed-size header that opens every transfer.

    On the wire it is ``int64[16]``: magic, protocol version, transfer_id, epoch, num_blocks,
    num_layers, bytes_per_layer, a self-check of the header, num_tokens, first_token,
    layers_per_message and five spare slots (zero). The payload checksum rides in the
    trailer, because the header leaves before the (streamed) layers exist.
    """

    transfer_id: int
    epoch: int
    num_blocks: int
    num_layers: int
    bytes_per_layer: int
    num_tokens: int
    first_token: int = -1  # the prefill side's sampled first token; -1 for none
    layers_per_message: int = 1  # k: the layers travel in messages of k (the last: fewer)

    def __post_init__(self) -> None:
        lower = {"num_layers": 1, "first_token": -1, "layers_per_message": 1}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"header field {f.name} must be an int, got {value!r}")
            low = lower.get(f.name, 0)
            if not low <= value <= _INT64_MAX:
                raise ValueError(f"header field {f.name}={value} out of range")
        if self.layers_per_message > self.num_layers:
            raise ValueError(
                f"header field layers_per_message={self.layers_per_message} exceeds "
                f"num_layers={self.num_layers}"
            )

    @classmethod
    def for_spec(
        cls,
        spec: ChannelSpec,
        *,
        transfer_id: int,
        epoch: int,
        num_blocks: int,
        num_tokens: int,
        first_token: int = -1,
        layers_per_message: int = 1,
    ) -> TransferHeader:
        """A header whose geometry (layers, bytes per layer) follows ``spec``."""
        return cls(
            transfer_id=transfer_id,
            epoch=epoch,
            num_blocks=num_blocks,
            num_layers=spec.num_layers,
            bytes_per_layer=spec.layer_bytes(num_blocks),
            num_tokens=num_tokens,
            first_token=first_token,
            layers_per_message=layers_per_message,
        )

    @property
    def payload_bytes(self) -> int:
        return self.num_layers * self.bytes_per_layer

    @property
    def num_messages(self) -> int:
        return -(-self.num_layers // self.layers_per_message)

    def message_layers(self, m: int) -> range:
        """The layers message ``m`` carries."""
        k = self.layers_per_message
        return range(m * k, min(self.num_layers, (m + 1) * k))

    def _slots(self) -> list[int]:
        slots = [0] * HEADER_SLOTS
        slots[_H_MAGIC] = HEADER_MAGIC
        slots[_H_VERSION] = PROTOCOL_VERSION
        slots[_H_TRANSFER_ID] = self.transfer_id
        slots[_H_EPOCH] = self.epoch
        slots[_H_NUM_BLOCKS] = self.num_blocks
        slots[_H_NUM_LAYERS] = self.num_layers
        slots[_H_BYTES_PER_LAYER] = self.bytes_per_layer
        slots[_H_NUM_TOKENS] = self.num_tokens
        slots[_H_FIRST_TOKEN] = self.first_token
        slots[_H_LAYERS_PER_MESSAGE] = self.layers_per_message
        slots[_H_CHECK] = _header_check(slots)
        return slots

    def to_bytes(self) -> bytes:
        """The header as the doorbell carries it: ``int64[16]``, little-endian."""
        return _HEADER_STRUCT.pack(*self._slots())

    @classmethod
    def from_bytes(cls, raw: bytes) -> TransferHeader:
        """Parse and validate what the doorbell carried; :class:`TransferError` on garbage."""
        if len(raw) != _HEADER_STRUCT.size:
            raise TransferError(
                f"header must be {_HEADER_STRUCT.size} bytes (int64[{HEADER_SLOTS}]), "
                f"got {len(raw)}"
            )
        v = _HEADER_STRUCT.unpack(raw)
        if v[_H_MAGIC] != HEADER_MAGIC:
            raise TransferError(f"bad header magic {v[_H_MAGIC] & ((1 << 64) - 1):#018x}")
        if v[_H_VERSION] != PROTOCOL_VERSION:
            raise TransferError(
                f"header protocol version {v[_H_VERSION]}, expected {PROTOCOL_VERSION}"
            )
        if v[_H_CHECK] != _header_check(v):
            raise TransferError("header self-check failed (corrupted header)")
        if any(v[i] for i in _H_SPARE):
            raise TransferError("header spare slots are not zero")
        try:
            return cls(
                transfer_id=v[_H_TRANSFER_ID],
                epoch=v[_H_EPOCH],
                num_blocks=v[_H_NUM_BLOCKS],
                num_layers=v[_H_NUM_LAYERS],
                bytes_per_layer=v[_H_BYTES_PER_LAYER],
                num_tokens=v[_H_NUM_TOKENS],
                first_token=v[_H_FIRST_TOKEN],
                layers_per_message=v[_H_LAYERS_PER_MESSAGE],
            )
        except ValueError as e:
            raise TransferError(f"bad header: {e}") from e


def match_header(
    header: TransferHeader,
    expected_transfer_id: int,
    expected_epoch: int,
    expected_blocks: int,
    expected_tokens: int | None = None,
) -> None:
    """Fail closed (:class:`TransferError` naming every field that differs) unless ``header``
    is exactly the transfer the caller reserved blocks for; ``expected_tokens``, when given,
    is checked too.

    The one check of an arriving header against a reservation: the decode worker calls it
    before it receives a transfer, and drains the transfer it rejects."""
    expected = [
        ("transfer_id", header.transfer_id, expected_transfer_id),
        ("epoch", header.epoch, expected_epoch),
        ("num_blocks", header.num_blocks, expected_blocks),
    ]
    if expected_tokens is not None:
        expected.append(("num_tokens", header.num_tokens, expected_tokens))
    wrong = [f"{name}: got {got}, expected {want}" for name, got, want in expected if got != want]
    if wrong:
        raise TransferError(
            f"transfer {header.transfer_id} (epoch {header.epoch}) does not match the "
            f"reservation for transfer {expected_transfer_id} (epoch {expected_epoch}): "
            + "; ".join(wrong)
        )


def message_name(h: TransferHeader, m: int) -> str:
    """``"layer 3"`` or ``"layers 4-7"``: what message ``m`` carries, for errors."""
    layers = h.message_layers(m)
    if len(layers) == 1:
        return f"layer {layers.start}"
    return f"layers {layers.start}-{layers.stop - 1}"


# --------------------------------------------------------------------------------------
# Trailer
# --------------------------------------------------------------------------------------


def write_trailer(words: NDArray[np.int64], header: TransferHeader, status: int,
                  first_token: int) -> None:
    """Fill ``words`` (``int64[TRAILER_SLOTS]`` on the host) with ``header``'s trailer, all
    but the checksum slot (:data:`TRAILER_CHECKSUM`, zero here), which the sender takes on
    the device."""
    words[:] = 0
    words[_T_FIRST_TOKEN] = first_token
    words[_T_MAGIC] = TRAILER_MAGIC
    words[_T_VERSION] = PROTOCOL_VERSION
    words[_T_TRANSFER_ID] = header.transfer_id
    words[_T_EPOCH] = header.epoch
    words[_T_STATUS] = status


def read_trailer(words: Sequence[int], header: TransferHeader) -> tuple[int, int, int] | None:
    """The status, payload checksum and first token in the trailer ``words``, or None unless
    they are a well-formed trailer of ``header``'s transfer (garbled)."""
    if (words[_T_MAGIC] != TRAILER_MAGIC or words[_T_VERSION] != PROTOCOL_VERSION
            or words[_T_TRANSFER_ID] != header.transfer_id or words[_T_EPOCH] != header.epoch
            or words[_T_STATUS] not in (STATUS_OK, STATUS_CANCELLED)):
        return None
    return words[_T_STATUS], words[TRAILER_CHECKSUM], words[_T_FIRST_TOKEN]


# --------------------------------------------------------------------------------------
# Checksum
# --------------------------------------------------------------------------------------


def checksum_tensor(t: Tensor, word_offset: int = 0) -> Tensor:
    """:func:`kv_checksum` of ``t`` taken at ``word_offset`` as a 0-d int64 tensor on ``t``'s
    device (no host sync): one fused Triton pass on a GPU, the identical torch computation
    elsewhere."""
    if not t.is_contiguous():
        raise ValueError("checksum needs a contiguous tensor")
    if t.is_cuda:
        return checksum_kernel.kv_checksum(t, word_offset)
    return checksum_kernel.kv_checksum_ref(t, word_offset)


def kv_checksum(t: Tensor) -> int:
    """Position-sensitive checksum of a contiguous tensor's bytes (``kernels.kv_checksum``:
    ``sum_i word_i * weight(i) mod 2**64`` over 32-bit words, a distinct odd weight per
    position), computed on the tensor's device with no copy of the payload to the host.
    A transfer's checksum is this over its whole payload ``[L, 2, n, bs, Hk, D]``."""
    return int(checksum_tensor(t).item())


__all__ = [
    "CHECKSUM_PRIME",
    "HEADER_MAGIC",
    "HEADER_SLOTS",
    "KV_LAYOUT",
    "MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "STATUS_CANCELLED",
    "STATUS_OK",
    "TAG_LAYER0",
    "TAG_TRAILER",
    "TRAILER_CHECKSUM",
    "TRAILER_MAGIC",
    "TRAILER_SLOTS",
    "ChannelClosed",
    "ChannelError",
    "ChannelSpec",
    "HandshakeError",
    "TransferError",
    "TransferHeader",
    "TransferTimeout",
    "checksum_tensor",
    "dtype_name",
    "kv_checksum",
    "layers_per_message",
    "match_header",
    "message_name",
    "read_trailer",
    "spec_differences",
    "write_trailer",
]
