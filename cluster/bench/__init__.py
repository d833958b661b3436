"""Benchmarks of a deployment and of its parts, one module per benchmark.

- ``serve``: ``pdserve bench``, a load generator for a running server (workloads in ``data``,
  statistics in ``report``, tables and figures in ``plot``, client processes in ``shards``).
"""
