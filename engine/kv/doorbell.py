"""A KV channel's doorbell (protocol 4): a TCP connection of the channel's own, from the
prefill end to the decode end, that carries each transfer's header.

The sender writes the header's 128 bytes (``TCP_NODELAY``); the receiver sleeps in ``recv``
with the GIL released until they arrive: one hop. Nothing is posted anywhere while a channel
is idle, so a wait times out harmlessly, and a prefill process that dies closes the
connection, so an idle decode end can tell a dead sender from a quiet one.

The connection also tells either end, mid-transfer, that the other one went away
(:meth:`Doorbell.check_peer`): an NCCL send or receive whose peer aborted its communicator
never completes, so without it the end still waiting would sit out its whole timeout. An end
that closes a sound channel on purpose says goodbye first, in either direction.

What it replaced:

* Protocol 3 rang a key in the decode worker's ``TCPStore`` whose value was the header: the
  sender's ``set``, the store server's wake-up of the waiting client, the client's ``get``.
  On two H200s the decode side held the header about 1.3 ms after the sender started, a
  fixed cost per transfer that held a whole 4k-token request to 0.62-0.69 of raw NCCL
  (docs/benchmarks.md).
* A header receive kept posted on the channel's NCCL communicator was tried on two H200s and
  dropped: the decode process hung in both checks where the channel sat idle. Not traced;
  the likely cause is that a kernel only the next transfer ends blocks every device-wide
  synchronization of the process (CUDA graph capture and the runner make them) and some
  allocations; the NCCL watchdog also has to be disarmed for it.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import select
import socket
import threading
import time

import torch.distributed as dist

from pdserve.engine.kv.protocol import HEADER_SLOTS
from pdserve.engine.secret import Secret

HEADER_BYTES = HEADER_SLOTS * 8
# Sent in place of a header by an end that closes on purpose (shutdown), so the other end can
# tell a peer that left from one that died (the connection just closes).
GOODBYE = b"PDKV-BYE".ljust(HEADER_BYTES, b"\0")
_HELLO = b"PDKV-BELL:"  # then the tag of the channel's name and nonce (engine.secret)
_ADDR_KEY = "bell/addr"
HELLO_TIMEOUT_S = 2.0  # a connection that has not sent its hello by then is turned away


class DoorbellError(ConnectionError):
    """The doorbell could not be set up, or its connection broke."""


class PeerLeft(DoorbellError):
    """The peer closed its end on purpose (it said goodbye first)."""


class Doorbell:
    """One end of a channel's doorbell connection; use :meth:`listen` (decode end) or
    :meth:`connect` (prefill end), then :meth:`ring` / :meth:`wait`."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._buf = bytearray()  # bytes received beyond the header handed out last
        self._poller = select.poll()  # for check_peer (select() fails past fd 1024)
        self._poller.register(sock, select.POLLIN | select.POLLPRI)
        self._check_lock = threading.Lock()  # the prefill end may check from two threads
        self._gone: DoorbellError | None = None  # what check_peer saw, once it saw it

    @classmethod
    def listen(cls, ns: dist.Store, host: str, name: str, timeout_s: float,
               secret: Secret) -> Doorbell:
        """Decode end: listen on ``host``, publish the address and a fresh nonce in the
        channel's namespace ``ns``, and accept, within ``timeout_s``, the connection that
        opens with the tag of the name and nonce under the deployment's ``secret``; any
        other connection is closed unread."""
        deadline = time.monotonic() + timeout_s
        nonce = os.urandom(16)
        hello = _HELLO + secret.tag("kv-doorbell", name, nonce)
        try:
            with socket.create_server((host, 0)) as server:
                ns.set(_ADDR_KEY, json.dumps([host, server.getsockname()[1], nonce.hex()]))
                while True:
                    server.settimeout(max(deadline - time.monotonic(), 1e-3))
                    conn, _ = server.accept()
                    conn.settimeout(max(min(deadline - time.monotonic(), HELLO_TIMEOUT_S),
                                        1e-3))
                    try:
                        said = _recv_exact(conn, len(hello))
                    except OSError:  # silent past HELLO_TIMEOUT_S, or reset
                        said = b""
                    if hmac.compare_digest(said, hello):
                        conn.settimeout(None)
                        return cls(conn)
                    conn.close()  # not our peer
        except TimeoutError as e:
            raise DoorbellError(f"the prefill end did not connect within {timeout_s:.3g} s") \
                from e
        except OSError as e:
            raise DoorbellError(f"listening for the prefill end failed: {e}") from e

    @classmethod
    def connect(cls, ns: dist.Store, name: str, timeout_s: float,
                secret: Secret) -> Doorbell:
        """Prefill end: connect to the address the decode end published in ``ns``, and
        open with the tag of the name and the published nonce."""
        try:
            ns.wait([_ADDR_KEY])
            host, port, nonce = json.loads(ns.get(_ADDR_KEY).decode())
            sock = socket.create_connection((host, int(port)), timeout=timeout_s)
            sock.sendall(_HELLO + secret.tag("kv-doorbell", name, bytes.fromhex(nonce)))
            sock.settimeout(None)
        except (OSError, ValueError, RuntimeError) as e:
            raise DoorbellError(f"connecting to the decode end's doorbell failed: {e}") from e
        return cls(sock)

    def ring(self, header: bytes, timeout_s: float) -> None:
        """Send one header (:data:`HEADER_BYTES`); :class:`DoorbellError` if the connection
        is gone or stays full for ``timeout_s``."""
        if len(header) != HEADER_BYTES:
            raise ValueError(f"a header is {HEADER_BYTES} bytes, got {len(header)}")
        try:
            self._sock.settimeout(timeout_s)
            self._sock.sendall(header)
        except OSError as e:
            raise DoorbellError(f"ringing the doorbell failed: {e}") from e

    def wait(self, timeout_s: float) -> bytes | None:
        """The next header once it is in, or None after ``timeout_s`` (whatever part of it
        arrived is kept for the next call). :class:`DoorbellError` once the connection is
        closed (the peer went away, or :meth:`close` was called)."""
        deadline = time.monotonic() + timeout_s
        while len(self._buf) < HEADER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                self._sock.settimeout(remaining)
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                return None
            except OSError as e:
                raise DoorbellError(f"the doorbell connection broke: {e}") from e
            if not chunk:
                raise DoorbellError("the doorbell connection was closed")
            self._buf += chunk
        if self._buf.startswith(GOODBYE):
            raise PeerLeft("the peer closed its end")
        return self._take()

    def poll(self) -> bytes | None:
        """The next header if it is in already, else None; never blocks. A goodbye or a
        closed connection is left for :meth:`wait` to report."""
        if len(self._buf) < HEADER_BYTES:
            try:
                self._sock.settimeout(0.0)  # non-blocking (a timeout would wait it out)
                chunk = self._sock.recv(1 << 16)
            except OSError:  # nothing there (BlockingIOError), or broken: wait() says so
                return None
            if not chunk:
                return None
            self._buf += chunk
        if len(self._buf) < HEADER_BYTES or self._buf.startswith(GOODBYE):
            return None
        return self._take()

    def check_peer(self) -> None:
        """Raise :class:`PeerLeft` if the peer said goodbye, :class:`DoorbellError` if its end
        is closed; else return. Never blocks and loses nothing: bytes that came in (a
        header) stay for :meth:`wait` and :meth:`poll`. Safe beside :meth:`ring` on another
        thread; a check already running on another thread makes this one return."""
        if self._gone is not None:
            raise self._gone
        if self._sock.fileno() < 0:  # closed here (its number may belong to another file)
            raise DoorbellError("the doorbell connection was closed")
        if not self._check_lock.acquire(blocking=False):
            return
        try:
            while self._poller.poll(0):  # readable: data, end of stream or an error
                try:
                    chunk = self._sock.recv(1 << 16)  # returns at once (it is readable)
                except BlockingIOError:
                    break
                except OSError as e:
                    self._gone = DoorbellError(f"the doorbell connection broke: {e}")
                    break
                if not chunk:
                    self._gone = DoorbellError("the doorbell connection was closed")
                    break
                self._buf += chunk
            if any(self._buf[i:i + HEADER_BYTES] == GOODBYE  # behind headers rung before
                   for i in range(0, len(self._buf), HEADER_BYTES)):
                self._gone = PeerLeft("the peer closed its end")
        finally:
            self._check_lock.release()
        if self._gone is not None:
            raise self._gone

    def _take(self) -> bytes:
        """The first header buffered (there is one); the rest stays for the next call."""
        header = bytes(self._buf[:HEADER_BYTES])
        del self._buf[:HEADER_BYTES]
        return header

    def close(self, goodbye: bool = False) -> None:
        """Close the connection; a :meth:`wait` blocked in another thread returns at once
        (with :class:`DoorbellError`). ``goodbye`` (closing on purpose): first tell the peer,
        whose :meth:`wait` or :meth:`check_peer` then raises :class:`PeerLeft`; best
        effort."""
        if goodbye:
            with contextlib.suppress(OSError):
                self._sock.settimeout(0.5)
                self._sock.sendall(GOODBYE)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)
