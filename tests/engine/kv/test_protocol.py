"""The KV wire protocol (engine/kv/protocol.py): checksum, channel spec, header, trailer, and
the header's match against a reservation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pdserve.engine.kv.protocol import (
    HEADER_SLOTS,
    STATUS_CANCELLED,
    TRAILER_SLOTS,
    ChannelSpec,
    TransferError,
    TransferHeader,
    kv_checksum,
    layers_per_message,
    match_header,
    read_trailer,
    write_trailer,
)
from pdserve_testing.kv import SPEC, make_header


def test_kv_checksum_position_sensitive() -> None:
    x = torch.randn(SPEC.layer_shape(5), generator=torch.Generator().manual_seed(0))
    base = kv_checksum(x)
    assert isinstance(base, int) and base != 0
    assert kv_checksum(x.clone()) == base

    swapped = x.clone()  # swap blocks 1 and 3 of the K half
    swapped[0, 1], swapped[0, 3] = x[0, 3].clone(), x[0, 1].clone()
    assert kv_checksum(swapped) != base

    kv_swapped = torch.stack([x[1], x[0]])  # K and V exchanged
    assert kv_checksum(kv_swapped) != base

    flat = x.clone().view(-1)  # two neighbouring words exchanged
    flat[10], flat[11] = x.view(-1)[11].item(), x.view(-1)[10].item()
    assert kv_checksum(flat) != base

    bit = x.clone()  # one bit flipped
    bit.view(torch.int32).view(-1)[7] ^= 1
    assert kv_checksum(bit) != base

    # bf16, odd byte counts and empty tensors all work.
    xb = x.to(torch.bfloat16)
    sb = xb.clone()
    sb[1, 0], sb[1, 2] = xb[1, 2].clone(), xb[1, 0].clone()
    assert kv_checksum(xb) != kv_checksum(sb)
    odd = torch.arange(7, dtype=torch.uint8)
    assert kv_checksum(odd) != kv_checksum(odd.flip(0))
    assert kv_checksum(torch.empty(0)) == 0
    with pytest.raises(ValueError, match="contiguous"):
        kv_checksum(x.transpose(1, 2))


def test_spec_from_configs() -> None:
    from pdserve.engine.config import PRESETS, CacheConfig

    model = PRESETS["tiny"]
    spec = ChannelSpec.from_configs(model, CacheConfig(block_size=16, dtype=torch.bfloat16))
    assert spec == ChannelSpec(
        fingerprint=model.fingerprint(), dtype="bfloat16", block_size=16,
        num_layers=model.num_layers, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
    )
    assert spec.layer_bytes(3) == 2 * 3 * 16 * model.num_kv_heads * model.head_dim * 2
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(spec, dtype="float128")


def test_header_round_trip_and_garbage() -> None:
    h = make_header(SPEC, tid=17, num_blocks=5, epoch=3)
    raw = h.to_bytes()
    assert len(raw) == HEADER_SLOTS * 8
    assert TransferHeader.from_bytes(raw) == h
    assert h.bytes_per_layer == SPEC.layer_bytes(5) == 2 * 5 * 4 * 2 * 8 * 4

    for slot, value, msg in [
        (0, 12345, "magic"),
        (1, 99, "version"),
        (4, 6, "self-check"),  # num_blocks changed in flight
        (12, 1, "self-check"),
    ]:
        bad = bytearray(raw)
        bad[slot * 8:slot * 8 + 8] = value.to_bytes(8, "little", signed=True)
        with pytest.raises(TransferError, match=msg):
            TransferHeader.from_bytes(bytes(bad))
    with pytest.raises(TransferError, match="int64"):
        TransferHeader.from_bytes(raw[:-8])
    with pytest.raises(TransferError, match="int64"):
        TransferHeader.from_bytes(bytes(24))
    with pytest.raises(ValueError, match="epoch"):
        dataclasses.replace(h, epoch=-1)


def test_header_messages() -> None:
    h = dataclasses.replace(make_header(SPEC, tid=3, num_blocks=2), layers_per_message=2)
    assert TransferHeader.from_bytes(h.to_bytes()) == h
    assert h.num_messages == 2  # 3 layers: [0, 1], [2]
    assert [list(h.message_layers(m)) for m in range(h.num_messages)] == [[0, 1], [2]]
    with pytest.raises(ValueError, match="layers_per_message=4 exceeds num_layers=3"):
        dataclasses.replace(h, layers_per_message=4)
    with pytest.raises(ValueError, match="layers_per_message"):
        dataclasses.replace(h, layers_per_message=0)
    assert layers_per_message(16 << 20, 32, target=64 << 20) == 4
    assert layers_per_message(200 << 20, 32) == 1
    assert layers_per_message(1, 32) == 32
    assert TransferHeader.from_bytes(h.to_bytes()) == h  # the doorbell's form
    with pytest.raises(TransferError, match="must be 128 bytes"):
        TransferHeader.from_bytes(h.to_bytes()[:-1])
    raw = bytearray(h.to_bytes())
    raw[16] ^= 1  # transfer id
    with pytest.raises(TransferError, match="self-check"):
        TransferHeader.from_bytes(bytes(raw))


def test_match_header_fails_closed() -> None:
    h = make_header(SPEC, tid=17, num_blocks=5, epoch=3)
    match_header(h, 17, 3, 5)
    with pytest.raises(TransferError, match="transfer_id: got 17, expected 18"):
        match_header(h, 18, 3, 5)
    with pytest.raises(TransferError, match="epoch: got 3, expected 4"):
        match_header(h, 17, 4, 5)
    with pytest.raises(TransferError, match="num_blocks: got 5, expected 6"):
        match_header(h, 17, 3, 6)
    with pytest.raises(TransferError, match="epoch: got 3, expected 2; num_blocks: got 5"):
        match_header(h, 17, 2, 4)


def test_match_header_checks_tokens_when_asked() -> None:
    h = make_header(SPEC, tid=17, num_blocks=5, epoch=3)  # 19 tokens
    match_header(h, 17, 3, 5, 19)
    with pytest.raises(TransferError, match="num_tokens: got 19, expected 18"):
        match_header(h, 17, 3, 5, 18)


def test_trailer_round_trip_and_garbage() -> None:
    h = make_header(SPEC, tid=17, num_blocks=5, epoch=3)
    words = np.zeros(TRAILER_SLOTS, dtype=np.int64)
    write_trailer(words, h, STATUS_CANCELLED, first_token=42)
    assert read_trailer([int(w) for w in words], h) == (STATUS_CANCELLED, 0, 42)
    assert read_trailer([int(w) for w in words], dataclasses.replace(h, epoch=4)) is None
    garbled = [int(w) for w in words]
    garbled[0] ^= 1  # magic
    assert read_trailer(garbled, h) is None
