"""The sampler's processors on a CUDA GPU against the same computation on the CPU, and
what each stage costs at serving sizes (``-s`` prints the timings).

    source deploy/source-tree.sh && python3 -m pytest -p no:cacheprovider --noconftest -q -s \
        tests/gpu/test_sampler_gpu.py
"""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.engine.sampler import sample_batch
from pdserve.engine.sequence import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

B, V, L = 64, 128256, 2048  # a batch, Llama-3's vocabulary, a long context


def _batch() -> tuple[torch.Tensor, list[SamplingParams], list[int], list[list[int]]]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=g) * 4
    params = [SamplingParams(temperature=0.0, max_tokens=64, min_tokens=8 if i % 4 == 0 else 0,
                             eos_token_ids=(2,), repetition_penalty=1.0 + 0.05 * (i % 5),
                             presence_penalty=0.1 * (i % 3), frequency_penalty=0.2 * (i % 2),
                             logprobs=i % 2 == 0, top_logprobs=5 * (i % 2 == 0))
              for i in range(B)]
    histories = [torch.randint(0, V, (L,), generator=g).tolist() for _ in range(B)]
    return logits, params, [i % 16 for i in range(B)], histories


def test_cuda_matches_the_cpu() -> None:
    logits, params, steps, histories = _batch()
    cpu = sample_batch(logits, params, steps, histories)
    gpu = sample_batch(logits.cuda(), params, steps, histories)
    assert gpu.tokens == cpu.tokens
    for a, b in zip(gpu.logprobs, cpu.logprobs, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert a.top_ids == b.top_ids
    # min_p draws (the CUDA generator's stream differs from the CPU's): only kept tokens.
    mp = [SamplingParams(temperature=0.9, min_p=0.2, seed=i) for i in range(B)]
    probs = torch.softmax(logits / 0.9, dim=-1)
    for i, tok in enumerate(sample_batch(logits.cuda(), mp, steps).tokens):
        assert probs[i, tok] >= 0.2 * probs[i].max()


def _ms(fn: object) -> float:
    assert callable(fn)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[10] * 1e3


def test_what_each_stage_costs() -> None:
    logits, params, steps, histories = _batch()
    x = logits.cuda()
    greedy = [SamplingParams(temperature=0.0)] * B
    sampled = [SamplingParams(temperature=0.8, top_p=0.95)] * B
    rows = {
        "greedy": _ms(lambda: sample_batch(x, greedy, steps)),
        "temperature + top_p": _ms(lambda: sample_batch(x, sampled, steps)),
        "temperature + min_p": _ms(lambda: sample_batch(
            x, [SamplingParams(temperature=0.8, min_p=0.05)] * B, steps)),
        "greedy + logprobs(5)": _ms(lambda: sample_batch(
            x, [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5)] * B, steps)),
        f"greedy + penalties (history {L})": _ms(lambda: sample_batch(
            x, [SamplingParams(temperature=0.0, repetition_penalty=1.2,
                               frequency_penalty=0.5)] * B, steps, histories)),
        "all of them mixed": _ms(lambda: sample_batch(x, params, steps, histories)),
    }
    print(f"\nsample_batch, B={B}, V={V}, {torch.cuda.get_device_name()}:")
    for name, ms in rows.items():
        print(f"  {name:36s} {ms:8.3f} ms")
    assert all(ms > 0 for ms in rows.values())
