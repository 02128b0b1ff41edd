"""The CUDA device a Triton host function launches on.

Triton launches on the current device and its current stream, not on its tensors' device (the CUDA bindings take
the tensors' with ``c10::cuda::CUDAGuard``): tensors on ``cuda:1`` while ``cuda:0`` is current would be touched from
the wrong device, unordered with their own stream.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

Launcher = TypeVar("Launcher", bound=Callable)


def on_input_device(launcher: Launcher) -> Launcher:
    """Run ``launcher`` with the device of its first tensor argument current (when that tensor is on CUDA)."""

    @functools.wraps(launcher)
    def on_device(*args, **kwargs):
        first = next((arg for arg in args if isinstance(arg, torch.Tensor)), None)
        if first is None or first.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    return on_device  # type: ignore[return-value]
