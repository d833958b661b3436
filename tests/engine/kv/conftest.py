"""The decode store the KV channel tests of one module open their channels through."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pdserve.engine.kv import host_store
from pdserve_testing.kv import HOST, OPEN_TIMEOUT_S


@pytest.fixture(scope="module")
def decode_store() -> Iterator[tuple[torch.distributed.TCPStore, int]]:
    store, port = host_store(HOST, 0, timeout_s=OPEN_TIMEOUT_S)
    yield store, port
