"""Compile every Triton kernel the library launches for an H100/H200 (sm_90), ahead of time, without a GPU.

The CPU test suite runs the kernels through TRITON_INTERPRET=1, which never lowers them to PTX: type checks in the
lowering, tl.dot shape/dtype constraints, shared-memory and register budgets only show on the GPU.  This script

1. runs the public functions (kd_kl_div for the forward/reverse KL and the JSD, hidden_mse, meta_teacher_loss) and
   their backward on small CPU tensors of representative shapes, with backend="triton", while
   ``JITFunction.run`` is replaced by a recorder: every launch the library's own host code makes (its block sizes,
   num_warps and constexprs) is recorded instead of run (plus the grid-barrier test kernel of
   tests/test_grid_sync.py);
2. turns each distinct launch into the argument signature ("*bf16", "i32", "fp64", "constexpr", ...), constexpr
   values and divisibility attributes with Triton's own launch binder, as ``kernel[grid](...)`` does on a GPU;
3. compiles it with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, through Triton's
   bundled ptxas, and prints one line per variant: OK/FAIL, the kernel, its key constexprs, the dynamic shared
   memory, and registers and spill (local) bytes per thread read from the cubin with the bundled cuobjdump.

A variant also fails when it needs more shared memory than an sm_90 block can have (227 KiB, an OutOfResources at
launch), and the check fails when a ``*_kernel`` of the kernels package was never launched by the scenarios (a new
kernel must get a scenario here).  Exit status 0 when every variant compiled, 1 otherwise.

    python scripts/compile_triton_gpu.py [-j JOBS] [-v]

Runs with whichever Triton is installed (3.6 and 3.9 were checked); TRITON_INTERPRET is ignored (removed from the
environment before triton is imported), and compiles go to a fresh temporary cache unless TRITON_CACHE_DIR is set.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JITFunctions, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its (and 3.6's) default
_OWN_CACHE = None
if "TRITON_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.TemporaryDirectory(prefix="triton-sm90-")
    os.environ["TRITON_CACHE_DIR"] = _OWN_CACHE.name

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # mpdistil_fast from this checkout (and tests/ for the grid-barrier test kernel)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
#: Dynamic shared memory one sm_90 block can have (cudaDevAttrMaxSharedMemoryPerBlockOptin of the H100 and H200).
SM90_MAX_SHARED = 232448
KERNEL_MODULES = ("kd_kl_div", "kd_jsd", "hidden_mse", "meta_teacher", "grid_sync")


# ---------------------------------------------------------------------------------------------------------------
# 1. Record the launches the library makes.
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    scenario: str


@dataclass
class Recorder:
    launches: list = field(default_factory=list)
    scenario: str = ""

    @contextlib.contextmanager
    def active(self):
        """Replace ``JITFunction.run`` (what ``kernel[grid](...)`` calls) by a recorder; outputs stay unwritten."""
        original = triton_jit.JITFunction.run

        def record(kernel, *args, grid, warmup, **kwargs):
            self.launches.append(Launch(kernel, args, dict(kwargs), self.scenario))

        triton_jit.JITFunction.run = record
        try:
            yield self
        finally:
            triton_jit.JITFunction.run = original


@contextlib.contextmanager
def triton_backend_on_cpu():
    """Let the public functions choose backend="triton" for CPU tensors (their launches are only recorded)."""
    modules = [importlib.import_module(f"mpdistil_fast.functional.{name}")
               for name in ("kd_kl_div", "hidden_mse", "meta_teacher_loss")]
    originals = [module.resolve_backend_traceable for module in modules]

    def resolve(requested, op, device):
        assert requested == "triton", requested
        return "triton"

    for module in modules:
        module.resolve_backend_traceable = resolve
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.resolve_backend_traceable = original


def _leaf(tensor: torch.Tensor, grad: bool) -> torch.Tensor:
    return tensor.requires_grad_(grad)


def _run(recorder: Recorder, scenario: str, compute) -> None:
    recorder.scenario = scenario
    loss = compute()
    if loss.requires_grad:
        loss.sum().backward()


def kl_scenarios(recorder: Recorder) -> None:
    """kd_kl_div: forward KL, reverse KL, JSD; reduced (gradient in forward, with and without a row mask), per row
    ("none": forward + backward kernels) and without autograd (forward only); frozen and trainable teacher."""
    from mpdistil_fast import kd_kl_div

    # (dtype, vocabulary, the full set of cases?): 32000 (Llama-2) and 128256 (Llama-3) in bf16 and fp32; a
    # vocabulary that is not a multiple of 16 (GPT-2's 50257, fp16), a small one (one block of 128) and fp64.
    shapes = [(torch.bfloat16, 32000, True), (torch.bfloat16, 128256, True), (torch.float32, 32000, True),
              (torch.float32, 128256, True), (torch.float16, 50257, False), (torch.float32, 100, False),
              (torch.float64, 100, False)]
    rows = 4
    for dtype, vocab, full in shapes:
        for direction in ("forward", "reverse", "jsd"):
            beta = 0.5 if direction == "jsd" else None
            cases = [("none", False, False, False), ("none", False, True, True), ("batchmean", True, True, True)]
            if full:
                cases = [(reduction, masked, teacher_grad, True) for reduction in ("batchmean", "none")
                         for masked in (False, True) for teacher_grad in (False, True)]
                cases.append(("none", False, False, False))
            for reduction, masked, teacher_grad, grad in cases:
                student = _leaf(torch.randn(rows, vocab, dtype=dtype), grad)
                teacher = _leaf(torch.randn(rows, vocab, dtype=dtype), grad and teacher_grad)
                mask = torch.tensor([True, False] * (rows // 2)) if masked else None
                name = (f"kd_kl_div {direction} {str(dtype)[6:]} [{rows},{vocab}] {reduction}"
                        f"{' mask' if masked else ''}{' teacher-grad' if teacher_grad else ''}"
                        f"{'' if grad else ' no-grad'}")
                with torch.set_grad_enabled(grad):
                    _run(recorder, name, lambda: kd_kl_div(student, teacher, 2.0, reduction=reduction, mask=mask,
                                                           direction=direction, beta=beta, backend="triton"))


def hidden_mse_scenarios(recorder: Recorder) -> None:
    """hidden_mse on layer stacks [L, B, S, H] (patient KD with a skip layer map) and pooled [B, H] states."""
    from mpdistil_fast import hidden_mse

    # (dtype, student width, teacher width, stacked?, full flag product?): MiniLM-L6-H384 (the packaged teacher),
    # BERT-base 768, a narrower student through a projection, 4096 (a 7B model's width), pooled rows, fp64.
    shapes = [(torch.bfloat16, 768, 768, True, True), (torch.float32, 768, 768, True, True),
              (torch.float32, 384, 384, True, False), (torch.bfloat16, 384, 768, True, False),
              (torch.bfloat16, 4096, 4096, True, False), (torch.float32, 4096, 4096, True, False),
              (torch.float32, 768, 768, False, False), (torch.float64, 64, 64, True, False)]
    for dtype, width_s, width_t, stacked, full in shapes:
        lead = (2, 2, 64) if stacked else (3,)
        flags = [(masked, normalize, teacher_grad) for masked in (False, True) for normalize in (False, True)
                 for teacher_grad in (False, True)] if full else [(False, False, False), (True, True, True)]
        for masked, normalize, teacher_grad in flags:
            student = _leaf(torch.randn(*lead, width_s, dtype=dtype), True)
            teacher = _leaf(torch.randn(*lead, width_t, dtype=dtype), teacher_grad)
            projection = None
            if width_s != width_t:
                projection = (_leaf(torch.randn(width_t, width_s, dtype=dtype), True),
                              _leaf(torch.randn(width_t, dtype=dtype), True))
            mask = (torch.arange(lead[-1]) % 3 != 0).expand(lead[1:] if stacked else lead) if masked else None
            name = (f"hidden_mse {str(dtype)[6:]} {list(lead) + [width_s]}->{width_t}"
                    f"{' projection' if projection else ''}{' mask' if masked else ''}"
                    f"{' normalize' if normalize else ''}{' teacher-grad' if teacher_grad else ''}")
            _run(recorder, name, lambda: hidden_mse(student, teacher, mask=mask, normalize=normalize,
                                                    projection=projection,
                                                    layer_map="skip" if stacked else None, backend="triton"))


def meta_teacher_scenarios(recorder: Recorder) -> None:
    """meta_teacher_loss: linear and Linear-GELU-Linear discriminators, with and without a student projection (with
    and without its bias), both modes, gradients for the parameters only or for the pooled states too."""
    from mpdistil_fast import meta_teacher_loss

    # (dtype, batch, teacher width, student width, hidden, classes): the benchmarks' and the configs' shapes.
    shapes = [(torch.float32, 16, 384, 384, None, 3), (torch.float32, 32, 768, 768, None, 2),
              (torch.float32, 256, 768, 768, 1024, 3), (torch.float32, 32, 768, 384, None, 3),
              (torch.float32, 32, 768, 384, 256, 3), (torch.bfloat16, 32, 768, 768, None, 3),
              (torch.bfloat16, 32, 768, 384, 256, 2), (torch.float64, 8, 64, 32, 16, 3)]
    for dtype, batch, width, width_s, hidden, classes in shapes:
        variants = [(False, "collaborative", True), (True, "competitive", True)]
        if width_s != width:
            variants.append((True, "collaborative", False))  # projection without bias
        for states_grad, mode, proj_bias in variants:
            h_t = _leaf(torch.randn(batch, width, dtype=dtype), states_grad)
            h_s = _leaf(torch.randn(batch, width_s, dtype=dtype), states_grad)
            if hidden is None:
                weight, bias = (_leaf(torch.randn(classes, width, dtype=dtype), True),
                                _leaf(torch.randn(classes, dtype=dtype), True))
            else:
                weight = (_leaf(torch.randn(hidden, width, dtype=dtype), True),
                          _leaf(torch.randn(classes, hidden, dtype=dtype), True))
                bias = (_leaf(torch.randn(hidden, dtype=dtype), True), _leaf(torch.randn(classes, dtype=dtype), True))
            projection = None
            if width_s != width:
                projection = (_leaf(torch.randn(width, width_s, dtype=dtype), True),
                              _leaf(torch.randn(width, dtype=dtype), True) if proj_bias else None)
            labels = torch.randint(0, classes, (batch,))
            name = (f"meta_teacher_loss {str(dtype)[6:]} B={batch} H={width}"
                    f"{f' H_s={width_s} projection' + ('' if proj_bias else ' (no bias)') if projection else ''}"
                    f"{f' hidden={hidden}' if hidden else ''} K={classes} {mode}"
                    f"{' state-grads' if states_grad else ''}")
            _run(recorder, name, lambda: meta_teacher_loss(h_t, h_s, weight, bias, labels, mode=mode, hidden=hidden,
                                                           student_projection=projection, backend="triton"))


def grid_sync_scenarios(recorder: Recorder) -> None:
    """The grid barrier runs inside the meta-teacher kernels; its own GPU test launches tests/test_grid_sync.py's
    two-phase kernel (``pytest -m gpu``), compiled here with that test's arguments."""
    from mpdistil_fast.kernels.grid_sync import barrier_counters

    spec = importlib.util.spec_from_file_location("test_grid_sync", ROOT / "tests" / "test_grid_sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # by path: a site-packages "tests" package could shadow this checkout's
    values = torch.zeros(133, dtype=torch.int32)
    recorder.scenario = "test_grid_sync two_phase_kernel n_items=133"
    module.two_phase_kernel[(1,)](values, torch.zeros_like(values), barrier_counters(values.device), 133, BLOCK=256)


SCENARIOS = (kl_scenarios, hidden_mse_scenarios, meta_teacher_scenarios, grid_sync_scenarios)


def record_launches() -> list[Launch]:
    torch.manual_seed(0)
    recorder = Recorder()
    with recorder.active(), triton_backend_on_cpu():
        for scenarios in SCENARIOS:
            scenarios(recorder)
    return recorder.launches


def unlaunched_kernels(launches: list[Launch]) -> list[str]:
    """``*_kernel`` JIT functions of the kernels package that no scenario launched."""
    launched = {id(launch.kernel) for launch in launches}
    missing = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"mpdistil_fast.kernels.{name}")
        for attribute, value in vars(module).items():
            if (isinstance(value, triton_jit.JITFunction) and attribute.endswith("_kernel")
                    and value.__module__ == module.__name__ and id(value) not in launched):
                missing.append(f"{name}.{attribute}")
    return missing


# ---------------------------------------------------------------------------------------------------------------
# 2. Specialize each launch as Triton's launcher would on a GPU.
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    kernel: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    label: str  # kernel and key constexprs
    scenarios: list


def _constexpr_text(value) -> str:
    return str(value).replace("triton.language.", "").replace("tl.", "")


def specialize(launch: Launch, backend) -> tuple[dict, dict, dict, object]:
    """(signature, constexprs, attrs, options) of a launch: Triton's own binder (``create_function_from_signature``,
    then ``JITFunction._pack_args``, as ``JITFunction.run`` does; the same in Triton 3.6 and 3.9)."""
    kernel = launch.kernel
    binder = triton_jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    return kernel._pack_args(backend, launch.kwargs, bound_args, specialization, options)


def variants_of(launches: list[Launch]) -> list[Variant]:
    """The distinct compilations among the launches, in the order first seen."""
    backend = make_backend(TARGET)
    variants: dict[str, Variant] = {}
    for launch in launches:
        options, signature, constexprs, attrs = specialize(launch, backend)
        kernel = launch.kernel
        module = kernel.__module__.rsplit(".", 1)[-1]
        if module == "test_grid_sync":
            module = f"tests/{module}"
        names = [param.name for param in kernel.params]
        key_constexprs = " ".join(f"{names[path[0]]}={_constexpr_text(value)}" for path, value in constexprs.items()
                                  if len(path) == 1 and kernel.params[path[0]].is_constexpr)
        pointers = ",".join(dict.fromkeys(kind[1:] for kind in signature.values() if kind.startswith("*")))
        label = (f"{module}.{kernel.__name__} [{pointers}] {key_constexprs} num_warps={options.num_warps} "
                 f"num_stages={options.num_stages}")
        key = repr((module, kernel.__name__, sorted(signature.items()), sorted(constexprs.items(), key=str),
                    sorted(attrs.items(), key=str), sorted(options.__dict__.items(), key=str)))
        if key not in variants:
            variants[key] = Variant(kernel, signature, constexprs, attrs, dict(options.__dict__), label, [])
        variants[key].scenarios.append(launch.scenario)
    return list(variants.values())


# ---------------------------------------------------------------------------------------------------------------
# 3. Compile each variant for sm_90.
# ---------------------------------------------------------------------------------------------------------------
_VARIANTS: list[Variant] = []  # filled before the worker processes fork
_VERBOSE = False


def _cuobjdump() -> str | None:
    import triton.backends.nvidia as nvidia

    path = pathlib.Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def _resource_usage(cubin: bytes) -> str:
    """'regs=N local=N' from the cubin's resource usage (per thread), or '' without cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        result = subprocess.run([tool, "-res-usage", file.name], capture_output=True, text=True)
    registers = re.search(r"REG:(\d+)", result.stdout)
    local = re.search(r"LOCAL:(\d+)", result.stdout)
    if not registers:
        return ""
    return f"regs={registers.group(1)} local={local.group(1) if local else '?'}"


def _error_lines(error: BaseException) -> str:
    """The first line of the error and, when different, its last (Triton's CompilationError begins with the
    source position and ends with the reason)."""
    lines = [line.strip() for line in f"{type(error).__name__}: {error}".splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def compile_variant(index: int) -> tuple[int, bool, str, float, str]:
    """(index, ok, detail, seconds, traceback when verbose) of compiling variant ``index``."""
    variant = _VARIANTS[index]
    start = time.perf_counter()
    try:
        source = ASTSource(variant.kernel, variant.signature, variant.constexprs, variant.attrs)
        compiled = triton.compile(source, target=TARGET, options=variant.options)
        shared = int(compiled.metadata.shared)
        detail = f"shared={shared} B {_resource_usage(compiled.asm['cubin'])}".strip()
        if shared > SM90_MAX_SHARED:
            return (index, False, f"{detail}: more shared memory than an sm_90 block can have ({SM90_MAX_SHARED} B)",
                    time.perf_counter() - start, "")
        return index, True, detail, time.perf_counter() - start, ""
    except Exception as error:  # noqa: BLE001  (every failure is reported, the run goes on)
        return (index, False, _error_lines(error), time.perf_counter() - start,
                traceback.format_exc() if _VERBOSE else "")


def main() -> int:
    global _VARIANTS, _VERBOSE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("-v", "--verbose", action="store_true", help="the scenarios of each variant; tracebacks")
    args = parser.parse_args()
    _VERBOSE = args.verbose
    torch.set_num_threads(1)  # no OpenMP pool in this process before it forks the compile workers

    if not (hasattr(triton_jit, "create_function_from_signature") and hasattr(triton_jit.JITFunction, "_pack_args")):
        print(f"triton {triton.__version__}: no create_function_from_signature / JITFunction._pack_args (the launch "
              "binder of Triton 3.3 to 3.9) to specialize the launches with", file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(f"triton {triton.__version__} ({pathlib.Path(triton.__file__).parent}), torch {torch.__version__}, "
          f"target {TARGET.backend} sm_{TARGET.arch}, warp {TARGET.warp_size}", flush=True)
    launches = record_launches()
    _VARIANTS = variants_of(launches)
    missing = unlaunched_kernels(launches)
    print(f"{len(launches)} launches recorded, {len(_VARIANTS)} distinct compilations", flush=True)

    failures = 0
    jobs = max(1, min(args.jobs, len(_VARIANTS)))
    context = multiprocessing.get_context("fork")
    with context.Pool(jobs) as pool:
        for index, ok, detail, seconds, trace in pool.imap(compile_variant, range(len(_VARIANTS))):
            variant = _VARIANTS[index]
            failures += not ok
            more = f" (+{len(variant.scenarios) - 1})" if len(variant.scenarios) > 1 else ""
            print(f"{'OK  ' if ok else 'FAIL'} {variant.label}: {detail} ({seconds:.1f} s) <- "
                  f"{variant.scenarios[0]}{more}", flush=True)
            if args.verbose or not ok:
                for scenario in variant.scenarios[1:]:
                    print(f"       also {scenario}")
                if trace:
                    print(trace)
    for name in missing:
        failures += 1
        print(f"FAIL {name}: launched by no scenario of {pathlib.Path(__file__).name} (add one)")
    kernels = len({(variant.kernel.__module__, variant.kernel.__name__) for variant in _VARIANTS})
    print(f"triton {triton.__version__}, sm_90: {len(_VARIANTS) - failures + len(missing)} of {len(_VARIANTS)} "
          f"variants of {kernels} kernels compiled, {failures} failure(s), {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
