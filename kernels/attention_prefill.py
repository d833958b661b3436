# mypy: disable-error-code="no-untyped-def"
"""Varlen causal prefill attention over the paged KV cache (cached prefix + new chunk).

Grid: (query tiles across all sequences, kv heads). A tile holds ``BLOCK_Q`` consecutive new
tokens of one sequence times the ``group = Hq // Hk`` query heads of one kv head, packed
along M (``BLOCK_M >= BLOCK_Q * group`` rows), so each K/V tile is read once per group.
Sequence ``b``'s tiles are numbered from ``cu_seqlens_q[b] // BLOCK_Q + b``, an upper bound on
the tiles before it that needs no host sync; a program finds its sequence by counting the
starts at or below its id, and idles if it is past its sequence's last tile. Key tiles wholly
below the tile's first query position run without a mask; the diagonal tiles are masked and
tiles past the last query position are never visited.

Tuning switches (launcher keywords; ``python -P -m pdserve.kernels.tune_prefill`` sweeps them):

- ``heavy_first``: programs take tiles last-first, so that a sequence's late (causal: longest)
  tiles start first and the grid ends on short ones, instead of one long tile per SM at the
  end.
- ``scale``: where the softmax scale (times log2 e) is applied: ``"tile"`` multiplies each score
  tile; ``"fma"`` takes the row max of the raw scores and folds scale and max subtraction into
  one FMA per score (the Triton fused-attention tutorial's form); ``"q"`` scales q once
  (rounded back to q's dtype, so slightly less accurate in fp16/bf16).
- ``page_ids``: per key tile, load one block id per page and broadcast it over the page's keys
  instead of one (repeated) id per key.
- ``prefetch_ids``: load the next key tile's block ids one iteration ahead, into registers.
  Loaded in the iteration that uses them, the ids are a load feeding the K/V addresses, which
  Triton's pipeliner turns into an async copy too; waiting for it waits for every copy in
  flight (the groups complete in order), so the K/V prefetch of later tiles drains at each
  iteration (seen in the sm_90a SASS: ``DEPBAR.LE SB0, 0x0`` at the loop top, against
  ``0x2`` with the ids carried over).

Unmasked tiles skip the ``-inf`` guards: every score there is finite, so the running max is
finite after the first one; the masked (diagonal) tiles keep them, so a row with no visible
key in a tile never computes ``exp(-inf - -inf)``.
"""

import math

import torch
import torch.nn.functional as F

from pdserve.kernels._triton import check_last_dim_contiguous, check_launch, jit, next_pow2, tl

SCALE_MODES = ("tile", "fma", "q")


@jit
def _kv_rows(
    table_row, n0, end, stride_cb, stride_ct,
    MASKED: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_IDS: tl.constexpr,
):
    """Element offset in the cache of keys ``n0 + [0, BLOCK_N)`` (without head and d), int64:
    block id x block stride overflows int32 on large pools. ``n0`` is a multiple of BLOCK_N.
    MASKED: keys from ``end`` on may be asked for (their table entries read as block 0)."""
    n = tl.arange(0, BLOCK_N)
    pos = n0 + n
    if (PAGE & (PAGE - 1)) == 0:
        # Pages and tiles are powers of 2 and n0 is a tile start, so a tile's keys lie in one
        # page or span whole pages: split into n0's part and n's (loop-invariant) part.
        page = n0 // PAGE + n // PAGE
        slot = n0 % PAGE + n % PAGE
    else:
        page = pos // PAGE
        slot = pos % PAGE
    if PAGE_IDS and BLOCK_N <= PAGE:  # the whole key tile lies in one page (both powers of 2)
        if MASKED:
            blk = tl.load(table_row + n0 // PAGE, mask=n0 < end, other=0)
        else:
            blk = tl.load(table_row + n0 // PAGE)
        row = blk.to(tl.int64) * stride_cb + slot * stride_ct
    elif PAGE_IDS:
        pages = n0 // PAGE + tl.arange(0, BLOCK_N // PAGE)
        if MASKED:
            blk = tl.load(table_row + pages, mask=pages * PAGE < end, other=0)
        else:
            blk = tl.load(table_row + pages)
        base = blk.to(tl.int64) * stride_cb  # [BLOCK_N // PAGE] -> one per key
        base = tl.reshape(tl.broadcast_to(base[:, None], (BLOCK_N // PAGE, PAGE)), (BLOCK_N,))
        row = base + slot * stride_ct
    else:
        if MASKED:
            blk = tl.load(table_row + page, mask=pos < end, other=0)
        else:
            blk = tl.load(table_row + page)
        row = blk.to(tl.int64) * stride_cb + slot * stride_ct
    return row


@jit
def _load_kv(ptr, key_ok, d_ok, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    if MASKED:  # masked V too: a stale slot may hold NaN, and 0 * NaN is NaN
        return tl.load(ptr, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=d_ok[None, :], other=0.0)


@jit
def _prefill_tiles(
    acc, l_sum, m, q, q_pos, k_base, v_base, table_row, start, end, qk_scale,
    stride_cb, stride_ct,
    MASKED: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SCALE: tl.constexpr, PAGE_IDS: tl.constexpr,
    PREFETCH_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key tiles [start, end). MASKED tiles may cross the causal diagonal
    or the last query position ``end - 1``; the others lie wholly below every row's query.
    Scores are in log2 units: ``SCALE`` 0 scales each tile, 1 folds the scale into the
    exponent's FMA, 2 means q is scaled already."""
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    if PREFETCH_IDS:
        row = _kv_rows(table_row, start, end, stride_cb, stride_ct, True, PAGE, BLOCK_N,
                       PAGE_IDS)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + n
        key_ok = pos < end
        if PREFETCH_IDS:  # this tile's rows came from the previous iteration
            cur = row
            row = _kv_rows(table_row, n0 + BLOCK_N, end, stride_cb, stride_ct, True, PAGE,
                           BLOCK_N, PAGE_IDS)
        else:
            cur = _kv_rows(table_row, n0, end, stride_cb, stride_ct, MASKED, PAGE, BLOCK_N,
                           PAGE_IDS)
        off = cur[:, None] + d[None, :]
        k = _load_kv(k_base + off, key_ok, d_ok, MASKED, HEAD_DIM == BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [M, N]
        if MASKED:
            if SCALE != 2:
                s = s * qk_scale
            s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # no exp(-inf - -inf)
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe[:, None])
        elif SCALE == 1:  # qk_scale > 0, so max(s) * scale == max(s * scale)
            m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s * qk_scale - m_new[:, None])
        else:
            if SCALE == 0:
                s = s * qk_scale
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = _load_kv(v_base + off, key_ok, d_ok, MASKED, HEAD_DIM == BLOCK_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m = m_new
    return acc, l_sum, m


# The batch's sequence count and block-table width vary step to step: specializing on them
# (Triton's 1 / multiple-of-16 / other classes) recompiled the kernel in serving, a 1.1-1.5 s
# stall each time on an H200.
@jit(do_not_specialize=("num_seqs", "stride_table"))
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_ptr, lens_ptr, table_ptr,
    qk_scale, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ct, stride_ch, stride_table,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr, HEAVY_FIRST: tl.constexpr, SCALE: tl.constexpr,
    PAGE_IDS: tl.constexpr, PREFETCH_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    if HEAVY_FIRST:  # within a sequence, later tiles see more keys
        pid = tl.num_programs(0) - 1 - pid
    kv_head = tl.program_id(1).to(tl.int64)
    bi = tl.arange(0, BLOCK_B)
    b_mask = bi < num_seqs
    cu = tl.load(cu_ptr + bi, mask=b_mask, other=0)
    first_tile = tl.where(b_mask, cu // BLOCK_Q + bi, 0x7FFFFFFF)
    seq = tl.sum((first_tile <= pid).to(tl.int32), 0) - 1
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + seq)
    if tile * BLOCK_Q >= q_len:  # an idle program past its sequence's tiles
        return
    seq64 = seq.to(tl.int64)
    kv_len = tl.load(lens_ptr + seq64)

    r = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + r // GROUP  # new-token index within the sequence
    row_ok = (r < BLOCK_Q * GROUP) & (tok < q_len)
    head = kv_head * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    q_mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    q_row = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=q_mask, other=0.0)
    if SCALE == 2:
        q = (q.to(tl.float32) * qk_scale).to(q_ptr.dtype.element_ty)
    q_pos = kv_len - q_len + tok  # absolute position of each row's query

    first_pos = kv_len - q_len + tile * BLOCK_Q
    last_pos = kv_len - q_len + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys below it are seen by every row

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = table_ptr + seq64 * stride_table
    k_base = k_cache_ptr + kv_head * stride_ch
    v_base = v_cache_ptr + kv_head * stride_ch
    acc, l_sum, m = _prefill_tiles(
        acc, l_sum, m, q, q_pos, k_base, v_base, table_row, 0, full_end, qk_scale,
        stride_cb, stride_ct,
        False, PAGE, HEAD_DIM, BLOCK_N, BLOCK_D, SCALE, PAGE_IDS, PREFETCH_IDS, DOT_PRECISION,
    )
    acc, l_sum, m = _prefill_tiles(
        acc, l_sum, m, q, q_pos, k_base, v_base, table_row, full_end, last_pos + 1, qk_scale,
        stride_cb, stride_ct,
        True, PAGE, HEAD_DIM, BLOCK_N, BLOCK_D, SCALE, PAGE_IDS, PREFETCH_IDS, DOT_PRECISION,
    )
    o = acc / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]
    tl.store(out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=q_mask)


def _default_tiles(head_dim: int, max_kv_len: int) -> tuple[int, int, int, int]:
    """(block_m, block_n, warps, stages), from a sweep on an H100 (bf16, 32/8 heads):
    d128 reached 377 TFLOP/s at 4k with 128x128 tiles, 8 warps, 3 stages, but short
    contexts (<= 1k) did better with 32-key tiles; d64 was best with 128x64 and 4 warps."""
    if head_dim > 128:
        return 64, 64, 4, 2
    if head_dim > 64:
        return (128, 32, 4, 3) if max_kv_len <= 1024 else (128, 128, 8, 3)
    return 128, 64, 4, 3


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    *,
    block_m: int = 0,
    block_n: int = 0,
    num_warps: int = 0,
    num_stages: int = 0,
    heavy_first: bool = True,
    scale_mode: str = "fma",
    page_ids: bool = False,
    prefetch_ids: bool = True,
) -> torch.Tensor:
    """Triton launcher; same contract as :func:`prefill_attention_ref`. ``block_m`` (rows of
    a query tile, tokens x grouped heads), ``block_n`` (keys per tile), warps and stages are
    tuning knobs, 0 = default; ``heavy_first``, ``scale_mode`` (one of :data:`SCALE_MODES`),
    ``page_ids`` and ``prefetch_ids`` are the switches of the module docstring (``page_ids``
    is ignored when the page size is not a power of two)."""
    del max_seqlen_q  # the grid is bounded by T and B instead (no host sync either way)
    assert scale_mode in SCALE_MODES, scale_mode
    assert scale > 0, scale  # the "fma" form takes the row max before scaling
    check_launch(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables)
    assert q.dim() == 3 and k_cache.dim() == 4, (q.shape, k_cache.shape)
    tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape[3] == head_dim and num_q_heads % num_kv_heads == 0
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype)
    num_seqs = kv_lens.shape[0]
    assert cu_seqlens_q.shape == (num_seqs + 1,) and cu_seqlens_q.dtype == torch.int32
    assert kv_lens.dtype == torch.int32 and block_tables.dtype == torch.int32
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs
    assert cu_seqlens_q.is_contiguous() and kv_lens.is_contiguous()
    assert block_tables.stride(1) == 1
    for name, t in (("q", q), ("k_cache", k_cache)):
        check_last_dim_contiguous(name, t)
    out = torch.empty_like(q)
    if tokens == 0 or num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    block_d = max(16, next_pow2(head_dim))
    cfg = _default_tiles(head_dim, block_tables.shape[1] * block_size)
    block_m = max(block_m or cfg[0], 16, next_pow2(group))
    block_n = block_n or cfg[1]
    num_warps = num_warps or cfg[2]
    num_stages = num_stages or cfg[3]
    block_q = block_m // group
    page_ids = page_ids and next_pow2(block_size) == block_size
    grid = (tokens // block_q + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q, kv_lens, block_tables,
        scale * math.log2(math.e), num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, PAGE=block_size, HEAD_DIM=head_dim,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        # a floor of 32 sequences: fewer compiled variants (workers warm each one up)
        BLOCK_B=max(32, next_pow2(num_seqs)), HEAVY_FIRST=heavy_first,
        SCALE=SCALE_MODES.index(scale_mode), PAGE_IDS=page_ids, PREFETCH_IDS=prefetch_ids,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached K/V.

    ``q: [T, Hq, D]``; ``k_cache, v_cache: [N, bs, Hk, D]``; ``cu_seqlens_q: [B+1]``;
    ``kv_lens: [B]`` (cached prefix + new tokens, whose K/V are already stored);
    ``block_tables: [B, max_blocks]``. New query ``j`` of sequence ``b`` sits at absolute
    position ``kv_lens[b] - q_len_b + j`` and sees kv positions up to that one inclusive.
    Query head ``h`` reads kv head ``h // (Hq // Hk)``. Returns ``[T, Hq, D]`` in q's dtype.
    """
    del max_seqlen_q  # the reference walks the sequences one by one
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = kv_lens.tolist()
    for b, kv_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        n_blocks = (kv_len + block_size - 1) // block_size
        blocks = block_tables[b, :n_blocks].long()
        # [n_blocks, bs, Hk, D] -> [kv_len, Hk, D] -> [1, Hk, kv_len, D]
        k = k_cache[blocks].flatten(0, 1)[:kv_len].transpose(0, 1)[None].float()
        v = v_cache[blocks].flatten(0, 1)[:kv_len].transpose(0, 1)[None].float()
        qb = q[start:end].transpose(0, 1)[None].float()  # [1, Hq, q_len, D]
        if q_len == kv_len:
            o = F.scaled_dot_product_attention(
                qb, k, v, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
            mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(
                qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[start:end] = o[0].transpose(0, 1).to(q.dtype)
    return out
