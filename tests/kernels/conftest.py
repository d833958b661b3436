"""Kernel tests run the Triton kernels under the CPU interpreter.

``TRITON_INTERPRET`` must be set before anything imports triton (triton decides interpreter or
compiler once, at its import), so it is set here, at conftest import time. When the whole
suite runs, an earlier folder's test modules import triton first (anything that loads
torch._dynamo does), so tests/conftest.py must set it too on machines without CUDA. The
``triton_interpreter`` fixture says so instead of failing obscurely.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")



@pytest.fixture
def triton_interpreter() -> None:
    """For tests of the Triton launchers on CPU tensors."""
    from pdserve.kernels._triton import HAS_TRITON, interpreting

    if not HAS_TRITON:
        pytest.skip("triton is not installed (an optional dependency)")
    if not interpreting():
        if torch.cuda.is_available():
            pytest.skip("triton runs compiled in this process: run tests/kernels on its own")
        pytest.fail(
            "triton was imported (torch._dynamo imports it) before TRITON_INTERPRET=1 was set. "
            "Put at the top of tests/conftest.py: `import os, torch` and "
            "`if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')`"
        )
