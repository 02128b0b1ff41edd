"""Helpers shared by the fused-op layers (custom-op registration, dtypes, backend choice under torch.compile)."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, NoReturn

import torch

from mpdistil_fast.backends import resolve_backend

#: ``resolve_backend`` for code that torch.compile traces: the choice is a constant of the call site, so Dynamo
#: takes its result instead of tracing the registry (which imports modules and queries the dispatcher).
resolve_backend_traceable = torch.compiler.assume_constant_result(resolve_backend)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype (what the fused kernels accumulate in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_double_backward(op: str) -> Callable[..., NoReturn]:
    """An autograd backward for a fused ``<op>_bwd`` custom op that refuses double backward with a clear error."""

    def backward(ctx, *grads) -> NoReturn:
        raise RuntimeError(f"{op}: double backward through the fused kernels (cpp, cuda, triton) is not supported; "
                           "use backend='torch' (composite, differentiable twice) or a first-order hypergradient "
                           "(mpdistil_fast.bilevel's 'finite_difference' method)")

    return backward


def fused_kernels(backend: str, triton_module: str) -> ModuleType | object:
    """Where a fused backend's ``<op>_fwd`` / ``<op>_bwd`` live: ``torch.ops.mpdistil_C`` for cpp and cuda (the
    dispatcher picks the CPU or CUDA kernel by device) or the Triton module ``mpdistil_fast.kernels.<name>``."""
    if backend in ("cpp", "cuda"):
        return torch.ops.mpdistil_C
    if backend == "triton":
        return importlib.import_module(f"mpdistil_fast.kernels.{triton_module}")
    raise ValueError(f"backend must be 'cpp', 'cuda' or 'triton' for a fused op, got {backend!r}")
