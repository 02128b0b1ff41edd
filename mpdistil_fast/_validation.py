"""Argument checks shared by every public op: each raises a ValueError/TypeError that names the argument; and the
one dtype policy they share (:func:`promote_pair`)."""
from __future__ import annotations

import math
import numbers
from typing import Collection

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, value: object, *, floating: bool = True) -> torch.Tensor:
    """``value`` must be a tensor, of a floating dtype when ``floating``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {value.dtype}")
    return value


def promote_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` in the wider of their dtypes (as torch's binary ops promote; a no-op when they share one): a
    bf16 student beside an fp32 teacher computes in fp32, and each gradient comes back in its input's dtype."""
    if a.dtype == b.dtype:  # what ``.to`` would return, without its two dispatcher calls (2 us a call)
        return a, b
    common = torch.promote_types(a.dtype, b.dtype)
    return a.to(common), b.to(common)


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (None skipped) live on one device; return it.  The listing of the error is built only
    when the devices differ: this check runs on every call of every public op."""
    device = None
    for tensor in tensors.values():
        if tensor is None:
            continue
        if device is None:
            device = tensor.device
        elif tensor.device != device:
            listing = ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)
            raise ValueError(f"all tensors must be on the same device, got {listing}")
    return device


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_mask(mask: torch.Tensor | None, expected_shape: torch.Size | tuple[int, ...], device: torch.device,
               name: str = "mask") -> torch.Tensor | None:
    """An optional boolean mask of exactly ``expected_shape`` on ``device``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(f"{name} must have shape {tuple(expected_shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on {device}, got {mask.device}")
    return mask


def _real_number(name: str, value: object) -> float:
    """``value`` as a Python float: ints, floats and NumPy scalars (``numbers.Real``); not bools, and not tensors
    (a tensor may carry a gradient these arguments do not propagate, and reading one syncs with its device)."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_positive_finite(name: str, value: object) -> float:
    """A real number > 0 and finite (temperatures, learning rates).

    Written with comparisons only (NaN fails them too), not ``math.isfinite``: under torch.compile a float that
    changes between calls (a temperature schedule, or ``dynamic=True``) is a symbolic float, which comparisons guard
    on but ``math.isfinite`` cannot take (a graph break, an error with ``fullgraph=True``)."""
    if type(value) is float and 0 < value < math.inf:  # the usual case, without the numbers.Real ABC check
        return value
    value = _real_number(name, value)
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_unit_interval(name: str, value: object) -> float:
    """A real number in [0, 1] (mixture weights)."""
    value = _real_number(name, value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_choice(name: str, value: object, choices: Collection[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
