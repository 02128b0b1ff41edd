"""Backend registry: which implementation of a fused op runs, and why the others do not.

Every fused op has up to four implementations:

``torch``   the composite plain-torch reference (always available, supports double backward);
``cpp``     the fused C++ CPU kernel (CPU tensors), from one of the libraries ``mpdistil_fast._cpu_<isa>``: the
            widest instruction set built that torch's CPU capability allows (:func:`cpu_kernel_build`);
``triton``  the Triton kernel (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, for tests);
``cuda``    the CUDA C++ kernel in ``mpdistil_fast._C`` (CUDA tensors, when built with CUDA).

``backend="auto"`` takes the first available entry of the op's preference order for the tensors' device;
the environment variable ``MPDISTIL_BACKEND`` replaces ``"auto"``.  Asking for a backend that cannot run
raises a ``ValueError`` that says why (like xformers' ``not_supported_reasons``).
"""
from __future__ import annotations

import functools
import importlib
import importlib.machinery
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

BACKENDS: tuple[str, ...] = ("torch", "cpp", "triton", "cuda")
#: The fused ops, by the names the registry knows them under.
FUSED_OPS: tuple[str, ...] = ("kd_kl_div", "kd_jsd", "hidden_mse", "meta_teacher_loss")
#: Preference of ``"auto"`` per device type, fastest first.
DEFAULT_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}
ENV_OVERRIDE = "MPDISTIL_BACKEND"


@dataclass(frozen=True)
class BackendStatus:
    """Whether ``name`` can run an op on a device; ``reason`` says why not (empty when available), ``detail`` which
    build runs (the CPU kernels' instruction set for ``cpp``)."""

    name: str
    available: bool
    reason: str = ""
    detail: str = ""


@functools.lru_cache(maxsize=None)
def extension_import_error() -> str | None:
    """Import ``mpdistil_fast._C`` once; return why it failed, or None when it loaded."""
    try:
        importlib.import_module("mpdistil_fast._C")
    except ImportError as exc:  # not built, or built against another torch
        return (f"the C++ extension mpdistil_fast._C could not be imported ({exc}); build it with "
                "`pip install --no-build-isolation -e .`")
    return None


#: The CPU kernel builds setup.py can make (MPDISTIL_CPU_ARCH), most preferred first, with the torch CPU
#: capabilities each runs on (None: any; "native" was built for this machine on purpose).
CPU_KERNEL_BUILDS: tuple[tuple[str, frozenset[str] | None], ...] = (
    ("native", None),
    ("avx512", frozenset({"AVX512"})),
    ("avx2", frozenset({"AVX2", "AVX512"})),
    ("generic", None),
)


@dataclass(frozen=True)
class CpuKernelBuild:
    """The CPU kernel library loaded into this process (``isa`` empty and ``error`` set when none is)."""

    isa: str
    capability: str
    error: str = ""


def built_cpu_kernels() -> dict[str, Path]:
    """The CPU kernel libraries built beside this package, {isa: path}, in :data:`CPU_KERNEL_BUILDS` order."""
    package = Path(__file__).resolve().parent
    return {isa: path for isa, _ in CPU_KERNEL_BUILDS for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if (path := package / f"_cpu_{isa}{suffix}").is_file()}


def runnable_cpu_kernels(capability: str | None = None) -> list[str]:
    """The built CPU kernel libraries a process with torch CPU capability ``capability`` (default: this one's) can
    load, most preferred first."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    built = built_cpu_kernels()
    return [isa for isa, runs_on in CPU_KERNEL_BUILDS if isa in built and (runs_on is None or capability in runs_on)]


@functools.lru_cache(maxsize=None)
def cpu_kernel_build() -> CpuKernelBuild:
    """Load the fused CPU kernels once: the first of :func:`runnable_cpu_kernels` for torch's CPU capability
    (``torch.backends.cpu.get_cpu_capability()``; the environment variable ``ATEN_CPU_CAPABILITY=avx2|avx512|default``
    lowers it, for torch's kernels and these alike).  Exactly one is loaded: every build registers the same
    ``mpdistil_C`` CPU kernels."""
    capability = torch.backends.cpu.get_cpu_capability()
    if (err := extension_import_error()) is not None:
        return CpuKernelBuild("", capability, err)
    if runnable := runnable_cpu_kernels(capability):
        library = built_cpu_kernels()[runnable[0]]
        try:
            torch.ops.load_library(str(library))
        except OSError as exc:  # built against another torch, or damaged
            return CpuKernelBuild("", capability, f"the CPU kernels {library.name} could not be loaded ({exc}); "
                                                  "rebuild with `pip install --no-build-isolation -e .`")
        return CpuKernelBuild(runnable[0], capability)
    found = ", ".join(built_cpu_kernels()) or "none"
    return CpuKernelBuild("", capability, f"no CPU kernel build runs with torch's CPU capability {capability} "
                                          f"(built: {found}; ATEN_CPU_CAPABILITY lowers the capability); CPUs "
                                          "without AVX2 need a MPDISTIL_CPU_ARCH=generic build")


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """Import triton once; return why it failed, or None when it loaded."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not installed ({exc}); `pip install triton`"
    return None


def triton_interpreted() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_kernel(cpp_op: str, dispatch_key: str) -> bool:
    """True when the dispatcher knows ``cpp_op`` and has a kernel for ``dispatch_key``."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(cpp_op, dispatch_key)
    except RuntimeError:  # the op is not registered at all
        return False


def backend_status(name: str, op: str, device: torch.device | str | None = None) -> BackendStatus:
    """Whether backend ``name`` can run the fused op ``op`` (one of :data:`FUSED_OPS`, e.g. ``"kd_kl_div"``; another
    name is a ``ValueError``) on ``device``.

    The C++ kernels are looked up as ``torch.ops.mpdistil_C.<op>_fwd`` in the dispatcher, so a backend is
    available exactly when its kernel is registered for the device's dispatch key.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    if op not in FUSED_OPS:
        raise ValueError(f"op must be one of {FUSED_OPS}, got {op!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    def unavailable(reason: str) -> BackendStatus:
        return BackendStatus(name, False, reason)

    if name == "torch":
        return BackendStatus(name, True)
    if name in ("triton", "cuda") and device.type == "cuda" and not torch.cuda.is_available():
        return unavailable("there is no CUDA device here (torch.cuda.is_available() is False)")
    if name in ("cpp", "cuda"):
        want = "cpu" if name == "cpp" else "cuda"
        if device.type != want:
            return unavailable(f"{name} runs on {want} tensors, these are on {device.type}")
        if (err := extension_import_error()) is not None:
            return unavailable(err)
        detail = ""
        if name == "cpp":
            build = cpu_kernel_build()
            if build.error:
                return unavailable(build.error)
            detail = f"{build.isa} build, torch CPU capability {build.capability}"
        key = "CPU" if name == "cpp" else "CUDA"
        if not _has_kernel(f"mpdistil_C::{op}_fwd", key):
            hint = " (rebuild with a CUDA torch and nvcc, MPDISTIL_BUILD_CUDA=1)" if name == "cuda" else ""
            return unavailable(f"mpdistil_fast has no {key} kernel for {op}{hint}")
        return BackendStatus(name, True, detail=detail)
    # triton
    if (err := triton_import_error()) is not None:
        return unavailable(err)
    if device.type == "cpu" and not triton_interpreted():
        return unavailable("Triton needs CUDA tensors; on CPU it runs only with TRITON_INTERPRET=1 set before "
                           "triton is imported (for tests)")
    if device.type not in ("cpu", "cuda"):
        return unavailable(f"Triton kernels here target CUDA devices, not {device.type}")
    return BackendStatus(name, True)


def available_backends(op: str = "kd_kl_div", device: torch.device | str | None = None) -> dict[str, BackendStatus]:
    """Status of every backend for ``op`` on ``device`` (default: CUDA when present, else CPU)."""
    return {name: backend_status(name, op, device) for name in BACKENDS}


def inside_torch_func_transform() -> bool:
    """Whether the caller runs inside a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ``jacrev``, ...) or
    inside a ``torch.autograd.forward_ad.dual_level()`` (forward-mode AD on dual tensors, which the fused kernels'
    autograd Functions cannot propagate either: torch's error only said 'You must implement the jvp function')."""
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0)


def resolve_backend(requested: str, op: str, device: torch.device,
                    auto_order: dict[str, Sequence[str]] | None = None, *, transformed: bool = False) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    ``requested`` is a name from :data:`BACKENDS` or ``"auto"``; ``"auto"`` honours ``MPDISTIL_BACKEND`` and
    otherwise takes the first available backend of ``auto_order[device.type]``.  ``transformed`` (inside a
    ``torch.func`` transform or a forward-mode AD dual level, :func:`inside_torch_func_transform`): only ``"torch"``
    runs there (the fused kernels have no batching or forward-mode rules), so ``"auto"`` takes it and a fused
    backend is refused.
    Raises ``ValueError`` with the reason when the requested backend cannot run.
    """
    if not isinstance(requested, str) or requested not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
    if op not in FUSED_OPS:
        raise ValueError(f"op must be one of {FUSED_OPS}, got {op!r}")
    source = ""
    if requested == "auto":
        override = os.environ.get(ENV_OVERRIDE, "").strip()
        if override and override != "auto":
            if override not in BACKENDS:
                raise ValueError(f"{ENV_OVERRIDE} must be one of {('auto',) + BACKENDS}, got {override!r}")
            requested, source = override, f" (from {ENV_OVERRIDE}={override})"
        elif transformed:
            return "torch"
        else:
            order = (auto_order or DEFAULT_AUTO_ORDER).get(device.type, ("torch",))
            for name in order:
                if backend_status(name, op, device).available:
                    return name
            return "torch"
    status = backend_status(requested, op, device)
    if not status.available:
        raise ValueError(f"backend {requested!r}{source} cannot run {op} here: {status.reason}")
    if transformed and requested != "torch":
        raise ValueError(f"backend {requested!r}{source} cannot run {op} inside a torch.func transform (vmap, grad, "
                         "jvp, ...) or a torch.autograd.forward_ad.dual_level: its kernels have no batching or "
                         "forward-mode rules; use backend='torch' (what 'auto' takes there)")
    return requested


def auto_backends(device: torch.device | str) -> dict[str, str]:
    """What ``backend="auto"`` (or ``MPDISTIL_BACKEND``) runs for each of :data:`FUSED_OPS` on ``device``, with the
    build where it matters, e.g. ``{"kd_kl_div": "cpp (avx512 build of the CPU kernels ...)", ...}``."""
    device = torch.device(device)
    chosen = {}
    for op in FUSED_OPS:
        name = resolve_backend("auto", op, device)
        detail = backend_status(name, op, device).detail
        chosen[op] = f"{name} ({detail})" if detail else name
    return chosen


def machine_name(device: torch.device | str = "cpu") -> str:
    """Human name of the machine a number came from: the GPU's name, or the CPU model and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'' if threads == 1 else 's'})"


def environment_lines(device: torch.device | str) -> list[str]:
    """What can run here, for ``mpdistil-fast env`` and bug reports (after xformers' ``python -m xformers.info``):
    torch and the machine, the CPU kernel builds, the related packages, and every backend of every fused op with
    the reason when it cannot run."""
    from importlib import metadata

    device = torch.device(device)
    build = cpu_kernel_build()
    built = ", ".join(built_cpu_kernels()) or "none"

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) on {machine_name(device)}; "
             f"device {device}",
             f"CPU kernels: built {built}; loaded {build.isa or 'none'} (torch CPU capability {build.capability})"
             + (f": {build.error}" if build.error else ""),
             "packages: " + ", ".join(f"{name} {version(name)}" for name in ("triton", "deepspeed", "transformers"))]
    for op in FUSED_OPS:
        try:
            chosen = resolve_backend("auto", op, device)
        except ValueError as error:  # MPDISTIL_BACKEND names a backend that cannot run here: say so, list the rest
            chosen = f"refused: {error}"
        lines.append(f"{op}: auto -> {chosen}")
        for name, status in available_backends(op, device).items():
            state = (f"available ({status.detail})" if status.detail else "available") if status.available \
                else f"unavailable: {status.reason}"
            lines.append(f"  {name}: {state}")
    return lines
