"""The sampler's logits processors against references: transformers' processors where they
exist, the OpenAI penalty formula written out, torch.log_softmax for logprobs; and the
sampler's use of them (greedy rows penalized, min_tokens masking, plain batches untouched)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
)

from pdserve.engine.logits_processors import (
    apply_min_p,
    apply_penalties,
    logprobs_of,
    min_p_ref,
    penalties_ref,
    token_counts,
)
from pdserve.engine.sampler import sample_batch
from pdserve.engine.sequence import SamplingParams, finish_reason

V = 40


def _penalize(logits: torch.Tensor, histories: list[list[int]], num_output: list[int],
              rep: list[float], pres: list[float], freq: list[float]) -> torch.Tensor:
    counts, seen = token_counts(histories, num_output, logits.shape[-1], logits.device)
    return apply_penalties(logits, counts, seen, torch.tensor(rep), torch.tensor(pres),
                           torch.tensor(freq))


def test_token_counts_count_output_and_see_prompt() -> None:
    counts, seen = token_counts([[1, 2, 2, 5, 5, 5], [3]], [4, 0], 8, torch.device("cpu"))
    # row 0: prompt [1, 2], output [2, 5, 5, 5]
    assert counts[0].tolist() == [0, 0, 1, 0, 0, 3, 0, 0]
    assert seen[0].nonzero().flatten().tolist() == [1, 2, 5]
    assert counts[1].sum() == 0 and seen[1].nonzero().flatten().tolist() == [3]


def test_repetition_penalty_matches_transformers() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, V) * 3
    histories = [[1, 4, 4, 9], [0, 39], [7]]
    pens = [1.3, 0.7, 2.0]
    got = _penalize(logits, histories, [2, 1, 0], pens, [0.0] * 3, [0.0] * 3)
    for r in range(3):
        hf = RepetitionPenaltyLogitsProcessor(pens[r])
        want = hf(torch.tensor([histories[r]]), logits[r:r + 1].clone())[0]
        torch.testing.assert_close(got[r], want)


def test_presence_and_frequency_follow_the_openai_formula() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, V)
    prompt, output = [3, 3, 8], [8, 5, 5, 5, 12]
    got = _penalize(logits, [prompt + output, prompt + output], [5, 5], [1.0, 1.0],
                    [0.5, -1.5], [0.25, 2.0])
    for r, (pres, freq) in enumerate([(0.5, 0.25), (-1.5, 2.0)]):
        want = logits[r].clone()
        for tok in range(V):
            c = output.count(tok)  # mu[j] -= c[j] * freq + (c[j] > 0) * pres, output only
            want[tok] -= c * freq + (1.0 if c > 0 else 0.0) * pres
        torch.testing.assert_close(got[r], want)


def test_all_penalties_match_the_row_reference() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, V) * 2
    prompts = [[1, 2, 3], [5], [0, 0, 0, 6], [39]]
    outputs = [[3, 3, 7], [], [6, 1], [38, 38]]
    rep, pres, freq = [1.2, 1.5, 0.9, 1.0], [0.3, 0.0, -0.4, 1.0], [0.1, 0.0, 0.6, -2.0]
    got = _penalize(logits, [p + o for p, o in zip(prompts, outputs, strict=True)],
                    [len(o) for o in outputs], rep, pres, freq)
    for r in range(4):
        want = penalties_ref(logits[r], prompts[r], outputs[r], rep[r], pres[r], freq[r])
        torch.testing.assert_close(got[r], want)


def test_min_p_matches_transformers_and_the_reference() -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, V) * 2
    mins = [0.05, 0.3, 0.9]
    got = apply_min_p(logits, torch.tensor(mins))
    for r, m in enumerate(mins):
        hf = MinPLogitsWarper(m, filter_value=float("-inf"))
        torch.testing.assert_close(got[r], hf(None, logits[r:r + 1].clone())[0])
        torch.testing.assert_close(got[r], min_p_ref(logits[r], m))
    assert bool((got[2] > float("-inf")).sum() >= 1)  # the most likely token survives


def test_min_tokens_masks_eos_and_stop_ids_like_transformers() -> None:
    torch.manual_seed(4)
    logits = torch.randn(1, V)
    eos, stop = 7, 11
    logits[0, eos] = logits[0, stop] = 50.0  # the argmax without the mask
    p = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3, eos_token_ids=(eos,),
                       stop_token_ids=(stop,))
    hf = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=2, min_new_tokens=3,
                                           eos_token_id=[eos, stop])
    for step in range(5):
        tok = sample_batch(logits, [p], [step]).tokens[0]
        ids = torch.zeros((1, 2 + step), dtype=torch.long)  # 2 prompt + step generated
        want = int(hf(ids, logits.clone()).argmax())
        assert tok == want
        assert (tok in (eos, stop)) == (step >= 3)
    assert finish_reason(p, eos, 2) is None  # under min_tokens no stop applies...
    assert finish_reason(p, eos, 3) == "stop"
    assert finish_reason(SamplingParams(max_tokens=2, min_tokens=2), 5, 2) == "length"


def test_min_tokens_with_ignore_eos_masks_only_stop_ids() -> None:
    logits = torch.zeros(1, V)
    logits[0, 3] = 9.0  # eos
    logits[0, 4] = 8.0  # stop id
    p = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=2, eos_token_ids=(3,),
                       stop_token_ids=(4,), ignore_eos=True)
    assert sample_batch(logits, [p], [0]).tokens == [3]
    q = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=2, eos_token_ids=(3,),
                       stop_token_ids=(4,))
    assert sample_batch(logits, [q], [0]).tokens != [3]
    assert sample_batch(logits, [q], [0]).tokens != [4]


def test_greedy_rows_are_penalized_and_plain_rows_untouched() -> None:
    torch.manual_seed(5)
    logits = torch.randn(2, V)
    top = int(logits[0].argmax())
    pen = SamplingParams(temperature=0.0, repetition_penalty=100.0)
    plain = SamplingParams(temperature=0.0)
    out = sample_batch(logits, [pen, plain], [1, 1], [[top], None]).tokens
    want = penalties_ref(logits[0], [], [top], 100.0, 0.0, 0.0).argmax()
    assert out[0] == int(want) and out[0] != top
    assert out[1] == int(logits[1].argmax())


def test_penalties_need_the_history() -> None:
    with pytest.raises(ValueError, match="history"):
        sample_batch(torch.zeros(1, V), [SamplingParams(frequency_penalty=1.0)], [0])


def test_logprobs_are_the_raw_log_softmax_with_ordered_alternatives() -> None:
    torch.manual_seed(6)
    logits = torch.randn(3, V) * 3
    params = [SamplingParams(temperature=0.7, seed=3, logprobs=True, top_logprobs=5,
                             repetition_penalty=1.5),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logprobs=True)]
    s = sample_batch(logits, params, [2, 0, 0], [[1, 2, 3], None, None])
    ref = torch.log_softmax(logits, dim=-1)  # raw: before penalties and temperature
    assert s.logprobs[1] is None
    for r in (0, 2):
        lp = s.logprobs[r]
        assert lp is not None
        assert lp.logprob == pytest.approx(float(ref[r, s.tokens[r]]), abs=1e-6)
    lp0 = s.logprobs[0]
    assert lp0 is not None and len(lp0.top_ids) == 5
    assert list(lp0.top_ids) == ref[0].topk(5).indices.tolist()
    assert list(lp0.top_logprobs) == sorted(lp0.top_logprobs, reverse=True)
    assert lp0.top_logprobs == pytest.approx(ref[0].topk(5).values.tolist(), abs=1e-6)
    assert s.logprobs[2] is not None and s.logprobs[2].top_ids == ()


def test_logprobs_of_clamps_nothing_and_returns_shapes() -> None:
    logits = torch.randn(2, 6)
    chosen, ids, vals = logprobs_of(logits, torch.tensor([1, 4]), 6)
    assert ids.shape == (2, 6) and vals.shape == (2, 6)
    torch.testing.assert_close(chosen, torch.log_softmax(logits, -1)[[0, 1], [1, 4]])


def test_min_p_and_top_k_combine_in_sampling() -> None:
    logits = torch.tensor([[5.0, 4.9, 0.0, -1.0, 4.8]])
    p = SamplingParams(temperature=1.0, min_p=0.5, top_k=2)
    seen = {sample_batch(logits, [p], [0]).tokens[0] for _ in range(200)}
    assert seen == {0, 1}  # min_p keeps {0, 1, 4}; top_k=2 then {0, 1}


@pytest.mark.parametrize("field,value", [
    ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
    ("min_p", 1.5), ("top_logprobs", 21), ("min_tokens", 20),
])
def test_sampling_params_refuse_out_of_range(field: str, value: float) -> None:
    kwargs: dict[str, float | bool] = {field: value, "logprobs": True}
    with pytest.raises(ValueError, match=field):
        SamplingParams(max_tokens=16, **kwargs)  # type: ignore[arg-type]
