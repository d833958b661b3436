"""Fail closed, at the channel level, on a real Gloo channel: 200 transfers in a seeded
random mix of good ones, stale-epoch headers, transfer ids no reservation holds, and
payloads with one random bit flipped. The receiver does what the decode worker does (look
the reservation up by transfer id, ``match_header`` against it, drain what it refuses,
verify the checksum before the blocks are used): every bad transfer is refused, no refused
header's payload reaches the reserved blocks, every good transfer lands exactly, and the
channel is in sync and usable after."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.engine.kv import TransferError, TransferHeader, match_header
from pdserve_testing.kv import SPEC, both, pair, pool_of, send_pool_blocks

EPOCH = 41  # the receiving incarnation's; a stale transfer carries an older one
KINDS = ("good", "stale_epoch", "wrong_id", "bit_flip")
POOL_BLOCKS = 16
SENTINEL = -7.0


@dataclass(frozen=True)
class Planned:
    kind: str
    tid: int  # what the header says
    blocks: list[int]  # the receiver's reserved blocks (and the sender's source blocks)
    layers_per_message: int
    flip: tuple[int, int, int]  # (message, byte, bit), for a bit flip

    def header(self) -> TransferHeader:
        n = len(self.blocks)
        return TransferHeader.for_spec(
            SPEC, transfer_id=self.tid, epoch=EPOCH - 3 if self.kind == "stale_epoch" else EPOCH,
            num_blocks=n, num_tokens=n * SPEC.block_size - 1,
            layers_per_message=self.layers_per_message)


def plan(n: int, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choice(KINDS)
        blocks = rng.sample(range(POOL_BLOCKS), rng.randint(1, 4))
        k = rng.choice((1, SPEC.num_layers))
        messages = -(-SPEC.num_layers // k)
        message_bytes = k * SPEC.layer_bytes(len(blocks))
        flip = (rng.randrange(messages), rng.randrange(message_bytes), rng.randrange(8))
        out.append(Planned(kind, 1000 + i, blocks, k, flip))
    return out


def test_every_stale_misaddressed_or_corrupted_transfer_is_refused(decode_store: Any) -> None:
    transfers = plan(200, seed=20240611)
    src = pool_of(SPEC, POOL_BLOCKS, seed=5)
    # The receiver's reservations, by transfer id: a misaddressed transfer names none.
    reserved = {t.tid: t for t in transfers if t.kind != "wrong_id"}
    final = Planned("good", 5000, [0, 1, 2], 1, (0, 0, 0))
    with pair(decode_store) as (tx, rx):
        def send() -> None:
            for t in [*transfers, final]:
                ids = torch.tensor(t.blocks, dtype=torch.int64)
                if t.kind == "bit_flip":
                    tx._send_hook = _flipper(*t.flip)
                send_pool_blocks(tx, t.header(), src, ids)
                tx._send_hook = None

        def recv() -> list[tuple[str, bool]]:
            outcomes = []
            for t in [*transfers, final]:
                dst = torch.full_like(src, SENTINEL)
                h = rx.recv_header()
                assert h.transfer_id == t.tid
                res = reserved.pop(h.transfer_id, None) if t is not final else final
                outcome, used = "accepted", False
                try:
                    if res is None:
                        raise TransferError("no reservation holds this transfer id")
                    n = len(res.blocks)
                    match_header(h, res.tid, EPOCH, n, n * SPEC.block_size - 1)
                except TransferError:
                    rx.discard()  # drained: the reserved blocks never see the payload
                    assert (dst == SENTINEL).all()
                    outcome = "refused_header"
                else:
                    ids = torch.tensor(res.blocks, dtype=torch.int64)
                    try:
                        rx.recv_pool_blocks(h, dst, ids)
                        used = True  # verified: only now may the blocks be used
                    except TransferError as e:
                        assert "checksum mismatch" in str(e)
                        outcome = "refused_checksum"
                    if used:
                        assert torch.equal(dst[:, :, ids], src[:, :, ids])
                assert not rx.closed and not rx.busy  # in sync for the next one
                outcomes.append((outcome, used))
            return outcomes

        _, outcomes = both(send, recv, timeout=120)
        assert not tx.closed and not rx.closed
    *got, last = outcomes
    assert last == ("accepted", True)  # the channel still works after all of it
    expected = {"good": "accepted", "stale_epoch": "refused_header",
                "wrong_id": "refused_header", "bit_flip": "refused_checksum"}
    tally: Counter[tuple[str, str]] = Counter()
    for t, (outcome, used) in zip(transfers, got, strict=True):
        tally[t.kind, outcome] += 1
        assert outcome == expected[t.kind], (t, outcome)
        assert used == (t.kind == "good")
    kinds = Counter(t.kind for t in transfers)
    assert all(kinds[k] > 20 for k in KINDS)  # the mix exercised every kind
    print("refusals:", dict(sorted(tally.items())))


def _flipper(message: int, byte: int, bit: int) -> Any:
    """A send hook: message ``message`` goes out with one bit flipped (after the sender took
    its checksum)."""
    def hook(m: int, t: torch.Tensor) -> torch.Tensor:
        if m != message:
            return t
        bad = t.clone()
        raw = bad.view(-1).view(torch.uint8)
        raw[byte] ^= 1 << bit
        return bad

    return hook
