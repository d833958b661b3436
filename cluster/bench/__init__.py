"""Benchmarks of a deployment and of its parts, one module per benchmark.

- ``serve``: ``pdserve bench``, a load generator for a running server (workloads in ``data``,
  statistics in ``report``, tables and figures in ``plot``, client processes in ``shards``);
- ``router``: the router side's streamed tokens a second against model-less decode workers;
- ``kv``: KV transfer between two GPUs against raw NCCL send/recv.
"""
