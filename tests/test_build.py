"""setup.py's CPU kernel builds (MPDISTIL_CPU_ARCH), the ATen at::vec capability each defines (without a
CPU_CAPABILITY define at::vec compiles its generic code even where the ISA is enabled), and which build the backend
registry loads."""
from __future__ import annotations

import os
import platform
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools
import torch

from mpdistil_fast import backends

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine() in ("x86_64", "AMD64")


def extensions(monkeypatch, arch: str | None) -> dict[str, list[str]]:
    """{extension name: its C++ flags} that setup.py builds for MPDISTIL_CPU_ARCH=arch (None: unset), without
    building."""
    if arch is None:
        monkeypatch.delenv("MPDISTIL_CPU_ARCH", raising=False)
    else:
        monkeypatch.setenv("MPDISTIL_CPU_ARCH", arch)
    monkeypatch.setenv("MPDISTIL_BUILD_CUDA", "0")
    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    runpy.run_path(str(ROOT / "setup.py"))
    return {ext.name: ext.extra_compile_args["cxx"] for ext in captured["ext_modules"]}


def cpu_builds(monkeypatch, arch: str | None) -> dict[str, list[str]]:
    """{isa: C++ flags} of the CPU kernel libraries; checks that _C (schemas, module) gets no ISA flags."""
    flags = extensions(monkeypatch, arch)
    assert not [f for f in flags.pop("mpdistil_fast._C") if f.startswith(("-m", "-DCPU_CAPABILITY"))]
    prefix = "mpdistil_fast._cpu_"
    assert all(name.startswith(prefix) and "-fvisibility=hidden" in f for name, f in flags.items())
    return {name.removeprefix(prefix): f for name, f in flags.items()}


@pytest.mark.skipif(not X86, reason="the avx2 + avx512 default is for x86-64")
def test_default_builds_avx2_and_avx512_each_with_its_aten_capability(monkeypatch):
    builds = cpu_builds(monkeypatch, None)
    assert set(builds) == {"avx2", "avx512"}
    assert {"-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"} <= set(builds["avx2"])
    assert not [f for f in builds["avx2"] if f.startswith("-mavx512")]
    # The ISA torch's "AVX512" capability checks for, so that the build loads exactly where it runs.
    assert {"-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
            "-DCPU_CAPABILITY=AVX512"} <= set(builds["avx512"])


def test_avx2_alone(monkeypatch):
    assert set(cpu_builds(monkeypatch, "avx2")) == {"avx2"}


@pytest.mark.skipif(not X86 or shutil.which("c++") is None, reason="needs an x86-64 C++ compiler")
def test_native_defines_the_widest_aten_capability_it_enables(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    macros = subprocess.run(["c++", "-march=native", "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True,
                            text=True, check=True).stdout
    (flags,) = cpu_builds(monkeypatch, "native").values()
    assert "-march=native" in flags
    capabilities = [f for f in flags if f.startswith("-DCPU_CAPABILITY=")]
    if "#define __AVX512BW__ " in macros and "#define __AVX512VL__ " in macros:
        assert capabilities == ["-DCPU_CAPABILITY=AVX512"] and "-DCPU_CAPABILITY_AVX512" in flags
    elif "#define __AVX2__ " in macros:
        assert capabilities == ["-DCPU_CAPABILITY=AVX2"] and "-DCPU_CAPABILITY_AVX2" in flags
    else:
        assert capabilities == []


def test_generic_has_no_isa_flags(monkeypatch):
    (flags,) = cpu_builds(monkeypatch, "generic").values()
    assert not [f for f in flags if f.startswith(("-m", "-DCPU_CAPABILITY"))]


def test_unknown_arch_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="MPDISTIL_CPU_ARCH must be dispatch, avx2, native or generic"):
        extensions(monkeypatch, "avx9")


def loaded_build_with(capability: str) -> str:
    """The CPU kernel build a fresh process loads with ATEN_CPU_CAPABILITY=capability."""
    code = "from mpdistil_fast import backends; build = backends.cpu_kernel_build(); print(build.isa or build.error)"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_widest_build_the_capability_allows_is_loaded():
    build = backends.cpu_kernel_build()
    assert not build.error and build.capability == torch.backends.cpu.get_cpu_capability()
    built = backends.built_cpu_kernels()
    if "native" in built:
        assert build.isa == "native" and loaded_build_with("avx2") == "native"  # built for this machine on purpose
        return
    expected = "avx512" if build.capability == "AVX512" and "avx512" in built else "avx2"
    assert build.isa == expected
    if build.capability in ("AVX2", "AVX512") and "avx2" in built:
        assert loaded_build_with("avx2") == "avx2"
    if "generic" not in built:
        assert "no CPU kernel build runs with" in loaded_build_with("default")


def test_the_other_cpu_build_passes_the_kernel_tests():
    """Every process loads one CPU build; the suite tests that one, this test the AVX2 build beside AVX512."""
    if backends.cpu_kernel_build().isa != "avx512" or "avx2" not in backends.built_cpu_kernels():
        pytest.skip("only one CPU kernel build can run here")
    code = ("import sys, pytest; from mpdistil_fast import backends; assert backends.cpu_kernel_build().isa == 'avx2';"
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'cpp', 'tests/test_kd_kl_div.py', "
            "'tests/test_hidden_mse.py', 'tests/test_meta_teacher.py']))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_a_cpu_kernel_library_that_does_not_load_is_explained(monkeypatch, tmp_path):
    """A damaged (or other-torch) library makes `cpp` unavailable with the reason, not an import-time crash."""
    broken = tmp_path / "_cpu_avx2.so"
    broken.write_bytes(b"not a shared object")
    monkeypatch.setattr(backends, "built_cpu_kernels", lambda: {"avx2": broken})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    backends.cpu_kernel_build.cache_clear()
    try:
        build = backends.cpu_kernel_build()
        assert not build.isa and "_cpu_avx2.so could not be loaded" in build.error and "rebuild" in build.error
    finally:
        backends.cpu_kernel_build.cache_clear()


def test_debug_information_only_when_asked(monkeypatch):
    assert all("-g0" in flags for flags in extensions(monkeypatch, None).values())
    monkeypatch.setenv("MPDISTIL_DEBUG_INFO", "1")
    assert not any("-g0" in flags for flags in extensions(monkeypatch, None).values())


@pytest.mark.parametrize("threads, words", [(1, "(1 thread)"), (2, "(2 threads)")])
def test_machine_name_says_the_threads(monkeypatch, threads, words):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert backends.machine_name("cpu").endswith(words)


def test_an_installed_package_ships_its_kernels_and_configs(tmp_path):
    """What a wheel holds (setup.py's build_py, without compiling): the Triton kernels and the configs inside the
    package, and the DeepSpeed defaults found there, not in a source tree the install does not have."""
    build = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)], cwd=ROOT, check=True,
                   env={**os.environ, "MPDISTIL_BUILD_CUDA": "0"}, capture_output=True)
    package = build / "mpdistil_fast"
    shipped = {p.relative_to(package / "configs").as_posix() for p in (package / "configs").rglob("*")
               if p.suffix in (".yaml", ".json")}
    assert {"quickstart.yaml", "mpdistil.yaml", "deepspeed/zero2.json", "deepspeed/zero3.json"} <= shipped
    assert (package / "kernels" / "kd_kl_div.py").is_file()
    for library in (ROOT / "mpdistil_fast").glob("*.so"):  # the compiled part, as a wheel would hold it
        shutil.copy(library, package)
    probe = ("from mpdistil_fast.pipeline.config import RuntimeConfig; import mpdistil_fast; "
             "print(mpdistil_fast.__file__); print(RuntimeConfig().deepspeed_teacher)")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(build)})
    assert run.returncode == 0, run.stderr[-3000:]
    module_file, teacher_json = run.stdout.split()
    assert Path(module_file).is_relative_to(build)  # the built tree, not the checkout
    assert Path(teacher_json) == package / "configs" / "deepspeed" / "zero3.json"


def test_an_uninstalled_checkout_imports_after_linking_its_source_packages(tmp_path):
    """benchmarks/run_gpu.sh runs on a copy of the working tree that is not installed (PYTHONPATH=<checkout>):
    scripts/link_source_packages.sh links kernels/ and configs/ in as mpdistil_fast.kernels / .configs, without
    which the pipeline (its DeepSpeed defaults live in mpdistil_fast.configs) does not import there."""
    checkout = tmp_path / "checkout"
    for part in ("mpdistil_fast", "kernels", "configs", "scripts"):
        shutil.copytree(ROOT / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import sys\n"  # as if not installed: without this environment's editable-install finder
             "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '').lower()]\n"
             "import mpdistil_fast.pipeline.trainer, mpdistil_fast.kernels.kd_kl_div\n"
             "from mpdistil_fast.pipeline.config import DEEPSPEED_CONFIG_DIR\n"
             "print(DEEPSPEED_CONFIG_DIR)\n")
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    run = lambda: subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True,  # noqa
                                 text=True)
    assert "No module named 'mpdistil_fast.configs'" in run().stderr  # the probe sees the bare checkout
    subprocess.run(["bash", str(checkout / "scripts" / "link_source_packages.sh")], env=env, check=True)
    linked = run()
    assert linked.returncode == 0, linked.stderr[-3000:]
    assert Path(linked.stdout.strip()) == (checkout / "configs" / "deepspeed").resolve()  # the checkout's own
