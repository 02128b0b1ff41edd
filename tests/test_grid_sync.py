"""The launch machinery of the Triton kernels: the grid barrier of the persistent kernels (kernels/grid_sync.py):
every program sees every store made before the barrier, the counters come back to their starting state, and the
barrier can be passed repeatedly; and the device the host functions launch on (kernels/device.py)."""
from __future__ import annotations

import contextlib

import pytest
import torch

triton = pytest.importorskip("triton")  # tests/conftest.py chose the interpreter before this import on a CPU
import triton.language as tl  # noqa: E402

from mpdistil_fast.kernels.device import on_input_device  # noqa: E402
from mpdistil_fast.kernels.grid_sync import barrier_counters, grid_barrier, persistent_programs  # noqa: E402


@triton.jit
def two_phase_kernel(values_ptr, sums_ptr, counters_ptr, n_items, BLOCK: tl.constexpr):
    """Phase 1 writes item + 1 for the program's items; phase 2 sums every item (others' writes included); phase 3
    clears the items (after a second barrier, so no program still reads them)."""
    programs = tl.num_programs(0)
    for item in range(tl.program_id(0), n_items, programs):
        tl.store(values_ptr + item, item + 1)
    grid_barrier(counters_ptr, programs)
    for item in range(tl.program_id(0), n_items, programs):
        total = tl.zeros((BLOCK,), dtype=tl.int32)
        for start in range(0, n_items, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            total += tl.load(values_ptr + offsets, mask=offsets < n_items, other=0, cache_modifier=".cg")
        tl.store(sums_ptr + item, tl.sum(total, axis=0))
    grid_barrier(counters_ptr, programs)
    for item in range(tl.program_id(0), n_items, programs):
        tl.store(values_ptr + item, 0)


@pytest.mark.gpu  # also selected by `pytest -m gpu` (benchmarks/run_gpu.sh); runs on a CPU too, one program
@pytest.mark.parametrize("n_items", [1, 7, 133, 2000])
def test_every_program_sees_every_store(n_items):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and n_items > 133:
        pytest.skip("the interpreter runs one program: the large case only adds time")
    values = torch.zeros(n_items, dtype=torch.int32, device=device)
    sums = torch.zeros_like(values)
    programs = persistent_programs(n_items, device)
    counters = barrier_counters(device)
    generation = int(counters[1])
    for _ in range(5):
        sums.zero_()
        two_phase_kernel[(programs,)](values, sums, counters, n_items, BLOCK=256)
        assert (sums == n_items * (n_items + 1) // 2).all() and (values == 0).all()
    assert counters.tolist() == [0, generation + 10]
    if device.type == "cuda":
        assert programs == min(n_items, torch.cuda.get_device_properties(device).multi_processor_count)


def test_host_functions_launch_on_their_tensors_device(monkeypatch):
    """A Triton launch uses the current device: the host functions make their first tensor's CUDA device current
    (a fake tensor on cuda:1 stands in for a second GPU) and leave CPU tensors alone (the interpreter)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    launcher = on_input_device(lambda scale, logits: (scale, logits.device))
    with FakeTensorMode():
        on_second_gpu = torch.empty(2, device="cuda:1")
    assert launcher(2.0, on_second_gpu) == (2.0, torch.device("cuda:1")) and entered == [torch.device("cuda:1")]
    assert launcher(2.0, torch.empty(2))[1] == torch.device("cpu") and len(entered) == 1
    from mpdistil_fast.kernels import hidden_mse, kd_jsd, kd_kl_div, meta_teacher
    for module, names in ((kd_kl_div, ("kd_kl_div_fwd", "kd_kl_div_bwd", "kd_kl_div_fwd_grad")),
                          (kd_jsd, ("kd_jsd_fwd", "kd_jsd_bwd", "kd_jsd_fwd_grad")),
                          (hidden_mse, ("hidden_mse_fwd", "hidden_mse_bwd")),
                          (meta_teacher, ("meta_teacher_loss_fwd", "meta_teacher_loss_bwd"))):
        for name in names:  # every host function that launches is wrapped
            assert getattr(module, name).__code__ is on_input_device(len).__code__, name
