"""Forward+backward of the KD losses: mpdistil_fast.kd_kl_div (forward KL, and the generalized JSD with
``direction="jsd"``) against torch eager and torch.compile.

    OMP_NUM_THREADS=2 python benchmarks/bench_kd_kl_div.py [--reps 20] [--shapes 2048x32000,512x128256]
                                                           [--dtypes float32,bfloat16] [--losses kl,jsd]
                                                           [--no-compile]

For ``kl`` every provider computes ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True,
reduction="batchmean") * T^2``; for ``jsd`` (beta = 0.5) beta KL(P || M) + (1 - beta) KL(Q || M) with log M a
logsumexp of the two log-softmaxes (as GKD's reference code in TRL writes it), batchmean, times T^2.  Each is timed
with its gradient with respect to the student logits (the teacher is frozen), interleaved (benchmarks/harness.py).
torch.compile compiles each case anew with static shapes; its compile time (the first call, before the checks and
warm-up) is not in the timings and is given in its rows' ``extra`` column.
On CUDA the script also times the triton and cuda backends and, when installed, Liger-Kernel's LigerKLDIVLoss /
LigerJSD on the same log-softmax inputs (their whole pipeline), and for the KL the cuda backend with each
MPDISTIL_KL_ROW_RESIDENT setting (``mpdistil_cuda_residentN``: the row-resident cluster kernel with N 16-byte packs
per thread on sm_90+ devices; elsewhere the default kernel runs).  GB/s is computed from the minimum traffic of a
fused forward+backward: read both logits once and write the student gradient (3*N*V elements; the fused JSD reads
the logits twice in forward, so it cannot reach this figure).  On CUDA each row also gives the number of kernels
one forward+backward launches and their summed run time (torch.profiler), with the bandwidth and fraction of the
measured copy bandwidth that this kernel time reaches: the wall-clock figure also holds the host's launch overhead.
Results go to benchmarks/results/kd_kl_div.{csv,png}.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import bar_plot, copy_bandwidth_gbps, interleaved_timings, make_row, print_table, threads_note, write_csv  # noqa: E402
from mpdistil_fast import kd_kl_div  # noqa: E402

TEMPERATURE = 2.0
BETA = 0.5
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def eager_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The usual KD loss written with torch ops (the baseline)."""
    return F.kl_div(F.log_softmax(student / TEMPERATURE, dim=-1), F.log_softmax(teacher / TEMPERATURE, dim=-1),
                    reduction="batchmean", log_target=True) * TEMPERATURE ** 2


def eager_jsd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The generalized JSD written with torch ops, as GKD's reference code (TRL) does (the baseline)."""
    log_q, log_p = F.log_softmax(student / TEMPERATURE, dim=-1), F.log_softmax(teacher / TEMPERATURE, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(BETA), log_q + math.log1p(-BETA)]), dim=0)
    kl = lambda log_x: F.kl_div(log_m, log_x, reduction="batchmean", log_target=True)  # noqa: E731
    return (BETA * kl(log_p) + (1 - BETA) * kl(log_q)) * TEMPERATURE ** 2


def liger_loss(loss: str) -> LossFn | None:
    """Liger-Kernel's pipeline (log-softmax in torch, then its fused KL or JSD kernel), when importable."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return None
    fused = LigerKLDIVLoss(reduction="batchmean", log_target=True) if loss == "kl" else LigerJSD(beta=BETA)
    return lambda s, t: fused(F.log_softmax(s / TEMPERATURE, dim=-1),
                              F.log_softmax(t / TEMPERATURE, dim=-1)) * TEMPERATURE ** 2


def fwd_bwd(loss_fn: LossFn, student: torch.Tensor,
            teacher: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: torch.autograd.grad(loss_fn(student, teacher), student)[0]


def providers(device: torch.device, loss: str, compile_baseline: bool = True) -> dict[str, LossFn]:
    """Every implementation of ``loss`` ("kl" or "jsd") that runs on ``device``."""
    eager = eager_loss if loss == "kl" else eager_jsd
    found: dict[str, LossFn] = {"torch_eager": eager}
    if compile_baseline:  # this case's own static-shape compile (harness.compiled_baseline)
        found["torch_compile"] = harness.compiled_baseline(eager)
    op, options = ("kd_kl_div", {}) if loss == "kl" else ("kd_jsd", {"direction": "jsd", "beta": BETA})
    for name in harness.fused_backends(op, device):  # prints the reason of each one that cannot run here
        found[f"mpdistil_{name}"] = lambda s, t, name=name: kd_kl_div(s, t, TEMPERATURE, backend=name, **options)
    if loss == "kl" and "mpdistil_cuda" in found:
        for packs in RESIDENT_PACKS:
            found[f"mpdistil_cuda_resident{packs}"] = row_resident(found["mpdistil_cuda"], packs)
    if device.type == "cuda" and (liger := liger_loss(loss)) is not None:
        found["liger"] = liger
    return found


#: MPDISTIL_KL_ROW_RESIDENT settings timed beside the default cuda kernel (16-byte packs per thread).
RESIDENT_PACKS = ("1", "2", "4")


def row_resident(loss_fn: LossFn, packs: str) -> LossFn:
    """``loss_fn`` with MPDISTIL_KL_ROW_RESIDENT=packs (the cuda backend's row-resident cluster kernel) for the
    duration of each call (the setting before it is restored after)."""
    def call(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        before = os.environ.get("MPDISTIL_KL_ROW_RESIDENT")
        os.environ["MPDISTIL_KL_ROW_RESIDENT"] = packs
        try:
            return loss_fn(student, teacher)
        finally:
            if before is None:
                del os.environ["MPDISTIL_KL_ROW_RESIDENT"]
            else:
                os.environ["MPDISTIL_KL_ROW_RESIDENT"] = before
    return call


def loss_and_grad(loss_fn: LossFn, student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(loss, fp32 student gradient) of ``loss_fn``, on the path the timing takes (with the gradient)."""
    student = student.detach().requires_grad_()
    loss = loss_fn(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.double().item(), grad.float()


#: Relative error allowed to the loss and student gradient of a baseline (torch.compile, Liger) on 16-bit inputs:
#: they round their log-softmax outputs (and the loss) to 16 bits (the compiled bf16 JSD is ~2.5% off in its loss,
#: ~5% in its gradient).
BASELINE_16BIT_RTOL = 0.1


def agreeing_losses(losses: dict[str, LossFn], student: torch.Tensor, teacher: torch.Tensor,
                    label: str) -> dict[str, LossFn]:
    """The providers that compute the loss and student gradient of the fp32 eager formula on the same inputs,
    each on the path that is timed (with the gradient): relative error (for the gradient: relative norm error) at
    most 1e-4 for fp32 inputs, 2e-2 for 16-bit ones, BASELINE_16BIT_RTOL for the baselines' 16-bit results.  The
    others, and those whose call raises, are reported and left out.  The 16-bit eager baseline itself computes in
    16 bits (its JSD is off by ~15% at [2048, 32000] bf16), so it is timed but not checked."""
    exact = student.dtype in (torch.float32, torch.float64)
    reference_loss, reference_grad = loss_and_grad(losses["torch_eager"], student.float(), teacher.float())
    loss_errors, gradient_errors = {}, {}
    for name, fn in losses.items():
        if name == "torch_eager" and not exact:
            continue
        tolerance = 1e-4 if exact else 2e-2 if name.startswith("mpdistil_") else BASELINE_16BIT_RTOL
        try:
            loss, grad = loss_and_grad(fn, student, teacher)
        except Exception as error:  # a provider that fails here is dropped, the others are timed
            harness.record_failure(label, name, error)
            continue
        loss_errors[name] = abs(loss - reference_loss) / abs(reference_loss) / tolerance
        gradient_errors[name] = ((grad - reference_grad).norm() / reference_grad.norm()).item() / tolerance
        del grad
    kept = (set(harness.agreeing(loss_errors, 0.0, 0.0, f"{label} loss error / tolerance", 1.0))
            & set(harness.agreeing(gradient_errors, 0.0, 0.0, f"{label} student gradient error / tolerance", 1.0)))
    return {name: fn for name, fn in losses.items() if name in kept | {"torch_eager"}}


#: The logits dtypes --dtypes takes (every backend runs them; the checks compare against the fp32 formula).
DTYPES = ("float32", "bfloat16", "float16", "float64")


def shape_list(text: str) -> list[tuple[int, int]]:
    """argparse type of --shapes: comma-separated ROWSxVOCAB, both positive."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated ROWSxVOCAB with positive sizes (e.g. 2048x32000,512x128256), got {item!r}")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def choice_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """argparse type of a comma-separated list of names from ``allowed`` (each once)."""
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",")]
        if unknown := [name for name in names if name not in allowed]:
            raise argparse.ArgumentTypeError(f"takes a comma-separated list of {', '.join(allowed)}; "
                                             f"got {', '.join(map(repr, unknown))}")
        return list(dict.fromkeys(names))
    return parse


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=harness.positive_int, default=20,
                        help="timed interleaved rounds per case (default 20)")
    parser.add_argument("--shapes", type=shape_list, default=shape_list("2048x32000,512x128256"),
                        help="comma-separated ROWSxVOCAB logits shapes (default 2048x32000,512x128256)")
    parser.add_argument("--dtypes", type=choice_list(DTYPES), default=["float32", "bfloat16"],
                        help=f"comma-separated logits dtypes, of {', '.join(DTYPES)} (default float32,bfloat16)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    parser.add_argument("--losses", type=choice_list(("kl", "jsd")), default=["kl", "jsd"],
                        help="comma-separated: kl (forward KL), jsd (beta = 0.5) (default kl,jsd)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_arguments()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device}, {threads_note()}")
    rows = []
    for loss, (n, v), dtype_name in itertools.product(args.losses, args.shapes, args.dtypes):
        dtype = getattr(torch, dtype_name)
        student = torch.randn(n, v, device=device, dtype=dtype).requires_grad_()
        teacher = torch.randn(n, v, device=device, dtype=dtype)
        x = f"[{n}, {v}] {dtype_name}" + (" JSD" if loss == "jsd" else "")
        losses = providers(device, loss, not args.no_compile)
        compile_s = (harness.first_call_seconds(fwd_bwd(losses["torch_compile"], student, teacher), device)
                     if "torch_compile" in losses else None)
        losses = agreeing_losses(losses, student, teacher, x)
        calls = {name: fwd_bwd(fn, student, teacher) for name, fn in losses.items()}
        times = interleaved_timings(calls, device=device, warmup=2, reps=args.reps)
        traffic_gb = 3 * n * v * student.element_size() / 1e9
        copy_gbps = copy_bandwidth_gbps(int(traffic_gb * 1e9 / 2), device) if device.type == "cuda" else None
        kernel = "kd_kl_div" if loss == "kl" else "kd_jsd"
        shape_rows = {name: make_row(kernel, name, "full", "speed", x, samples, "ms", device)
                      for name, samples in times.items()}
        for row in shape_rows.values():
            gbps = traffic_gb / (row["p50"] / 1e3)
            row["extra"] = f"GB/s={gbps:.1f}" + "".join(
                f"; vs_{base}={shape_rows[f'torch_{base}']['p50'] / row['p50']:.2f}x" for base in ("eager", "compile")
                if f"torch_{base}" in shape_rows)
            if row["provider"] == "torch_compile" and compile_s is not None:
                row["extra"] += "; " + harness.compile_note(compile_s)
            if copy_gbps is not None:
                launches, kernel_ms = harness.cuda_kernel_profile(calls[row["provider"]], reps=3)
                kernel_gbps = traffic_gb / (kernel_ms / 1e3)
                row["extra"] += (f"; of_copy_bw={gbps / copy_gbps:.0%} (copy {copy_gbps:.0f} GB/s); kernels={launches}"
                                 f" taking {kernel_ms:.3f} ms = {kernel_gbps:.0f} GB/s = {kernel_gbps / copy_gbps:.0%}"
                                 " of copy")
            rows.append(row)
        write_csv(rows, "kd_kl_div")  # after every case: a run stopped by a time limit keeps what it measured
        del student, teacher
    print_table(rows, ("x", "provider", "p50", "p20", "p80", "unit", "extra"))
    print(f"machine: {rows[0]['device']}; {rows[0]['version']}")
    print(write_csv(rows, "kd_kl_div"))
    print(bar_plot(rows, "kd_kl_div", "kd_kl_div forward+backward (ms, lower is better)"))


if __name__ == "__main__":
    main()
    sys.exit(harness.exit_status())
