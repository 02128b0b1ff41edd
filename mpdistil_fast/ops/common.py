"""Helpers shared by the fused-op layers (custom-op registration, dtypes, backend choice under torch.compile)."""
from __future__ import annotations

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
