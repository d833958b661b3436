"""Device timing for the benchmarks and tuners (GPU only): the median of ``do_bench``, the
median replay of CUDA graphs cycled through several inputs, and the device-to-device copy
bandwidth that bandwidth figures are measured against.

It sits in ``kernels`` because the kernel benchmark and tuner use it and ``kernels`` may
import nothing above it; the step benchmarks of ``cluster.bench`` use it too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """``triton.testing.do_bench``'s median time of ``fn`` in ms (``warmup`` and ``rep`` in ms
    of running it, as do_bench takes them)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


class Cycle:
    """Round-robin index over ``n`` input copies (defeats L2 reuse between calls)."""

    def __init__(self, n: int) -> None:
        self.n, self.i = n, 0

    def next(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i


def graph_median_ms(fns: list[Callable[[], object]]) -> float:
    """Median time of one replay of a CUDA graph of each ``fns[i]``, cycling through them (as
    decode runs in serving: under CUDA graphs, without Python launch overhead)."""
    for fn in fns:
        fn()  # compile outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for fn in fns:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs.append(graph)
    cycle = Cycle(len(graphs))
    return median_ms(lambda: graphs[cycle.next()].replay())


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3)
