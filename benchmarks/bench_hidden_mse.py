"""Hidden-state MSE benchmark: fused op (cpp on CPU; triton and cuda on a GPU) against eager torch and
torch.compile of the same formula, on a [6, 32, 128, 768] teacher stack, with and without projection and mask.

The baseline is the loss as one writes it in torch: ``((s @ W.T + b - t)^2 * mask).sum() / (valid * H * L)``.
The mask keeps a random length between S/4 and S per sequence (about 60% of the tokens, like padded GLUE batches).
Modes: ``forward`` (loss only) and ``full`` (loss + gradients of the student states and projection).  Rows go to
``benchmarks/results/hidden_mse.csv`` and ``hidden_mse.png``; without projection the table also gives the
achieved GB/s of the minimum traffic (reading both stacks once, with a mask only their valid tokens and the mask,
plus writing the whole student gradient in ``full``; :func:`minimum_traffic_bytes`),
and on a GPU its fraction of the measured device-to-device copy bandwidth, from the wall clock and from the summed
run time of the kernels (torch.profiler; without the host's launch overhead).  torch.compile compiles each case
anew with static shapes; its compile time (the first calls, before the checks) is not in the timings and is given
in its rows' ``extra`` column.

    OMP_NUM_THREADS=2 python benchmarks/bench_hidden_mse.py [--quick] [--reps 10] [--no-compile]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
import mpdistil_fast  # noqa: E402

NAME = "hidden_mse"


def eager_hidden_mse(student, teacher, weight, bias, mask):
    """The hint loss as written in plain torch (the eager / torch.compile baseline)."""
    projected = student if weight is None else torch.nn.functional.linear(student, weight, bias)
    squared = (projected - teacher).square()
    if mask is None:
        return squared.mean()
    squared = squared * mask[None, :, :, None]
    return squared.sum() / (mask.sum() * teacher.shape[-1] * teacher.shape[0])


def minimum_traffic_bytes(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, mode: str) -> int:
    """Bytes a fused hidden MSE without projection moves at the least: it reads both [L, B, S, H] stacks once, with a
    [B, S] mask only their valid tokens (and the mask), and in ``full`` mode also writes the whole student gradient
    (padding included: the gradient is a dense tensor)."""
    if mask is None:
        moved = student.numel() * student.element_size() + teacher.numel() * teacher.element_size()
    else:
        valid = int(mask.sum()) * student.shape[0]  # valid (layer, token) rows
        moved = (valid * (student.shape[-1] * student.element_size() + teacher.shape[-1] * teacher.element_size())
                 + mask.numel() * mask.element_size())
    if mode == "full":
        moved += student.numel() * student.element_size()
    return moved


def padding_mask(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    lengths = torch.randint(seq // 4, seq + 1, (batch,), device=device)
    return torch.arange(seq, device=device)[None, :] < lengths[:, None]


def main() -> None:
    args, device = harness.bench_arguments(__doc__, "small shapes, few repetitions (smoke test)", reps=10)
    torch.manual_seed(0)
    layers, batch, seq, width = (2, 4, 32, 128) if args.quick else (6, 32, 128, 768)
    fused = harness.fused_backends("hidden_mse", device)  # prints the reason of each one that cannot run here
    rows = []
    copy_gbps = harness.copy_bandwidth_gbps(2 * layers * batch * seq * width * 4, device) \
        if device.type == "cuda" else None
    for projection in (False, True):
        for masked in (False, True):
            student_width = width // 2 if projection else width
            student = torch.randn(layers, batch, seq, student_width, device=device, requires_grad=True)
            teacher = torch.randn(layers, batch, seq, width, device=device)
            weight = (torch.randn(width, student_width, device=device) / student_width ** 0.5).requires_grad_() \
                if projection else None
            bias = torch.randn(width, device=device, requires_grad=True) if projection else None
            mask = padding_mask(batch, seq, device) if masked else None
            leaves = [t for t in (student, weight, bias) if t is not None]
            label = f"{'proj ' if projection else ''}{'mask' if masked else 'no mask'}"

            def fused_loss(backend):
                return lambda: mpdistil_fast.hidden_mse(student, teacher, mask=mask,
                                                        projection=None if weight is None else (weight, bias),
                                                        backend=backend)

            # this case's own static-shape compile; its compile time is measured apart and left out of the timings
            compiled_eager = None if args.no_compile else harness.compiled_baseline(eager_hidden_mse)
            losses = {"eager": lambda: eager_hidden_mse(student, teacher, weight, bias, mask),
                      **({} if args.no_compile else
                         {"torch.compile": lambda: compiled_eager(student, teacher, weight, bias, mask)}),
                      **{name: fused_loss(name) for name in fused}}
            compile_s = (harness.first_call_seconds(harness.both_modes(losses["torch.compile"], leaves), device)
                         if "torch.compile" in losses else None)
            values = harness.provider_values(losses, label)  # every provider computes the same loss (one that
            losses = {name: fn for name, fn in losses.items() if name in values}  # raises is reported, dropped)
            errors = harness.gradient_errors(losses, leaves, "eager", f"{label} gradient")  # ... and gradients
            kept = (set(harness.agreeing(values, values["eager"], 1e-4, label))
                    & set(harness.agreeing(errors, 0.0, 0.0, f"{label} gradient error", atol=1e-4)))
            losses = {name: fn for name, fn in losses.items() if name in kept}
            for mode in ("forward", "full"):
                providers = {name: (fn if mode == "forward" else
                                    (lambda fn=fn: torch.autograd.grad(fn(), leaves)))
                             for name, fn in losses.items()}
                with torch.no_grad() if mode == "forward" else torch.enable_grad():
                    times = harness.interleaved_timings(providers, device=device, warmup=2, reps=args.reps)
                for name, samples in times.items():
                    extra = ""
                    if not projection:  # minimum traffic: read both stacks (+ write the student gradient)
                        gbytes = minimum_traffic_bytes(student, teacher, mask, mode) / 1e9
                        gbps = gbytes / (harness.quantiles(samples)[0] / 1e3)
                        extra = f"{gbps:.1f} GB/s" + (f"; of_copy_bw={gbps / copy_gbps:.0%}" if copy_gbps else "")
                        if copy_gbps:
                            with torch.no_grad() if mode == "forward" else torch.enable_grad():
                                launches, kernel_ms = harness.cuda_kernel_profile(providers[name], reps=3)
                            kernel_gbps = gbytes / (kernel_ms / 1e3)
                            extra += (f"; kernels={launches} taking {kernel_ms:.3f} ms = {kernel_gbps:.0f} GB/s = "
                                      f"{kernel_gbps / copy_gbps:.0%} of copy")
                    if name == "torch.compile" and compile_s is not None:
                        extra = "; ".join(part for part in (extra, harness.compile_note(compile_s)) if part)
                    rows.append(harness.make_row(NAME, name, mode, "speed", label, samples, "ms", device, extra))
            harness.write_csv(rows, NAME)  # after every case: a run stopped by a time limit keeps what it measured
    path = harness.write_csv(rows, NAME)
    harness.bar_plot([r for r in rows if r["mode"] == "full"], NAME,
                     f"hidden MSE [{layers},{batch},{seq},{width}] forward+backward")
    harness.print_table(rows, ("provider", "mode", "x", "p50", "p20", "p80", "unit", "extra"))
    harness.print_speedups(rows, fused)
    print(f"{harness.machine_name(device)}; {harness.threads_note()}; {harness.library_versions(device)}; wrote {path}")


if __name__ == "__main__":
    main()
    sys.exit(harness.exit_status())
