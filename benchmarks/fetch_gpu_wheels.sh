#!/usr/bin/env bash
# Download the wheels that benchmarks/run_gpu.sh installs on a GPU machine without PyPI access: Liger-Kernel, the
# fused-kernel baseline of the KD benchmarks (pure Python; it needs only the machine's torch and triton).  They land
# in .whl/ (git-ignored), built for the GPU machines' CPython 3.12; carry that folder to the machine.
#
#   bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl "liger-kernel==0.8.5"
ls -l .whl
