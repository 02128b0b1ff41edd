"""Forward+backward of the KD KL loss: mpdistil_fast.kd_kl_div against torch eager and torch.compile.

    OMP_NUM_THREADS=2 python benchmarks/bench_kd_kl_div.py [--reps 20] [--shapes 2048x32000,512x128256]

Every provider computes the same loss, ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True,
reduction="batchmean") * T^2``, and its gradient with respect to the student logits (the teacher is frozen), timed
interleaved (benchmarks/harness.py).  On CUDA the script also times the triton and cuda backends and, when
installed, Liger-Kernel's LigerKLDIVLoss on the same log-softmax inputs (its whole pipeline).  GB/s is computed from
the minimum traffic of a fused forward+backward: read both logits once and write the student gradient (3*N*V
elements).  Results go to benchmarks/results/kd_kl_div.{csv,png}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import bar_plot, copy_bandwidth_gbps, interleaved_timings, make_row, print_table, threads_note, write_csv  # noqa: E402
from mpdistil_fast import available_backends, kd_kl_div  # noqa: E402

TEMPERATURE = 2.0


def eager_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The usual KD loss written with torch ops (the baseline)."""
    return F.kl_div(F.log_softmax(student / TEMPERATURE, dim=-1), F.log_softmax(teacher / TEMPERATURE, dim=-1),
                    reduction="batchmean", log_target=True) * TEMPERATURE ** 2


def liger_loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """Liger-Kernel's KL pipeline (log-softmax in torch, its fused KL kernel), when importable."""
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        return None
    loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    return lambda s, t: loss(F.log_softmax(s / TEMPERATURE, dim=-1),
                             F.log_softmax(t / TEMPERATURE, dim=-1)) * TEMPERATURE ** 2


def fwd_bwd(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], student: torch.Tensor,
            teacher: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: torch.autograd.grad(loss_fn(student, teacher), student)[0]


def providers(device: torch.device) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    found: dict[str, Callable] = {"torch_eager": eager_loss, "torch_compile": torch.compile(eager_loss)}
    for name, status in available_backends("kd_kl_div", device).items():
        if status.available and name != "torch":
            found[f"mpdistil_{name}"] = lambda s, t, name=name: kd_kl_div(s, t, TEMPERATURE, backend=name)
    if device.type == "cuda" and (liger := liger_loss()) is not None:
        found["liger"] = liger
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--shapes", default="2048x32000,512x128256")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device}, {threads_note()}")
    rows = []
    for shape in args.shapes.split(","):
        n, v = (int(x) for x in shape.split("x"))
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            student = torch.randn(n, v, device=device, dtype=dtype).requires_grad_()
            teacher = torch.randn(n, v, device=device, dtype=dtype)
            calls = {name: fwd_bwd(fn, student, teacher) for name, fn in providers(device).items()}
            times = interleaved_timings(calls, device=device, warmup=2, reps=args.reps)
            traffic_gb = 3 * n * v * student.element_size() / 1e9
            copy_gbps = copy_bandwidth_gbps(int(traffic_gb * 1e9 / 2), device) if device.type == "cuda" else None
            x = f"[{n}, {v}] {dtype_name}"
            shape_rows = {name: make_row("kd_kl_div", name, "full", "speed", x, samples, "ms", device)
                          for name, samples in times.items()}
            for row in shape_rows.values():
                speedup = {base: shape_rows[f"torch_{base}"]["p50"] / row["p50"] for base in ("eager", "compile")}
                gbps = traffic_gb / (row["p50"] / 1e3)
                row["extra"] = f"GB/s={gbps:.1f}; vs_eager={speedup['eager']:.2f}x; vs_compile={speedup['compile']:.2f}x"
                if copy_gbps is not None:
                    row["extra"] += f"; of_copy_bw={gbps / copy_gbps:.0%} (copy {copy_gbps:.0f} GB/s)"
                rows.append(row)
            del student, teacher
    print_table(rows, ("x", "provider", "p50", "p20", "p80", "unit", "extra"))
    print(f"machine: {rows[0]['device']}, torch {torch.__version__}")
    print(write_csv(rows, "kd_kl_div"))
    print(bar_plot(rows, "kd_kl_div", "kd_kl_div forward+backward (ms, lower is better)"))


if __name__ == "__main__":
    main()
