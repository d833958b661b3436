"""The fuzz generator (``pdserve_testing.fuzz``) against the frontend's validation and
tokenization in this process: every case the frontend decides alone gets a code its case
allows, with the field named, so the live run's expectations are the validation's. Also:
the generator is deterministic, and its raw cases are as undecodable (or decodable) as
their categories say."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from pdserve.cluster.config import ServeConfig
from pdserve.engine.config import ModelSpec
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.engine.weights import load_model_config
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.frontend import Frontend
from pdserve.router.validation import RequestError
from pdserve_testing.fuzz import CATEGORIES, OK, Fuzzer
from pdserve_testing.fuzz_run import judge
from pdserve_testing.fuzz_wire import decodes

UNDECODABLE = {"bad_utf8", "corrupt"}  # refused by the gRPC handlers' parser, before it
# Decided past the frontend's validation: by admission, by gRPC, by the streams in flight.
NOT_HERE = {"tight_slo", "oversize", "duplicate_id", "huge_text", *UNDECODABLE}


@pytest.fixture(scope="module")
def frontend(default_gguf: Path) -> Frontend:
    spec = ModelSpec("gguf", str(default_gguf))
    config = load_model_config(spec)
    cfg = ServeConfig(model=spec, port=0, metrics_port=-1).server_config(config)
    fe = Frontend(0, cfg, router=None)
    fe.tokenizer = load_tokenizer(spec, config)
    return fe


def _fuzzer(seed: int) -> Fuzzer:
    return Fuzzer(seed, vocab_size=49152, max_context=8192, max_tokens_limit=4096)


def test_validation_gives_each_case_a_code_it_allows(frontend: Frontend) -> None:
    weights = {c: 0.0 if c in NOT_HERE else w for c, (w, _) in CATEGORIES.items()}
    seen: Counter[str] = Counter()
    for case in _fuzzer(7).cases(1500, weights):
        req = pb.GenerateRequest.FromString(case.payload)
        try:
            frontend.submission(req, time.monotonic(), None)
            code, message = OK, ""
        except RequestError as e:
            code, message = e.code.name, e.message
        fake_stream = [pb.GenerateResponse(token_ids=[1], finished=True, finish_reason="length",
                                           usage=pb.Usage(completion_tokens=1))]
        problem = judge(case, code, message, fake_stream if code == OK else [])
        assert not problem, (case.category, problem, req)
        seen[code] += 1
    assert seen[OK] > 100 and seen["INVALID_ARGUMENT"] > 1000


def test_same_seed_same_cases_whatever_the_count() -> None:
    a = [c.payload for c in _fuzzer(3).cases(400)]
    b = [c.payload for c in _fuzzer(3).cases(600)][:400]
    assert a == b
    assert a != [c.payload for c in _fuzzer(4).cases(400)]


def test_raw_cases_decode_as_their_category_says() -> None:
    for case in _fuzzer(5).cases(2000):
        if case.category in UNDECODABLE:
            assert not decodes(case.payload), case.category
        elif case.category != "oversize":
            assert decodes(case.payload), case.category
