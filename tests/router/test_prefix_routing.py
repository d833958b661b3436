"""The router's prefix index and the placement preference it feeds: pure logic, on the
synthetic cost model of test_placement and the fake workers of pdserve_testing.router."""

from __future__ import annotations

import asyncio

from pdserve.engine.messages import FirstToken
from pdserve.router.cost_model import CostModel, LinearFit, Profile, TransferFit
from pdserve.router.placement import Ask, Placer
from pdserve.router.policy import DecodeLoad, PrefillLoad, decode_order, pick_prefill
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.slo import ValidSlo
from pdserve_testing.router import RouterSetup, settle

NO_SLO = ValidSlo(None, None)
# Prefill step 10 ms + 1 ms a token + 1 us per unit of attention; decode 20 ms + 1 ms a seq.
PROFILE = Profile(
    device="cpu", model="synthetic", dtype="float32", block_size=16, max_batch_tokens=100,
    kv_bytes_per_token=1000, prefill=LinearFit(0.010, 0.001, 1e-6),
    decode=LinearFit(0.020, 0.001, 0.0), transfer=TransferFit(0.001, 1e6), samples={},
)


def placer(local: bool) -> Placer:
    return Placer(CostModel(PROFILE), max_num_seqs=8, block_size=16, local_prefill=local,
                  clock=lambda: 0.0)


def free(name: str) -> DecodeLoad:
    return DecodeLoad(name, num_free_blocks=1000, known=True)


def test_index_longest_prefix_per_worker_and_never_the_last_token() -> None:
    ix = PrefixIndex(block_size=4)
    prompt = list(range(20))  # five full blocks
    h = ix.hashes(prompt)
    ix.record("w0", h[:3])
    ix.record("w1", h)
    assert ix.cached_tokens("w0", h, 20) == 12
    assert ix.cached_tokens("w1", h, 20) == 16  # the block with the last token is computed
    assert ix.cached_tokens("w2", h, 20) == 0
    other = ix.hashes([99, *prompt[1:]])  # the first block differs: no later block matches
    assert ix.cached_tokens("w1", other, 20) == 0
    assert ix.cached_by_worker(["w0", "w1", "w2"], h, 20) == {"w0": 12, "w1": 16}


def test_index_keeps_at_most_the_workers_pool_dropping_the_oldest() -> None:
    ix = PrefixIndex(block_size=4)
    a, b = ix.hashes(list(range(100, 116))), ix.hashes(list(range(200, 216)))
    ix.set_capacity("w", 6)
    ix.record("w", a)  # 4 blocks
    ix.record("w", b)  # 4 more: a's first two go
    assert ix.size("w") == 6
    assert ix.cached_tokens("w", a, 17) == 0 and ix.cached_tokens("w", b, 17) == 16
    ix.record("w", a[:1])  # used again: now the newest
    assert ix.cached_tokens("w", a, 17) == 4
    ix.forget("w")
    assert ix.cached_tokens("w", b, 17) == 0


def test_disabled_index_hashes_nothing() -> None:
    ix = PrefixIndex(block_size=4, enabled=False)
    assert ix.hashes(list(range(40))) == []


def test_placement_prefers_the_prefix_holder() -> None:
    pl = placer(local=False)
    ps = [PrefillLoad("p0"), PrefillLoad("p1")]
    ds = [free("d0")]
    ask = Ask(400, NO_SLO, {"p1": 384})
    best = pl.options(ask, ps, ds, {})[0]
    assert best.prefill == "p1"
    # 400 tokens from scratch: 4 steps + 400 ms; with 384 cached: 1 step + 16 ms.
    assert pl.remote_ttft_s(ps[1], 400, cached=384) < pl.remote_ttft_s(ps[0], 400) / 10


def test_a_loaded_holder_loses_to_an_idle_worker_when_the_queue_costs_more() -> None:
    pl = placer(local=False)
    ps = [PrefillLoad("p0"), PrefillLoad("p1", queued_tokens=2000, queued_attention=2000**2)]
    ask = Ask(200, NO_SLO, {"p1": 160})
    assert pl.options(ask, ps, [free("d0")], {})[0].prefill == "p0"
    # A short queue on the holder costs less than the prefix saves: the holder wins.
    ps[1] = PrefillLoad("p1", queued_tokens=20, queued_attention=400)
    assert pl.options(ask, ps, [free("d0")], {})[0].prefill == "p1"


def test_local_prefill_prefers_the_decode_worker_holding_the_prefix() -> None:
    pl = placer(local=True)
    ds = [free("d0"), free("d1")]
    best = pl.options(Ask(300, NO_SLO, {"d1": 288}), [], ds, {})[0]
    assert (best.decode, best.prefill) == ("d1", None)


def test_fifo_rules_break_ties_by_the_prefix() -> None:
    ps = [PrefillLoad("p0"), PrefillLoad("p1")]
    assert pick_prefill(ps).name == "p0"
    assert pick_prefill(ps, {"p1": 32}).name == "p1"
    ps[1].queued_tokens = 5  # a tie-break only: the shorter queue still wins
    assert pick_prefill(ps, {"p1": 32}).name == "p0"
    ds = [free("d0"), free("d1")]
    assert [d.name for d in decode_order(ds, {"d1": 16})] == ["d1", "d0"]


def test_router_records_placed_prompts_and_leases_carry_the_tokens() -> None:
    async def main() -> None:
        s = RouterSetup(prefix_caching=True)
        first = await s.admit("a", 100)
        (res,) = s.d.called("reserve")
        assert res[0].token_ids == tuple(first.prompt_ids)
        ix = s.router.dispatcher.prefix
        h = ix.request_hashes(first)
        assert ix.cached_tokens("prefill-0", h, 100) == 96
        assert ix.cached_tokens("decode-0", h, 100) == 96
        # A second prompt sharing the first 64 tokens: the prefill queue counts only the
        # tokens the worker is expected to compute.
        before = s.queued
        await s.admit("b", 80)
        assert s.queued - before == 80 - 64
        s.first_token("prefill-0", first)
        await settle()

    asyncio.run(main())


def test_hit_counters_count_what_the_workers_report() -> None:
    async def main() -> None:
        s = RouterSetup(prefix_caching=True)
        req = await s.admit("a", 50)
        assert req.lease is not None
        s.router.on_first_token(FirstToken("prefill-0", "a", req.lease.transfer_id, 65, None,
                                           0.0, 0.0, num_tokens=50, cached_tokens=32))
        assert s.value("pdserve:prefix_cache_queries_total", role="prefill") == 50
        assert s.value("pdserve:prefix_cache_hits_total", role="prefill") == 32
        assert s.value("pdserve:prefix_cache_hits_total", role="decode") == 0
        # A late report of the same attempt is not counted twice.
        s.router.on_first_token(FirstToken("prefill-0", "a", req.lease.transfer_id, 65, None,
                                           0.0, 0.0, num_tokens=50, cached_tokens=32))
        assert s.value("pdserve:prefix_cache_queries_total", role="prefill") == 50

    asyncio.run(main())
