"""Build of the extension: ``mpdistil_fast._C`` (the op schemas; the CUDA kernels when available) and the fused C++
CPU kernels, once per instruction set, as the libraries ``mpdistil_fast._cpu_<isa>``.

Environment switches
--------------------
MPDISTIL_BUILD_CUDA   "auto" (default): build the CUDA kernels when torch is a CUDA build and nvcc is found;
                      "1": require them (fail loudly otherwise); "0": skip them.
MPDISTIL_CPU_ARCH     which builds of the fused CPU kernels (csrc/cpu/) to make; each is its own library
                      mpdistil_fast._cpu_<isa>, and mpdistil_fast.backends loads the widest one that torch's CPU
                      capability (torch.backends.cpu.get_cpu_capability(), ATEN_CPU_CAPABILITY overrides it) allows:
                      "dispatch" (default on x86-64): both "avx2" and "avx512", chosen when the extension is loaded;
                      "avx2": AVX2+FMA only (every x86-64 CPU since 2013);
                      "native": ``-march=native`` with ATen's matching AVX512/AVX2 at::vec code (the build machine
                      only, loaded whatever the capability says);
                      "generic": no ISA flags (portable, slower; the default off x86-64).
MPDISTIL_CUDA_ARCHS   semicolon list for TORCH_CUDA_ARCH_LIST when it is unset (default "8.0;9.0").
MPDISTIL_DEBUG_INFO   "1": keep the debug information Python's CFLAGS ask for (-g); by default the C++ objects
                      are built with -g0 (a quarter less compile time, a twentieth of the library size).
"""
from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import torch  # the extension is compiled against the installed torch
except ImportError as exc:
    raise SystemExit(
        "mpdistil_fast builds its C++/CUDA extension against the installed torch: install torch first "
        "(CPU: pip install torch==2.13.0), then pip install --no-build-isolation . (see scripts/install.sh)"
    ) from exc


#: Compiler flags of each CPU kernel build: the ISA and the CPU_CAPABILITY defines that select ATen's matching
#: at::vec::Vectorized specialisation (without them at::vec compiles its generic scalar loops).  The AVX512 set is
#: the one ATen builds its own AVX512 kernels with and torch's "AVX512" capability checks for.
_ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "generic": [],
}


def _cpu_builds() -> dict[str, list[str]]:
    """The CPU kernel builds MPDISTIL_CPU_ARCH asks for: {isa: its compiler flags}."""
    arch = os.environ.get("MPDISTIL_CPU_ARCH", "dispatch" if platform.machine() in ("x86_64", "AMD64") else "generic")
    if arch == "dispatch":
        return {isa: _ISA_FLAGS[isa] for isa in ("avx2", "avx512")}
    if arch in ("avx2", "generic"):
        return {arch: _ISA_FLAGS[arch]}
    if arch == "native":
        return {"native": ["-march=native", *_native_capability()]}
    raise ValueError(f"MPDISTIL_CPU_ARCH must be dispatch, avx2, native or generic, got {arch!r}")


def _native_capability() -> list[str]:
    """The CPU_CAPABILITY defines of the widest ATen at::vec specialisation that ``-march=native`` enables (AVX512
    or AVX2); without them at::vec compiles its generic (scalar-loop) code even where the ISA is there."""
    compiler = os.environ.get("CXX", "c++")
    macros = subprocess.run([compiler, "-march=native", "-dM", "-E", "-x", "c++", os.devnull], capture_output=True,
                            text=True, check=True).stdout
    enabled = lambda *names: all(f"#define {name} " in macros for name in names)  # noqa: E731
    if enabled("__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512DQ__"):
        return ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    if enabled("__AVX2__", "__FMA__"):
        return ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def _want_cuda() -> bool:
    mode = os.environ.get("MPDISTIL_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MPDISTIL_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    have = torch.version.cuda is not None and CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    if mode == "1" and not have:
        raise RuntimeError(
            "MPDISTIL_BUILD_CUDA=1 but no CUDA build of torch or no nvcc was found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})."
        )
    return have


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    # -fopenmp: at::parallel_for is inline (ATen's OpenMP backend); without it the row loops run on one thread.
    cxx = ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    if os.environ.get("MPDISTIL_DEBUG_INFO", "0") != "1":
        cxx.append("-g0")  # after Python's -g
    link = ["-fopenmp"]
    include_dirs = [os.path.join(HERE, "csrc")]
    # One library per CPU build; hidden symbols, so that nothing compiled for a wider ISA is ever shared.
    cpu = [CppExtension(f"mpdistil_fast._cpu_{isa}", rel("csrc/cpu/*.cpp"), include_dirs=include_dirs,
                        extra_compile_args={"cxx": [*cxx, "-fvisibility=hidden", *flags]}, extra_link_args=link)
           for isa, flags in _cpu_builds().items()]
    sources = rel("csrc/*.cpp") + rel("csrc/schemas/*.cpp")
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("MPDISTIL_CUDA_ARCHS", "8.0;9.0"))
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
        return [CUDAExtension("mpdistil_fast._C", sources, include_dirs=include_dirs,
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
                              define_macros=[("MPDISTIL_WITH_CUDA", "1")]), *cpu]
    return [CppExtension("mpdistil_fast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                         extra_link_args=link), *cpu]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class BuildEachInItsOwnFolder(BuildExtension):
        """Every extension compiles into its own temporary folder: the CPU builds share their sources, and in one
        folder each build would overwrite the other's objects (and recompile everything on every build)."""

        def build_extension(self, ext):
            shared = self.build_temp
            self.build_temp = os.path.join(shared, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = shared

    return {"build_ext": BuildEachInItsOwnFolder.with_options(use_ninja=True)}


setup(
    # kernels/ and configs/ stay top-level folders of the source tree and install inside the package
    packages=find_packages(include=["mpdistil_fast", "mpdistil_fast.*"]) + ["mpdistil_fast.kernels",
                                                                            "mpdistil_fast.configs"],
    package_dir={"mpdistil_fast.kernels": "kernels", "mpdistil_fast.configs": "configs"},
    package_data={"mpdistil_fast.configs": ["*.yaml", "deepspeed/*.json"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    include_package_data=True,
)
