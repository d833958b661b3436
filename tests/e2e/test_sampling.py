"""The sampling parameters end to end (real Ray workers, KV over the channel, gRPC): greedy
with penalties and min_tokens against transformers' ``generate``, logprobs against the HF
model's log_softmax, n > 1 on one stream, and the bounds refused with INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest

from pdserve.proto.client import Client, collect, collect_choices
from pdserve_testing.e2e import HFReference, openai_penalties

pytestmark = pytest.mark.e2e

PROMPTS = ["Q: What is 2+2?\nA:", "The capital of France is",
           "List three colors: red, green, and blue. List three more colors: red, green,"]
N = 16
LOGPROB_TOL = 2e-3  # pdserve's kernels against transformers', float32 on the CPU


def _ids(hf: HFReference, text: str) -> list[int]:
    return list(hf.tokenizer(text)["input_ids"])


def test_greedy_with_repetition_penalty_matches_transformers(
    client: Client, hf_reference: HFReference
) -> None:
    for prompt in PROMPTS:
        ids = _ids(hf_reference, prompt)
        got = collect(client.generate(token_ids=ids, max_tokens=N, temperature=0.0,
                                      repetition_penalty=1.3)).token_ids
        assert got == hf_reference.generate(ids, N, repetition_penalty=1.3), prompt
    # ... and the penalty changed something (else the comparison proves nothing).
    ids = _ids(hf_reference, PROMPTS[2])
    assert hf_reference.generate(ids, N, repetition_penalty=1.3) != hf_reference.greedy(ids, N)


def test_greedy_with_presence_and_frequency_matches_the_openai_formula(
    client: Client, hf_reference: HFReference
) -> None:
    ids = _ids(hf_reference, PROMPTS[2])
    got = collect(client.generate(token_ids=ids, max_tokens=N, temperature=0.0,
                                  presence_penalty=0.8, frequency_penalty=0.6)).token_ids
    want = hf_reference.generate(ids, N,
                                 logits_processor=openai_penalties(len(ids), 0.8, 0.6))
    assert got == want


def test_min_tokens_holds_back_eos_like_transformers(
    client: Client, hf_reference: HFReference
) -> None:
    tok = hf_reference.tokenizer
    ids = _ids(hf_reference, tok.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], add_generation_prompt=True, tokenize=False))
    plain = hf_reference.greedy(ids, 40)
    assert plain[-1] == hf_reference.eos, "the prompt must end at EOS for this test"
    floor = len(plain) + 4
    want = hf_reference.generate(ids, floor + 8, min_new_tokens=floor)
    done = collect(client.generate(token_ids=ids, max_tokens=floor + 8, temperature=0.0,
                                   min_tokens=floor))
    assert done.token_ids == want
    assert len(done.token_ids) >= floor and hf_reference.eos not in done.token_ids[:floor]


def test_logprobs_of_a_greedy_stream_match_the_model(
    client: Client, hf_reference: HFReference
) -> None:
    ids = _ids(hf_reference, PROMPTS[1])
    done = collect(client.generate(token_ids=ids, max_tokens=12, temperature=0.0,
                                   logprobs=True, top_logprobs=5))
    assert len(done.logprobs) == len(done.token_ids) == 12
    ref = hf_reference.logprobs(ids, done.token_ids)
    for i, (tok, entry) in enumerate(zip(done.token_ids, done.logprobs, strict=True)):
        assert entry.logprob == pytest.approx(float(ref[i, tok]), abs=LOGPROB_TOL)
        top = [t.token_id for t in entry.top]
        assert len(top) == 5 and top[0] == tok  # greedy: the chosen token is the best
        assert [t.logprob for t in entry.top] == sorted([t.logprob for t in entry.top],
                                                        reverse=True)
        assert [t.logprob for t in entry.top] == pytest.approx(
            ref[i].topk(5).values.tolist(), abs=LOGPROB_TOL)
    plain = collect(client.generate(token_ids=ids, max_tokens=4, temperature=0.0))
    assert plain.logprobs == []  # nothing when not asked for


def test_n_greedy_gives_n_identical_choices_and_counts_the_prompt_once(
    client: Client, hf_reference: HFReference
) -> None:
    ids = _ids(hf_reference, PROMPTS[1])
    responses = list(client.generate(token_ids=ids, max_tokens=8, temperature=0.0, n=3,
                                     request_id="greedy-n"))
    choices = collect_choices(responses)
    assert [c.index for c in choices] == [0, 1, 2]
    assert all(r.request_id == "greedy-n" for r in responses)
    want = hf_reference.greedy(ids, 8)
    assert [c.token_ids for c in choices] == [want] * 3
    assert sum(r.finished for r in responses) == 3
    with_usage = [r for r in responses if r.HasField("usage")]
    assert len(with_usage) == 1 and with_usage[0] is responses[-1]
    assert (with_usage[0].usage.prompt_tokens, with_usage[0].usage.completion_tokens) == (
        len(ids), 3 * len(want))


def test_n_seeded_gives_different_reproducible_choices(
    client: Client, hf_reference: HFReference
) -> None:
    ids = _ids(hf_reference, PROMPTS[0])

    def run(n: int) -> list[list[int]]:
        return [c.token_ids for c in collect_choices(client.generate(
            token_ids=ids, max_tokens=12, temperature=1.0, seed=1234, n=n, ignore_eos=True))]

    first = run(3)
    assert run(3) == first  # the same again on a second call
    assert len({tuple(c) for c in first}) > 1  # the seeds differ by choice
    assert run(1) == first[:1]  # choice 0 is the n = 1 stream


def test_model_info_gives_the_bounds(client: Client) -> None:
    info = client.model_info()
    assert (info.max_n, info.max_top_logprobs) == (16, 20)


@pytest.mark.parametrize("kwargs,field", [
    ({"n": 0}, "sampling.n"),
    ({"n": 17}, "sampling.n"),
    ({"max_tokens": 4, "min_tokens": 5}, "sampling.min_tokens"),
    ({"logprobs": True, "top_logprobs": 21}, "sampling.top_logprobs"),
    ({"presence_penalty": 3.0}, "sampling.presence_penalty"),
    ({"repetition_penalty": 0.0}, "sampling.repetition_penalty"),
    ({"min_p": 2.0}, "sampling.min_p"),
])
def test_out_of_range_sampling_is_invalid_argument(
    client: Client, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        collect(client.generate(token_ids=[1, 2, 3], **kwargs))  # type: ignore[arg-type]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (e.value.details() or "")
