"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton picks interpreter or compiler once, at its first import (which torch._dynamo may
# trigger early): without a GPU, the kernel tests run under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pdserve.engine.model_files import default_gguf_path


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The embedded default model's GGUF file (fetched into the cache on first use)."""
    return default_gguf_path()
