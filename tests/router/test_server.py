"""The router actor's body and a gRPC frontend in this process (no Ray): every call that
ends with an error status is counted once in ``request_failure_total{code}``, whichever
process ends it, and the client sees the status it always did.

The workers are stand-ins: the decode worker grants leases until told not to, the prefill
worker takes prompts and never reports, so a request stays in flight until the test ends
it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from pdserve.cluster.config import ServeConfig
from pdserve.engine.config import ModelSpec
from pdserve.engine.secret import Secret
from pdserve.engine.weights import load_model_config
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.client import AsyncClient, acollect
from pdserve.router.frontend import Frontend, _gone
from pdserve.router.server import RouterService
from pdserve.router.stream import StreamEnd, encode, feed_hello
from pdserve_testing.router import FakeWorker

CODES = ("INVALID_ARGUMENT", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED",
         "CANCELLED", "UNAVAILABLE")


class Handle:
    """An actor handle on an object of this process: ``handle.method.remote(*args)`` runs
    the coroutine method as a task on this event loop (awaited or left to run, as Ray's
    object refs are)."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)

        class Method:
            def remote(self, *args: Any) -> asyncio.Future[Any]:
                return asyncio.ensure_future(method(*args))

        return Method()


class FullableDecode(FakeWorker):
    """Grants every lease until ``full`` is set, then none (the request stays queued)."""

    full = False

    def reply(self, method: str, args: tuple[Any, ...]) -> Any:
        if method == "reserve" and self.full:
            return None
        return super().reply(method, args)


async def until(cond: Callable[[], bool], what: str) -> None:
    """Poll ``cond`` on the event loop (for what happens across processes in real life)."""
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


async def expect(code: grpc.StatusCode, stream: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await acollect(stream)
    assert e.value.code() == code, e.value.details()


def test_every_error_status_is_counted_once_by_code(default_gguf: Path) -> None:
    spec = ModelSpec("gguf", str(default_gguf))
    cfg = ServeConfig(model=spec, host="127.0.0.1", port=0, metrics_port=-1, max_waiting=1,
                      scheduler="fifo").server_config(load_model_config(spec))
    decode = FullableDecode("decode-0")

    async def main() -> None:
        svc = RouterService(cfg)
        fe = Frontend(0, cfg, Handle(svc))
        await svc.start()
        port, feed = await fe.start(0)
        await svc.attach_frontends([Handle(fe)], [feed])
        await svc.attach({"prefill-0": FakeWorker("prefill-0")}, {"decode-0": decode})
        await svc.set_serving()
        router = svc.router
        assert router is not None

        def failures(code: str) -> float:
            v = svc.registry.get_sample_value("pdserve:request_failure_total", {"code": code})
            return v or 0.0

        def counts() -> dict[str, float]:
            return {c: failures(c) for c in CODES if failures(c)}

        async with AsyncClient(f"127.0.0.1:{port}") as client:
            # Refused by the frontend's validation: the router counts it when told.
            await expect(grpc.StatusCode.INVALID_ARGUMENT, client.send(pb.GenerateRequest(text="")))
            await until(lambda: failures("INVALID_ARGUMENT") == 1, "INVALID_ARGUMENT counted")

            # In flight (its prompt is never prefilled); the same id again on this frontend.
            held = client.generate(text="held", max_tokens=4, request_id="held", timeout=600)
            await until(lambda: "held" in router.requests, "held admitted")
            await expect(grpc.StatusCode.ALREADY_EXISTS,
                         client.generate(text="again", max_tokens=4, request_id="held"))
            await until(lambda: failures("ALREADY_EXISTS") == 1, "ALREADY_EXISTS counted")

            # The Abort RPC: the stream ends with finish_reason "abort", not an error.
            aborted = client.generate(text="x", max_tokens=4, request_id="aborted")
            await until(lambda: "aborted" in router.requests, "aborted admitted")
            assert await client.abort("aborted")
            done = await acollect(aborted)
            assert done.finish_reason == "abort"

            # The client's deadline passes (the router's timer or the frontend sees it first).
            await expect(grpc.StatusCode.DEADLINE_EXCEEDED,
                         client.generate(text="late", max_tokens=4, timeout=0.5))
            await until(lambda: failures("DEADLINE_EXCEEDED") == 1, "DEADLINE_EXCEEDED counted")

            # The client cancels (long before its deadline).
            assert held.cancel()
            await until(lambda: failures("CANCELLED") == 1, "CANCELLED counted")
            await until(lambda: not router.requests, "held freed")

            # No decode seat: one request waits, the next is refused (queue full).
            decode.full = True
            waiting = client.generate(text="waits", max_tokens=4, request_id="waits")
            await until(lambda: "waits" in router.requests, "waits queued")
            await expect(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         client.generate(text="refused", max_tokens=4))
            assert failures("RESOURCE_EXHAUSTED") == 1  # counted before the answer went out

            # Shutting down ends the waiting one UNAVAILABLE.
            stopping = asyncio.ensure_future(svc.stop(grace_s=5.0))
            await expect(grpc.StatusCode.UNAVAILABLE, waiting)
            await stopping
            await asyncio.sleep(0)  # the frontend's last count_failure calls, if any

        assert counts() == dict.fromkeys(CODES, 1.0)
        assert svc.registry.get_sample_value(
            "pdserve:request_success_total", {"finished_reason": "abort"}) == 1
        assert svc.registry.get_sample_value("pdserve:goodput_requests_total",
                                              {"slo_class": "default"}) == 0

    asyncio.run(main())


class _Hang(pb_grpc.GenerationServicer):
    """Streams nothing until its client goes away; records the status ``_gone`` names."""

    def __init__(self) -> None:
        self.started = 0
        self.gone: list[str] = []

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        self.started += 1
        try:
            await asyncio.sleep(600)
            yield pb.GenerateResponse()
        finally:
            self.gone.append(_gone(context))


def test_a_client_gone_is_named_by_how_its_call_ended() -> None:
    """What the frontend reports to the router when a stream's client goes away: its
    deadline passed (as gRPC's server side sees it) or it cancelled."""
    async def main() -> None:
        servicer = _Hang()
        server = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{port}") as client:
                await expect(grpc.StatusCode.DEADLINE_EXCEEDED,
                             client.generate(text="x", timeout=0.3))
                await until(lambda: len(servicer.gone) == 1, "the first call ended")
                for timeout in (600.0, None):
                    n = servicer.started + 1
                    stream = client.generate(text="x", timeout=timeout)
                    await until(lambda n=n: servicer.started == n, "the call reached the server")
                    stream.cancel()
                    await until(lambda n=n: len(servicer.gone) == n, "a cancelled call ended")
        finally:
            await server.stop(None)
        assert servicer.gone == ["DEADLINE_EXCEEDED", "CANCELLED", "CANCELLED"]

    asyncio.run(main())


def test_the_feed_takes_only_the_router(default_gguf: Path) -> None:
    """A local process that connects to a frontend's feed cannot end or fill a stream:
    without the router's tag its connection is closed unread."""
    spec = ModelSpec("gguf", str(default_gguf))
    cfg = ServeConfig(model=spec, host="127.0.0.1", port=0, metrics_port=-1,
                      scheduler="fifo").server_config(load_model_config(spec))
    forged = encode([("held", [1, 2, 3], "forged", StreamEnd(finish_reason="stop"), 0, None)])
    other = Secret.generate()

    async def stray(feed: int, hello: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", feed)
        writer.write(hello + forged)
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 30)  # b"" once the frontend closes it
        writer.close()
        return rest

    async def main() -> None:
        svc = RouterService(cfg)
        fe = Frontend(0, cfg, Handle(svc))
        await svc.start()
        port, feed = await fe.start(0)
        await svc.attach_frontends([Handle(fe)], [feed])
        decode = FullableDecode("decode-0")
        decode.full = True  # the request waits for a seat: nothing but the feed ends it
        await svc.attach({"prefill-0": FakeWorker("prefill-0")}, {"decode-0": decode})
        await svc.set_serving()
        router = svc.router
        assert router is not None
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            held = client.generate(text="held", max_tokens=4, request_id="held", timeout=600)
            await until(lambda: "held" in router.requests, "held admitted")
            for hello in (b"", b"\0" * 32, other.tag("router-feed", "0"),
                          feed_hello(cfg.secret, 1)):  # another frontend's tag
                assert await stray(feed, hello) == b""
            assert "held" in fe.streams and fe.streams["held"].empty()
            assert await client.abort("held")
            done = await acollect(held)
            assert (done.finish_reason, done.token_ids) == ("abort", [])
        await svc.stop(grace_s=5.0)

    asyncio.run(main())
