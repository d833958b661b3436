import pytest

from pdserve.router.policy import (
    DecodeLoad,
    LocalPrefillRule,
    PrefillLoad,
    decode_order,
    pick_prefill,
    prefill_locally,
)


def test_pick_prefill_least_queued() -> None:
    ws = [PrefillLoad("p0", 100), PrefillLoad("p1", 10), PrefillLoad("p2", 10)]
    assert pick_prefill(ws).name == "p1"
    ws[1].queued_tokens += 1  # p1's queue grew past p2's
    assert pick_prefill(ws).name == "p2"
    with pytest.raises(LookupError):
        pick_prefill([])


def test_decode_order_by_free_kv() -> None:
    ws = [DecodeLoad("d0", num_running=4, kv_usage=0.5),
          DecodeLoad("d1", num_running=9, kv_usage=0.1),
          DecodeLoad("d2", num_running=1, kv_usage=0.1)]
    assert [w.name for w in decode_order(ws)] == ["d2", "d1", "d0"]


def test_local_prefill_off_by_default() -> None:
    off = LocalPrefillRule()
    assert not off.enabled
    for n, queued in ((1, 0), (1, 10**9), (4096, 10**9)):
        assert not prefill_locally(n, PrefillLoad("p", queued), off)


def test_short_prompts_prefill_locally() -> None:
    rule = LocalPrefillRule(local_prefill_max_tokens=64)
    assert rule.enabled
    idle = PrefillLoad("p")
    assert prefill_locally(1, idle, rule) and prefill_locally(64, idle, rule)
    assert not prefill_locally(65, idle, rule)
    assert not prefill_locally(65, PrefillLoad("p", 10**9), rule)  # no queue threshold


def test_a_backed_up_prefill_worker_sends_every_prompt_local() -> None:
    rule = LocalPrefillRule(prefill_queue_max_tokens=8192)
    assert rule.enabled
    assert not prefill_locally(1, PrefillLoad("p", 0), rule)  # no length threshold
    assert not prefill_locally(4096, PrefillLoad("p", 8192), rule)  # at the limit: remote
    assert prefill_locally(4096, PrefillLoad("p", 8193), rule)
    both = LocalPrefillRule(local_prefill_max_tokens=64, prefill_queue_max_tokens=8192)
    assert prefill_locally(64, PrefillLoad("p", 0), both)
    assert not prefill_locally(65, PrefillLoad("p", 0), both)
    assert prefill_locally(65, PrefillLoad("p", 9000), both)


@pytest.mark.parametrize("field", ["local_prefill_max_tokens", "prefill_queue_max_tokens"])
def test_local_prefill_thresholds_are_not_negative(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LocalPrefillRule(**{field: -1})
