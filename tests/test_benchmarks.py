"""Smoke runs of the kernel benchmarks on tiny shapes, so the scripts the README's numbers come from keep working:
each must finish, check that every provider computes the same loss (the KD one: and gradient), and write its
CSV and plot (to a temporary directory: benchmarks/results keeps the committed runs)."""
from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SMOKE_RUNS = {
    "kd_kl_div": ["benchmarks/bench_kd_kl_div.py", "--reps", "1", "--shapes", "8x100", "--dtypes", "float32,bfloat16"],
    "hidden_mse": ["benchmarks/bench_hidden_mse.py", "--quick", "--reps", "1"],
    "meta_teacher": ["benchmarks/bench_meta_teacher.py", "--quick", "--reps", "1"],
}


@pytest.mark.parametrize("name", list(SMOKE_RUNS))
def test_benchmark_script_runs(name, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # CPU providers only
    env.update(MPDISTIL_BENCH_RESULTS=str(tmp_path), OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, *SMOKE_RUNS[name]], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / f"{name}.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    providers = {row["provider"] for row in rows}
    assert {"cpp", "mpdistil_cpp"} & providers and len(providers) >= 3, providers
    assert all(float(row["p50"]) > 0 for row in rows)
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    # torch.compile's compile time is measured apart (left out of its timings) and stated in its rows
    compiled = [row for row in rows if row["provider"] in ("torch.compile", "torch_compile")]
    assert compiled and all(re.search(r"compile \d+\.\d s \(first call, not timed\)", row["extra"]) for row in compiled)
    if name == "kd_kl_div":  # both losses, both dtypes
        assert {row["x"] for row in rows} == {"[8, 100] float32", "[8, 100] bfloat16", "[8, 100] float32 JSD",
                                              "[8, 100] bfloat16 JSD"}


def test_kd_benchmark_drops_a_provider_with_a_wrong_gradient(monkeypatch):
    """The KD benchmark checks the gradient each provider times, not only its loss: a provider whose loss is right
    but whose student gradient is off is reported and left out."""
    from benchmarks import harness
    from benchmarks.bench_kd_kl_div import agreeing_losses, eager_loss

    monkeypatch.setattr(harness, "MISMATCHES", [])
    same_loss_wrong_grad = lambda s, t: eager_loss(s, t) - (s.sum() - s.sum().detach()) * 1e-3  # noqa: E731
    student, teacher = torch.randn(4, 50, dtype=torch.float32), torch.randn(4, 50, dtype=torch.float32)
    kept = agreeing_losses({"torch_eager": eager_loss, "right": eager_loss, "wrong": same_loss_wrong_grad},
                           student, teacher, "[4, 50] float32")
    assert set(kept) == {"torch_eager", "right"}
    assert len(harness.MISMATCHES) == 1 and "wrong" in harness.MISMATCHES[0] and "gradient" in harness.MISMATCHES[0]


def test_gradient_errors_flag_a_provider_whose_gradient_is_off():
    """harness.gradient_errors (the hidden-MSE and meta-teacher benchmarks' gradient check) compares every leaf."""
    from benchmarks import harness

    x, w = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    losses = {"eager": lambda: (x * w).sum(),
              "same": lambda: (w * x).sum(),
              "w_off": lambda: (x * w).sum() + 1e-2 * (w.sum() - w.sum().detach())}
    errors = harness.gradient_errors(losses, [x, w], "eager")
    assert errors["eager"] == 0.0 and errors["same"] < 1e-12 and errors["w_off"] > 1e-3


def test_cpu_build_benchmark_times_every_build_that_runs_here(tmp_path):
    """bench_cpu_builds.py: one row per case and CPU kernel build this CPU runs (each timed in its own worker)."""
    from mpdistil_fast import backends

    runnable = set(backends.runnable_cpu_kernels()) & {"avx2", "avx512"}
    if not runnable:
        pytest.skip("no avx2/avx512 CPU kernel build here")
    env = {**os.environ, "MPDISTIL_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "benchmarks/bench_cpu_builds.py", "--quick", "--rounds", "2", "--reps",
                             "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (tmp_path / "cpu_builds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    cases = {row["x"] for row in rows}
    assert len(cases) == 6 and {row["provider"] for row in rows} == runnable
    assert len(rows) == len(cases) * len(runnable) and all(float(row["p50"]) > 0 for row in rows)


@pytest.mark.parametrize("argv, message", [
    (["--reps", "0"], "--reps: expected a whole number >= 1, got 0"),
    (["--reps", "many"], "--reps: expected a whole number >= 1, got 'many'"),
    (["--shapes", "2048x"], "--shapes: expected comma-separated ROWSxVOCAB"),
    (["--shapes", "8x0"], "--shapes: expected comma-separated ROWSxVOCAB"),
    (["--dtypes", "float32,int64"], "--dtypes: takes a comma-separated list of float32, bfloat16, float16, float64; "
                                    "got 'int64'"),
    (["--losses", "kl,kld"], "--losses: takes a comma-separated list of kl, jsd; got 'kld'"),
])
def test_kd_benchmark_refuses_a_bad_flag_value_with_a_usage_error(argv, message, capsys):
    """A bad value is a usage error naming the flag (exit 2), not a traceback from deep in the run (--reps 0 used to
    end in statistics' 'must have at least one data point' after the whole run, --shapes 2048x in int(''))."""
    from benchmarks.bench_kd_kl_div import parse_arguments

    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_kd_benchmark_flags_parse_and_are_described(capsys):
    from benchmarks.bench_kd_kl_div import parse_arguments

    args = parse_arguments(["--shapes", "8x100, 4X50", "--dtypes", "bfloat16", "--losses", "jsd", "--reps", "3"])
    assert (args.shapes, args.dtypes, args.losses, args.reps) == ([(8, 100), (4, 50)], ["bfloat16"], ["jsd"], 3)
    with pytest.raises(SystemExit):
        parse_arguments(["--help"])
    text = capsys.readouterr().out
    # the whole description (the first line alone stopped mid-sentence), and what every flag takes
    assert 'generalized JSD with\n``direction="jsd"``' in text and "Results go to" in text
    for flag in (r"--reps REPS\s+timed", r"--shapes SHAPES\s+comma-separated ROWSxVOCAB", r"--dtypes DTYPES\s+comma"):
        assert re.search(flag, text), flag


def test_quick_benchmarks_take_few_repetitions_and_refuse_zero():
    """--quick promised 'few repetitions' but kept the full default (10 / 50 rounds): now it lowers the default."""
    from benchmarks import harness

    assert harness.bench_arguments("doc", "small", reps=50, argv=[])[0].reps == 50
    assert harness.bench_arguments("doc", "small", reps=50, argv=["--quick"])[0].reps == 3
    assert harness.bench_arguments("doc", "small", reps=50, argv=["--quick", "--reps", "7"])[0].reps == 7
    with pytest.raises(SystemExit):
        harness.bench_arguments("doc", "small", reps=50, argv=["--reps", "0"])


@pytest.mark.parametrize("name, command", [
    ("kd_kl_div", ["benchmarks/bench_kd_kl_div.py", "--reps", "1", "--shapes", "8x100", "--dtypes", "float32"]),
    ("hidden_mse", ["benchmarks/bench_hidden_mse.py", "--quick", "--reps", "1"]),
    ("meta_teacher", ["benchmarks/bench_meta_teacher.py", "--quick", "--reps", "1"]),
])
def test_benchmark_without_a_fused_backend_says_why_and_still_runs(name, command, tmp_path):
    """With no cpp kernels (ATEN_CPU_CAPABILITY=default: no build runs) every script still times the baseline, says
    which backend it skipped and why (it left the rows out without a word), and prints no 'nanx' speed-up."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(MPDISTIL_BENCH_RESULTS=str(tmp_path), OMP_NUM_THREADS="2", ATEN_CPU_CAPABILITY="default")
    result = subprocess.run([sys.executable, *command, "--no-compile"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"skipped backend cpp for \w+ on cpu: no CPU kernel build runs", result.stdout), result.stdout
    assert "nan" not in result.stdout.lower()
    with (tmp_path / f"{name}.csv").open() as handle:
        assert {row["provider"] for row in csv.DictReader(handle)} in ({"eager"}, {"torch_eager"})


def test_kd_benchmark_drops_a_provider_that_raises_and_times_the_rest(monkeypatch):
    """A backend that fails on the machine (a kernel the GPU cannot launch, say) is reported and left out: it used
    to end the whole run at its first case, losing every case after it."""
    from benchmarks import harness
    from benchmarks.bench_kd_kl_div import agreeing_losses, eager_loss

    monkeypatch.setattr(harness, "MISMATCHES", [])

    def broken(student, teacher):
        raise RuntimeError("no kernel image is available for execution on the device\nsecond line")

    student, teacher = torch.randn(4, 50), torch.randn(4, 50)
    kept = agreeing_losses({"torch_eager": eager_loss, "right": eager_loss, "broken": broken}, student, teacher, "case")
    assert set(kept) == {"torch_eager", "right"}
    assert harness.MISMATCHES == ["case: broken raised RuntimeError: no kernel image is available for execution on "
                                  "the device"]
    assert harness.exit_status() == 1


def test_provider_checks_drop_a_provider_whose_forward_or_backward_raises(monkeypatch):
    """The hidden-MSE and meta-teacher scripts' checks (harness.provider_values, harness.gradient_errors)."""
    from benchmarks import harness

    monkeypatch.setattr(harness, "MISMATCHES", [])
    x = torch.randn(6, requires_grad=True)

    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value):
            return value.sum()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("backward failed")

    def raises():
        raise ValueError("forward failed")

    losses = {"eager": lambda: x.square().sum(), "forward_fails": raises, "backward_fails": lambda: NoBackward.apply(x)}
    values = harness.provider_values(losses, "B=4")
    assert set(values) == {"eager", "backward_fails"}
    errors = harness.gradient_errors({name: losses[name] for name in values}, [x], "eager", "B=4 gradient")
    assert set(errors) == {"eager"}
    assert harness.MISMATCHES == ["B=4: forward_fails raised ValueError: forward failed",
                                  "B=4 gradient: backward_fails raised RuntimeError: backward failed"]


def test_torch_compile_baseline_compiles_every_case_with_static_shapes(monkeypatch):
    """Each case's torch.compile baseline is its own static-shape compile.  It used to reuse the function's dynamo
    cache, so the second shape was a recompile that torch's automatic dynamic shapes made with symbolic sizes (the
    README's [512, 128256] torch.compile numbers were timed that way)."""
    from benchmarks.bench_kd_kl_div import providers

    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append([type(value).__name__ for value in example_inputs])
        return graph_module.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_(fn, backend=recording_backend, **options))
    for rows, vocab in ((8, 100), (16, 50)):
        student, teacher = torch.randn(rows, vocab, requires_grad=True), torch.randn(rows, vocab)
        compiled = providers(torch.device("cpu"), "kl")["torch_compile"]
        torch.autograd.grad(compiled(student, teacher), student)
    assert graphs == [["Tensor", "Tensor"], ["Tensor", "Tensor"]]  # no SymInt size inputs: no dynamic shapes


def test_hidden_mse_minimum_traffic_counts_only_what_a_fused_kernel_must_move():
    """By hand: [2, 4, 32, 128] fp32 stacks are 131072 bytes each.  A masked row used to count the padding as read
    (the H200 run's masked forward showed 97% of copy bandwidth that way)."""
    from benchmarks.bench_hidden_mse import minimum_traffic_bytes

    student, teacher = torch.zeros(2, 4, 32, 128), torch.zeros(2, 4, 32, 128)
    assert minimum_traffic_bytes(student, teacher, None, "forward") == 2 * 131072
    assert minimum_traffic_bytes(student, teacher, None, "full") == 3 * 131072
    mask = torch.zeros(4, 32, dtype=torch.bool)
    mask[:, :8] = True  # 32 valid tokens x 2 layers, 128 fp32 values in each stack: 64 * 1024 bytes, + 128 mask bytes
    assert minimum_traffic_bytes(student, teacher, mask, "forward") == 64 * 1024 + 128
    assert minimum_traffic_bytes(student, teacher, mask, "full") == 64 * 1024 + 128 + 131072
    # a bf16 student beside an fp32 teacher: element sizes of each
    assert minimum_traffic_bytes(student.bfloat16(), teacher, None, "full") == 65536 + 131072 + 65536


@pytest.mark.parametrize("module, cases", [("bench_hidden_mse", 4), ("bench_meta_teacher", 2)])
def test_benchmark_writes_its_csv_after_every_case(module, cases, monkeypatch, tmp_path):
    """run_gpu.sh caps each benchmark step's time and the README says a step cut by its cap keeps what it measured:
    the hidden-MSE and meta-teacher scripts wrote their CSV only at the end, so a cut run kept nothing."""
    import importlib

    from benchmarks import harness

    script = importlib.import_module(f"benchmarks.{module}")
    written = []
    write_csv = harness.write_csv
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(harness, "MISMATCHES", [])
    monkeypatch.setattr(harness, "write_csv", lambda rows, name: written.append(len(rows)) or write_csv(rows, name))
    fused_backends = harness.fused_backends  # cpp only: the tests' TRITON_INTERPRET would time Triton's interpreter
    monkeypatch.setattr(harness, "fused_backends", lambda op, device: fused_backends(op, device, ("cpp",)))
    monkeypatch.setattr(sys, "argv", [module, "--quick", "--reps", "1", "--no-compile"])
    script.main()
    per_case = written[-1] // cases
    assert written[:cases] == [per_case * (index + 1) for index in range(cases)], written


def test_bar_plot_leaves_a_missing_provider_blank_and_labels_the_axis(monkeypatch, tmp_path):
    """A provider without a row at some x (skipped, or dropped as a mismatch) was drawn as a 0 ms bar, the fastest
    of all at a glance; the y axis said 'speed (ms)' of a time."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from benchmarks import harness

    def row(provider, x, p50):
        return harness.make_row("k", provider, "full", "speed", x, [p50], "ms")

    rows = [row("eager", "a", 2.0), row("cpp", "a", 1.0), row("eager", "b", 4.0)]  # cpp dropped at b
    xs, bars = harness.bar_values(rows)
    assert xs == ["a", "b"] and bars["eager"] == [2.0, 4.0] and bars["cpp"][0] == 1.0 and math.isnan(bars["cpp"][1])
    seen = {}
    savefig = Figure.savefig

    def recording_savefig(figure, *args, **kwargs):
        ax = figure.axes[0]
        seen.update(ylabel=ax.get_ylabel(), title=ax.get_title(), heights=[patch.get_height() for patch in ax.patches])
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    path = harness.bar_plot(rows, "plot", "k forward+backward")
    assert path.stat().st_size > 0
    assert seen["ylabel"] == "time per call (ms), median; lower is better"
    assert seen["title"].startswith("k forward+backward\n") and rows[0]["device"] in seen["title"]
    assert seen["heights"][:3] == [2.0, 4.0, 1.0] and math.isnan(seen["heights"][3])  # no bar, not a 0 ms one


def test_rows_record_the_software_they_were_measured_with():
    """The version column held torch's version alone: not mpdistil_fast's, the CPU kernel build (avx2 / avx512,
    which the README's CPU tables depend on), nor Triton's."""
    from importlib import metadata

    import mpdistil_fast
    from benchmarks import harness
    from mpdistil_fast import backends

    version = harness.make_row("k", "p", "full", "speed", "x", [1.0], "ms", "cpu")["version"]
    assert version.startswith(f"torch {torch.__version__}; mpdistil_fast {mpdistil_fast.__version__}")
    build = backends.cpu_kernel_build()  # once loaded, the build is named (never loaded just to name it)
    loaded = f"({build.isa} CPU kernels)" if build.isa else "(no CPU kernels loaded)"
    assert loaded in harness.library_versions("cpu")
    try:
        assert f"triton {metadata.version('triton')}" in version
    except metadata.PackageNotFoundError:
        assert "triton" not in version


def test_run_gpu_fails_soft_and_keeps_the_machine_description(tmp_path):
    """benchmarks/run_gpu.sh in a scratch copy with stand-ins for nvidia-smi and Python and too little time for any
    step: every step is skipped (exit 1, nothing aborts the script), and the tarball it leaves holds logs/machine.log
    with the GPU, driver and versions (they went to the terminal only, not into the results)."""
    import shutil
    import tarfile

    for part in ("benchmarks/run_gpu.sh", "scripts/link_source_packages.sh"):
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / part, tmp_path / part)
    (tmp_path / "mpdistil_fast").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("nvidia-smi", "echo 'NVIDIA H200, 143771 MiB, 570.86, 1980 MHz, 3201 MHz'"),
                       ("python", "echo \"stub python $*\"")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"), "OUT": str(out)}
    result = subprocess.run(["bash", "benchmarks/run_gpu.sh", "20"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count("SKIPPED: no time left") == 6
    # the fused kernels' KD rows (the KL bandwidth target) before the torch.compile baseline's many compiles
    steps = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("=== ") and "(" in line]
    assert steps == ["build", "tests", "bench_kd", "bench_meta", "bench_hidden", "bench_kd_compile"], steps
    with tarfile.open(out / "gpu_run.tar.gz") as archive:
        machine = archive.extractfile("gpu/logs/machine.log").read().decode()
    assert "NVIDIA H200, 143771 MiB, 570.86" in machine and "stub python -c import torch, triton" in machine
    assert "stub python -c from mpdistil_fast.backends import available_backends" in machine


def test_run_gpu_killed_from_outside_keeps_the_finished_steps(tmp_path):
    """The device call that runs benchmarks/run_gpu.sh may be cut off before the script's own deadline (its limit
    is what is left of the session's device time): the tarball in $OUT holds every step that finished before the
    kill (it was written at the very end only, so a killed run brought back nothing)."""
    import shutil
    import signal
    import tarfile
    import time

    for part in ("benchmarks/run_gpu.sh", "scripts/link_source_packages.sh"):
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / part, tmp_path / part)
    (tmp_path / "mpdistil_fast").mkdir()
    bin_dir, out, hanging = tmp_path / "bin", tmp_path / "out", tmp_path / "hanging.pid"
    bin_dir.mkdir()
    out.mkdir()
    stubs = (("nvidia-smi", "echo 'NVIDIA H200'"),  # the test step hangs (it writes its pid), everything else echoes
             ("python", f'case "$*" in *pytest*) echo $$ > "{hanging}"; exec sleep 120;; esac\necho "stub python $*"'))
    for name, text in stubs:
        (bin_dir / name).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"), "OUT": str(out)}
    run = subprocess.Popen(["bash", "benchmarks/run_gpu.sh", "500"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (hanging.exists() and hanging.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hanging.exists(), "the test step never started"
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the device call's limit: the whole script, mid-step
        run.wait(timeout=30)
        if hanging.exists() and hanging.read_text().strip():
            with contextlib.suppress(ProcessLookupError):  # (timeout runs it in a process group of its own)
                os.kill(int(hanging.read_text()), signal.SIGKILL)
    with tarfile.open(out / "gpu_run.tar.gz") as archive:
        names = archive.getnames()
        build = archive.extractfile("gpu/logs/build.log").read().decode()
    assert "gpu/logs/machine.log" in names and "stub python setup.py -q build_ext --inplace" in build, names


@pytest.mark.parametrize("flag", ["--rounds", "--reps"])
def test_cpu_build_benchmark_refuses_zero_rounds_or_reps(flag):
    """--rounds 0 ended in an IndexError after the setup, --reps 0 in a worker's traceback."""
    result = subprocess.run([sys.executable, "benchmarks/bench_cpu_builds.py", flag, "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"argument {flag}: expected a whole number >= 1, got 0" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "argument --rounds: expected a whole number >= 1, got 0"),
    (["--reps", "-3"], "argument --reps: expected a whole number >= 1, got -3"),
    (["--threads", "one"], "argument --threads: expected a whole number >= 1, got 'one'"),
    (["--cases", "kl,kld"], "--cases: takes a comma-separated list of kl, reverse, jsd, kl_mask, hidden_mse, "
                            "meta_teacher; got 'kld'"),
    (["--baseline-ref", "no-such-ref-anywhere"], "--baseline-ref: not a commit of this repository: "
                                                 "'no-such-ref-anywhere'"),
])
def test_overhead_benchmark_refuses_a_bad_flag_value_with_a_usage_error(argv, message, capsys):
    from benchmarks.bench_overhead import parse_arguments

    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_overhead_benchmark_flags_parse():
    from benchmarks.bench_overhead import CASES, parse_arguments

    args = parse_arguments([])
    assert (args.rounds, args.reps, args.threads, args.cases, args.baseline_ref) == (4, 400, 1, list(CASES), None)
    args = parse_arguments(["--cases", "jsd, kl", "--reps", "5", "--baseline-ref", "HEAD"])
    assert args.cases == ["jsd", "kl"] and args.reps == 5 and re.fullmatch(r"[0-9a-f]{4,40}", args.baseline_ref)


def test_overhead_benchmark_runs_against_a_baseline_ref(tmp_path):
    """A smoke run with tiny repetition counts: every case, mode and provider gets a row in microseconds, the
    baseline (HEAD, exported with git archive) included, and the baseline's losses and gradients are bitwise this
    tree's (the script exits non-zero otherwise)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(MPDISTIL_BENCH_RESULTS=str(tmp_path))
    result = subprocess.run([sys.executable, "benchmarks/bench_overhead.py", "--rounds", "1", "--reps", "2",
                             "--cases", "kl,kl_mask,hidden_mse,meta_teacher", "--baseline-ref", "HEAD"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (tmp_path / "overhead.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    baseline = next(row["provider"] for row in rows if row["provider"].startswith("mpdistil@"))
    assert {(row["x"].split(" ")[0], row["mode"], row["provider"]) for row in rows} == {
        (op, mode, provider) for op in ("kd_kl_div", "hidden_mse", "meta_teacher_loss") for mode in ("forward", "full")
        for provider in ("mpdistil", baseline, "torch_backend", "eager")}
    assert len(rows) == 4 * 2 * 4 and all(row["unit"] == "us" and float(row["p50"]) > 0 for row in rows)
    assert "(1 thread)" in rows[0]["device"] and "MISMATCH" not in result.stdout
