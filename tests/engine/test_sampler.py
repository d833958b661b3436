import torch

from pdserve.engine.sampler import sample
from pdserve.engine.sequence import SamplingParams, finish_reason

GREEDY = SamplingParams(temperature=0.0)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(4, 50)
    assert sample(logits, [GREEDY] * 4, [0] * 4) == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    logits = torch.randn(3, 100)
    p = SamplingParams(temperature=1.0, seed=1234)
    a = sample(logits, [p, p, p], [0, 1, 2])
    # The same rows in another batch composition, another order: the same draws.
    b = sample(logits[[2, 0]], [p, p], [2, 0])
    assert b == [a[2], a[0]]
    other = SamplingParams(temperature=1.0, seed=99)
    draws = {tuple(sample(logits, [other] * 3, [s, s, s])) for s in range(20)}
    assert len(draws) > 1  # the step moves the stream


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(8, 64)
    k1 = SamplingParams(temperature=1.5, top_k=1)
    p0 = SamplingParams(temperature=1.5, top_p=1e-6)
    want = logits.argmax(-1).tolist()
    assert sample(logits, [k1] * 8, list(range(8))) == want
    assert sample(logits, [p0] * 8, list(range(8))) == want


def test_top_k_restricts_support() -> None:
    torch.manual_seed(0)
    logits = torch.zeros(1, 10)
    logits[0, 3] = 1.0
    logits[0, 7] = 1.0
    p = SamplingParams(temperature=1.0, top_k=2)
    seen = {sample(logits, [p], [0])[0] for _ in range(200)}
    assert seen == {3, 7}


def test_temperature_sampling_matches_distribution() -> None:
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().repeat(4000, 1)
    p = SamplingParams(temperature=1.0)
    out = torch.tensor(sample(logits, [p] * 4000, [0] * 4000))
    freq = torch.bincount(out, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = torch.randn(4, 30)
    params = [GREEDY, SamplingParams(seed=1), GREEDY, SamplingParams(seed=2)]
    out = sample(logits, params, [0, 0, 0, 0])
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())


def test_finish_reasons() -> None:
    p = SamplingParams(max_tokens=3, eos_token_ids=(2,), stop_token_ids=(7,))
    assert finish_reason(p, 5, 1) is None
    assert finish_reason(p, 2, 1) == "stop"
    assert finish_reason(p, 7, 1) == "stop"
    assert finish_reason(p, 5, 3) == "length"
    ignore = SamplingParams(max_tokens=3, eos_token_ids=(2,), ignore_eos=True)
    assert finish_reason(ignore, 2, 1) is None
