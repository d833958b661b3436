import pytest

from router.policy import DecodeLoad, PrefillLoad, decode_order, pick_prefill


def test_pick_prefill_least_queued() -> None:
    ws = [PrefillLoad("p0", 100), PrefillLoad("p1", 10), PrefillLoad("p2", 10)]
    assert pick_prefill(ws).name == "p1"
    ws[1].draining = True
    assert pick_prefill(ws).name == "p2"
    with pytest.raises(LookupError):
        pick_prefill([PrefillLoad("p", draining=True)])


def test_decode_order_by_free_kv() -> None:
    ws = [DecodeLoad("d0", 4, kv_usage=0.5), DecodeLoad("d1", 9, kv_usage=0.1),
          DecodeLoad("d2", 1, kv_usage=0.1), DecodeLoad("d3", draining=True)]
    assert [w.name for w in decode_order(ws)] == ["d2", "d1", "d0"]
