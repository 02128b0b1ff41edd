"""Shared test utilities: error metrics with dtype-aware tolerances, backend parametrisation, and threads standing
in for data-parallel ranks."""
from __future__ import annotations

import math
import threading
from typing import Any, Callable

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


#: Skips a GPU test on a machine without a CUDA device.
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                             reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine: benchmarks/run_gpu.sh)")


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


def cpu_and_gpu_backend_params(op: str) -> list:
    """``(backend, device)`` params: every backend on CPU tensors (:func:`backend_params`), then the fused GPU
    backends on CUDA tensors, marked ``gpu`` (``pytest -m gpu``) and skipped without a CUDA device."""
    return ([pytest.param(p.values[0], "cpu", id=f"{p.id}-cpu", marks=p.marks) for p in backend_params(op)]
            + [pytest.param(p.values[0], "cuda", id=f"{p.id}-cuda", marks=(*p.marks, pytest.mark.gpu, NO_CUDA))
               for p in gpu_backend_params(op)])


def assert_checkpointed_grads_match_torch(loss: Callable[[torch.Tensor, str], torch.Tensor], first: torch.Tensor,
                                          leaves: list[torch.Tensor], backend: str) -> None:
    """``loss(first, backend)`` inside ``torch.utils.checkpoint`` (non-reentrant, whose saved tensors can be unpacked
    once per backward: the fused backward read them twice and raised CheckpointError) gives the gradients of the
    leaves that ``loss(first, "torch")`` gives."""
    got = torch.autograd.grad(torch.utils.checkpoint.checkpoint(loss, first, backend, use_reentrant=False), leaves)
    want = torch.autograd.grad(loss(first, "torch"), leaves)
    for g, w in zip(got, want):
        assert_rel_close(g, w, first.dtype)


def assert_traced_like_eager(module: torch.nn.Module, traced_inputs: tuple, inputs: tuple,
                             leaves: list[torch.Tensor], op: str, folder: Any) -> None:
    """``torch.jit.trace`` of ``module`` on ``traced_inputs`` records the custom op ``mpdistil::<op>``, and on other
    ``inputs`` gives eager's value and gradients (with respect to ``leaves``), also once saved to ``folder`` and
    loaded back."""
    traced = torch.jit.trace(module, traced_inputs)
    assert f"mpdistil::{op}" in str(traced.inlined_graph)
    got, want = traced(*inputs), module(*inputs)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(g, w)
    torch.jit.save(traced, folder / "traced.pt")
    torch.testing.assert_close(torch.jit.load(folder / "traced.pt")(*inputs), want.detach())


def gpu_test(test):
    """Mark a test that runs on CUDA tensors: ``pytest -m gpu`` selects it (benchmarks/run_gpu.sh); without a CUDA
    device it is skipped."""
    return pytest.mark.gpu(NO_CUDA(test))


class ThreadRanks:
    """The collectives of data-parallel ranks for threads standing in for them: ``average`` (the bi-level engine's)
    and, per rank, the runtime's row sharing, ``from_main`` and ``barrier`` (:meth:`rank`)."""

    def __init__(self, world_size: int) -> None:
        # a rank that fails alone leaves the others waiting: they give up after the timeout (BrokenBarrierError)
        self.world_size, self.posted = world_size, [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=20)

    def exchange(self, rank: int, value: Any) -> list:
        """Every rank's ``value``, in rank order (an all-gather)."""
        self.posted[rank] = value
        self.barrier.wait()
        values = list(self.posted)
        self.barrier.wait()
        return values

    def average_for(self, rank: int) -> Callable[[list[torch.Tensor]], None]:
        def average(tensors: list[torch.Tensor]) -> None:
            posted = self.exchange(rank, [t.clone() for t in tensors])
            for i, tensor in enumerate(tensors):
                tensor.copy_(sum(p[i] for p in posted) / self.world_size)
        return average

    def rank(self, rank: int) -> "ThreadRank":
        return ThreadRank(self, rank)


class ThreadRank:
    """One thread's view of :class:`ThreadRanks`, shaped like a runtime (contiguous row shares padded like
    DeepSpeedRuntime's, whole models)."""

    def __init__(self, group: ThreadRanks, rank: int) -> None:
        self.group, self.rank = group, rank
        self.world_size = group.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank_rows(self, n: int) -> torch.Tensor:
        share = math.ceil(n / self.group.world_size)
        return torch.arange(self.rank * share, (self.rank + 1) * share) % n

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        return torch.cat(self.group.exchange(self.rank, local))[:n]

    def read_weights(self, module: torch.nn.Module):
        yield from module.state_dict().items()

    def from_main(self, value: int) -> int:
        return self.group.exchange(self.rank, value)[0]

    def barrier(self) -> None:
        self.group.barrier.wait()


def run_on_thread_ranks(fn: Callable[[ThreadRank, Callable], Any], world_size: int = 2) -> tuple[list, list]:
    """``fn(rank, average)`` on ``world_size`` threads; each rank's result and exception (``None`` if none)."""
    group = ThreadRanks(world_size)
    results, errors = [None] * world_size, [None] * world_size

    def run(rank: int) -> None:
        try:
            results[rank] = fn(group.rank(rank), group.average_for(rank))
        except BaseException as error:  # noqa: BLE001 (reported to the caller)
            errors[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors
