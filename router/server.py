"""The router's gRPC face: the ``pdserve.v1.Generation`` servicer, health, reflection and
/metrics, hosted with the request state machine on one event loop (a Ray actor's)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from engine.config import ModelConfig, ModelSpec
from engine.messages import FirstToken, StepReport, TransferDone
from engine.sequence import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from router.metrics import Metrics
from router.request import Chunk, Request
from router.router import QueueFull, Router, RouterConfig
from router.validation import (
    Limits,
    RequestError,
    ValidRequest,
    effective_max_tokens,
    validate_prompt_tokens,
    validate_request,
)

log = logging.getLogger("pdserve.server")

VERSION = "0.1.0"
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(frozen=True)
class ServerConfig:
    """What the router's servers need: where to listen, and what they serve."""

    model: ModelSpec
    model_config: ModelConfig
    limits: Limits
    router: RouterConfig
    block_size: int
    dtype: str
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port
    metrics_port: int = 0  # 0 = any free port; -1 = no /metrics
    mode: str = "disaggregated"


class RouterService:
    """The router actor's body: gRPC server + request state machine + metrics."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.started = time.monotonic()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.tokenizer: Tokenizer | None = None
        self.router: Router | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0
        self.metrics_port = 0

    # -- lifecycle (Ray calls from cluster.launch) -------------------------------------------
    async def start(self) -> tuple[int, int]:
        """Load the tokenizer, start gRPC (NOT_SERVING until ``set_serving``) and /metrics.
        Returns (grpc port, metrics port)."""
        loop = asyncio.get_running_loop()
        self.tokenizer = await loop.run_in_executor(
            None, load_tokenizer, self.cfg.model, self.cfg.model_config
        )
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_GenerationServicer_to_server(_Servicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {self.cfg.host}:{self.cfg.port}")
        for service in ("", SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self.server = server
        if self.cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.start_http_server(
                self.cfg.metrics_port, self.cfg.host
            )
        return self.port, self.metrics_port

    async def attach(self, prefill: dict[str, Any], decode: dict[str, Any]) -> None:
        """Hand over the worker pools (actor handles by name)."""
        self.router = Router(prefill, decode, self.cfg.router, self.metrics)

    async def open_channels(self) -> None:
        assert self.router is not None
        await self.router.open_channels()

    async def set_serving(self) -> None:
        """Workers are warm: report SERVING."""
        for service in ("", SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float = 2.0) -> None:
        for service in ("", SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.router is not None:
            self.router.abort_all("the server is shutting down")
        if self.server is not None:
            await self.server.stop(grace_s)

    async def debug_state(self) -> list[str]:
        """One line per in-flight request (state, attempts, tokens): for operators and
        tests."""
        if self.router is None:
            return []
        waiting = {id(r) for r in self.router.waiting}
        return [
            f"{r.request_id} {r.state.value} attempts={r.attempts} out={len(r.output_ids)} "
            f"lease={r.lease.worker + ':' + str(r.lease.transfer_id) if r.lease else None} "
            f"queued={id(r) in waiting} awaiting_first={r.awaiting_first}"
            for r in self.router.requests.values()
        ]

    # -- worker reports ---------------------------------------------------------------------
    async def on_first_token(self, msg: FirstToken) -> None:
        assert self.router is not None
        self.router.on_first_token(msg)

    async def on_step(self, report: StepReport) -> None:
        assert self.router is not None
        self.router.on_step(report)

    async def on_transfer_done(self, msg: TransferDone) -> None:
        assert self.router is not None
        self.router.on_transfer_done(msg)

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

    def new_request(self, req: pb.GenerateRequest, arrival: float) -> Request:
        """Validate and tokenize; raises RequestError naming the field at fault."""
        assert self.tokenizer is not None
        limits = self.cfg.limits
        v = validate_request(req, limits)
        ids = self.prompt_ids(req, v)
        max_tokens = effective_max_tokens(len(ids), v.sampling, limits)
        validate_prompt_tokens(ids, max_tokens, limits)
        s = v.sampling
        sampling = SamplingParams(
            max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            seed=s.seed, stop_token_ids=s.stop_token_ids,
            eos_token_ids=self.tokenizer.eos_token_ids, ignore_eos=s.ignore_eos,
        )
        return Request(
            request_id=v.request_id or uuid.uuid4().hex, prompt_ids=ids, sampling=sampling,
            stop=s.stop,
            ttft_slo_s=v.slo.ttft_ms / 1e3 if v.slo.ttft_ms else None,
            tpot_slo_s=v.slo.tpot_ms / 1e3 if v.slo.tpot_ms else None,
            arrival=arrival, detok=IncrementalDetokenizer(self.tokenizer, ids),
        )


class _Servicer(pb_grpc.GenerationServicer):
    def __init__(self, svc: RouterService) -> None:
        self.svc = svc

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.monotonic()
        router = self.svc.router
        if router is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is starting")
        assert router is not None
        try:
            req = self.svc.new_request(request, arrival)
            router.admit(req)
        except RequestError as e:
            await context.abort(e.code, e.message)
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"queue full: {e}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {e}")
        remaining = context.time_remaining()
        timer = None
        if remaining is not None:
            timer = asyncio.get_running_loop().call_later(
                max(0.0, remaining), router.deadline_callback(req.request_id)
            )
        try:
            while True:
                chunk = _merge([await req.chunks.get()], req.chunks)
                if chunk.error is not None:
                    code, message = chunk.error
                    await context.abort(grpc.StatusCode[code], message)
                yield _response(req, chunk)
                if chunk.finish_reason is not None:
                    return
        finally:
            if timer is not None:
                timer.cancel()
            if not req.done:  # the client went away (cancel, deadline, disconnect)
                router.abort(req.request_id)

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        router = self.svc.router
        found = router is not None and router.abort(request.request_id)
        return pb.AbortResponse(found=found)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        cfg = self.svc.cfg
        tok = self.svc.tokenizer
        return pb.ModelInfo(
            model_name=cfg.model_config.name, max_context_length=cfg.limits.max_context,
            vocab_size=cfg.limits.vocab_size,
            eos_token_ids=list(tok.eos_token_ids if tok else cfg.model_config.eos_token_ids),
            block_size=cfg.block_size, dtype=cfg.dtype,
            default_max_tokens=cfg.limits.default_max_tokens,
            max_tokens_limit=cfg.limits.max_tokens_limit,
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
        router = self.svc.router
        return pb.ServerInfo(
            num_prefill_workers=len(router.prefill) if router else 0,
            num_decode_workers=len(router.decode) if router else 0,
            version=VERSION, mode=self.svc.cfg.mode,
            uptime_s=time.monotonic() - self.svc.started,
        )


def _merge(first: list[Chunk], more: asyncio.Queue[Chunk]) -> Chunk:
    """Fold chunks that are already waiting into one response (a slow reader gets fewer,
    larger messages instead of falling behind)."""
    chunks = first
    while chunks[-1].finish_reason is None and chunks[-1].error is None and not more.empty():
        chunks.append(more.get_nowait())
    last = chunks[-1]
    return Chunk(
        token_ids=[t for c in chunks for t in c.token_ids],
        text="".join(c.text for c in chunks),
        finish_reason=last.finish_reason, matched_stop=last.matched_stop, error=last.error,
    )


def _response(req: Request, chunk: Chunk) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(request_id=req.request_id, token_ids=chunk.token_ids,
                               text=chunk.text)
    if chunk.finish_reason is None:
        return resp
    now = time.monotonic()
    n = len(req.output_ids)
    resp.finished = True
    resp.finish_reason = chunk.finish_reason
    if isinstance(chunk.matched_stop, str):
        resp.matched_stop_str = chunk.matched_stop
    elif isinstance(chunk.matched_stop, int):
        resp.matched_stop_token_id = chunk.matched_stop
    resp.usage.prompt_tokens = len(req.prompt_ids)
    resp.usage.completion_tokens = n
    resp.timing.queue_s = req.queue_s
    resp.timing.prefill_s = req.prefill_s
    resp.timing.kv_transfer_s = req.transfer_s
    resp.timing.ttft_s = req.t_first - req.arrival if req.t_first else 0.0
    resp.timing.mean_tpot_s = (req.t_last - req.t_first) / (n - 1) if n > 1 else 0.0
    resp.timing.e2e_s = now - req.arrival
    return resp
