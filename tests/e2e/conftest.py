"""End-to-end fixtures: a real local Ray cluster, real workers, the real gRPC server on
loopback, and the HF transformers reference for the embedded default model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from pdserve.cluster.launch import Deployment, job_runtime_env, launch
from pdserve.proto.client import Client
from pdserve_testing.e2e import HFReference, serve_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    ray.init(address="local", namespace="pdserve-tests", include_dashboard=False, num_cpus=8,
             object_store_memory=200 * 1024 * 1024, log_to_driver=True,
             runtime_env=job_runtime_env())
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def deployment(ray_cluster: None, default_gguf: Path) -> Iterator[Deployment]:
    dep = launch(serve_config(default_gguf, "e2e-main"))
    yield dep
    dep.stop()


@pytest.fixture(scope="session")
def client(deployment: Deployment) -> Iterator[Client]:
    with Client(deployment.address) as c:
        yield c


@pytest.fixture(scope="session")
def hf_reference(default_gguf: Path) -> HFReference:
    torch.set_num_threads(os.cpu_count() or 1)
    return HFReference(default_gguf)


