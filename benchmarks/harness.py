"""One benchmark harness for every op (after Liger-Kernel's): interleaved timing, medians, CSV rows, plots.

Rows have the columns of :data:`COLUMNS`; every script writes ``benchmarks/results/<name>.csv`` (replacing its
previous run; ``MPDISTIL_BENCH_RESULTS`` names another folder) and prints a table.  Providers are timed
*interleaved* (round-robin, one call each per round, after untimed warm-up rounds) so that machine drift hits all
of them alike; reported numbers are the median and the 20th/80th percentiles (p50, p20, p80, in ``unit``).
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

import mpdistil_fast
from mpdistil_fast import backends
from mpdistil_fast.backends import available_backends, machine_name

#: Where CSV and PNG files go: benchmarks/results, or MPDISTIL_BENCH_RESULTS (the smoke tests write elsewhere).
#: ``device`` names the machine (GPU, or CPU model and torch threads); ``version`` the software (library_versions).
RESULTS_DIR = Path(os.environ.get("MPDISTIL_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
COLUMNS = ("kernel_name", "provider", "mode", "metric", "x", "p50", "p20", "p80", "unit", "extra", "device", "version")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_timings(providers: Mapping[str, Callable[[], object]], *, device: torch.device | str = "cpu",
                        warmup: int = 3, reps: int = 20, min_time_s: float = 0.0) -> dict[str, list[float]]:
    """Milliseconds per call of each provider, measured round-robin ``reps`` times after ``warmup`` rounds.

    Rounds continue past ``reps`` until ``min_time_s`` seconds were spent, so short kernels get many samples.
    On CUDA each call is timed with a pair of CUDA events on the current stream (the device is synchronised
    before every call, so a call's time never includes another's queued work, and the wall clock's
    synchronisation cost stays out); on the CPU with ``time.perf_counter``.
    """
    device = torch.device(device)
    for _ in range(warmup):
        for fn in providers.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in providers}
    start = time.perf_counter()
    rounds = 0
    while rounds < reps or time.perf_counter() - start < min_time_s:
        for name, fn in providers.items():
            times[name].append(_time_call(fn, device))
        rounds += 1
    return times


def compiled_baseline(fn: Callable) -> Callable:
    """``torch.compile(fn)`` for the case about to be timed, with static shapes and empty compile caches.

    Dynamo keeps its compiled code on ``fn``'s code object, shared by every ``torch.compile(fn)``: without the reset,
    the second shape a script timed was a recompile, which torch's automatic dynamic shapes made with symbolic sizes
    (a generic kernel, not the one a user of that shape gets), and a long run could reach the recompile limit and
    fall back to eager without a word.  The compile itself is not timed (:func:`first_call_seconds`)."""
    torch.compiler.reset()
    return torch.compile(fn, dynamic=False)


def first_call_seconds(call: Callable[[], object], device: torch.device | str = "cpu") -> float | None:
    """Seconds the first ``call`` takes (for a torch.compile provider: its compilation), synchronised on a GPU; run
    before a provider's checks and timing, so that compile time never enters a timed sample.  None when it raises
    (the checks that follow report the provider)."""
    device = torch.device(device)
    _sync(device)
    start = time.perf_counter()
    try:
        call()
        _sync(device)
    except Exception:
        return None
    return time.perf_counter() - start


def both_modes(fn: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor]) -> Callable[[], None]:
    """A call of ``fn`` with its gradient, then one under ``no_grad``: the two graphs a torch.compile provider of the
    ``full`` and ``forward`` modes compiles (for :func:`first_call_seconds`)."""
    def call() -> None:
        torch.autograd.grad(fn(), leaves)
        with torch.no_grad():
            fn()
    return call


def compile_note(seconds: float | None) -> str:
    """The ``extra`` text of a torch.compile row: how long it compiled (left out of its timings)."""
    return "" if seconds is None else f"compile {seconds:.1f} s (first call, not timed)"


def _time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on a GPU, the wall clock on the CPU."""
    _sync(device)
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def cuda_kernels(fn: Callable[[], object], reps: int = 1) -> tuple[object, list]:
    """(the last call's result, the GPU kernels that ``reps`` calls of ``fn`` launched) from torch.profiler;
    memsets and copies are not kernels and are left out."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    result = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            result = fn()
        torch.cuda.synchronize()
    return result, [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA
                    and not event.name.startswith(("Memcpy", "Memset"))]


def cuda_kernel_profile(fn: Callable[[], object], reps: int = 1) -> tuple[int, float]:
    """(GPU kernels launched per call of ``fn``, milliseconds those kernels ran per call) over ``reps`` calls.
    Kernel time leaves out the host's launch overhead and idle gaps, which the wall-clock (CUDA event) timings
    include."""
    _, kernels = cuda_kernels(fn, reps)
    return len(kernels) // reps, sum(event.time_range.elapsed_us() for event in kernels) / 1e3 / reps


def fused_backends(op: str, device: torch.device | str, names: Sequence[str] = ("cpp", "triton", "cuda")) -> list[str]:
    """The backends among ``names`` that run ``op`` on ``device``.  Each one that cannot is printed with the reason
    (``skipped backend ...``), so a table without its rows says why instead of leaving them out silently."""
    device = torch.device(device)
    found = []
    for name, status in available_backends(op, device).items():
        if name not in names:
            continue
        if status.available:
            found.append(name)
        else:
            print(f"skipped backend {name} for {op} on {device.type}: {status.reason}")
    return found


#: Providers dropped by :func:`agreeing` in this process (a script exits non-zero when any was).
MISMATCHES: list[str] = []


def agreeing(values: Mapping[str, float], reference: float, rtol: float, label: str,
             atol: float = 0.0) -> list[str]:
    """Names of the providers whose loss matches ``reference`` within ``rtol`` (and ``atol``).

    The others are reported and recorded in :data:`MISMATCHES`, so one wrong backend does not stop the timing of
    the rest; a script ends with :func:`exit_status`.
    """
    kept = []
    for name, value in values.items():
        if abs(value - reference) <= rtol * abs(reference) + atol:
            kept.append(name)
        else:
            MISMATCHES.append(f"{label}: {name} computes {value!r}, the reference {reference!r}")
            print("MISMATCH", MISMATCHES[-1])
    return kept


def record_failure(label: str, name: str, error: Exception) -> None:
    """Report a provider whose call raised and record it in :data:`MISMATCHES`: the caller leaves it out and times
    the others (a backend that fails on this machine, say a kernel a GPU cannot launch, does not end the run)."""
    message = (str(error).strip().splitlines() or [""])[0][:300]
    MISMATCHES.append(f"{label}: {name} raised {type(error).__name__}: {message}")
    print("MISMATCH", MISMATCHES[-1])


def provider_values(losses: Mapping[str, Callable[[], torch.Tensor]], label: str) -> dict[str, float]:
    """The loss each provider computes; one that raises is reported (:func:`record_failure`) and left out."""
    values = {}
    for name, fn in losses.items():
        try:
            values[name] = fn().item()
        except Exception as error:  # any failure of one provider drops that provider alone
            record_failure(label, name, error)
    return values


def gradient_errors(losses: Mapping[str, Callable[[], torch.Tensor]], leaves: Sequence[torch.Tensor],
                    reference: str, label: str = "gradient") -> dict[str, float]:
    """Relative norm error of each provider's gradient with respect to ``leaves`` (all of them, concatenated)
    against the ``reference`` provider's: what :func:`agreeing` checks next to the loss (with ``atol``).  A provider
    whose backward raises is reported and left out."""
    def flat_gradient(loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(loss_fn(), leaves)])

    want = flat_gradient(losses[reference])
    errors = {}
    for name, fn in losses.items():
        try:
            errors[name] = ((flat_gradient(fn) - want).norm() / want.norm()).item()
        except Exception as error:
            record_failure(label, name, error)
    return errors


def exit_status() -> int:
    """1 when a provider computed a wrong loss (its rows are missing), else 0."""
    for line in MISMATCHES:
        print("MISMATCH", line)
    return 1 if MISMATCHES else 0


def quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


@functools.lru_cache(maxsize=None)
def _package_version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def library_versions(device: torch.device | str = "cpu") -> str:
    """The software a row was measured with, for its ``version`` column: torch (and CUDA on a GPU), mpdistil_fast
    with the CPU kernel build this process loaded (when it loaded one), Triton and Liger-Kernel when installed."""
    device = torch.device(device)
    parts = [f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if device.type == "cuda" else "")]
    package = f"mpdistil_fast {mpdistil_fast.__version__}"
    if backends.cpu_kernel_build.cache_info().currsize:  # only report a build, never load one (bench_cpu_builds)
        build = backends.cpu_kernel_build()
        package += f" ({build.isa} CPU kernels)" if build.isa else " (no CPU kernels loaded)"
    parts.append(package)
    parts += [f"{name} {version}" for name in ("triton", "liger-kernel") if (version := _package_version(name))]
    return "; ".join(parts)


def make_row(kernel_name: str, provider: str, mode: str, metric: str, x: str, samples: Sequence[float], unit: str,
             device: torch.device | str = "cpu", extra: str = "") -> dict[str, object]:
    p50, p20, p80 = quantiles(samples)
    return {"kernel_name": kernel_name, "provider": provider, "mode": mode, "metric": metric, "x": x,
            "p50": round(p50, 5), "p20": round(p20, 5), "p80": round(p80, 5), "unit": unit, "extra": extra,
            "device": machine_name(device), "version": library_versions(device)}


def write_csv(rows: Iterable[Mapping[str, object]], name: str) -> Path:
    """Write rows to ``RESULTS_DIR/<name>.csv`` (replacing an older run of the same script)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> None:
    """Print rows as an aligned text table."""
    widths = [max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def bar_values(rows: Sequence[Mapping[str, object]]) -> tuple[list[str], dict[str, list[float]]]:
    """(the x labels, {provider: its p50 at each x}) of ``rows``.  NaN where a provider has no row at an x (skipped
    there, or dropped by a check): matplotlib draws no bar, where a zero-height one read as the fastest."""
    xs = list(dict.fromkeys(str(r["x"]) for r in rows))
    providers = list(dict.fromkeys(str(r["provider"]) for r in rows))
    return xs, {provider: [next((float(r["p50"]) for r in rows if str(r["x"]) == x and r["provider"] == provider),
                                math.nan) for x in xs] for provider in providers}


def bar_plot(rows: Sequence[Mapping[str, object]], name: str, title: str, metric: str = "speed") -> Path:
    """Grouped bar chart of p50 per provider for each x, saved as ``RESULTS_DIR/<name>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["metric"] == metric]
    xs, bars = bar_values(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(xs) * max(1, len(bars)) / 2), 4))
    width = 0.8 / max(1, len(bars))
    for i, (provider, values) in enumerate(bars.items()):
        ax.bar([j + i * width for j in range(len(xs))], values, width, label=provider)
    ax.set_xticks([j + width * (len(bars) - 1) / 2 for j in range(len(xs))], xs, rotation=15, fontsize=8)
    quantity = "time per call" if metric == "speed" else metric
    ax.set_ylabel(f"{quantity} ({rows[0]['unit'] if rows else ''}), median; lower is better")
    ax.set_title(f"{title}\n{rows[0]['device'] if rows else ''}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def copy_bandwidth_gbps(nbytes: int, device: torch.device | str, reps: int = 20) -> float:
    """Measured device-to-device copy bandwidth (GB/s, bytes read + written) for a buffer of ``nbytes``.

    The reference for "fraction of copy bandwidth" targets of memory-bound kernels.
    """
    device = torch.device(device)
    src = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    samples = interleaved_timings({"copy": lambda: dst.copy_(src)}, device=device, warmup=3, reps=reps)["copy"]
    return 2 * src.numel() * 4 / 1e9 / (quantiles(samples)[0] / 1e3)


def threads_note() -> str:
    return f"torch threads={torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def print_speedups(rows: Sequence[Mapping[str, object]], fused: Sequence[str],
                   baselines: Sequence[str] = ("torch.compile", "eager")) -> None:
    """Per mode and x: median of each baseline provider / median of the fastest of the ``fused`` providers."""
    for mode in dict.fromkeys(str(r["mode"]) for r in rows):
        for x in dict.fromkeys(str(r["x"]) for r in rows if r["mode"] == mode):
            p50 = {r["provider"]: float(r["p50"]) for r in rows if r["mode"] == mode and r["x"] == x}
            if not any(name in p50 for name in fused):
                print(f"{mode:8s} {x:24s} no fused provider ran (see the skipped / MISMATCH lines)")
                continue
            best = min(p50[name] for name in fused if name in p50)
            ratios = ", ".join(f"over {b}: {p50[b] / best:.2f}x" for b in baselines if b in p50)
            print(f"{mode:8s} {x:24s} fused speed-up {ratios}")


def positive_int(text: str) -> int:
    """argparse type of ``--reps`` and its like: a whole number >= 1 (zero timed rounds leave no median to report)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def bench_arguments(doc: str, quick_help: str, reps: int, quick_reps: int = 3,
                    argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, torch.device]:
    """Command line of a benchmark script (``--quick``, ``--reps``, ``--no-compile``) and the device it runs on
    (CUDA when present).  ``--reps`` defaults to ``reps``, or ``quick_reps`` with ``--quick``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{quick_help} (--reps defaults to {quick_reps})")
    parser.add_argument("--reps", type=positive_int, default=None,
                        help=f"timed interleaved rounds per case (default {reps}; {quick_reps} with --quick)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile baseline (it compiles for tens of seconds per shape)")
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = quick_reps if args.quick else reps
    return args, torch.device("cuda" if torch.cuda.is_available() else "cpu")
