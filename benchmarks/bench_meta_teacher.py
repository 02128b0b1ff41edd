"""Meta-teacher (MPDistil discriminator) benchmark: the fused loss (cpp on CPU; triton and cuda on a GPU) against
eager torch and torch.compile of the same formula, for batches of 32 and 256 pooled states of width 768 and 1536.

The baseline is the competitive loss as one writes it in torch (two ``F.linear``, ``F.cross_entropy``, softmax
gather).  The fused provider is the public ``mpdistil_fast.meta_teacher_loss`` (argument checks included).
Modes: ``forward`` and ``full`` (loss + gradients of the discriminator parameters and of h_student).  D is the
linear discriminator over K = 3 labels; ``+mlp1024`` rows use Linear(H, 1024) -> GELU -> Linear(1024, 3).
On a GPU each row also gives the GPU kernels one forward and one backward launch and their summed run time
(torch.profiler).  Rows go to ``benchmarks/results/meta_teacher.csv`` and ``meta_teacher.png``.  Each mode times
at least ``--reps`` rounds and goes on for 0.5 s (not with ``--quick``), so short calls get many samples.
torch.compile compiles each configuration anew with static shapes; its compile time (the first calls, before the
checks) is not in the timings and is given in its rows' ``extra`` column.

    OMP_NUM_THREADS=2 python benchmarks/bench_meta_teacher.py [--quick] [--reps 50] [--no-compile]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
import mpdistil_fast  # noqa: E402

NAME = "meta_teacher"
CLASSES = 3


def eager_meta_teacher(h_teacher, h_student, w1, b1, w2, b2, labels):
    """The competitive meta-teacher loss written in plain torch (the eager / torch.compile baseline)."""
    def discriminator(h):
        out = F.linear(h, w1, b1)
        return out if w2 is None else F.linear(F.gelu(out), w2, b2)

    z_t, z_s = discriminator(h_teacher), discriminator(h_student)
    gold = lambda z: z.softmax(-1).gather(1, labels[:, None]).mean()  # noqa: E731
    return F.cross_entropy(z_t, labels) - gold(z_t) + gold(z_s)


def kernel_profile(loss_fn, leaves) -> str:
    """GPU kernels launched, and their time in microseconds, by the forward (autograd recording) and by the
    backward of one loss call."""
    forward = harness.cuda_kernel_profile(loss_fn, reps=5)
    loss = loss_fn()
    grad_output = torch.ones_like(loss)
    backward = harness.cuda_kernel_profile(
        lambda: torch.autograd.grad(loss, leaves, grad_output, retain_graph=True), reps=5)
    return (f"kernels fwd/bwd={forward[0]}/{backward[0]}, "
            f"kernel time fwd/bwd={forward[1] * 1e3:.1f}/{backward[1] * 1e3:.1f} us")


def main() -> None:
    args, device = harness.bench_arguments(__doc__, "two small configurations, few repetitions", reps=50)
    torch.manual_seed(0)
    fused = harness.fused_backends("meta_teacher_loss", device)  # prints the reason of each one that cannot run here
    configs = [(32, 768, None), (256, 768, None), (32, 1536, None), (256, 1536, None), (256, 768, 1024)]
    if args.quick:
        configs = configs[:2]
    rows = []
    for batch, width, hidden in configs:
        h_t = torch.randn(batch, width, device=device)
        h_s = torch.randn(batch, width, device=device, requires_grad=True)
        labels = torch.randint(0, CLASSES, (batch,), device=device)
        first = hidden or CLASSES
        w1 = (torch.randn(first, width, device=device) / width ** 0.5).requires_grad_()
        b1 = torch.zeros(first, device=device, requires_grad=True)
        w2 = (torch.randn(CLASSES, hidden, device=device) / hidden ** 0.5).requires_grad_() if hidden else None
        b2 = torch.zeros(CLASSES, device=device, requires_grad=True) if hidden else None
        leaves = [t for t in (h_s, w1, b1, w2, b2) if t is not None]
        weight, bias = (w1, b1) if hidden is None else ((w1, w2), (b1, b2))
        label = f"B={batch} H={width}{' +mlp1024' if hidden else ''}"

        def fused_loss(backend):
            return lambda: mpdistil_fast.meta_teacher_loss(h_t, h_s, weight, bias, labels, mode="competitive",
                                                           hidden=hidden, backend=backend)

        # this case's own static-shape compile; its compile time is measured apart and left out of the timings
        compiled_eager = None if args.no_compile else harness.compiled_baseline(eager_meta_teacher)
        losses = {"eager": lambda: eager_meta_teacher(h_t, h_s, w1, b1, w2, b2, labels),
                  **({} if args.no_compile else
                     {"torch.compile": lambda: compiled_eager(h_t, h_s, w1, b1, w2, b2, labels)}),
                  **{name: fused_loss(name) for name in fused}}
        compile_s = (harness.first_call_seconds(harness.both_modes(losses["torch.compile"], leaves), device)
                     if "torch.compile" in losses else None)
        values = harness.provider_values(losses, label)  # every provider computes the same loss (one that
        losses = {name: fn for name, fn in losses.items() if name in values}  # raises is reported, dropped)
        errors = harness.gradient_errors(losses, leaves, "eager", f"{label} gradient")  # ... and gradients
        kept = (set(harness.agreeing(values, values["eager"], 1e-4, label, atol=1e-4))
                & set(harness.agreeing(errors, 0.0, 0.0, f"{label} gradient error", atol=1e-4)))
        losses = {name: fn for name, fn in losses.items() if name in kept}
        profiles = {name: kernel_profile(fn, leaves) for name, fn in losses.items()} if device.type == "cuda" else {}
        for mode in ("forward", "full"):
            providers = {name: (fn if mode == "forward" else (lambda fn=fn: torch.autograd.grad(fn(), leaves)))
                         for name, fn in losses.items()}
            with torch.no_grad() if mode == "forward" else torch.enable_grad():
                times = harness.interleaved_timings(providers, device=device, warmup=5, reps=args.reps,
                                                    min_time_s=0.0 if args.quick else 0.5)
            for name, samples in times.items():
                extra = profiles.get(name, "")
                if name == "torch.compile" and compile_s is not None:
                    extra = "; ".join(part for part in (extra, harness.compile_note(compile_s)) if part)
                rows.append(harness.make_row(NAME, name, mode, "speed", label, [t * 1e3 for t in samples], "us",
                                             device, extra))
        harness.write_csv(rows, NAME)  # after every case: a run stopped by a time limit keeps what it measured
    path = harness.write_csv(rows, NAME)
    harness.bar_plot([r for r in rows if r["mode"] == "full"], NAME, "meta-teacher loss forward+backward")
    harness.print_table(rows, ("provider", "mode", "x", "p50", "p20", "p80", "unit", "extra"))
    harness.print_speedups(rows, fused)
    print(f"{harness.machine_name(device)}; {harness.threads_note()}; {harness.library_versions(device)}; wrote {path}")


if __name__ == "__main__":
    main()
    sys.exit(harness.exit_status())
