"""A deployment's secret: the key its side channels authenticate with.

Every process of a deployment gets the same 32 random bytes through Ray (whose own token
authentication guards the cluster); nothing else ever holds them. With them a process can
compute what a stray one cannot:

* the namespace of a KV channel in the decode worker's ``TCPStore`` (``engine.kv.connect``):
  a TCPStore answers any client, but has no way to list its keys, so keys under a prefix
  only the secret yields cannot be read, overwritten or planted;
* the tag a prefill worker sends to open a channel's doorbell (``engine.kv.doorbell``) and
  the tag the router sends to open a frontend's feed (``router.stream``): a connection
  without the right tag is closed before a byte of it is used.

Tags are HMAC-SHA256 over a purpose and length-prefixed parts, so one purpose's tag never
passes for another's.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

KEY_BYTES = 32
TAG_BYTES = 32


@dataclass(frozen=True)
class Secret:
    """The deployment's key (never shown: repr hides it, and it takes no part in equality
    of the configs that carry it)."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) < 16:
            raise ValueError("a secret is at least 16 bytes")

    @classmethod
    def generate(cls) -> Secret:
        return cls(secrets.token_bytes(KEY_BYTES))

    def tag(self, purpose: str, *parts: str | bytes) -> bytes:
        """HMAC-SHA256 of ``purpose`` and ``parts`` (:data:`TAG_BYTES` bytes)."""
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in (purpose, *parts):
            data = part.encode() if isinstance(part, str) else part
            mac.update(len(data).to_bytes(4, "big") + data)
        return mac.digest()

    def verify(self, tag: bytes, purpose: str, *parts: str | bytes) -> bool:
        return hmac.compare_digest(tag, self.tag(purpose, *parts))
