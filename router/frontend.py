"""A gRPC frontend: the ``pdserve.v1.Generation`` service, health and reflection, in a Ray
actor of its own.

It validates and tokenizes each ``Generate`` call, submits it to the router actor, and
streams what the router delivers for it. Several frontends listen on one port
(``SO_REUSEPORT``: the kernel spreads client connections over them; each connection, with
all the streams multiplexed on it, stays with one frontend), so the per-message gRPC work,
which bounds how many tokens a second one process streams, is spread over processes as
vLLM's API servers spread HTTP (``--api-server-count``).

A frontend keeps no metrics: a call it refuses before submitting it is counted by the
router actor (``count_failure``), and a call whose client goes away mid-stream is reported
to it with the status the call ended with (``client_gone``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.engine.sequence import MAX_TOP_LOGPROBS, SamplingParams
from pdserve.engine.tokenizer import Tokenizer, load_tokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.router.config import ServerConfig
from pdserve.router.grpc_service import add_generation_service
from pdserve.router.openai_api.http_server import HttpServer, start_http
from pdserve.router.security import TokenInterceptor
from pdserve.router.server import VERSION
from pdserve.router.stream import (
    StreamEnd,
    StreamItem,
    Submission,
    merge,
    read_frame,
    read_hello,
    response,
)
from pdserve.router.validation import (
    RequestError,
    ValidRequest,
    effective_max_tokens,
    validate_prompt_tokens,
    validate_request,
)

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
DEADLINE_SLACK_S = 0.05  # a client gone this close to its deadline is counted as past it


class Frontend:
    """One gRPC frontend (hosted in a Ray actor by ``cluster.launch``)."""

    def __init__(self, index: int, cfg: ServerConfig, router: Any) -> None:
        self.index = index
        self.cfg = cfg
        self.router = router
        self.tokenizer: Tokenizer | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.streams: dict[str, asyncio.Queue[StreamItem]] = {}
        self.served = 0  # Generate calls submitted to the router
        self.feed: asyncio.Server | None = None
        self.serving = False
        self.http: HttpServer | None = None  # the OpenAI-compatible API, if cfg.http_port

    async def start(self, port: int) -> tuple[int, int]:
        """Load the tokenizer and listen on ``port`` (0: any free one), NOT_SERVING until
        ``set_serving``, on ``cfg.http_port`` for the HTTP API (``router.openai_api``) when
        set, and for the router's feed on a loopback port; returns (the gRPC port bound, the
        feed's port)."""
        loop = asyncio.get_running_loop()
        self.tokenizer = await loop.run_in_executor(
            None, load_tokenizer, self.cfg.model, self.cfg.model_config
        )
        shared = self.cfg.frontends > 1
        auth = self.cfg.auth
        interceptors = [] if auth is None else [TokenInterceptor(
            auth, lambda: self.router.count_failure.remote("UNAUTHENTICATED"))]
        server = grpc.aio.server(options=[("grpc.so_reuseport", int(shared))],
                                 interceptors=interceptors)
        add_generation_service(_Servicer(self), server, self.refuse)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{self.cfg.host}:{port}"
        tls = self.cfg.tls
        bound = (server.add_insecure_port(address) if tls is None
                 else server.add_secure_port(address, tls.server_credentials()))
        if bound == 0:
            raise RuntimeError(f"cannot listen on {self.cfg.host}:{port}")
        await self.set_serving(False)
        await server.start()
        self.server = server
        if self.cfg.http_port:
            self.http = await start_http(self)
        self.feed = await asyncio.start_server(self._read_feed, "127.0.0.1", 0)
        return bound, self.feed.sockets[0].getsockname()[1]

    async def _read_feed(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        """The router's connection (it opens with the router's tag; any other is closed
        unread): deliver each frame; when it closes, the streams still open here cannot go
        on."""
        if not await read_hello(reader, self.cfg.secret, self.index):
            writer.close()
            return
        while (items := await read_frame(reader)) is not None:
            self.deliver(items)
        writer.close()
        gone = StreamEnd(error=("UNAVAILABLE", "the router closed its connection"))
        self.deliver([(rid, [], "", gone, 0, None) for rid in self.streams])

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.serving = serving
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace_s: float) -> None:
        if self.http is not None:
            await self.http.stop()
        if self.server is not None:
            await self.server.stop(grace_s)
        if self.feed is not None:
            self.feed.close()

    def num_served(self) -> int:
        return self.served

    async def refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                     message: str) -> NoReturn:
        """End a call before it reaches the router: the router counts the failure."""
        self.router.count_failure.remote(code.name)
        await context.abort(code, message)

    def deliver(self, items: list[StreamItem]) -> None:
        """The router's items for this frontend's streams, from its feed (a stream that
        ended here already drops its late items)."""
        for item in items:
            q = self.streams.get(item[0])
            if q is not None:
                q.put_nowait(item)

    # -- requests ---------------------------------------------------------------------------
    def prompt_ids(self, req: pb.GenerateRequest, v: ValidRequest) -> list[int]:
        assert self.tokenizer is not None
        if v.input_kind == "token_ids":
            return list(req.token_ids.ids)
        if v.input_kind == "messages":
            return self.tokenizer.apply_chat_template(
                [(m.role, m.content) for m in req.messages.messages]
            )
        return self.tokenizer.encode(req.text)

    def submission(self, req: pb.GenerateRequest, arrival: float,
                   deadline_s: float | None) -> Submission:
        """Validate and tokenize; raises RequestError naming the field at fault."""
        assert self.tokenizer is not None
        limits = self.cfg.limits
        v = validate_request(req, limits, self.cfg.slo_classes)
        ids = self.prompt_ids(req, v)
        max_tokens = effective_max_tokens(len(ids), v.sampling, limits)
        validate_prompt_tokens(ids, max_tokens, limits)
        s = v.sampling
        sampling = SamplingParams(
            max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            seed=s.seed, stop_token_ids=s.stop_token_ids,
            eos_token_ids=self.tokenizer.eos_token_ids, ignore_eos=s.ignore_eos,
            min_tokens=s.min_tokens, repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            min_p=s.min_p, logprobs=s.logprobs, top_logprobs=s.top_logprobs,
        )
        return Submission(
            request_id=v.request_id or uuid.uuid4().hex, prompt_ids=ids, sampling=sampling,
            stop=s.stop, slo=v.slo,
            waited_s=time.monotonic() - arrival, deadline_s=deadline_s, n=s.n,
        )


def _gone(context: grpc.aio.ServicerContext) -> str:
    """The status a call ended with when its client went away mid-stream: its deadline
    passed, or it cancelled or disconnected. A client cancels the call itself at its
    deadline, which may reach us a moment before ours (set when the call arrived) passes."""
    left = context.time_remaining()
    return "DEADLINE_EXCEEDED" if left is not None and left <= DEADLINE_SLACK_S \
        else "CANCELLED"


class _Servicer(pb_grpc.GenerationServicer):
    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.monotonic()
        fe = self.fe
        if fe.tokenizer is None:
            await fe.refuse(context, grpc.StatusCode.UNAVAILABLE, "the server is starting")
        try:
            sub = fe.submission(request, arrival, context.time_remaining())
        except RequestError as e:
            await fe.refuse(context, e.code, e.message)
        rid = sub.request_id
        if rid in fe.streams:
            await fe.refuse(context, grpc.StatusCode.ALREADY_EXISTS,
                            f"request_id: {rid!r} is already in flight")
        # Registered before the router hears of it: its first items may come back before
        # the answer to submit does.
        q: asyncio.Queue[StreamItem] = asyncio.Queue()
        fe.streams[rid] = q
        fe.served += 1
        ended = False
        open_choices, completion = sub.n, 0
        try:
            refused = await fe.router.submit.remote(sub, fe.index)
            if refused is not None:
                ended = True
                await context.abort(grpc.StatusCode[refused[0]], refused[1])
            while True:
                items = [await q.get()]
                while not q.empty():
                    items.append(q.get_nowait())
                for item in merge(items):
                    end = item[3]
                    if end is not None and end.error is not None:
                        ended = True
                        await context.abort(grpc.StatusCode[end.error[0]], end.error[1])
                    resp = response(item)
                    if end is not None:
                        open_choices -= 1
                        completion += end.completion_tokens
                        if open_choices:  # usage: on the stream's last response only
                            resp.ClearField("usage")
                        else:
                            resp.usage.completion_tokens = completion
                    yield resp
                    if not open_choices:
                        ended = True
                        return
        finally:
            fe.streams.pop(rid, None)
            if not ended:  # the client went away (cancel, deadline, disconnect)
                fe.router.client_gone.remote(rid, _gone(context))

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        found = await self.fe.router.cancel.remote(request.request_id)
        return pb.AbortResponse(found=found)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        cfg = self.fe.cfg
        tok = self.fe.tokenizer
        return pb.ModelInfo(
            model_name=cfg.model_config.name, max_context_length=cfg.limits.max_context,
            vocab_size=cfg.limits.vocab_size,
            eos_token_ids=list(tok.eos_token_ids if tok else cfg.model_config.eos_token_ids),
            block_size=cfg.block_size, dtype=cfg.dtype,
            default_max_tokens=cfg.limits.default_max_tokens,
            max_tokens_limit=cfg.limits.max_tokens_limit, max_n=cfg.limits.max_n,
            max_top_logprobs=MAX_TOP_LOGPROBS,
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
        num_prefill, num_decode, uptime = await self.fe.router.server_info.remote()
        return pb.ServerInfo(
            num_prefill_workers=num_prefill, num_decode_workers=num_decode,
            version=VERSION, mode=self.fe.cfg.mode, uptime_s=uptime,
            slo_classes=[pb.SloClass(name=c.name, ttft_ms=c.ttft_ms or 0.0,
                                     tpot_ms=c.tpot_ms or 0.0, priority=c.priority,
                                     best_effort=c.best_effort)
                         for c in self.fe.cfg.slo_classes.classes],
            default_slo_class=self.fe.cfg.slo_classes.default,
            scheduler=self.fe.cfg.router.scheduler,
        )
