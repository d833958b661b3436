"""The HTTP listener of a frontend: uvicorn serving ``app.build_app`` as a task on the
frontend's own event loop, beside its gRPC server.

So HTTP and gRPC requests share the frontend's tokenizer, validation and router feed. The
port is bound here with ``SO_REUSEPORT`` when several frontends share it (the kernel spreads
connections over them, as for gRPC), and served with the deployment's TLS, mutual when it
has a client CA, like the gRPC port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator

import uvicorn

from pdserve.router.openai_api.app import build_app
from pdserve.router.openai_api.calls import Host

STOP_TIMEOUT_S = 5.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The frontend's process (a Ray worker) owns its signals: uvicorn takes none.
        yield


def bind(host: str, port: int, shared: bool) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``SO_REUSEPORT`` when ``shared``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"http_port: cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


class HttpServer:
    """uvicorn on one bound socket, started and stopped with its frontend."""

    def __init__(self, host: Host) -> None:
        cfg = host.cfg
        tls = cfg.tls
        self.config = uvicorn.Config(
            build_app(host), http="h11", lifespan="off", log_config=None, access_log=False,
            server_header=False,
            ssl_certfile=tls.cert if tls else None, ssl_keyfile=tls.key if tls else None,
            ssl_ca_certs=tls.client_ca if tls and tls.client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
        )
        self.sock = bind(cfg.host, cfg.http_port, cfg.frontends > 1)
        self.server = _Server(self.config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():  # it failed to start (a bad TLS file, ...)
                self.task.result()
                raise RuntimeError("the HTTP server stopped as it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self.task, STOP_TIMEOUT_S)
        self.sock.close()


async def start_http(host: Host) -> HttpServer:
    server = HttpServer(host)
    await server.start()
    return server
