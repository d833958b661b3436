"""Which device a worker computes on."""

from __future__ import annotations

import os

import torch


def describe_device(device: torch.device) -> str:
    """The device, and for a GPU its name and the physical GPU Ray gave this process."""
    if device.type != "cuda":
        return str(device)
    name = torch.cuda.get_device_name(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    return f"{device} {name} (CUDA_VISIBLE_DEVICES={visible})"
