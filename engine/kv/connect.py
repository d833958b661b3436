"""Opening a KV channel (DESIGN.md section 5): rendezvous, handshake, process group.

* The decode side hosts a ``TCPStore`` (:func:`host_store`); the prefill side connects to it
  (:func:`connect_store`). Each channel lives in its own namespace ``pdserve/kv/{name}/`` of
  that store, over a connection of its own (a store connection serializes its operations,
  and the handshake and rendezvous block in store waits), so one process can hold several
  channels.
* Both ends hold the deployment's secret (:mod:`engine.secret`): the channel's keys live
  under a prefix derived from it (:func:`namespace`), and the doorbell opens only for the
  tag it yields, so a process without it can neither join a channel nor plant a key in it.
* :func:`open_sender` (prefill) and :func:`open_receiver` (decode) first run a **handshake**:
  each side publishes its :class:`ChannelSpec` as JSON and compares it with the peer's; any
  difference raises :class:`HandshakeError` on both sides, naming every differing field with
  both values, and no process group is created. Then the prefill side connects to the decode
  side's **doorbell** (:mod:`engine.kv.doorbell`), and both build ``ProcessGroupGloo`` (CPU
  tensors) or ``ProcessGroupNCCL`` (CUDA tensors, :func:`make_nccl_group`) of size 2: rank 0
  is the prefill side (a :class:`KVSender`), rank 1 the decode side (a :class:`KVReceiver`).

The NCCL process group is bound to the tensors' device and connected eagerly, so
point-to-point traffic reuses that communicator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pdserve.engine.kv.channel import ROLES, Link
from pdserve.engine.kv.doorbell import Doorbell, DoorbellError
from pdserve.engine.kv.protocol import ChannelError, ChannelSpec, HandshakeError, spec_differences
from pdserve.engine.kv.receiver import KVReceiver
from pdserve.engine.kv.sender import KVSender
from pdserve.engine.secret import Secret

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,200}$")


def host_store(
    host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0
) -> tuple[dist.TCPStore, int]:
    """Decode side: host the store the channels to this worker rendezvous through.
    ``port=0`` picks a free port; returns the store and its actual port."""
    store = dist.TCPStore(
        host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False
    )
    return store, int(store.port)


def connect_store(host: str, port: int, timeout_s: float = 30.0) -> dist.TCPStore:
    """Prefill side: a client of the decode worker's store."""
    return dist.TCPStore(
        host, port, None, False, timedelta(seconds=timeout_s), wait_for_workers=False
    )


def open_sender(
    *,
    store: dist.Store,
    name: str,
    secret: Secret,
    spec: ChannelSpec,
    device: torch.device | str,
    timeout_s: float,
    open_timeout_s: float | None = None,
    gloo_host: str | None = None,
    owns_store: bool = False,
) -> KVSender:
    """The prefill end of the channel ``name``; the decode end calls :func:`open_receiver`
    with the same name (unique per pairing and store: a name is never reused, not even after
    close).

    Handshake first (:class:`HandshakeError` on any spec difference, on both sides), then
    the two-rank process group: Gloo for a cpu ``device``, NCCL for a cuda one.
    ``open_timeout_s`` (default ``timeout_s``) bounds the handshake and the process
    group's rendezvous, where the peer may still be starting; ``timeout_s`` bounds every
    later blocking step. ``gloo_host`` is the address Gloo listens on (default: Gloo's
    default device; GLOO_SOCKET_IFNAME is honoured). With ``owns_store`` the channel
    keeps ``store`` alive and releases it on close. Both ends hold the deployment's
    ``secret``: the channel's keys in the store and its doorbell are keyed by it, so an end
    with another secret (or none) never meets this one.
    """
    return KVSender(_connect(store, name, 0, spec, device, timeout_s, open_timeout_s,
                             gloo_host, owns_store, secret))


def open_receiver(
    *,
    store: dist.Store,
    name: str,
    secret: Secret,
    spec: ChannelSpec,
    device: torch.device | str,
    timeout_s: float,
    open_timeout_s: float | None = None,
    gloo_host: str | None = None,
    owns_store: bool = False,
) -> KVReceiver:
    """The decode end of the channel ``name`` (``store`` is usually the one this side hosts:
    :func:`host_store`); the arguments are those of :func:`open_sender`."""
    return KVReceiver(_connect(store, name, 1, spec, device, timeout_s, open_timeout_s,
                               gloo_host, owns_store, secret))


def make_nccl_group(store: dist.Store, rank: int, device: torch.device, timeout_s: float,
                    name: str) -> Any:
    """A two-rank ``ProcessGroupNCCL`` on ``device`` through ``store``, as a channel builds
    its own: the communicator is connected eagerly (both ranks rendezvous here), and a
    watchdog timeout fires only well after ``timeout_s`` and aborts just the communicator."""
    nccl_cls: Any = getattr(dist, "ProcessGroupNCCL", None)
    if nccl_cls is None or not dist.is_nccl_available():
        raise ChannelError("this torch build has no NCCL")
    # Without this the watchdog tears the whole worker down on a timeout; we want only the
    # communicator aborted (our own deadlines normally abort first anyway).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    # One transfer at a time per channel by design, so P2P serialization is what we want.
    os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")
    # The flight recorder records every NCCL operation with its stack, host time on each
    # message's path; the channel's own deadlines name what hung. (Read once per process,
    # when the first NCCL group is built: the workers' first groups are their channels.)
    for var in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"):
        os.environ.setdefault(var, "0")
    opts = nccl_cls.Options()
    opts._timeout = timedelta(seconds=max(3 * timeout_s, timeout_s + 60))
    opts.is_high_priority_stream = False
    with contextlib.suppress(AttributeError, TypeError):
        opts.group_name = f"pdserve-kv-{name}"
    with torch.cuda.device(device):
        pg = nccl_cls(store, rank, 2, opts)
        # Bind the device and build the communicator now (both sides rendezvous here), so the
        # first transfer does not pay for it and p2p reuses this communicator.
        pg.eager_connect_single_device(device)
    return pg


def _connect(store: dist.Store, name: str, rank: int, spec: ChannelSpec,
             device: torch.device | str, timeout_s: float, open_timeout_s: float | None,
             gloo_host: str | None, owns_store: bool, secret: Secret) -> Link:
    """Handshake, doorbell and process group of ``rank``'s end of the channel ``name``."""
    if not _NAME_RE.match(name):
        raise ValueError(f"bad channel name {name!r} (letters, digits, _.:@- only)")
    open_s = timeout_s if open_timeout_s is None else open_timeout_s
    if timeout_s <= 0 or open_s <= 0:
        raise ValueError(f"timeouts must be positive, got {timeout_s} and {open_s}")
    dev = _normalize_device(device)

    base = _private_client(store, timedelta(seconds=open_s))
    ns = dist.PrefixStore(namespace(name, secret), base)

    _handshake(ns, name=name, rank=rank, spec=spec, timeout_s=open_s)
    try:
        bell = (Doorbell.connect(ns, name, open_s, secret) if rank == 0
                else Doorbell.listen(ns, _listen_host(store), name, open_s, secret))
    except DoorbellError as e:
        raise ChannelError(f"KV channel {name!r}: {e}") from e

    pg_store = dist.PrefixStore("pg/", ns)
    try:
        if dev.type == "cuda":
            pg = make_nccl_group(pg_store, rank, dev, timeout_s, name)
        else:
            pg = _make_gloo(pg_store, rank, timedelta(seconds=max(open_s, timeout_s)),
                            gloo_host)
    except Exception as e:
        bell.close()
        raise ChannelError(
            f"KV channel {name!r}: could not build the process group as rank {rank}: {e}"
        ) from e
    stores = [base, store] if owns_store else [base]
    logger.info("KV channel %r open as rank %d (%s) on %s", name, rank, ROLES[rank], dev)
    return Link(name=name, rank=rank, spec=spec, device=dev, timeout_s=timeout_s, pg=pg,
                namespace=ns, stores=stores, bell=bell)


def namespace(name: str, secret: Secret) -> str:
    """The prefix of channel ``name``'s keys in its store: the name, then a part only the
    deployment's secret yields (a TCPStore cannot list its keys, so no other client can
    find, read or plant one of them)."""
    return f"pdserve/kv/{name}/{secret.tag('kv-store', name).hex()[:32]}/"


def _normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ChannelError("a CUDA KV channel needs CUDA")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ChannelError(f"KV channels support cpu (Gloo) and cuda (NCCL), not {device}")
    return device


def _private_client(store: dist.Store, timeout: timedelta) -> dist.Store:
    """A connection of the channel's own to ``store``.

    A TCPStore client serializes its operations, so a channel blocked in a store wait
    (handshake, rendezvous) would stall every other channel sharing the connection; each
    channel therefore gets its own. Its default timeout (which bounds the process group's
    rendezvous) is the channel's, and the caller's store is left untouched. Other store
    types are used as they are."""
    if not isinstance(store, dist.TCPStore):
        return store
    clone = getattr(store, "clone", None)
    client: dist.TCPStore
    if clone is not None:
        client = clone()
    else:  # older torch
        client = dist.TCPStore(store.host, store.port, None, False, timeout,
                               wait_for_workers=False)
    client.set_timeout(timeout)
    return client


def _listen_host(store: dist.Store) -> str:
    """Where the decode end's doorbell listens: the interface its store serves on."""
    return str(store.host) if isinstance(store, dist.TCPStore) else "127.0.0.1"


def _handshake(ns: dist.Store, *, name: str, rank: int, spec: ChannelSpec,
               timeout_s: float) -> None:
    my_key, peer_key = f"spec/{rank}", f"spec/{1 - rank}"
    try:
        if ns.check([my_key]):
            raise ChannelError(
                f"KV channel name {name!r} was already used on this store (its "
                f"{ROLES[rank]} end exists); use a fresh name for every pairing"
            )
        ns.set(my_key, spec.to_json())
        ns.wait([peer_key], timedelta(seconds=timeout_s))
        raw = ns.get(peer_key)
    except ChannelError:
        raise
    except dist.DistStoreError as e:
        raise ChannelError(
            f"KV channel {name!r}: the {ROLES[1 - rank]} side did not join within "
            f"{timeout_s:.3g} s (or it holds another deployment's secret)"
        ) from e
    except Exception as e:
        raise ChannelError(f"KV channel {name!r}: store failure in the handshake: {e}") from e
    try:
        peer = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise HandshakeError(f"KV channel {name!r}: the peer's spec is not JSON") from e
    if not isinstance(peer, dict):
        raise HandshakeError(f"KV channel {name!r}: the peer's spec is not a JSON object")
    mine = dataclasses.asdict(spec)
    diffs = spec_differences(*((mine, peer) if rank == 0 else (peer, mine)))
    if diffs:
        raise HandshakeError(
            f"KV channel {name!r}: prefill and decode disagree: " + "; ".join(diffs)
        )


def _make_gloo(store: dist.Store, rank: int, timeout: timedelta, host: str | None) -> Any:
    if host is None:
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    gloo_cls: Any = dist.ProcessGroupGloo  # the options type is not in the stubs
    opts = gloo_cls._Options()
    opts._timeout = timeout
    opts._devices = [gloo_cls.create_device(hostname=host)]
    return gloo_cls(store, rank, 2, opts)
