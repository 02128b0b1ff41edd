"""Per-call host (Python) overhead of the public fused ops: microseconds per call at tiny shapes, where the
kernels take a few microseconds and the rest is argument checks, backend choice, autograd.Function bookkeeping and
the reductions written in torch.

    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py [--rounds 4] [--reps 400] [--threads 1]
                                                          [--cases kl,reverse,jsd,kl_mask,hidden_mse,meta_teacher]
                                                          [--baseline-ref <git-ref>]

Cases: ``kd_kl_div`` on [8, 128] fp32 logits (forward KL, reverse KL, JSD beta = 0.5, forward KL with a row mask),
``hidden_mse`` on [4, 8, 32] fp32 states, ``meta_teacher_loss`` (collaborative, linear D) on [8, 32] fp32
representations with 3 labels.  Each is timed with the student (and the meta-teacher's parameters) requiring grad,
in two modes: ``forward`` (the loss only, with grad enabled, as in a training step) and ``full`` (forward and
``torch.autograd.grad``).  Providers: ``mpdistil`` (the public op, ``backend="auto"``: the cpp kernels here),
``torch_backend`` (the same public op with ``backend="torch"``) and ``eager`` (the plain torch formula, e.g.
``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True, reduction="batchmean") * T^2``).

Every provider is timed in worker processes (``--threads`` torch threads, 1 by default), interleaved round-robin
within a worker (benchmarks/harness.py), the medians pooling ``--rounds`` workers.  With ``--baseline-ref REF`` the
package as committed at REF (``git archive``, with this checkout's built extension libraries linked in: the C++
kernels must be the same) is timed too, as provider ``mpdistil@REF``, in workers that alternate with the current
tree's; its losses and gradients must be bitwise those of the current tree (a mismatch is reported and the script
exits non-zero).  Every provider's loss and gradient are checked against the eager formula (relative 1e-4).
Results go to benchmarks/results/overhead.csv (unit: microseconds).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
#: A worker imports mpdistil_fast from this folder (a baseline's package) instead of the checkout's.
SOURCE_ENV = "MPDISTIL_OVERHEAD_SOURCE"
sys.path.insert(0, str(ROOT))
if os.environ.get(SOURCE_ENV):  # (only mpdistil_fast/ is there: benchmarks/ still comes from this checkout)
    sys.path.insert(0, os.environ[SOURCE_ENV])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.bench_kd_kl_div import BETA, TEMPERATURE, choice_list, eager_jsd, eager_loss  # noqa: E402

NAME = "overhead"
CASES = ("kl", "reverse", "jsd", "kl_mask", "hidden_mse", "meta_teacher")
MODES = ("forward", "full")
LOGITS_SHAPE = (8, 128)
HIDDEN_SHAPE = (4, 8, 32)
META_BATCH, META_WIDTH, META_CLASSES = 8, 32, 3
#: Relative error of a provider's loss and gradient (norm) against the eager formula's.
RTOL = 1e-4


def eager_reverse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(p_s || p_t), batchmean, times T^2, with torch ops."""
    return F.kl_div(F.log_softmax(teacher / TEMPERATURE, dim=-1), F.log_softmax(student / TEMPERATURE, dim=-1),
                    reduction="batchmean", log_target=True) * TEMPERATURE ** 2


def eager_masked(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward KL summed over the rows ``mask`` keeps, over their number, times T^2, with torch ops."""
    rows = F.kl_div(F.log_softmax(student / TEMPERATURE, dim=-1), F.log_softmax(teacher / TEMPERATURE, dim=-1),
                    reduction="none", log_target=True).sum(-1)
    return torch.where(mask, rows, 0.0).sum() / mask.sum().clamp(min=1) * TEMPERATURE ** 2


def eager_meta_teacher(h_teacher, h_student, weight, bias, labels) -> torch.Tensor:
    """The collaborative meta-teacher loss of a linear D, with torch ops."""
    return 0.5 * F.cross_entropy(F.linear(h_teacher, weight, bias), labels) + 0.5 * F.cross_entropy(
        F.linear(h_student, weight, bias), labels)


Case = tuple[str, dict[str, Callable[[], torch.Tensor]], list[torch.Tensor]]


def make_case(name: str) -> Case:
    """(label, {provider: the loss on seeded inputs}, the leaves the gradient is taken for)."""
    import mpdistil_fast

    torch.manual_seed(0)
    if name in ("kl", "reverse", "jsd", "kl_mask"):
        student = torch.randn(*LOGITS_SHAPE, requires_grad=True)
        teacher = torch.randn(*LOGITS_SHAPE)
        mask = torch.arange(LOGITS_SHAPE[0]) % 4 != 3
        options, eager = {
            "kl": ({}, lambda: eager_loss(student, teacher)),
            "reverse": ({"direction": "reverse"}, lambda: eager_reverse(student, teacher)),
            "jsd": ({"direction": "jsd", "beta": BETA}, lambda: eager_jsd(student, teacher)),
            "kl_mask": ({"mask": mask}, lambda: eager_masked(student, teacher, mask)),
        }[name]
        label = f"kd_kl_div {name} {list(LOGITS_SHAPE)}"
        return label, {
            "mpdistil": lambda: mpdistil_fast.kd_kl_div(student, teacher, TEMPERATURE, **options),
            "torch_backend": lambda: mpdistil_fast.kd_kl_div(student, teacher, TEMPERATURE, backend="torch",
                                                             **options),
            "eager": eager}, [student]
    if name == "hidden_mse":
        student = torch.randn(*HIDDEN_SHAPE, requires_grad=True)
        teacher = torch.randn(*HIDDEN_SHAPE)
        return f"hidden_mse {list(HIDDEN_SHAPE)}", {
            "mpdistil": lambda: mpdistil_fast.hidden_mse(student, teacher),
            "torch_backend": lambda: mpdistil_fast.hidden_mse(student, teacher, backend="torch"),
            "eager": lambda: F.mse_loss(student, teacher)}, [student]
    if name == "meta_teacher":
        h_teacher = torch.randn(META_BATCH, META_WIDTH)
        h_student = torch.randn(META_BATCH, META_WIDTH, requires_grad=True)
        weight = (torch.randn(META_CLASSES, META_WIDTH) / META_WIDTH ** 0.5).requires_grad_()
        bias = torch.zeros(META_CLASSES, requires_grad=True)
        labels = torch.randint(0, META_CLASSES, (META_BATCH,))
        args = (h_teacher, h_student, weight, bias, labels)
        return f"meta_teacher_loss [{META_BATCH}, {META_WIDTH}] K={META_CLASSES}", {
            "mpdistil": lambda: mpdistil_fast.meta_teacher_loss(*args),
            "torch_backend": lambda: mpdistil_fast.meta_teacher_loss(*args, backend="torch"),
            "eager": lambda: eager_meta_teacher(*args)}, [h_student, weight, bias]
    raise ValueError(f"unknown case {name!r}")


def fingerprint(loss_fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> dict[str, object]:
    """The loss (exact, as float.hex) and the gradient's bytes (sha256) of one call, with the float values for the
    tolerance check."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, leaves)
    flat = torch.cat([g.detach().reshape(-1).double() for g in grads])
    digest = hashlib.sha256(b"".join(g.detach().contiguous().numpy().tobytes() for g in grads)).hexdigest()
    return {"loss": loss.item(), "loss_hex": loss.double().item().hex(), "grad_sha256": digest,
            "grad": flat.tolist()}


def worker(case_names: list[str], reps: int, threads: int, providers: list[str] | None) -> dict:
    """Time every case and mode (interleaved over the providers) in this process; return samples (us) and
    fingerprints."""
    torch.set_num_threads(threads)
    report: dict[str, dict] = {"samples": {}, "checks": {}}
    for name in case_names:
        label, losses, leaves = make_case(name)
        if providers is not None:
            losses = {k: v for k, v in losses.items() if k in providers}
        report["checks"][label] = {k: fingerprint(fn, leaves) for k, fn in losses.items()}
        for mode in MODES:
            calls = {k: (fn if mode == "forward" else
                         lambda fn=fn: torch.autograd.grad(fn(), leaves)) for k, fn in losses.items()}
            times = harness.interleaved_timings(calls, warmup=max(20, reps // 10), reps=reps)
            report["samples"][f"{mode}|{label}"] = {k: [t * 1e3 for t in v] for k, v in times.items()}
    return report


def run_worker(args: argparse.Namespace, provider: str, source: Path | None) -> dict:
    """One worker process timing ``provider`` (of the current checkout, or the package in ``source``); its JSON
    report."""
    env = {key: value for key, value in os.environ.items() if key not in (SOURCE_ENV, "TRITON_INTERPRET")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    if source is not None:
        env[SOURCE_ENV] = str(source)
    command = [sys.executable, __file__, "--worker", "--reps", str(args.reps), "--threads", str(args.threads),
               "--cases", ",".join(args.cases), "--providers", provider]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"a worker ({provider}, {source or 'this checkout'}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def export_baseline(ref: str, into: Path) -> Path:
    """``mpdistil_fast/`` as committed at ``ref`` under ``into``, with this checkout's built extension libraries
    (``*.so``, not in git) linked in; returns the folder to put on ``sys.path``."""
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "mpdistil_fast"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    package = ROOT / "mpdistil_fast"
    for library in package.iterdir():
        if library.suffix in (".so", ".pyd") and not (into / "mpdistil_fast" / library.name).exists():
            (into / "mpdistil_fast" / library.name).symlink_to(library)
    return into


def git_commit(ref: str) -> str:
    """argparse type of --baseline-ref: a ref naming a commit of this repository (its short hash is returned)."""
    result = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "--short", f"{ref}^{{commit}}"], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        raise argparse.ArgumentTypeError(f"not a commit of this repository: {ref!r}")
    return result.stdout.strip()


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=harness.positive_int, default=4,
                        help="worker processes per provider set, alternating with the baseline's (default 4)")
    parser.add_argument("--reps", type=harness.positive_int, default=400,
                        help="timed interleaved rounds per case and mode in each worker (default 400)")
    parser.add_argument("--threads", type=harness.positive_int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cases", type=choice_list(CASES), default=list(CASES),
                        help=f"comma-separated, of {', '.join(CASES)} (default all)")
    parser.add_argument("--baseline-ref", type=git_commit, default=None,
                        help="also time mpdistil_fast as committed at this git ref (provider mpdistil@REF)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--providers", type=choice_list(("mpdistil", "torch_backend", "eager")), default=None,
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_reports(checks_by_label: dict[str, dict[str, dict]], baseline: str | None) -> None:
    """Each provider's loss and gradient against the eager formula's (RTOL); the baseline's (provider ``baseline``)
    bitwise against the current tree's fused op.  Failures go to harness.MISMATCHES."""
    for label, checks in checks_by_label.items():
        reference = checks["eager"]
        want_grad = torch.tensor(reference["grad"], dtype=torch.float64)
        loss_errors = {k: abs(v["loss"] - reference["loss"]) / abs(reference["loss"]) / RTOL
                       for k, v in checks.items()}
        grad_errors = {k: ((torch.tensor(v["grad"], dtype=torch.float64) - want_grad).norm()
                           / want_grad.norm()).item() / RTOL for k, v in checks.items()}
        harness.agreeing(loss_errors, 0.0, 0.0, f"{label} loss error / tolerance", 1.0)
        harness.agreeing(grad_errors, 0.0, 0.0, f"{label} gradient error / tolerance", 1.0)
        if baseline is not None:
            ours, theirs = checks["mpdistil"], checks[baseline]
            for key in ("loss_hex", "grad_sha256"):
                if ours[key] != theirs[key]:
                    harness.MISMATCHES.append(f"{label}: {baseline} differs from this tree in {key}: "
                                              f"{theirs[key]} vs {ours[key]}")
                    print("MISMATCH", harness.MISMATCHES[-1])


def main() -> None:
    args = parse_arguments()
    if args.worker:
        print(json.dumps(worker(args.cases, args.reps, args.threads, args.providers)))
        return
    baseline = f"mpdistil@{args.baseline_ref}" if args.baseline_ref else None
    providers = ["mpdistil", *([baseline] if baseline else []), "torch_backend", "eager"]
    reports: dict[str, list[dict]] = {provider: [] for provider in providers}
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as folder:
        source = export_baseline(args.baseline_ref, Path(folder)) if baseline else None
        for round_index in range(args.rounds):
            for provider in (providers[::-1] if round_index % 2 else providers):
                own = "mpdistil" if provider == baseline else provider
                report = run_worker(args, own, source if provider == baseline else None)
                report["samples"] = {key: {provider: times[own]} for key, times in report["samples"].items()}
                report["checks"] = {label: {provider: checks[own]} for label, checks in report["checks"].items()}
                reports[provider].append(report)
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    check_reports({label: {provider: reports[provider][0]["checks"][label][provider] for provider in providers}
                   for label in reports["mpdistil"][0]["checks"]}, baseline)
    torch.set_num_threads(args.threads)  # the rows' device column names the thread count the workers used
    rows = []
    for key in reports["mpdistil"][0]["samples"]:
        mode, label = key.split("|", 1)
        pooled = {provider: [sample for report in reports[provider] for sample in report["samples"][key][provider]]
                  for provider in providers}
        medians = {k: harness.quantiles(v)[0] for k, v in pooled.items()}
        for provider, samples in pooled.items():
            extra = [f"{other}/this={medians[other] / medians[provider]:.2f}x" for other in medians
                     if other != provider and (provider == "mpdistil" or other == "mpdistil")]
            extra.append(f"threads={args.threads}; {args.rounds} workers x {args.reps} calls")
            rows.append(harness.make_row(NAME, provider, mode, "speed", label, samples, "us", extra="; ".join(extra)))
    harness.print_table(rows, ["x", "mode", "provider", "p50", "p20", "p80", "unit", "extra"])
    print(f"machine: {rows[0]['device']}; {rows[0]['version']}")
    print(harness.write_csv(rows, NAME))
    sys.exit(harness.exit_status())


if __name__ == "__main__":
    main()
