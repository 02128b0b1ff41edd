"""Every CUDA source compiles (nvcc -c, C++20, torch's include paths), so a broken .cu is caught without a GPU;
the C++ bindings of the CUDA kernels (csrc/cuda/*.cpp, built only on CUDA machines) pass a C++20 syntax and type
check against torch's and the CUDA toolkit's headers."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
CUDA_BINDINGS = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "c++"))
#: CMake-generated in CUDA builds of torch and missing from CPU wheels; one macro (shared-library build).
CUDA_CMAKE_MACROS = "c10/cuda/impl/cuda_cmake_macros.h"


#: A source with Hopper-only code (thread-block clusters) guards it with this, and is compiled for sm_90 as well.
HOPPER_GUARD = "__CUDA_ARCH__ >= 900"


def compile_cuda(source: Path, out_dir: Path) -> subprocess.CompletedProcess:
    includes = [f"-I{p}" for p in (str(ROOT / "csrc"), *include_paths())]
    archs = ["80", "90"] if HOPPER_GUARD in source.read_text() else ["80"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # The flags of the real build (setup.py + torch's CUDAExtension defaults), light optimisation.
    # -Xptxas=-v: ptxas reports each kernel's registers and spills (stderr), read by the register test below
    command = [NVCC, "-c", "-std=c++20", "-O1", *gencode, "--use_fast_math", "-Xptxas=-v", *COMMON_NVCC_FLAGS,
               *includes, str(source), "-o", str(out_dir / f"{source.stem}.o")]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@functools.lru_cache(maxsize=None)
def compiled(source: Path) -> subprocess.CompletedProcess:
    """compile_cuda of ``source`` once per test process (the tests below share it)."""
    with tempfile.TemporaryDirectory(prefix="mpdistil-nvcc-") as out_dir:
        return compile_cuda(source, Path(out_dir))


def spills(ptxas_output: str, arch: str) -> dict[str, tuple[int, int]]:
    """{kernel (mangled name): (spill store bytes, spill load bytes)} for ``arch`` ("sm_90") from ptxas -v."""
    found, kernel = {}, None
    for line in ptxas_output.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if entry:
            kernel = entry.group(1) if entry.group(2) == arch else None
            continue
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill and kernel is not None:
            found[kernel] = (int(spill.group(1)), int(spill.group(2)))
            kernel = None
    return found


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_every_cuda_source_compiles():
    assert CUDA_SOURCES, "no csrc/cuda/*.cu found"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CUDA_SOURCES, pool.map(compiled, CUDA_SOURCES)))
    failures = {s.name: r.stderr[-3000:] for s, r in results.items() if r.returncode != 0}
    assert not failures, "\n\n".join(f"{name}:\n{err}" for name, err in failures.items())


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_row_resident_kernel_keeps_its_rows_in_registers():
    """The row-resident KL kernel (MPDISTIL_KL_ROW_RESIDENT) exists to hold each row in registers at 64 a thread
    (two 512-thread CTAs per SM): no variant may spill to local memory on sm_90 (its bf16 PACKS=4 variant spilled
    80 bytes a thread while it widened bf16 with __bfloat162float)."""
    result = compiled(ROOT / "csrc" / "cuda" / "kd_kl_div.cu")
    assert result.returncode == 0, result.stderr[-3000:]
    resident = {name: bytes_ for name, bytes_ in spills(result.stderr, "sm_90").items() if "resident" in name}
    assert len(resident) == 9, resident  # float32, float16, bfloat16 x PACKS 1, 2, 4
    assert all(bytes_ == (0, 0) for bytes_ in resident.values()), resident


def cuda_toolkit_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime_api.h), next to nvcc or under CUDA_HOME / CUDA_PATH."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if NVCC is not None:
        candidates.append(Path(NVCC).resolve().parents[1] / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_runtime_api.h").is_file()), None)


def check_binding(source: Path, shim: Path, toolkit: Path) -> subprocess.CompletedProcess:
    includes = [f"-I{p}" for p in (str(ROOT / "csrc"), *include_paths(), str(shim), str(toolkit))]
    command = [CXX, "-fsyntax-only", "-std=c++20", "-DMPDISTIL_WITH_CUDA=1", *includes, str(source)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(NVCC is None or CXX is None, reason="nvcc or a C++ compiler is not installed")
def test_every_cuda_binding_compiles(tmp_path):
    toolkit = cuda_toolkit_include()
    if toolkit is None:
        pytest.skip("the CUDA toolkit headers (cuda_runtime_api.h) were not found")
    assert CUDA_BINDINGS, "no csrc/cuda/*.cpp found"
    shim = tmp_path / "shim"
    if not any((Path(p) / CUDA_CMAKE_MACROS).is_file() for p in include_paths()):
        (shim / CUDA_CMAKE_MACROS).parent.mkdir(parents=True)
        (shim / CUDA_CMAKE_MACROS).write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CUDA_BINDINGS, pool.map(lambda s: check_binding(s, shim, toolkit), CUDA_BINDINGS)))
    failures = {s.name: r.stderr[-3000:] for s, r in results.items() if r.returncode != 0}
    assert not failures, "\n\n".join(f"{name}:\n{err}" for name, err in failures.items())
