"""Kernel benchmark: every figure beside its ceiling measured in the same run (GPU only).

    python -P -m pdserve.kernels.bench [--quick] [--json PATH]

- decode attention: achieved bytes/s (K/V read + q/out) over device-to-device copy bandwidth,
  and torch SDPA's time (``enable_gqa=True``, contiguous ``[B, Hk, ctx, D]`` K/V) over ours;
  both timed as CUDA-graph replays, as decode steps run in serving;
- prefill attention: TFLOP/s, and ours over torch SDPA causal (K/V expanded to all heads);
- KV pack/unpack: bytes moved per second over copy bandwidth: one layer eagerly and under
  CUDA graphs, and the channel's several-layer message with its checksum fused in.

A whole decode step of a model over its roofline is ``pdserve.cluster.bench.step``.

Times are ``triton.testing.do_bench`` medians. Inputs smaller than ``ROTATE_BYTES`` are
rotated through several copies so that the L2 cache does not flatter the bandwidth figures.
"""

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from pdserve.kernels.timing import Cycle, copy_bandwidth, graph_median_ms, median_ms

ROTATE_BYTES = 512 << 20  # well past the 50-60 MB L2 of an H100/H200
HQ, HK, HEAD_DIM, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16


@dataclass
class Row:
    kernel: str
    shape: str
    ms: float
    achieved: float  # GB/s or TFLOP/s
    unit: str
    ceiling: str  # what the ratio is measured against
    ratio: float


def _rotation(nbytes: int) -> int:
    return max(1, min(8, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def _free_bytes() -> int:
    return int(torch.cuda.mem_get_info()[0])


def _decode_case(batch: int, ctx: int, copy_bw: float) -> list[Row]:
    from pdserve.kernels.attention_decode import decode_attention

    scale = HEAD_DIM**-0.5
    kv_bytes = 2 * batch * ctx * HK * HEAD_DIM * DTYPE.itemsize
    copies = _rotation(kv_bytes)
    # paged pools + SDPA's contiguous copies, with headroom
    if 2 * copies * kv_bytes > 0.7 * _free_bytes():
        return []
    blocks_per_seq = ctx // BLOCK
    num_blocks = batch * blocks_per_seq * copies
    pool = torch.randn(2, num_blocks, BLOCK, HK, HEAD_DIM, device="cuda", dtype=DTYPE)
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    tables = perm.view(copies, batch, blocks_per_seq)  # scattered blocks, as in serving
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    qs = torch.randn(copies, batch, HQ, HEAD_DIM, device="cuda", dtype=DTYPE)
    ks = torch.randn(copies, batch, HK, ctx, HEAD_DIM, device="cuda", dtype=DTYPE)
    vs = torch.randn_like(ks)

    def ours(i: int) -> Callable[[], object]:
        return lambda: decode_attention(qs[i], pool[0], pool[1], tables[i], lens, scale)

    def sdpa(i: int) -> Callable[[], object]:
        return lambda: F.scaled_dot_product_attention(
            qs[i][:, :, None], ks[i], vs[i], scale=scale, enable_gqa=True
        )

    ms = graph_median_ms([ours(i) for i in range(copies)])
    ms_sdpa = graph_median_ms([sdpa(i) for i in range(copies)])
    moved = kv_bytes + 2 * batch * HQ * HEAD_DIM * DTYPE.itemsize
    bw = moved / (ms * 1e-3)
    bw_sdpa = moved / (ms_sdpa * 1e-3)
    shape = f"B={batch} ctx={ctx}"
    return [
        Row("decode", shape, ms, bw / 1e9, "GB/s", "copy bandwidth", bw / copy_bw),
        Row("decode", shape, ms_sdpa, bw_sdpa / 1e9, "GB/s", "SDPA time / ours (ms is SDPA's)",
            ms_sdpa / ms),
    ]


def _prefill_case(seq: int, tokens: int) -> Row:
    from pdserve.kernels.attention_prefill import prefill_attention

    scale = HEAD_DIM**-0.5
    batch = max(1, tokens // seq)
    blocks_per_seq = seq // BLOCK
    num_blocks = batch * blocks_per_seq
    pool = torch.randn(2, num_blocks, BLOCK, HK, HEAD_DIM, device="cuda", dtype=DTYPE)
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    tables = perm.view(batch, blocks_per_seq)
    q = torch.randn(batch * seq, HQ, HEAD_DIM, device="cuda", dtype=DTYPE)
    cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * seq
    lens = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    # SDPA gets K/V already expanded to all heads: its fastest (flash) path.
    qb = torch.randn(batch, HQ, seq, HEAD_DIM, device="cuda", dtype=DTYPE)
    kb = torch.randn(batch, HQ, seq, HEAD_DIM, device="cuda", dtype=DTYPE)
    vb = torch.randn_like(kb)
    flops = 4 * batch * HQ * HEAD_DIM * seq * seq / 2  # causal: half of QK^T and PV

    def ours() -> object:
        return prefill_attention(q, pool[0], pool[1], cu, lens, tables, seq, scale)

    def sdpa() -> object:
        return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)

    ms = median_ms(ours)
    ms_sdpa = median_ms(sdpa)
    tflops = flops / (ms * 1e-3) / 1e12
    sdpa_tflops = flops / (ms_sdpa * 1e-3) / 1e12
    return Row("prefill", f"B={batch} L={seq}", ms, tflops, "TFLOP/s",
               f"torch SDPA causal ({sdpa_tflops:.0f} TFLOP/s)", tflops / sdpa_tflops)


def _pack_bytes(tokens: int) -> int:
    """One layer's K and V of ``tokens`` tokens."""
    return 2 * tokens * HK * HEAD_DIM * DTYPE.itemsize


def _pack_inputs(tokens: int, layers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool of ``layers`` layers, block ids of one request per rotated copy (scattered, as
    in serving) and a transfer buffer per copy: ``[k, 2, N, ...]``, ``[copies, n]``,
    ``[copies, k, 2, n, ...]``."""
    n = tokens // BLOCK
    copies = _rotation(_pack_bytes(tokens) * layers)
    num_blocks = n * copies * 2
    pool = torch.randn(layers, 2, num_blocks, BLOCK, HK, HEAD_DIM, device="cuda", dtype=DTYPE)
    ids = torch.randperm(num_blocks, device="cuda")[: n * copies].view(copies, n)
    bufs = torch.empty(copies, layers, 2, n, BLOCK, HK, HEAD_DIM, device="cuda", dtype=DTYPE)
    return pool, ids, bufs


def _pack_case(tokens: int, copy_bw: float) -> list[Row]:
    """One request's blocks of one layer, launched eagerly (what a layer-wise send pays,
    launch included) and as CUDA-graph replays (the kernel alone); and the KV channel's
    message, several layers packed with the checksum in the same pass (eagerly)."""
    from pdserve.kernels.kv_pack import (
        layers_per_message,
        pack_kv,
        pack_kv_checksum,
        unpack_kv,
        unpack_kv_checksum,
    )

    nbytes = _pack_bytes(tokens)
    layers = layers_per_message(nbytes, 32)  # a llama-3.1-8b request's message
    pool, ids, bufs = _pack_inputs(tokens, layers)
    copies = ids.shape[0]
    cycle = Cycle(copies)

    def pack(i: int) -> Callable[[], object]:
        return lambda: pack_kv(pool[0], ids[i], bufs[i, 0])

    def unpack(i: int) -> Callable[[], object]:
        return lambda: unpack_kv(bufs[i, 0], pool[0], ids[i])

    def pack_msg() -> object:
        i = cycle.next()
        return pack_kv_checksum(pool, ids[i], bufs[i], 0)

    def unpack_msg() -> object:
        i = cycle.next()
        return unpack_kv_checksum(bufs[i], pool, ids[i], 0)

    def eager(make: Callable[[int], Callable[[], object]]) -> float:
        fns = [make(i) for i in range(copies)]
        return median_ms(lambda: fns[cycle.next()]())

    def graphs(make: Callable[[int], Callable[[], object]]) -> float:
        return graph_median_ms([make(i) for i in range(copies)])

    rows: list[Row] = []
    for name, ms, moved in (
        ("kv_pack", eager(pack), nbytes),
        ("kv_unpack", eager(unpack), nbytes),
        ("kv_pack", graphs(pack), nbytes),
        ("kv_unpack", graphs(unpack), nbytes),
        ("kv_pack+sum", median_ms(pack_msg), nbytes * layers),
        ("kv_unpk+sum", median_ms(unpack_msg), nbytes * layers),
    ):
        bw = 2 * moved / (ms * 1e-3)  # read + write, like the copy ceiling
        how = ("eager, 1 layer" if len(rows) < 2 else "graph, 1 layer" if len(rows) < 4
               else f"eager, {layers} layers")
        rows.append(Row(name, f"tok={tokens} {how}", ms, bw / 1e9, "GB/s", "copy bandwidth",
                        bw / copy_bw))
    return rows


def pack_tiles(tokens: int, copy_bw: float) -> list[Row]:
    """``--pack-tiles``: one layer's pack under CUDA graphs for each (chunk, warps)."""
    from pdserve.kernels.kv_pack import pack_kv

    nbytes = _pack_bytes(tokens)
    pool, ids, bufs = _pack_inputs(tokens, 1)
    rows = []
    for chunk in (1024, 2048, 4096, 8192):
        for warps in (2, 4, 8, 16):
            def make(i: int, c: int = chunk, w: int = warps) -> Callable[[], object]:
                return lambda: pack_kv(pool[0], ids[i], bufs[i, 0], c, w)

            ms = graph_median_ms([make(i) for i in range(ids.shape[0])])
            bw = 2 * nbytes / (ms * 1e-3)
            rows.append(Row("kv_pack", f"tok={tokens} c={chunk} w={warps}", ms, bw / 1e9,
                            "GB/s", "copy bandwidth", bw / copy_bw))
    return rows


def bench_decode(batches: list[int], contexts: list[int], copy_bw: float) -> list[Row]:
    rows = []
    for batch in batches:
        for ctx in contexts:
            rows += _decode_case(batch, ctx, copy_bw)
            torch.cuda.empty_cache()
    return rows


def bench_prefill(seq_lens: list[int], tokens: int = 16384) -> list[Row]:
    rows = []
    for seq in seq_lens:
        rows.append(_prefill_case(seq, tokens))
        torch.cuda.empty_cache()
    return rows


def bench_pack(token_counts: list[int], copy_bw: float) -> list[Row]:
    rows = []
    for tokens in token_counts:
        rows += _pack_case(tokens, copy_bw)
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -P -m pdserve.kernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short sweep")
    parser.add_argument("--pack-tiles", action="store_true",
                        help="with pack: also sweep the pack kernel's chunk and warps")
    parser.add_argument("--only", default="decode,prefill,pack", metavar="PARTS",
                        help="comma-separated parts to run (default: decode,prefill,pack)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.bench needs a CUDA GPU")

    if args.quick:
        batches, contexts = [1, 16, 64], [512, 4096, 32768]
        prefill_lens, pack_tokens = [1024, 4096], [4096]
    else:
        batches, contexts = [1, 4, 16, 64, 128, 256], [512, 2048, 8192, 32768]
        prefill_lens, pack_tokens = [1024, 4096, 16384], [1024, 4096, 16384]

    copy_bw = copy_bandwidth()
    rows = [Row("copy", "1 GiB d2d", 2 * (1 << 30) / copy_bw * 1e3, copy_bw / 1e9, "GB/s",
                "-", 1.0)]
    parts = set(args.only.split(","))
    if parts - {"decode", "prefill", "pack"}:
        parser.error(f"--only: unknown parts {sorted(parts - {'decode', 'prefill', 'pack'})}")
    if "decode" in parts:
        rows += bench_decode(batches, contexts, copy_bw)
    if "prefill" in parts:
        rows += bench_prefill(prefill_lens)
    if "pack" in parts:
        rows += bench_pack(pack_tokens, copy_bw)
        if args.pack_tiles:
            rows += pack_tiles(4096, copy_bw)

    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}")
    header = f"{'kernel':<11} {'shape':<28} {'ms':>9} {'achieved':>14}  {'ratio':>6}  ceiling"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.kernel:<11} {r.shape:<28} {r.ms:>9.4f} {r.achieved:>9.1f} {r.unit:<7}"
              f" {r.ratio:>6.2f}  {r.ceiling}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
