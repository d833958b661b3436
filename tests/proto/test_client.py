"""proto.client against an in-process fake Generation server on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.client import AsyncClient, Client, acollect, build_request, collect


class FakeGeneration(pb_grpc.GenerationServicer):
    """Echoes a token_ids prompt back one token per response; "slow" text streams until
    cancelled or aborted."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.running: dict[str, threading.Event] = {}
        self.cancelled = threading.Event()

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        self.requests.append(request)
        rid = request.request_id or "srv-1"
        kind = request.WhichOneof("input")
        if kind == "text" and not request.text:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text must not be empty")
        if kind == "text" and request.text == "slow":
            aborted = self.running.setdefault(rid, threading.Event())
            context.add_callback(self.cancelled.set)
            n = 0
            while context.is_active() and not aborted.is_set() and n < 500:
                yield pb.GenerateResponse(request_id=rid, token_ids=[n], text="x")
                n += 1
                time.sleep(0.01)
            self.running.pop(rid, None)
            yield pb.GenerateResponse(request_id=rid, finished=True, finish_reason="abort",
                                      usage=pb.Usage(prompt_tokens=1, completion_tokens=n))
            return
        ids = list(request.token_ids.ids) if kind == "token_ids" else [7, 8]
        for t in ids:
            yield pb.GenerateResponse(request_id=rid, token_ids=[t], text=f"<{t}>")
        yield pb.GenerateResponse(
            request_id=rid, finished=True, finish_reason="stop", matched_stop_token_id=ids[-1],
            usage=pb.Usage(prompt_tokens=len(ids), completion_tokens=len(ids)),
            timing=pb.Timing(ttft_s=0.01, e2e_s=0.02),
        )

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        ev = self.running.get(request.request_id)
        if ev is not None:
            ev.set()
        return pb.AbortResponse(found=ev is not None)

    def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        return pb.ModelInfo(model_name="tiny", max_context_length=2048, vocab_size=49152,
                            eos_token_ids=[2], block_size=16, dtype="float32")

    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.ServerInfo:
        return pb.ServerInfo(num_prefill_workers=1, num_decode_workers=2, version="0.1.0",
                             mode="disaggregated", uptime_s=1.5)


class Server:
    def __init__(self) -> None:
        self.servicer = FakeGeneration()
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_GenerationServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"
        self.server.start()

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)


@pytest.fixture()
def server() -> Iterator[Server]:
    s = Server()
    s.set_serving(True)
    yield s
    s.server.stop(None)


# ------------------------------------------------------------------ build_request


def test_build_request_defaults_leave_fields_unset() -> None:
    req = build_request(text="hello")
    assert req.WhichOneof("input") == "text" and req.text == "hello"
    s = req.sampling
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        assert not s.HasField(name), name
    assert s.top_k == 0 and not s.ignore_eos and list(s.stop) == []
    assert req.slo.ttft_ms == 0 and req.slo.tpot_ms == 0 and req.request_id == ""


def test_build_request_all_fields_round_trip() -> None:
    req = build_request(
        token_ids=[1, 2, 3], max_tokens=0, temperature=0.0, top_p=0.5, top_k=-1, seed=2**63,
        stop=["\n\n", "END"], stop_token_ids=[2], ignore_eos=True, ttft_ms=250, tpot_ms=50.5,
        request_id="r1",
    )
    back = pb.GenerateRequest.FromString(req.SerializeToString())
    assert back == req
    s = back.sampling
    # Explicit zeros keep their presence: the server must see max_tokens=0 (invalid) and
    # temperature=0 (greedy), not "unset".
    assert s.HasField("max_tokens") and s.max_tokens == 0
    assert s.HasField("temperature") and s.temperature == 0.0
    assert s.top_p == 0.5 and s.top_k == -1 and s.seed == 2**63
    assert list(s.stop) == ["\n\n", "END"] and list(s.stop_token_ids) == [2] and s.ignore_eos
    assert list(back.token_ids.ids) == [1, 2, 3]
    assert back.slo.ttft_ms == 250 and back.slo.tpot_ms == 50.5 and back.request_id == "r1"


def test_build_request_messages_forms() -> None:
    req = build_request(messages=[{"role": "system", "content": "be brief"},
                                  ("user", "hi"), pb.ChatMessage(role="assistant", content="")])
    assert req.WhichOneof("input") == "messages"
    assert [(m.role, m.content) for m in req.messages.messages] == [
        ("system", "be brief"), ("user", "hi"), ("assistant", "")]
    # An empty conversation is still "messages" (the server rejects it by name).
    assert build_request(messages=[]).WhichOneof("input") == "messages"
    assert build_request(token_ids=[]).WhichOneof("input") == "token_ids"
    assert build_request(text="").WhichOneof("input") == "text"


@pytest.mark.parametrize("kwargs", [{}, {"text": "a", "token_ids": [1]},
                                    {"text": "a", "messages": []}])
def test_build_request_needs_exactly_one_input(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="exactly one of text, token_ids, messages"):
        build_request(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------ sync client


def test_generate_streams_and_collects(server: Server) -> None:
    with Client(server.target) as client:
        chunks = list(client.generate(token_ids=[5, 6, 9], max_tokens=3, temperature=0,
                                      request_id="abc", timeout=10))
        assert [list(c.token_ids) for c in chunks] == [[5], [6], [9], []]
        assert [c.finished for c in chunks] == [False, False, False, True]
        last = chunks[-1]
        assert last.HasField("usage") and last.usage.completion_tokens == 3
        assert not chunks[0].HasField("usage")
        sent = server.servicer.requests[-1]
        assert sent.request_id == "abc" and sent.sampling.max_tokens == 3
        assert sent.sampling.HasField("temperature")

        done = collect(client.generate(token_ids=[4, 5]))
        assert done.token_ids == [4, 5] and done.text == "<4><5>"
        assert done.finish_reason == "stop" and done.matched_stop == 5
        assert done.usage.prompt_tokens == 2 and done.timing.e2e_s == pytest.approx(0.02)
        assert done.request_id == "srv-1" and done.num_responses == 3


def test_generate_error_status(server: Server) -> None:
    with Client(server.target) as client, pytest.raises(grpc.RpcError) as info:
        list(client.generate(text=""))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text must not be empty" in (info.value.details() or "")


def test_send_prebuilt_request(server: Server) -> None:
    with Client(server.target) as client:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3]))
        assert [list(c.token_ids) for c in client.send(req)] == [[3], []]


def test_cancel_and_abort(server: Server) -> None:
    with Client(server.target) as client:
        stream = client.generate(text="slow", request_id="s1")
        it = iter(stream)
        next(it)
        stream.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(it)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        assert server.servicer.cancelled.wait(5)

        stream = client.generate(text="slow", request_id="s2")
        it = iter(stream)
        next(it)
        assert client.abort("s2") is True
        rest = list(it)
        assert rest[-1].finished and rest[-1].finish_reason == "abort"
        assert client.abort("s2") is False
        assert client.abort("nope") is False


def test_info_and_health(server: Server) -> None:
    with Client(server.target) as client:
        info = client.model_info()
        assert info.model_name == "tiny" and list(info.eos_token_ids) == [2]
        sinfo = client.server_info()
        assert (sinfo.num_prefill_workers, sinfo.num_decode_workers) == (1, 2)
        assert sinfo.mode == "disaggregated"
        assert client.health() == "SERVING"
        assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
        server.set_serving(False)
        assert client.health() == "NOT_SERVING"


def test_wait_ready(server: Server) -> None:
    server.set_serving(False)
    with Client(server.target) as client:
        with pytest.raises(TimeoutError, match=r"not SERVING after 0\.3 s"):
            client.wait_ready(0.3)
        threading.Timer(0.2, server.set_serving, (True,)).start()
        client.wait_ready(5)


def test_wait_ready_before_the_server_listens() -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(TimeoutError, match="UNAVAILABLE"):
        client.wait_ready(0.5)


# ------------------------------------------------------------------ asyncio client


def test_async_client(server: Server) -> None:
    async def main() -> None:
        async with AsyncClient(server.target) as client:
            await client.wait_ready(5)
            assert await client.health() == "SERVING"
            assert await client.health("no.such.Service") == "SERVICE_UNKNOWN"
            done = await acollect(client.generate(token_ids=[1, 2, 3], top_k=5))
            assert done.token_ids == [1, 2, 3] and done.finish_reason == "stop"
            assert server.servicer.requests[-1].sampling.top_k == 5
            assert (await client.model_info()).vocab_size == 49152
            assert (await client.server_info()).version == "0.1.0"

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await acollect(client.send(pb.GenerateRequest(text="")))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            stream = client.generate(text="slow", request_id="a1")
            got = 0
            async for _ in stream:
                got += 1
                if got == 3:
                    assert await client.abort("a1")
            assert got >= 3

            stream = client.generate(text="slow", request_id="a2")
            async for _ in stream:
                break
            assert stream.cancel()

    asyncio.run(main())
