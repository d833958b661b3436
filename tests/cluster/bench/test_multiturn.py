"""The multiturn dataset: conversations sharing one system prompt, each turn's prompt
extending the one before it."""

import pytest

from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.workload import Workload
from pdserve.cluster.cli import build_parser
from pdserve.proto import pdserve_pb2 as pb

INFO = pb.ModelInfo(model_name="m", vocab_size=5000, max_context_length=4096,
                    eos_token_ids=[2])


def cfg(**over: object) -> BenchConfig:
    base: dict[str, object] = dict(dataset="multiturn", system_prompt_len=100, turns=3,
                                   users=2, input_len=10, output_len=5)
    base.update(over)
    return BenchConfig(**base)  # type: ignore[arg-type]


def test_turns_extend_the_previous_prompt_and_share_the_system_prompt() -> None:
    prompts = Workload(cfg(), INFO).take(12)
    ids = [list(p.token_ids or ()) for p in prompts]
    system = ids[0][:100]
    assert all(p[:100] == system for p in ids)  # one system prompt for every conversation
    # Request i: slot i % 2, turn (i // 2) % 3. Turn 0: system + one message.
    assert len(ids[0]) == len(ids[1]) == 110
    for i in (2, 3, 4, 5):  # turns 1 and 2 extend the same slot's previous prompt
        prev = ids[i - 2]
        assert ids[i][:len(prev)] == prev
        assert len(ids[i]) == len(prev) + 5 + 10  # the answer, then a new message
    assert ids[6][:110] != ids[0][:110] and len(ids[6]) == 110  # a new conversation
    assert all(p.output_len == 5 for p in prompts)
    assert all(2 not in p for p in ids)  # no EOS in the random tokens


def test_same_seed_same_prompts_however_drawn() -> None:
    a = Workload(cfg(), INFO).take(300)
    w = Workload(cfg(), INFO)
    w.take(10)
    assert w.take(300) == a


def test_a_conversation_outgrowing_the_context_starts_over() -> None:
    small = pb.ModelInfo(model_name="m", vocab_size=5000, max_context_length=160)
    prompts = Workload(cfg(turns=50, users=1), small).take(20)
    assert all(len(p.token_ids or ()) + p.output_len <= 160 for p in prompts)
    assert min(len(p.token_ids or ()) for p in prompts[1:]) == 110  # some restarted


def test_bad_shapes_are_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="--turns"):
        cfg(turns=0)
    with pytest.raises(ValueError, match="--system-prompt-len"):
        cfg(system_prompt_len=-1)
    with pytest.raises(ValueError, match="--system-prompt-len"):
        Workload(cfg(system_prompt_len=5000), INFO)


def test_flags_reach_the_config() -> None:
    args = build_parser().parse_args(["bench", "--dataset", "multiturn", "--turns", "6",
                                      "--users", "3", "--system-prompt-len", "64"])
    assert (args.dataset, args.turns, args.users, args.system_prompt_len) == (
        "multiturn", 6, 3, 64)
