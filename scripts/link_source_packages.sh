#!/usr/bin/env bash
# Make an uninstalled checkout importable with PYTHONPATH=<checkout>: kernels/ and configs/ install as the
# subpackages mpdistil_fast.kernels and mpdistil_fast.configs (setup.py maps them), so link them into the package
# folder (benchmarks/run_gpu.sh runs on a device machine's copy of the working tree, which is not installed; in an
# installed checkout the links are harmless: they name the folders the install maps).
set -euo pipefail
cd "$(dirname "$0")/.."
for part in kernels configs; do
  [ -e "mpdistil_fast/$part" ] || ln -s "../$part" "mpdistil_fast/$part"
done
