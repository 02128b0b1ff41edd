"""setup.py's compiler flags: the CPU ISA switch (MPDISTIL_CPU_ARCH) and the ATen at::vec capability it defines
(without a CPU_CAPABILITY define, at::vec compiles its generic code even where the ISA is enabled)."""
from __future__ import annotations

import platform
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine() in ("x86_64", "AMD64")


def cxx_flags(monkeypatch, arch: str | None) -> list[str]:
    """The C++ flags setup.py gives the extension for MPDISTIL_CPU_ARCH=arch (None: unset), without building."""
    if arch is None:
        monkeypatch.delenv("MPDISTIL_CPU_ARCH", raising=False)
    else:
        monkeypatch.setenv("MPDISTIL_CPU_ARCH", arch)
    monkeypatch.setenv("MPDISTIL_BUILD_CUDA", "0")
    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    runpy.run_path(str(ROOT / "setup.py"))
    (extension,) = captured["ext_modules"]
    return extension.extra_compile_args["cxx"]


@pytest.mark.skipif(not X86, reason="the AVX2 default is for x86-64")
def test_default_is_avx2_with_its_aten_capability(monkeypatch):
    flags = cxx_flags(monkeypatch, None)
    assert {"-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"} <= set(flags)


@pytest.mark.skipif(not X86 or shutil.which("c++") is None, reason="needs an x86-64 C++ compiler")
def test_native_defines_the_widest_aten_capability_it_enables(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    macros = subprocess.run(["c++", "-march=native", "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True,
                            text=True, check=True).stdout
    flags = cxx_flags(monkeypatch, "native")
    assert "-march=native" in flags
    capabilities = [f for f in flags if f.startswith("-DCPU_CAPABILITY=")]
    if "#define __AVX512BW__ " in macros and "#define __AVX512VL__ " in macros:
        assert capabilities == ["-DCPU_CAPABILITY=AVX512"] and "-DCPU_CAPABILITY_AVX512" in flags
    elif "#define __AVX2__ " in macros:
        assert capabilities == ["-DCPU_CAPABILITY=AVX2"] and "-DCPU_CAPABILITY_AVX2" in flags
    else:
        assert capabilities == []


def test_generic_has_no_isa_flags(monkeypatch):
    flags = cxx_flags(monkeypatch, "generic")
    assert not [f for f in flags if f.startswith(("-m", "-DCPU_CAPABILITY"))]


def test_unknown_arch_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="MPDISTIL_CPU_ARCH must be avx2, native or generic"):
        cxx_flags(monkeypatch, "avx9")
