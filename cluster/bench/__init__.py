"""Benchmarks of a deployment and of its parts, one module per benchmark.

- ``serve``: ``pdserve bench``, a load generator for a running server (workloads in ``data``,
  statistics in ``report``, tables and figures in ``plot``, client processes in ``shards``);
- ``router``: the router side's streamed tokens a second against model-less decode workers;
- ``kv``: KV transfer between two GPUs against raw NCCL send/recv;
- ``step``: one decode step of a dummy-weight model against its memory roofline;
- ``worker_step``: the decode worker's step phase by phase against the graph replay alone.

The kernel benchmark and tuner stay with the kernels (``pdserve.kernels.bench``,
``pdserve.kernels.tune_prefill``); the device timing they all share is
``pdserve.kernels.timing``.
"""
