"""The autoscaler's pure part: how many workers each pool needs by the cost model and the
live signals, within bounds, and when a pool changes size (cooldown, delay: no flapping);
and its knobs as flags and YAML keys."""

from __future__ import annotations

import dataclasses
import math

import pytest

from pdserve.cluster.autoscale_config import AutoscaleConfig
from pdserve.cluster.autoscaler import Pacer, PoolShape, capacity, needed
from pdserve.cluster.cli import build_parser, serve_config
from pdserve.cluster.config import ServeConfig
from pdserve.router.cost_model import CostModel, Profile
from pdserve.router.fitting import LinearFit, TransferFit
from pdserve.router.load import LoadSnapshot

# Prefill: 10 ms + 1 ms a token (a full step of 100 tokens: 0.11 s, 909 tokens/s).
# Decode: 20 ms + 1 ms a sequence (at a 51 ms TPOT objective and 0.7 utilization the batch
# stops at 15: a 35 ms step, 428.6 tokens/s).
PROFILE = Profile(
    device="cpu", model="synthetic", dtype="float32", block_size=16, max_batch_tokens=100,
    kv_bytes_per_token=1000, prefill=LinearFit(0.010, 0.001, 0.0),
    decode=LinearFit(0.020, 0.001, 0.0), transfer=TransferFit(0.001, 1e6), samples={},
)
MODEL = CostModel(PROFILE)
DISAGG = PoolShape(colocated=False, max_batch_tokens=100, max_num_seqs=64,
                   tpot_objective_s=0.051)
CFG = AutoscaleConfig(autoscale=True, min_prefill=1, max_prefill=8, min_decode=1,
                      max_decode=8)


def load(rate: float = 10.0, prompt: int = 100, out: int = 50, **over: object) -> LoadSnapshot:
    base: dict[str, object] = dict(
        arrival_rate=rate, prompt_token_rate=rate * prompt, mean_output_tokens=out,
        mean_context_tokens=prompt + out, serving={"prefill": 1, "decode": 1})
    base.update(over)
    return LoadSnapshot(**base)  # type: ignore[arg-type]


def test_capacity_follows_the_cost_model() -> None:
    cap = capacity(MODEL, DISAGG, 100, 150, 0.7)
    assert cap.prefill_tokens_s == pytest.approx(100 / 0.11)
    assert cap.decode_batch == 15 and cap.decode_tokens_s == pytest.approx(15 / 0.035)
    free = capacity(MODEL, dataclasses.replace(DISAGG, tpot_objective_s=None), 100, 150, 0.7)
    assert free.decode_batch == 64  # no objective: the batch cap


def test_pools_are_sized_from_the_work_per_second() -> None:
    # 1000 prompt tokens/s: 1.1 worker-s/s; 500 output tokens/s: 1.17; / 0.7 each.
    assert needed(load(), MODEL, DISAGG, CFG) == {"prefill": 2, "decode": 2}
    assert needed(load(rate=30.0), MODEL, DISAGG, CFG) == {"prefill": 5, "decode": 5}
    colocated = dataclasses.replace(DISAGG, colocated=True)
    assert needed(load(), MODEL, colocated, CFG) == {"decode": 4}
    assert needed(load(rate=0.0, out=0), MODEL, DISAGG, CFG) == {"prefill": 1, "decode": 1}


def test_bounds_hold() -> None:
    tight = dataclasses.replace(CFG, max_prefill=3, min_decode=6, max_decode=6)
    assert needed(load(rate=30.0), MODEL, DISAGG, tight) == {"prefill": 3, "decode": 6}


def test_live_signals_grow_a_pool_the_model_thinks_big_enough() -> None:
    light = load(rate=0.1, serving={"prefill": 2, "decode": 3}, decode_batch=2,
                 queued_prompt_tokens=50)
    assert needed(light, MODEL, DISAGG, CFG) == {"prefill": 1, "decode": 1}
    missed_ttft = dataclasses.replace(light, ttft_attainment=0.5)
    assert needed(missed_ttft, MODEL, DISAGG, CFG) == {"prefill": 3, "decode": 1}
    for signal in ({"tpot_attainment": 0.8}, {"waiting": 3}, {"kv_usage": 0.95}):
        assert needed(dataclasses.replace(light, **signal), MODEL, DISAGG, CFG) == \
            {"prefill": 1, "decode": 4}, signal
    fine = dataclasses.replace(light, ttft_attainment=0.95, tpot_attainment=1.0, kv_usage=0.5)
    assert needed(fine, MODEL, DISAGG, CFG) == {"prefill": 1, "decode": 1}
    colocated = dataclasses.replace(DISAGG, colocated=True)
    assert needed(missed_ttft, MODEL, colocated, CFG) == {"decode": 4}


def test_misses_of_a_load_that_is_gone_ask_for_nothing() -> None:
    gone = load(rate=0.1, serving={"prefill": 2, "decode": 3}, ttft_attainment=0.2,
                tpot_attainment=0.3)  # nothing queued, nothing running
    assert needed(gone, MODEL, DISAGG, CFG) == {"prefill": 1, "decode": 1}


def test_an_uncalibrated_model_leaves_sizing_to_the_signals() -> None:
    blind = CostModel(None)
    assert needed(load(rate=50.0), blind, DISAGG, CFG) == {"prefill": 1, "decode": 1}
    busy = load(rate=50.0, waiting=5)
    assert needed(busy, blind, DISAGG, CFG) == {"prefill": 1, "decode": 2}


def test_pacing_grows_at_once_and_shrinks_slowly() -> None:
    cfg = dataclasses.replace(CFG, scale_up_cooldown_s=30.0, scale_down_delay_s=60.0)
    p = Pacer(cfg)
    assert p.moves({"decode": 3}, {"decode": 1}, 0.0) == {"decode": 2}
    assert p.moves({"decode": 5}, {"decode": 3}, 10.0) == {"decode": 0}  # cooldown
    assert p.moves({"decode": 5}, {"decode": 3}, 31.0) == {"decode": 2}
    # Too big from t=40: one worker drains after 60 s of it, the next 60 s later.
    assert p.moves({"decode": 1}, {"decode": 5}, 40.0) == {"decode": 0}
    assert p.moves({"decode": 1}, {"decode": 5}, 99.0) == {"decode": 0}
    assert p.moves({"decode": 1}, {"decode": 5}, 100.0) == {"decode": -1}
    assert p.moves({"decode": 1}, {"decode": 4}, 130.0) == {"decode": 0}
    assert p.moves({"decode": 1}, {"decode": 4}, 160.0) == {"decode": -1}


def test_a_blip_does_not_shrink_a_pool() -> None:
    p = Pacer(dataclasses.replace(CFG, scale_down_delay_s=60.0))
    assert p.moves({"decode": 1}, {"decode": 2}, 0.0) == {"decode": 0}
    assert p.moves({"decode": 2}, {"decode": 2}, 30.0) == {"decode": 0}  # load came back
    assert p.moves({"decode": 1}, {"decode": 2}, 61.0) == {"decode": 0}  # the clock restarts
    assert p.moves({"decode": 1}, {"decode": 2}, 121.0) == {"decode": -1}


def test_config_bounds_are_checked_and_named() -> None:
    with pytest.raises(ValueError, match=r"max_decode \(1\) must be >= min_decode \(2\)"):
        AutoscaleConfig(min_decode=2, max_decode=1)
    with pytest.raises(ValueError, match="min_prefill must be >= 1"):
        AutoscaleConfig(min_prefill=0)
    with pytest.raises(ValueError, match="target_utilization must be <= 1"):
        AutoscaleConfig(target_utilization=1.5)


def test_knobs_are_flags_and_top_level_yaml_keys() -> None:
    cfg = ServeConfig.from_dict({"num_decode": 2, "autoscale": True, "max_decode": 6})
    assert cfg.num_decode == 2
    assert cfg.autoscaling == AutoscaleConfig(autoscale=True, max_decode=6)
    with pytest.raises(ValueError, match="unknown config keys: \\['max_decoders'\\]"):
        ServeConfig.from_dict({"max_decoders": 6})
    args = build_parser().parse_args(["serve", "--autoscale", "--min-decode", "2",
                                      "--scale-down-delay-s", "5"])
    got = serve_config(args).autoscaling
    assert (got.autoscale, got.min_decode, got.scale_down_delay_s) == (True, 2, 5.0)
    assert got.max_decode == AutoscaleConfig().max_decode
    assert math.isclose(got.target_utilization, 0.7)


def test_without_autoscale_the_pools_are_held_at_their_sizes() -> None:
    from pdserve.cluster.scaling import keeper

    held = keeper(ServeConfig(num_prefill=2, num_decode=3))
    assert held.bounds("prefill") == (2, 2) and held.bounds("decode") == (3, 3)
    assert held.scale_up_cooldown_s == 0.0
    # A decode worker died: the router serves 2; the pool needs its third back at once.
    gone = load(rate=0.0, out=0, serving={"prefill": 2, "decode": 2})
    need = needed(gone, MODEL, DISAGG, held)
    assert need == {"prefill": 2, "decode": 3}
    assert Pacer(held).moves(need, {"prefill": 2, "decode": 2}, 0.0) == \
        {"prefill": 0, "decode": 1}
