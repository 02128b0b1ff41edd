#!/usr/bin/env bash
# The one device check (H100/H200 through the device tool, or any CUDA machine with torch + triton + nvcc):
# build the CUDA kernels, run the GPU tests, time every fused kernel, print a short table, keep the CSV/PNG.
#
#   bash benchmarks/run_gpu.sh            # results in benchmarks/results/ (and copied to $OUT when set)
#
# Liger-Kernel (a baseline of the KD benchmarks) is installed from .whl/ when present: run
# benchmarks/fetch_gpu_wheels.sh here first and carry .whl to a machine that cannot reach PyPI.
# Nothing is downloaded: the extension is built in place against the machine's own torch.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MPDISTIL_BUILD_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=$PWD/.torch_extensions TRITON_CACHE_DIR=$PWD/.triton_cache PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "carried wheels (.whl/, from benchmarks/fetch_gpu_wheels.sh)"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
else
  echo "none: the Liger-Kernel baseline rows are skipped"
fi

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build mpdistil_fast._C with CUDA kernels"
$PY setup.py -q build_ext --inplace || { echo "BUILD FAILED"; exit 1; }
$PY -c "from mpdistil_fast.backends import available_backends as a; [print(op, {k: v.available or v.reason for k, v in a(op, 'cuda').items()}) for op in ('kd_kl_div', 'kd_jsd', 'hidden_mse', 'meta_teacher_loss')]"

step "GPU tests (every backend on CUDA tensors)"
$PY -m pytest -q -x -m gpu tests/test_kd_kl_div.py tests/test_hidden_mse.py tests/test_meta_teacher.py || status=1

step "kernel benchmarks"
$PY benchmarks/bench_kd_kl_div.py --reps 50 --dtypes float32,bfloat16 || status=1
$PY benchmarks/bench_hidden_mse.py || status=1
$PY benchmarks/bench_meta_teacher.py || status=1

if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.csv benchmarks/results/*.png "$OUT"/ 2>/dev/null; fi
exit $status
