"""Shared test utilities: error metrics with dtype-aware tolerances and backend parametrisation."""
from __future__ import annotations

import pytest
import torch

from mpdistil_fast.backends import BACKENDS, backend_status

#: Relative (norm-wise) error tolerated against a float64 reference, by input dtype.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (absolute error when expected is all zero)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values in result"
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, factor: float = 1.0,
                     what: str = "") -> None:
    err = rel_error(actual, expected)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def backend_params(op: str, device: str = "cpu") -> list:
    """One pytest.param per backend; those that cannot run here are skipped with the registry's reason."""
    params = []
    for name in BACKENDS:
        status = backend_status(name, op, device)
        marks = () if status.available else (pytest.mark.skip(reason=status.reason),)
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def gpu_backend_params(op: str) -> list:
    """One pytest.param per fused GPU backend (cuda, triton) of ``op`` on CUDA tensors, skipped with the reason."""
    return [param for param in backend_params(op, "cuda") if param.values[0] in ("cuda", "triton")]


def gpu_test(test):
    """Mark a test that runs on CUDA tensors: ``pytest -m gpu`` selects it (benchmarks/run_gpu.sh); without a CUDA
    device it is skipped."""
    no_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine: "
                                        "benchmarks/run_gpu.sh)")
    return pytest.mark.gpu(no_cuda(test))
