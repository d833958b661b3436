# mypy: disable-error-code="no-untyped-def"
"""Gather one request's KV blocks into a contiguous transfer buffer (pack, on the prefill side
before sending) and scatter a received buffer into the receiver's blocks (unpack).

One kernel does both directions over ``k`` consecutive layers at once (the KV channel moves a
request's KV in messages of several layers), and can fold the transfer checksum
(:mod:`kernels.kv_checksum`) into the same pass, so the payload is read once: each program
also adds the weighted sum of the 32-bit words it moved to a 64-bit accumulator (an atomic
add; integer addition mod 2**64 is exact in any order, so the result is deterministic). The
KV channel passes its running checksum as that accumulator: no partials buffer, reduction or
extra add per message.

The copy runs over 32-bit words when a block's ``[bs, Hk, D]`` payload allows it (it always
does for 16- and 32-bit dtypes with an even head_dim), elements otherwise (no checksum then).
"""

import torch

from pdserve.kernels._triton import cdiv, check_launch, jit, tl
from pdserve.kernels.kv_checksum import kv_checksum_ref

# The size a whole-request transfer aims at per message (see layers_per_message()): the unit
# this kernel packs. 8 layers of a 4k-token Llama-3-8B prompt (docs/decisions.md).
MESSAGE_BYTES = 128 << 20


def layers_per_message(bytes_per_layer: int, num_layers: int,
                       target: int = MESSAGE_BYTES) -> int:
    """How many layers a whole-request transfer puts in one message: about ``target``
    bytes each (at least one layer, at most all)."""
    return max(1, min(num_layers, target // max(bytes_per_layer, 1)))


@jit
def _move_blocks_kernel(
    cache_ptr, buf_ptr, ids_ptr, acc_ptr,
    num_ids, block_elems, stride_layer, stride_kv, stride_block, word_offset,
    TO_BUFFER: tl.constexpr, CHECKSUM: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid: (n blocks, k layers x {K, V}, chunks of one block's bs*Hk*D contiguous elements)
    i = tl.program_id(0).to(tl.int64)
    lkv = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_elems
    block = tl.load(ids_ptr + i).to(tl.int64)
    cache_off = (lkv // 2) * stride_layer + (lkv % 2) * stride_kv + block * stride_block + offs
    buf_off = (lkv * num_ids + i) * block_elems + offs
    if TO_BUFFER:
        x = tl.load(cache_ptr + cache_off, mask=mask)
        tl.store(buf_ptr + buf_off, x, mask=mask)
    else:
        x = tl.load(buf_ptr + buf_off, mask=mask)
        tl.store(cache_ptr + cache_off, x, mask=mask)
    if CHECKSUM:
        # kv_checksum's word weights at the words' positions in the whole transfer
        w = x.to(tl.int64) & 0xFFFFFFFF
        weight = (((word_offset + buf_off) * 2654435761) & 0x7FFFFFFF) | 1
        tl.atomic_add(acc_ptr, tl.sum(tl.where(mask, w * weight, 0), axis=0))


def _word_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` with its last dim reinterpreted as 32-bit words, when its bytes allow it."""
    row = t.shape[-1] * t.element_size()
    if row % 4 or t.data_ptr() % 4 or t.stride(-1) != 1:
        return None
    if any(s * t.element_size() % 4 for s in t.stride()[:-1]):
        return None
    return t.view(torch.uint8).view(torch.int32) if t.dtype != torch.int32 else t


def _check(caches: torch.Tensor, buf: torch.Tensor, block_ids: torch.Tensor,
           acc: torch.Tensor | None) -> None:
    check_launch(caches, buf, block_ids, *(() if acc is None else (acc,)))
    if acc is not None:
        assert acc.dtype == torch.int64 and acc.numel() == 1, (acc.dtype, acc.shape)
    assert caches.dim() == 6 and caches.shape[1] == 2, caches.shape
    n = block_ids.shape[0]
    assert block_ids.dim() == 1 and block_ids.dtype == torch.int64, block_ids.dtype
    assert buf.shape == (caches.shape[0], 2, n, *caches.shape[3:]), (buf.shape, caches.shape)
    assert buf.dtype == caches.dtype and buf.is_contiguous()
    # Each block's [bs, Hk, D] payload must be one contiguous run (true of the pool layout).
    assert caches[0, 0, 0].is_contiguous(), caches.stride()


# Words (or elements) per program and warps: tuning knobs (python -P -m pdserve.kernels.bench --only
# pack --pack-tiles sweeps them).
CHUNK, WARPS = 2048, 4


def _launch(caches: torch.Tensor, buf: torch.Tensor, block_ids: torch.Tensor,
            to_buffer: bool, acc: torch.Tensor | None, word_offset: int = 0, chunk: int = 0,
            warps: int = 0, check: bool = True) -> None:
    """Move ``block_ids`` of ``caches`` [k, 2, N, bs, Hk, D] to/from ``buf`` [k, 2, n, ...];
    with ``acc`` (0-d int64) also add to it the checksum share of ``buf``'s words taken at
    positions ``word_offset + i``. ``check=False`` skips the argument checks (a caller that
    made them already: the KV channel)."""
    if check:
        _check(caches, buf, block_ids, acc)
    n = block_ids.shape[0]
    if n == 0 or caches.shape[0] == 0:
        return
    cw, bw = _word_view(caches), _word_view(buf)
    if cw is None or bw is None:
        assert acc is None, "the checksum needs 32-bit-word aligned KV rows"
        cw, bw = caches, buf
    block_elems = cw[0, 0, 0].numel()
    chunk = min(chunk or CHUNK, 1 << max(0, (block_elems - 1).bit_length()))
    grid = (n, 2 * caches.shape[0], cdiv(block_elems, chunk))
    _move_blocks_kernel[grid](
        cw, bw, block_ids, acc if acc is not None else block_ids,
        n, block_elems, cw.stride(0), cw.stride(1), cw.stride(2), word_offset,
        TO_BUFFER=to_buffer, CHECKSUM=acc is not None, BLOCK=chunk,
        num_warps=warps or WARPS,
    )


def pack_kv(layer_cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor,
            chunk: int = 0, warps: int = 0) -> None:
    """Triton launcher; same contract as :func:`pack_kv_ref` (``chunk``, ``warps``: tuning
    knobs, 0 = default)."""
    _launch(layer_cache[None], out[None], block_ids, True, None, 0, chunk, warps)


def unpack_kv(buf: torch.Tensor, layer_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Triton launcher; same contract as :func:`unpack_kv_ref`."""
    _launch(layer_cache[None], buf[None], block_ids, False, None)


def pack_kv_checksum(caches: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor,
                     word_offset: int, acc: torch.Tensor | None = None,
                     check: bool = True) -> torch.Tensor:
    """Triton launcher; same contract as :func:`pack_kv_checksum_ref` (``check=False``: the
    caller checked the arguments)."""
    acc = _accumulator(out, acc)
    _launch(caches, out, block_ids, True, acc, word_offset, check=check)
    return acc


def unpack_kv_checksum(buf: torch.Tensor, caches: torch.Tensor, block_ids: torch.Tensor,
                       word_offset: int, acc: torch.Tensor | None = None,
                       check: bool = True) -> torch.Tensor:
    """Triton launcher; same contract as :func:`unpack_kv_checksum_ref`."""
    acc = _accumulator(buf, acc)
    _launch(caches, buf, block_ids, False, acc, word_offset, check=check)
    return acc


def _accumulator(buf: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=buf.device) if acc is None else acc


def pack_kv_ref(layer_cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor) -> None:
    """``layer_cache: [2, N, bs, Hk, D]``, ``block_ids: [n]`` -> ``out: [2, n, bs, Hk, D]``."""
    torch.index_select(layer_cache, 1, block_ids.long(), out=out)


def unpack_kv_ref(buf: torch.Tensor, layer_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """``buf: [2, n, bs, Hk, D]`` -> the blocks ``block_ids`` of ``layer_cache``."""
    layer_cache.index_copy_(1, block_ids.long(), buf)


def pack_kv_checksum_ref(caches: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor,
                         word_offset: int, acc: torch.Tensor | None = None) -> torch.Tensor:
    """Pack ``k`` layers, ``caches: [k, 2, N, bs, Hk, D]`` -> ``out: [k, 2, n, bs, Hk, D]``;
    ``kv_checksum_ref(out, word_offset)`` is ``out``'s share of the checksum of a transfer in
    which its first 32-bit word sits at position ``word_offset``. Returns that share, or,
    given ``acc`` (0-d int64, a running checksum), adds the share to ``acc`` in place and
    returns ``acc``."""
    for layer in range(caches.shape[0]):
        pack_kv_ref(caches[layer], block_ids, out[layer])
    return _add_share(acc, kv_checksum_ref(out, word_offset))


def unpack_kv_checksum_ref(buf: torch.Tensor, caches: torch.Tensor, block_ids: torch.Tensor,
                           word_offset: int, acc: torch.Tensor | None = None) -> torch.Tensor:
    """Scatter ``buf: [k, 2, n, bs, Hk, D]`` into ``caches: [k, 2, N, ...]``; returns or adds
    to ``acc`` ``kv_checksum_ref(buf, word_offset)`` (see :func:`pack_kv_checksum_ref`)."""
    for layer in range(caches.shape[0]):
        unpack_kv_ref(buf[layer], caches[layer], block_ids)
    return _add_share(acc, kv_checksum_ref(buf, word_offset))


def _add_share(acc: torch.Tensor | None, share: torch.Tensor) -> torch.Tensor:
    if acc is None:
        return share
    acc += share
    return acc
