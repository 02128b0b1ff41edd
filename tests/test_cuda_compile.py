"""Every CUDA source compiles (nvcc -c, C++20, torch's include paths), so a broken .cu is caught without a GPU."""
from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


def compile_cuda(source: Path, out_dir: Path) -> subprocess.CompletedProcess:
    includes = [f"-I{p}" for p in (str(ROOT / "csrc"), *include_paths())]
    # The flags of the real build (setup.py + torch's CUDAExtension defaults), one architecture, light optimisation.
    command = [NVCC, "-c", "-std=c++20", "-O1", "-arch=sm_80", "--use_fast_math", *COMMON_NVCC_FLAGS, *includes, str(source),
               "-o", str(out_dir / f"{source.stem}.o")]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_every_cuda_source_compiles(tmp_path):
    assert CUDA_SOURCES, "no csrc/cuda/*.cu found"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CUDA_SOURCES, pool.map(lambda s: compile_cuda(s, tmp_path), CUDA_SOURCES)))
    failures = {s.name: r.stderr[-3000:] for s, r in results.items() if r.returncode != 0}
    assert not failures, "\n\n".join(f"{name}:\n{err}" for name, err in failures.items())
