"""A grid-wide barrier for persistent Triton kernels (one launch for work that needs two phases).

Every program of the launch must be resident at once: launch at most one program per multiprocessor
(:func:`persistent_programs`), and exactly one under the Triton interpreter, which runs programs one after
another.  The barrier uses two int32 counters that it leaves as it found them (arrivals back to 0, the generation
moved on), so one zeroed buffer per device and stream serves every launch (:func:`barrier_counters`); launches on
the same stream never overlap, launches on different streams get different buffers.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def interpreted() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def persistent_programs(work_items: int, device: torch.device) -> int:
    """Programs of a persistent launch: one per multiprocessor at most (all resident), one under the interpreter."""
    if interpreted() or device.type != "cuda":
        return 1
    return max(1, min(work_items, torch.cuda.get_device_properties(device).multi_processor_count))


def barrier_counters(device: torch.device) -> torch.Tensor:
    """The zero-initialised [arrivals, generation] pair of ``device``'s current stream (allocated once)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return _COUNTERS[key]


@triton.jit
def grid_barrier(counters_ptr, n_programs):
    """Wait until every program of the launch has arrived; stores made before are visible to loads after."""
    tl.debug_barrier()
    generation = tl.atomic_add(counters_ptr + 1, 0, sem="acquire")
    arrived = tl.atomic_add(counters_ptr, 1, sem="acq_rel")
    if arrived == n_programs - 1:
        tl.atomic_xchg(counters_ptr, 0, sem="relaxed")
        tl.atomic_add(counters_ptr + 1, 1, sem="release")
    else:
        while tl.atomic_add(counters_ptr + 1, 0, sem="acquire") == generation:
            pass
    tl.debug_barrier()
