"""KV transfer between a prefill worker and a decode worker (DESIGN.md section 5).

One channel per (prefill, decode) pair: a two-rank process group built without a global world
(no ``init_process_group``), so workers can join and leave freely. Its two ends are two
classes, one per role:

* :class:`KVSender` (:mod:`.sender`), the prefill end (rank 0), sends transfers;
* :class:`KVReceiver` (:mod:`.receiver`), the decode end (rank 1), receives them.

:func:`open_sender` and :func:`open_receiver` (:mod:`.connect`) run the rendezvous through
the decode worker's store, the handshake and the process group's construction; what both
ends share (streams, staging buffers, waits, peer-gone detection, failure handling) is a
:class:`~.channel.ChannelEnd` each of them holds (:mod:`.channel`). The wire protocol
(header, trailer, checksum, errors, the header's match against a reservation) is
:mod:`.protocol`; each transfer's header travels over the doorbell (:mod:`.doorbell`).
"""

from pdserve.engine.kv.channel import STAGING_SLOTS
from pdserve.engine.kv.connect import (
    connect_store,
    host_store,
    make_nccl_group,
    open_receiver,
    open_sender,
)
from pdserve.engine.kv.protocol import (
    HEADER_SLOTS,
    KV_LAYOUT,
    MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ChannelClosed,
    ChannelError,
    ChannelSpec,
    HandshakeError,
    TransferError,
    TransferHeader,
    TransferTimeout,
    kv_checksum,
    layers_per_message,
    match_header,
    spec_differences,
)
from pdserve.engine.kv.receiver import KVReceiver
from pdserve.engine.kv.sender import Departure, KVSender

__all__ = [
    "HEADER_SLOTS",
    "KV_LAYOUT",
    "MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "STAGING_SLOTS",
    "ChannelClosed",
    "ChannelError",
    "ChannelSpec",
    "Departure",
    "HandshakeError",
    "KVReceiver",
    "KVSender",
    "TransferError",
    "TransferHeader",
    "TransferTimeout",
    "connect_store",
    "host_store",
    "kv_checksum",
    "layers_per_message",
    "make_nccl_group",
    "match_header",
    "open_receiver",
    "open_sender",
    "spec_differences",
]
