"""The decode worker's own refusal path (``_receive`` -> ``_refusal`` / the checksum), on a
real worker (the tiny dummy model, CPU) and a real Gloo channel it hosts: transfers in a
seeded random mix of good ones, stale-epoch headers, transfer ids no lease holds, and
payloads with one bit flipped. Every bad one is refused and its lease (if it named one) is
freed and reported failed, so the router re-dispatches it; every good one joins the batch
and decodes; the channel stays open, and every block is free at the end."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import torch

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import blocks_for
from pdserve.engine.kv import ChannelSpec, TransferHeader, connect_store, open_sender
from pdserve.engine.messages import Reservation, StepReport
from pdserve.engine.sequence import SamplingParams
from pdserve_testing.workers import FakeRouter, wait_for, worker_config

EPOCH = 1_718_000_000_123  # a time-based epoch, as cluster.pools.next_epoch hands out
KINDS = ("good", "stale_epoch", "wrong_id", "bit_flip")
TWO = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)


def _reports(router: FakeRouter) -> list[StepReport]:
    return [args[0] for name, args in list(router.calls) if name == "on_step"]


def test_the_decode_worker_refuses_every_bad_transfer_and_keeps_the_good_ones() -> None:
    router = FakeRouter()
    cfg = worker_config(decode_blocks=64)
    d = DecodeWorker("decode-0", cfg, router, epoch=EPOCH)
    d.start()
    tx = None
    try:
        host, port, name = d.host_channel("prefill-x")
        assert name.startswith(f"prefill-x@decode-0:e{EPOCH}.")
        spec = ChannelSpec.from_configs(d.model_config, cfg.cache, d.runner.fingerprint)
        tx = open_sender(store=connect_store(host, port, 30.0), name=name, secret=cfg.secret,
                         spec=spec, device="cpu", timeout_s=20.0, owns_store=True)
        g = torch.Generator().manual_seed(3)
        src = torch.randn(d.runner.kv_pool.shape, generator=g).to(d.runner.kv_pool.dtype)
        rng = random.Random(11)
        tally: Counter[tuple[str, str]] = Counter()
        for i in range(40):
            kind = rng.choice(KINDS)
            rid, n = f"r{i}", rng.randint(3, 30)
            lease = d.reserve(Reservation(rid, n, 0, TWO, i))
            assert lease is not None and lease.epoch == EPOCH
            nblocks = blocks_for(n, cfg.cache.block_size)
            h = TransferHeader.for_spec(
                spec, epoch=EPOCH - 1 if kind == "stale_epoch" else EPOCH,
                transfer_id=lease.transfer_id + (10**6 if kind == "wrong_id" else 0),
                num_blocks=nblocks, num_tokens=n, layers_per_message=rng.choice((1, 2)))
            if kind == "bit_flip":
                m, byte = rng.randrange(h.num_messages), rng.randrange(h.bytes_per_layer)
                tx._send_hook = _flip(m, byte, rng.randrange(8))
            ids = torch.tensor(rng.sample(range(src.shape[2]), nblocks), dtype=torch.int64)
            tx.send_header(h)
            for m in range(h.num_messages):
                layers = h.message_layers(m)
                tx.send_from_pool(src[layers.start:layers.stop], ids)
            tx.finish(first_token=7)
            tx._send_hook = None
            tally[kind, _outcome(router, d, rid, lease.transfer_id, kind)] += 1
        print("decode worker refusals:", dict(sorted(tally.items())))
        assert set(tally) == {("good", "decoded"), ("stale_epoch", "refused"),
                              ("wrong_id", "ignored"), ("bit_flip", "refused")}
        assert d.channels() == {"prefill-x": (name, True)}  # still open, still in sync
        wait_for(lambda: d.stats().num_free_blocks == d.stats().num_blocks)
    finally:
        if tx is not None:
            tx.close()
        d.shutdown()


def _outcome(router: FakeRouter, d: DecodeWorker, rid: str, tid: int, kind: str) -> str:
    """Wait for what the worker did with ``rid``'s transfer; a misaddressed transfer's lease
    is then aborted here, as the router's retry would once it expired."""
    if kind == "wrong_id":
        # Drained unmatched: nothing reports it, and the lease it did not claim still waits.
        wait_for(lambda: d._channels.get("prefill-x") is not None
                 and not d._channels.get("prefill-x").busy)  # type: ignore[union-attr]
        assert d.sched.lease(tid) is not None
        assert d.abort(rid, tid)
        return "ignored"

    def seen() -> str | None:
        for r in _reports(router):
            if any(f[0] == rid for f in r.failed):
                (why,) = [f[2] for f in r.failed if f[0] == rid]
                assert ("epoch: got" in why) if kind == "stale_epoch" else (
                    "checksum mismatch" in why)
                return "refused"
            if any(t.request_id == rid and t.finish_reason for t in r.tokens):
                assert rid in [j for rep in _reports(router) for j in rep.joined]
                return "decoded"
        return None

    wait_for(lambda: seen() is not None)
    got = seen()
    assert got is not None
    assert d.sched.find(rid) is None  # its blocks are free either way
    return got


def _flip(message: int, byte: int, bit: int) -> Any:
    def hook(m: int, t: torch.Tensor) -> torch.Tensor:
        if m != message:
            return t
        bad = t.clone()
        bad.view(-1).view(torch.uint8)[byte] ^= 1 << bit
        return bad

    return hook
