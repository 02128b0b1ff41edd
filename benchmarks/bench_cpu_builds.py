"""The CPU kernel builds against each other: forward+backward of every fused op with each build of
``mpdistil_fast._cpu_<isa>`` that this CPU can run (the ``avx2`` and ``avx512`` libraries of the default
``MPDISTIL_CPU_ARCH=dispatch`` build), to check the choice the backend registry makes (the widest build torch's
CPU capability allows) with numbers.

A process loads exactly one build, so each build is timed in worker processes started with
``ATEN_CPU_CAPABILITY=<isa>``, alternating between the builds round after round (interleaved at the process level);
the medians pool every round.  Every worker also returns its losses on the same seeded inputs: the builds must
agree (relative 1e-5 in fp32 inputs, 1e-2 in bf16 ones) or their rows are left out.  Rows go to
``benchmarks/results/cpu_builds.csv`` and ``cpu_builds.png``.

    OMP_NUM_THREADS=2 python benchmarks/bench_cpu_builds.py [--quick] [--rounds 4] [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from benchmarks.bench_kd_kl_div import BETA, TEMPERATURE  # noqa: E402
import mpdistil_fast  # noqa: E402
from mpdistil_fast import backends  # noqa: E402

NAME = "cpu_builds"
#: The builds a process can be made to load through ATEN_CPU_CAPABILITY, widest first.
SWITCHABLE_BUILDS = ("avx512", "avx2")


def cases(quick: bool) -> dict[str, tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]:
    """{label: (loss on seeded inputs with the cpp backend, the leaves its gradient is taken for)}."""
    torch.manual_seed(0)
    rows, vocab = (8, 1000) if quick else (2048, 32000)
    layers, batch, seq, width = (2, 4, 32, 128) if quick else (6, 32, 128, 768)
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        student = torch.randn(rows, vocab, dtype=dtype, requires_grad=True)
        teacher = torch.randn(rows, vocab, dtype=dtype)
        short = "fp32" if dtype == torch.float32 else "bf16"
        found[f"KL [{rows}, {vocab}] {short}"] = (
            lambda s=student, t=teacher: mpdistil_fast.kd_kl_div(s, t, TEMPERATURE, backend="cpp"), [student])
        found[f"JSD [{rows}, {vocab}] {short}"] = (
            lambda s=student, t=teacher: mpdistil_fast.kd_kl_div(s, t, TEMPERATURE, direction="jsd", beta=BETA,
                                                                  backend="cpp"), [student])
    student = torch.randn(layers, batch, seq, width, requires_grad=True)
    teacher = torch.randn(layers, batch, seq, width)
    mask = torch.arange(seq)[None, :] < torch.randint(seq // 4, seq + 1, (batch,))[:, None]
    found[f"hidden MSE [{layers}, {batch}, {seq}, {width}] mask"] = (
        lambda: mpdistil_fast.hidden_mse(student, teacher, mask=mask, backend="cpp"), [student])
    h_batch, h_width, classes = (32, 128, 3) if quick else (256, 768, 3)
    h_teacher, h_student = torch.randn(h_batch, h_width), torch.randn(h_batch, h_width, requires_grad=True)
    weight = (torch.randn(classes, h_width) / h_width ** 0.5).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    labels = torch.randint(0, classes, (h_batch,))
    found[f"meta-teacher B={h_batch} H={h_width}"] = (
        lambda: mpdistil_fast.meta_teacher_loss(h_teacher, h_student, weight, bias, labels, mode="competitive",
                                                backend="cpp"), [h_student, weight, bias])
    return found


def worker(quick: bool, reps: int) -> None:
    """Time every case with the build this process loaded; print {"isa", "losses", "samples"} as JSON."""
    build = backends.cpu_kernel_build()
    if build.error:
        raise SystemExit(build.error)
    losses, samples = {}, {}
    for label, (loss_fn, leaves) in cases(quick).items():
        losses[label] = loss_fn().item()
        fwd_bwd = lambda loss_fn=loss_fn, leaves=leaves: torch.autograd.grad(loss_fn(), leaves)  # noqa: E731
        samples[label] = harness.interleaved_timings({label: fwd_bwd}, reps=reps, warmup=2)[label]
    print(json.dumps({"isa": build.isa, "losses": losses, "samples": samples}))


def run_worker(isa: str, quick: bool, reps: int) -> dict:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa}
    command = [sys.executable, __file__, "--worker", "--reps", str(reps), *(["--quick"] if quick else [])]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {isa} worker failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["isa"] != isa:
        raise SystemExit(f"ATEN_CPU_CAPABILITY={isa} loaded the {report['isa']} build")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--rounds", type=harness.positive_int, default=4,
                        help="worker processes per build, alternating (default 4)")
    parser.add_argument("--reps", type=harness.positive_int, default=5,
                        help="timed calls per case in each worker (default 5)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.quick, args.reps)
    capability = torch.backends.cpu.get_cpu_capability()
    runnable = [isa for isa in backends.runnable_cpu_kernels(capability) if isa in SWITCHABLE_BUILDS]
    if not runnable:
        raise SystemExit(f"no avx2/avx512 CPU kernel build runs here (capability {capability}, built: "
                         f"{', '.join(backends.built_cpu_kernels()) or 'none'})")
    reports: dict[str, list[dict]] = {isa: [] for isa in runnable}
    schedule = [isa for round_index in range(args.rounds) for isa in (runnable[::-1] if round_index % 2 else runnable)]
    for isa in tqdm(schedule, desc="workers", unit="worker"):
        reports[isa].append(run_worker(isa, args.quick, args.reps))
    labels = list(reports[runnable[0]][0]["samples"])
    widest = runnable[0]
    rows = []
    for label in labels:
        reference = reports[widest][0]["losses"][label]
        tolerance = 1e-2 if "bf16" in label else 1e-5
        values = {isa: reports[isa][0]["losses"][label] for isa in runnable}
        agree = set(harness.agreeing(values, reference, tolerance, label, atol=1e-6))
        pooled = {isa: [s for report in reports[isa] for s in report["samples"][label]] for isa in runnable}
        medians = {isa: harness.quantiles(samples)[0] for isa, samples in pooled.items()}
        for isa in runnable:
            if isa not in agree:
                continue
            extra = f"{widest}/{isa} speed: {medians[isa] / medians[widest]:.2f}x" if isa != widest else ""
            rows.append(harness.make_row(NAME, isa, "full", "speed", label, pooled[isa], "ms", extra=extra))
    print(f"machine: {harness.machine_name('cpu')}, torch {torch.__version__}, capability {capability}; "
          f"{args.rounds} alternating workers per build x {args.reps} timed calls")
    harness.print_table(rows, ["x", "provider", "p50", "p20", "p80", "unit", "extra"])
    print(harness.write_csv(rows, NAME))
    print(harness.bar_plot(rows, NAME, "fused CPU kernels, forward+backward, per instruction-set build"))
    sys.exit(harness.exit_status())


if __name__ == "__main__":
    main()
