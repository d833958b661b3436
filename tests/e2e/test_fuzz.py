"""Fuzzed Generate requests against the live CPU deployment (``pdserve_testing.fuzz``): each
gets a status code its case allows (OK for the valid ones; INVALID_ARGUMENT naming the
field; RESOURCE_EXHAUSTED, ALREADY_EXISTS where the wire API says so), a greedy neighbour
stream stays token-exact meanwhile, and after them every actor answers in the process it
had and every KV block is free. ``deploy/fuzz.sh`` sends the full 10,000; this sends 2,000,
with fewer valid and held ones (a few decode steps each) and no megabyte prompt.

Two kinds of bad input have tests of their own: bytes the protobuf runtime cannot parse
(INVALID_ARGUMENT, not grpc's UNKNOWN: ``router.grpc_service``) and a prompt that fits the
model's context but no worker's KV pool (INVALID_ARGUMENT at admission, not a wait for room
that never comes: ``router.capacity``)."""

from __future__ import annotations

from collections import Counter

import grpc
import pytest

from pdserve.cluster.launch import Deployment
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.client import Client
from pdserve_testing.e2e import HFReference, all_blocks_free, wait_for
from pdserve_testing.fuzz import ALWAYS_OK, CATEGORIES, Fuzzer
from pdserve_testing.fuzz_run import GENERATE, Neighbour, run
from pdserve_testing.streams import PROMPTS

pytestmark = pytest.mark.e2e

COUNT = 2000
SEED = 20261207
PARALLEL = 48
# Fewer valid cases and held streams (a few decode steps each) than the full run, and no
# 1-4 MiB prompt (its tokenization holds the frontend for seconds).
SCALE = {"huge_text": 0.0, "duplicate_id": 0.5,
         **{c: 0.25 for c in ALWAYS_OK}}
WEIGHTS = {c: w * SCALE.get(c, 1.0) for c, (w, _) in CATEGORIES.items()}


def test_fuzzed_requests_get_only_the_codes_they_allow(
        deployment: Deployment, client: Client, hf_reference: HFReference) -> None:
    fz = Fuzzer.for_server(SEED, client.model_info(), client.server_info())
    ids = hf_reference.tokenizer(PROMPTS[0])["input_ids"]
    neighbour = Neighbour(ids, hf_reference.greedy(ids, 16))
    report = run(deployment, fz.cases(COUNT, WEIGHTS), neighbour, PARALLEL)
    print(report.table())
    assert len(report.outcomes) == COUNT
    assert not report.problems(), report.table()
    codes = Counter(o.code for o in report.outcomes)
    # Every code the cases allow came up: the run reached each path it means to.
    assert {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "ALREADY_EXISTS"} <= set(codes)
    assert codes["INVALID_ARGUMENT"] > COUNT // 2


def _raw_call(address: str, payload: bytes, timeout: float) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_stream(GENERATE, request_serializer=None,
                               response_deserializer=pb.GenerateResponse.FromString)
        try:
            for _ in call(payload, timeout=timeout):
                pass
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_undecodable_requests_are_invalid_argument(deployment: Deployment, client: Client
                                                   ) -> None:
    fz = Fuzzer.for_server(SEED, client.model_info(), client.server_info())
    cases = list(fz.cases(40, {"bad_utf8": 1.0, "corrupt": 1.0}))
    codes = Counter(_raw_call(deployment.address, c.payload, 30).name for c in cases)
    assert codes == {"INVALID_ARGUMENT": len(cases)}


def test_a_prompt_no_kv_pool_can_hold_is_refused(deployment: Deployment) -> None:
    pool = max(s.num_blocks for s in deployment.worker_stats()) * deployment.cfg.block_size
    assert pool + 16 < 8192  # the model's context: validation lets the prompt through
    with Client(deployment.address) as c, pytest.raises(grpc.RpcError) as err:
        for _ in c.generate(token_ids=[5] * (pool + 16), max_tokens=1, timeout=5):
            pass
    wait_for(lambda: all_blocks_free(deployment), what="blocks free after the call")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "KV blocks" in (err.value.details() or "")
