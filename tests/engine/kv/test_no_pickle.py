"""No pickle on the data paths: a KV transfer over a channel (handshake, header, layers,
checksum) and a frame of the router-to-frontend feed go through with every pickle entry
point made to fail. A peer that could make the other side unpickle could make it run code."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
import torch.distributed.distributed_c10d as c10d

from pdserve.engine.messages import TokenLogprobs
from pdserve.router.stream import StreamEnd, encode, read_frame
from pdserve_testing.kv import SPEC, both, make_header, make_layers, pair, recv_checked, send_blocks


class PickleUsed(AssertionError):
    pass


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PickleUsed("pickle was called on a data path")

    for name in ("dumps", "loads", "dump", "load", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    # torch.distributed's object collectives keep their own references (bound at import).
    for name in ("_pickler", "_unpickler"):
        monkeypatch.setattr(c10d, name, refuse)
    yield


def test_a_kv_transfer_uses_no_pickle(decode_store: Any, no_pickle: None) -> None:
    with pytest.raises(PickleUsed):  # the guard is live
        pickle.dumps(1)
    with pair(decode_store) as (tx, rx):
        layers = make_layers(SPEC, 3, seed=7)
        _, (header, got) = both(lambda: send_blocks(tx, make_header(SPEC, 5, 3), layers),
                                lambda: recv_checked(rx, 5, 1, 3))
    assert header.transfer_id == 5
    assert all(a.equal(b) for a, b in zip(got, layers, strict=True))


def test_a_feed_frame_uses_no_pickle(no_pickle: None) -> None:
    items = [("r1", [1, 2], "hi", None, 0, None),
             ("r2", [3], "!", StreamEnd(finish_reason="stop", completion_tokens=1), 1,
              [TokenLogprobs(-0.5, (3, 7), (-0.5, -1.25))])]

    async def round_trip() -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(encode(items))
        reader.feed_eof()
        return await read_frame(reader)

    assert asyncio.run(round_trip()) == items
