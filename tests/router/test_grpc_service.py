"""The Generation service's handlers (router.grpc_service) on a real gRPC server: bytes the
protobuf runtime cannot parse end INVALID_ARGUMENT naming the message, through the
frontend's refusal (counted), and never reach the servicer; good requests are served."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
import grpc.aio
import pytest

from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.grpc_service import SERVICE, Undecodable, add_generation_service, parser


class _Servicer:
    def __init__(self) -> None:
        self.seen: list[object] = []

    async def Generate(self, request: pb.GenerateRequest, context: object
                       ) -> AsyncIterator[pb.GenerateResponse]:
        self.seen.append(request)
        for i in range(3):
            yield pb.GenerateResponse(request_id=request.request_id, token_ids=[i])

    async def Abort(self, request: pb.AbortRequest, context: object) -> pb.AbortResponse:
        self.seen.append(request)
        return pb.AbortResponse(found=request.request_id == "r")

    async def GetModelInfo(self, request: object, context: object) -> pb.ModelInfo:
        return pb.ModelInfo(model_name="m")

    async def GetServerInfo(self, request: object, context: object) -> pb.ServerInfo:
        return pb.ServerInfo(version="v")


BAD_UTF8 = b"\x0a\x02\xc3\x28"  # request_id = the bytes C3 28: not UTF-8
TRUNCATED = b"\x0a\x10abc"  # a length-delimited field that claims 16 bytes, has 3


def test_the_parser_returns_undecodable_instead_of_raising() -> None:
    parse = parser(pb.GenerateRequest)
    assert parse(pb.GenerateRequest(request_id="x").SerializeToString()) == \
        pb.GenerateRequest(request_id="x")
    for data in (BAD_UTF8, TRUNCATED):
        got = parse(data)
        assert isinstance(got, Undecodable)
        assert "pdserve.v1.GenerateRequest" in got.message


def test_undecodable_requests_end_invalid_argument_and_good_ones_are_served() -> None:
    async def main() -> None:
        servicer = _Servicer()
        refused: list[tuple[str, str]] = []

        async def refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                         message: str) -> NoReturn:
            refused.append((code.name, message))
            await context.abort(code, message)
            raise AssertionError("abort returns no more")

        server = grpc.aio.server()
        add_generation_service(servicer, server, refuse)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                generate = ch.unary_stream(f"/{SERVICE.full_name}/Generate",
                                           response_deserializer=pb.GenerateResponse.FromString)
                abort = ch.unary_unary(f"/{SERVICE.full_name}/Abort",
                                       response_deserializer=pb.AbortResponse.FromString)
                for data in (BAD_UTF8, TRUNCATED):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        async for _ in generate(data):
                            pass
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "GenerateRequest" in (err.value.details() or "")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await abort(TRUNCATED)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert servicer.seen == []  # nothing undecodable reached the servicer
                good = pb.GenerateRequest(request_id="ok").SerializeToString()
                got = [r.token_ids[0] async for r in generate(good)]
                assert got == [0, 1, 2]
                found = await abort(pb.AbortRequest(request_id="r").SerializeToString())
                assert found.found
        finally:
            await server.stop(None)
        assert [code for code, _ in refused] == ["INVALID_ARGUMENT"] * 3

    asyncio.run(main())
