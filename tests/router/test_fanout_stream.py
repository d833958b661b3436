"""n > 1 through a real frontend and router actor body in this process (fake workers, no
Ray): one stream carries every choice with its index, the last response alone carries the
usage (prompt once), Abort by the call's id ends every choice, the deadline fails them all,
and an id already used by a call is refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from pdserve.cluster.config import ServeConfig
from pdserve.engine.config import ModelSpec
from pdserve.engine.messages import FirstToken, StepReport, TokenLogprobs, TokenOut
from pdserve.engine.weights import load_model_config
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.client import AsyncClient, acollect_choices
from pdserve.router.frontend import Frontend
from pdserve.router.server import RouterService
from pdserve_testing.router import FakeWorker


class Handle:
    """An actor handle on an object of this process (as ``test_server``'s)."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)

        class Method:
            def remote(self, *args: Any) -> asyncio.Future[Any]:
                return asyncio.ensure_future(method(*args))

        return Method()


async def until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


async def expect(code: grpc.StatusCode, stream: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await acollect_choices(stream)
    assert e.value.code() == code, e.value.details()


def test_n_choices_share_one_stream(default_gguf: Path) -> None:
    spec = ModelSpec("gguf", str(default_gguf))
    cfg = ServeConfig(model=spec, host="127.0.0.1", port=0, metrics_port=-1,
                      scheduler="fifo", max_n=4).server_config(load_model_config(spec))

    async def main() -> None:
        svc = RouterService(cfg)
        fe = Frontend(0, cfg, Handle(svc))
        await svc.start()
        port, feed = await fe.start(0)
        await svc.attach_frontends([Handle(fe)], [feed])
        await svc.attach({"prefill-0": FakeWorker("prefill-0")},
                         {"decode-0": FakeWorker("decode-0")})
        await svc.set_serving()
        router = svc.router
        assert router is not None
        kids = ["c-0", "c-1", "c-2"]
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            info = await client.model_info()
            assert (info.max_n, info.max_top_logprobs) == (4, 20)  # the server's bounds
            await expect(grpc.StatusCode.INVALID_ARGUMENT,
                         client.generate(text="hello", n=5))  # over this server's max_n
            call = client.generate(text="hello", max_tokens=2, n=3, request_id="c",
                                   logprobs=True, temperature=0.0)
            await until(lambda: all(k in router.requests for k in kids)
                        and all(router.requests[k].lease for k in kids), "3 children leased")
            reqs = [router.requests[k] for k in kids]
            assert {r.lease.worker for r in reqs if r.lease} == {"decode-0"}
            lp = TokenLogprobs(-0.5, (), ())
            for r in reqs:
                assert r.lease is not None
                router.on_first_token(FirstToken("prefill-0", r.request_id, r.lease.transfer_id,
                                                 72 + r.index, None, 0.0, 0.0, logprobs=lp))
            router.on_step(StepReport("decode-0", tokens=[
                TokenOut(r.request_id, r.lease.transfer_id, 33, "length", lp)
                for r in reqs if r.lease is not None]))
            responses = [r async for r in call]
            choices = await acollect_choices(_replay(responses))
            assert [c.index for c in choices] == [0, 1, 2]
            assert [c.token_ids for c in choices] == [[72, 33], [73, 33], [74, 33]]
            assert all(c.finish_reason == "length" and len(c.logprobs) == 2 for c in choices)
            assert all(r.request_id == "c" for r in responses)
            assert [r.HasField("usage") for r in responses].count(True) == 1
            last = responses[-1]
            prompt = len(reqs[0].prompt_ids)
            assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt, 6)

            # Abort by the call's id ends every choice ("abort"), and frees them all.
            aborted = client.generate(text="hello", max_tokens=4, n=2, request_id="a")
            await until(lambda: "a-0" in router.requests and "a-1" in router.requests, "a")
            again = client.generate(text="hello", max_tokens=4, request_id="a")
            await expect(grpc.StatusCode.ALREADY_EXISTS, again)  # the id names the call
            assert await client.abort("a")
            ends = await acollect_choices(aborted)
            assert [c.finish_reason for c in ends] == ["abort", "abort"]
            assert not router.requests and "a" not in router.families

            # The deadline fails every choice; the call ends with that status.
            await expect(grpc.StatusCode.DEADLINE_EXCEEDED,
                         client.generate(text="hello", max_tokens=4, n=3, timeout=0.5))
            await until(lambda: not router.requests, "the late call's children freed")
        await svc.stop(grace_s=1.0)

    asyncio.run(main())


async def _replay(responses: list[pb.GenerateResponse]) -> AsyncIterator[pb.GenerateResponse]:
    for r in responses:
        yield r
