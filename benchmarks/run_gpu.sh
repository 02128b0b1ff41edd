#!/usr/bin/env bash
# The one device check (H100/H200 through the device tool, or any CUDA machine with torch + triton + nvcc):
# build the CUDA kernels, run the GPU tests, time every fused kernel, print a short table, keep the CSV/PNG.
#
#   bash benchmarks/run_gpu.sh [SECONDS]   # stop starting steps after SECONDS (default 540); results in
#                                          # benchmarks/results/gpu/ (emptied first: only this run's rows),
#                                          # logs (machine.log: GPU, driver, versions, backends) + results
#                                          # as $OUT/gpu_run.tar.gz when set
#
# Liger-Kernel (a baseline of the KD benchmarks) is installed from .whl/ when present: run
# benchmarks/fetch_gpu_wheels.sh here first and carry .whl to a machine that cannot reach PyPI.
# Nothing is downloaded: the extension is built in place against the machine's own torch.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# One CPU kernel build (avx2) beside the CUDA kernels: extensions build one after the other, and the GPU run needs
# no more CPU code than a working `cpp` backend.
export PYTHONUNBUFFERED=1 MPDISTIL_BUILD_CUDA=1 MPDISTIL_CPU_ARCH=${MPDISTIL_CPU_ARCH:-avx2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=$PWD/.torch_extensions TRITON_CACHE_DIR=$PWD/.triton_cache PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${1:-540}))
# this run's results only (benchmarks/harness.py writes there), never the committed CPU tables beside them
export MPDISTIL_BENCH_RESULTS=$PWD/benchmarks/results/gpu
rm -rf "$MPDISTIL_BENCH_RESULTS"
LOGS=$MPDISTIL_BENCH_RESULTS/logs
mkdir -p "$LOGS"
status=0
# save: this run's results and logs so far as $OUT/gpu_run.tar.gz (when OUT is set), after every step: a run cut off
# from outside (the device call's limit, which can be below SECONDS when little device time is left) keeps what the
# steps before produced.  Written aside and renamed, so a kill during tar leaves the previous archive whole.
save() {
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/.gpu_run.tar.gz.part" -C benchmarks/results gpu && mv -f "$OUT/.gpu_run.tar.gz.part" "$OUT/gpu_run.tar.gz"
}
# step NAME CAP COMMAND...: run with a timeout of CAP seconds or what is left before the deadline (less 10 s).
step() {
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - SECONDS - 10))
  (( left < cap )) && cap=$left
  echo; echo "=== $name ($(date +%T), up to ${cap}s)"
  if (( cap < 15 )); then echo "SKIPPED: no time left"; status=1; return 1; fi
  timeout -k 10 "$cap" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  (( rc != 0 )) && { echo "STEP $name FAILED (exit $rc)"; status=1; }
  save
  return "$rc"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
else
  echo "no carried wheels (.whl/): the Liger-Kernel baseline rows are skipped"
fi
# what the numbers were measured on, kept beside them (logs/machine.log; the CSV rows name the GPU and the software)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), run started $(date -u +%FT%TZ)"
} 2>&1 | tee "$LOGS/machine.log"
save

# a failed build still leaves the Triton backends (they need no extension) to test and time
step build 270 $PY setup.py -q build_ext --inplace || echo "BUILD FAILED: going on with what runs without it"
# An uninstalled checkout has kernels/ and configs/ but no mpdistil_fast.kernels / .configs: link them.
bash scripts/link_source_packages.sh
$PY -c "from mpdistil_fast.backends import available_backends as a; [print(op, {k: v.available or v.reason for k, v in a(op, 'cuda').items()}) for op in ('kd_kl_div', 'kd_jsd', 'hidden_mse', 'meta_teacher_loss')]" 2>&1 | tee -a "$LOGS/machine.log"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
# a kernel that hangs (the row-resident cluster kernel has not run on a GPU yet) fails its test, not the step
TIMEOUT=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=90 --timeout-method=thread")
step tests 200 $PY -m pytest -q -m gpu $XDIST $TIMEOUT -p no:cacheprovider --tb=short -rf tests/test_kd_kl_div.py tests/test_hidden_mse.py tests/test_meta_teacher.py tests/test_grid_sync.py tests/test_checkpoint.py
# The fused kernels against eager and Liger first (the KL's bandwidth target needs these rows); torch.compile, which
# compiles every case anew (tens of seconds each), last, in a folder of its own, with the time that is left.
step bench_kd 150 $PY benchmarks/bench_kd_kl_div.py --reps 30 --losses kl,jsd --dtypes float32,bfloat16 --no-compile
step bench_meta 90 $PY benchmarks/bench_meta_teacher.py --no-compile
step bench_hidden 90 $PY benchmarks/bench_hidden_mse.py --no-compile --reps 20
MPDISTIL_BENCH_RESULTS=$MPDISTIL_BENCH_RESULTS/with_compile step bench_kd_compile 200 \
  $PY benchmarks/bench_kd_kl_div.py --reps 30 --losses kl --dtypes float32,bfloat16

echo; echo "=== summary"
grep -h "passed\|failed\|MISMATCH" "$LOGS"/tests.log "$LOGS"/bench_*.log 2>/dev/null | tail -20
for csv in "$MPDISTIL_BENCH_RESULTS"/{kd_kl_div,hidden_mse,meta_teacher,with_compile/kd_kl_div}.csv; do
  [ -f "$csv" ] && $PY -c "
import csv, sys
for r in csv.DictReader(open(sys.argv[1])):
    extra = r['extra']
    kernels = extra.find('kernels=')  # the kernel count and time, with the fraction of copy bandwidth, when there
    print(r['device'][:20], r['kernel_name'][:10], r['provider'][:24].ljust(24), r['mode'][:4], r['x'][:28].ljust(28),
          r['p50'].rjust(9), r['unit'], extra[kernels:] if kernels >= 0 else extra[:70])
" "$csv"
done
save
exit $status
