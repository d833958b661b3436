# mypy: disable-error-code="no-untyped-def"
"""Gather one request's KV blocks of one layer into a contiguous buffer (pack, on the prefill
side before sending) and scatter a received buffer into the receiver's blocks (unpack)."""

import torch

from kernels._triton import cdiv, check_launch, jit, tl


@jit
def _copy_blocks_kernel(
    cache_ptr, buf_ptr, ids_ptr,
    num_ids, block_elems, stride_cache_kv, stride_cache_block,
    TO_BUFFER: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid: (n blocks, K or V, chunks of one block's bs*Hk*D contiguous elements)
    i = tl.program_id(0).to(tl.int64)
    kv = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_elems
    block = tl.load(ids_ptr + i).to(tl.int64)
    cache_off = kv * stride_cache_kv + block * stride_cache_block + offs
    buf_off = (kv * num_ids + i) * block_elems + offs
    if TO_BUFFER:
        x = tl.load(cache_ptr + cache_off, mask=mask)
        tl.store(buf_ptr + buf_off, x, mask=mask)
    else:
        x = tl.load(buf_ptr + buf_off, mask=mask)
        tl.store(cache_ptr + cache_off, x, mask=mask)


def _launch(layer_cache: torch.Tensor, buf: torch.Tensor, block_ids: torch.Tensor,
            to_buffer: bool) -> None:
    check_launch(layer_cache, buf, block_ids)
    assert layer_cache.dim() == 5 and layer_cache.shape[0] == 2, layer_cache.shape
    n = block_ids.shape[0]
    assert block_ids.dim() == 1 and block_ids.dtype == torch.int64, block_ids.dtype
    assert buf.shape == (2, n, *layer_cache.shape[2:]), (buf.shape, layer_cache.shape)
    assert buf.dtype == layer_cache.dtype and buf.is_contiguous()
    # Each block's [bs, Hk, D] payload must be one contiguous run (true of the pool layout).
    assert layer_cache[0, 0].is_contiguous(), layer_cache.stride()
    if n == 0:
        return
    block_elems = layer_cache[0, 0].numel()
    chunk = min(4096, 1 << max(0, (block_elems - 1).bit_length()))
    _copy_blocks_kernel[(n, 2, cdiv(block_elems, chunk))](
        layer_cache, buf, block_ids,
        n, block_elems, layer_cache.stride(0), layer_cache.stride(1),
        TO_BUFFER=to_buffer, BLOCK=chunk, num_warps=4,
    )


def pack_kv(layer_cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor) -> None:
    """Triton launcher; same contract as :func:`pack_kv_ref`."""
    _launch(layer_cache, out, block_ids, to_buffer=True)


def unpack_kv(buf: torch.Tensor, layer_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Triton launcher; same contract as :func:`unpack_kv_ref`."""
    _launch(layer_cache, buf, block_ids, to_buffer=False)


def pack_kv_ref(layer_cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor) -> None:
    """``layer_cache: [2, N, bs, Hk, D]``, ``block_ids: [n]`` -> ``out: [2, n, bs, Hk, D]``."""
    torch.index_select(layer_cache, 1, block_ids.long(), out=out)


def unpack_kv_ref(buf: torch.Tensor, layer_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """``buf: [2, n, bs, Hk, D]`` -> the blocks ``block_ids`` of ``layer_cache``."""
    layer_cache.index_copy_(1, block_ids.long(), buf)
