# mypy: disable-error-code="no-untyped-def"
"""Position-sensitive checksum of a KV payload, computed where the payload lives.

``sum_i word_i * weight_i (mod 2**64)`` over the bytes seen as unsigned 32-bit words, with
``weight_i = ((i * 2654435761) mod 2**31) | 1``: odd, different for nearby positions, so a
swapped pair of blocks changes the sum. One fused pass (load, weight, multiply, reduce) per
program instead of a chain of int64 torch ops with integer remainders, which cost more than
the NCCL send they guard. The torch reference computes the same value (int64 arithmetic
wraps modulo 2**64 in both).
"""

import torch

from pdserve.kernels._triton import cdiv, check_launch, jit, tl

_GOLDEN = 2654435761
_CHUNK = 1 << 22  # words per step of the reference: bounded int64 temporaries


@jit
def _checksum_kernel(words_ptr, partial_ptr, n, word_offset, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(words_ptr + offs, mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
    weight = (((word_offset + offs) * 2654435761) & 0x7FFFFFFF) | 1  # _GOLDEN
    tl.store(partial_ptr + pid, tl.sum(tl.where(mask, w * weight, 0), axis=0))


def _words(t: torch.Tensor) -> torch.Tensor:
    """32-bit words of ``t``'s bytes; single bytes when the size or alignment forbids it
    (both implementations take the same view, so they agree either way)."""
    b = t.reshape(-1).view(torch.uint8)
    if b.numel() % 4 or b.data_ptr() % 4:
        return b
    return b.view(torch.int32)


def kv_checksum_ref(t: torch.Tensor, word_offset: int = 0) -> torch.Tensor:
    """The checksum of contiguous ``t`` as a 0-d int64 tensor on its device. With
    ``word_offset``, ``t``'s words count from that position: the checksum of a payload sent
    in pieces is the (wrapping) sum of the pieces' checksums at their offsets."""
    words = _words(t)
    acc = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, words.numel(), _CHUNK):
        w = words[start:start + _CHUNK].to(torch.int64).bitwise_and_(0xFFFFFFFF)
        pos = torch.arange(word_offset + start, word_offset + start + w.numel(),
                           dtype=torch.int64, device=t.device)
        weight = pos.mul_(_GOLDEN).bitwise_and_(0x7FFFFFFF).bitwise_or_(1)
        acc += (w * weight).sum()
    return acc


def kv_checksum(t: torch.Tensor, word_offset: int = 0, block: int = 4096) -> torch.Tensor:
    """Triton launcher of :func:`kv_checksum_ref` (same value); no host sync."""
    assert t.is_contiguous(), "checksum needs a contiguous tensor"
    words = _words(t)
    n = words.numel()
    partial = torch.empty(max(1, cdiv(n, block)), dtype=torch.int64, device=t.device)
    if n == 0:
        return partial[:1].zero_().sum()
    check_launch(words, partial)
    _checksum_kernel[(cdiv(n, block),)](words, partial, n, word_offset, BLOCK=block)
    return partial.sum()
