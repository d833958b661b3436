"""The ``pdserve.v1.Generation`` service's method handlers, built from the proto's
descriptor, with a request parser that never raises.

grpc's generated ``add_GenerationServicer_to_server`` parses each request with the message's
``FromString``: bytes the protobuf runtime cannot parse (a truncated or corrupt message,
invalid UTF-8 in a string field) raise ``DecodeError`` inside grpc, and the call ends
UNKNOWN, uncounted. Here such a request reaches the method as an :class:`Undecodable`, and
the call ends INVALID_ARGUMENT naming the message type and the runtime's reason, refused and
counted like every other bad request (``refuse``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from pdserve.proto import pdserve_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"]

Refuse = Callable[[grpc.aio.ServicerContext, grpc.StatusCode, str], Awaitable[NoReturn]]


@dataclass(frozen=True)
class Undecodable:
    """A request the protobuf runtime could not parse, and why."""

    message: str


def parser(cls: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """``cls.FromString``, returning an :class:`Undecodable` where it would raise."""
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Undecodable(f"the request is not a valid {name} message ({e})")

    return parse


def add_generation_service(servicer: Any, server: grpc.aio.Server, refuse: Refuse) -> None:
    """Register every method of the Generation service on ``server``, as the generated
    code does, but with :func:`parser` and an INVALID_ARGUMENT refusal of undecodable
    requests in front of each of ``servicer``'s methods."""
    handlers = {}
    for method in SERVICE.methods:
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(behaviour, refuse), request_deserializer=parser(request),
                response_serializer=response.SerializeToString)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behaviour, refuse), request_deserializer=parser(request),
                response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    # (as the generated code does; the grpc stubs do not know the method yet)
    server.add_registered_method_handlers(  # type: ignore[attr-defined]
        SERVICE.full_name, handlers)


def _streaming(behaviour: Callable[..., AsyncIterator[Message]], refuse: Refuse
               ) -> Callable[..., AsyncIterator[Message]]:
    async def call(request: Message | Undecodable, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[Message]:
        if isinstance(request, Undecodable):
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for item in behaviour(request, context):
            yield item

    return call


def _unary(behaviour: Callable[..., Awaitable[Message]], refuse: Refuse
           ) -> Callable[..., Awaitable[Message]]:
    async def call(request: Message | Undecodable, context: grpc.aio.ServicerContext
                   ) -> Message:
        if isinstance(request, Undecodable):
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return call
