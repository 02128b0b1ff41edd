"""Test session setup: CPU-only runs exercise the Triton kernels through the interpreter."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

import torch  # noqa: E402  (importing torch does not import triton)

# Without a GPU the Triton kernels run through the interpreter; this must happen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
os.environ.setdefault("TRITON_CACHE_DIR", str(ROOT / ".triton_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

@pytest.fixture(autouse=True)
def _seeded():
    """Fresh, reproducible random data in every test."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The real SuperGLUE/GLUE files (MPDISTIL_DATA_DIR, default ../shared/data)."""
    path = pathlib.Path(os.environ.get("MPDISTIL_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
    if not (path / "superglue").is_dir():
        pytest.skip(f"real data not found at {path} (set MPDISTIL_DATA_DIR)")
    return path
