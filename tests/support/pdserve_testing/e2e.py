"""End-to-end helpers: a ServeConfig for the embedded model, the HF transformers reference,
waiting and concurrency helpers, the deployment's free-block check."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families

from pdserve.cluster.config import ServeConfig
from pdserve.cluster.launch import Deployment
from pdserve.engine.config import ModelSpec
from pdserve.proto.client import Client, collect


def serve_config(default_gguf: Path, namespace: str, **over: object) -> ServeConfig:
    base: dict[str, object] = dict(
        model=ModelSpec("gguf", str(default_gguf)), port=0, metrics_port=0,
        prefill_blocks=256, decode_blocks=256, max_batch_tokens=64, torch_threads=1,
        namespace=namespace, lease_timeout_s=30.0,
    )
    base.update(over)
    return ServeConfig(**base)  # type: ignore[arg-type]


class HFReference:
    """Greedy continuation with transformers, no EOS handling (callers cut at EOS)."""

    def __init__(self, gguf: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        ).eval()
        self.eos = self.tokenizer.eos_token_id

    @torch.inference_mode()
    def greedy(self, ids: list[int], n: int, stop_at_eos: bool = True) -> list[int]:
        out: list[int] = []
        past = None
        x = torch.tensor([ids])
        for _ in range(n):
            res = self.model(input_ids=x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            if stop_at_eos and tok == self.eos:
                break
            x = torch.tensor([[tok]])
        return out

    @torch.inference_mode()
    def generate(self, ids: list[int], n: int, **kwargs: object) -> list[int]:
        """Greedy ``model.generate`` for up to ``n`` new tokens (ends at EOS), with extra
        generate kwargs (``repetition_penalty``, ``min_new_tokens``, ``logits_processor``)."""
        out = self.model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=self.eos,
            pad_token_id=self.eos, **kwargs)
        return [int(t) for t in out[0, len(ids):]]

    @torch.inference_mode()
    def logprobs(self, ids: list[int], out: list[int]) -> torch.Tensor:
        """log_softmax of the model's logits at each of ``out``'s positions after prompt
        ``ids``: [len(out), V] (row i: the distribution ``out[i]`` was drawn from)."""
        logits = self.model(input_ids=torch.tensor([ids + out])).logits[0]
        return torch.log_softmax(logits[len(ids) - 1: len(ids) + len(out) - 1].float(), -1)


def openai_penalties(prompt_len: int, presence: float, frequency: float) -> object:
    """A transformers ``LogitsProcessorList`` applying OpenAI's presence and frequency
    penalties, as OpenAI writes them, over the generated tokens only (for ``generate``)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class OpenAIPenalties(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor,
                     scores: torch.FloatTensor) -> torch.FloatTensor:
            out = input_ids[0, prompt_len:].tolist()
            for tok in set(out):
                scores[0, tok] -= out.count(tok) * frequency + presence
            return scores

    return LogitsProcessorList([OpenAIPenalties()])


def wait_for(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run_concurrently(fn: Callable[[int], None], n: int) -> None:
    """Run ``fn(0)`` .. ``fn(n - 1)`` on threads of their own, all at once; wait for all."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def greedy_concurrently(client: Client, ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The greedy outputs of the prompts ``ids``, all sent at once over ``client``."""
    out: dict[int, list[int]] = {}

    def run(i: int) -> None:
        out[i] = collect(client.generate(token_ids=ids[i], max_tokens=max_tokens,
                                         temperature=0.0)).token_ids

    run_concurrently(run, len(ids))
    return [out[i] for i in range(len(ids))]


def all_blocks_free(dep: Deployment) -> bool:
    return all(s.num_free_blocks == s.num_blocks for s in dep.worker_stats())


def metric_values(dep: Deployment, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The router's samples named ``name`` (e.g. ``pdserve:request_failure_total``) from its
    /metrics, by their sorted labels."""
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{dep.metrics_port}/metrics", timeout=5).read().decode()
    return {tuple(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples
            if s.name == name}


def failure_counts(dep: Deployment) -> dict[str, float]:
    """``request_failure_total`` by status code."""
    return {dict(labels)["code"]: v
            for labels, v in metric_values(dep, "pdserve:request_failure_total").items()}
