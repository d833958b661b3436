"""Typed Python client of the pdserve wire API (sync and asyncio).

    with Client("localhost:50051") as client:
        client.wait_ready(timeout_s=60)
        for chunk in client.generate(text="Once upon a time", max_tokens=32, temperature=0):
            print(chunk.text, end="", flush=True)

    async with AsyncClient("localhost:50051") as client:
        done = await acollect(client.generate(messages=[{"role": "user", "content": "Hi"}]))

`generate` returns the gRPC call itself: iterate it for the responses, `cancel()` it to abort the
request (breaking out of the loop alone leaves the call open until it is garbage collected).
Server errors arrive as `grpc.RpcError` (sync) or `grpc.aio.AioRpcError` (asyncio) carrying the
status code and a message that names the offending field.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.completion import (
    ChatMessageLike,
    Completion,
    GenerateArgs,
    acollect,
    acollect_choices,
    build_request,
    collect,
    collect_choices,
)
from pdserve.proto.credentials import ClientAuth

if TYPE_CHECKING:  # typing.Unpack from Python 3.11 on
    from typing_extensions import Unpack

__all__ = ["AsyncClient", "ChatMessageLike", "Client", "Completion", "acollect",
           "acollect_choices", "build_request", "collect", "collect_choices"]

PLAIN = ClientAuth(tls=False)  # a plaintext channel, no token

_WAIT_POLL_S = 0.1


class GenerateStream(Protocol):
    """What `Client.generate` returns: the responses, and a way to abort the request."""

    def __iter__(self) -> Iterator[pb.GenerateResponse]: ...

    def cancel(self) -> bool: ...


class AsyncGenerateStream(Protocol):
    """What `AsyncClient.generate` returns: the responses, and a way to abort the request."""

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]: ...

    def cancel(self) -> bool: ...


def _status_name(resp: health_pb2.HealthCheckResponse) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

# Channels of one process to one target share a connection unless told otherwise. A server
# with several frontends on one port (`pdserve serve --frontends N`) serves a connection
# from one of them, so a client that wants its load spread opens connections of its own.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


class Client:
    """Blocking client over one gRPC channel. Thread-safe, as the channel is."""

    def __init__(self, target: str, *, channel: grpc.Channel | None = None,
                 own_connection: bool = False, auth: ClientAuth | None = None) -> None:
        """Connect to `target` ("host:port"), or use `channel` if given (then `target` only
        names it in messages; close() closes it all the same). With `own_connection` the
        channel opens a connection of its own (see OWN_CONNECTION); `auth`: TLS, a client
        certificate, a bearer token (`proto.credentials`)."""
        self.target = target
        options = OWN_CONNECTION if own_connection else None
        self._channel = channel if channel is not None else (auth or PLAIN).channel(
            target, options)
        stub = pb_grpc.GenerationStub(self._channel)
        self._generate: grpc.UnaryStreamMultiCallable[pb.GenerateRequest, pb.GenerateResponse]
        self._generate = stub.Generate
        self._abort: grpc.UnaryUnaryMultiCallable[pb.AbortRequest, pb.AbortResponse]
        self._abort = stub.Abort
        self._model_info: grpc.UnaryUnaryMultiCallable[pb.GetModelInfoRequest, pb.ModelInfo]
        self._model_info = stub.GetModelInfo
        self._server_info: grpc.UnaryUnaryMultiCallable[pb.GetServerInfoRequest, pb.ServerInfo]
        self._server_info = stub.GetServerInfo
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, *, timeout: float | None = None,
                 **args: Unpack[GenerateArgs]) -> GenerateStream:
        """Start generating; see `build_request` for the arguments. `timeout` (seconds) becomes
        the call's gRPC deadline. With `n` > 1 the responses of the n choices interleave
        (`GenerateResponse.index`; gather them with `collect_choices`)."""
        req = build_request(**args)
        return self.send(req, timeout=timeout)

    def send(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> GenerateStream:
        """Send a prebuilt GenerateRequest (any content, also invalid: for tests)."""
        return self._generate(request, timeout=timeout)

    def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Abort a running request; False if the server knows no running request by that id."""
        return self._abort(pb.AbortRequest(request_id=request_id), timeout=timeout).found

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return self._model_info(pb.GetModelInfoRequest(), timeout=timeout)

    def server_info(self, *, timeout: float | None = None) -> pb.ServerInfo:
        return self._server_info(pb.GetServerInfoRequest(), timeout=timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status name of `service` ("" = the whole server): "SERVING",
        "NOT_SERVING", "UNKNOWN", or "SERVICE_UNKNOWN" when the server does not know it."""
        try:
            resp = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return _status_name(resp)

    def wait_ready(self, timeout_s: float, service: str = "") -> None:
        """Poll health until SERVING; TimeoutError after `timeout_s` seconds. Connection errors
        while the server starts count as not ready yet."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.target} not SERVING after {timeout_s} s ({last})")
            try:
                last = self.health(service, timeout=min(left, 5.0))
                if last == "SERVING":
                    return
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(min(_WAIT_POLL_S, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """asyncio client over one grpc.aio channel; create and use it inside one event loop."""

    def __init__(self, target: str, *, channel: grpc.aio.Channel | None = None,
                 own_connection: bool = False, auth: ClientAuth | None = None) -> None:
        """Connect to `target` ("host:port"), or use `channel` if given. With
        `own_connection` the channel opens a connection of its own (see OWN_CONNECTION);
        `auth` as `Client`'s."""
        self.target = target
        self._channel = channel if channel is not None else (auth or PLAIN).aio_channel(
            target, options=OWN_CONNECTION if own_connection else None)
        stub = pb_grpc.GenerationStub(self._channel)
        self._generate: grpc.aio.UnaryStreamMultiCallable[
            pb.GenerateRequest, pb.GenerateResponse
        ] = stub.Generate
        self._abort: grpc.aio.UnaryUnaryMultiCallable[pb.AbortRequest, pb.AbortResponse]
        self._abort = stub.Abort
        self._model_info: grpc.aio.UnaryUnaryMultiCallable[pb.GetModelInfoRequest, pb.ModelInfo]
        self._model_info = stub.GetModelInfo
        self._server_info: grpc.aio.UnaryUnaryMultiCallable[
            pb.GetServerInfoRequest, pb.ServerInfo
        ] = stub.GetServerInfo
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, *, timeout: float | None = None,
                 **args: Unpack[GenerateArgs]) -> AsyncGenerateStream:
        """Start generating (`async for` the result); see `build_request` for the arguments."""
        req = build_request(**args)
        return self.send(req, timeout=timeout)

    def send(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> AsyncGenerateStream:
        """Send a prebuilt GenerateRequest (any content, also invalid: for tests)."""
        return self._generate(request, timeout=timeout)

    async def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Abort a running request; False if the server knows no running request by that id."""
        resp = await self._abort(pb.AbortRequest(request_id=request_id), timeout=timeout)
        return resp.found

    async def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return await self._model_info(pb.GetModelInfoRequest(), timeout=timeout)

    async def server_info(self, *, timeout: float | None = None) -> pb.ServerInfo:
        return await self._server_info(pb.GetServerInfoRequest(), timeout=timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """As `Client.health`."""
        try:
            resp = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return _status_name(resp)

    async def wait_ready(self, timeout_s: float, service: str = "") -> None:
        """As `Client.wait_ready`."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.target} not SERVING after {timeout_s} s ({last})")
            try:
                last = await self.health(service, timeout=min(left, 5.0))
                if last == "SERVING":
                    return
            except grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
            await asyncio.sleep(min(_WAIT_POLL_S, max(0.0, deadline - time.monotonic())))

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
