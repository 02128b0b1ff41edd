#!/usr/bin/env bash
# Run the Triton-backend tests under another Triton release's interpreter (default 3.6.0, the GPU machines'
# version; this machine's own tests use the installed Triton), in a throwaway virtualenv that shares this
# environment's torch and mpdistil_fast.  It checks the kernels against that release's language front end and
# interpreter, then compiles every kernel variant the library launches for sm_90 (H100/H200) with that release's
# own compiler and ptxas, without a GPU (scripts/compile_triton_gpu.py; not the generated code's results).
#
#   bash scripts/check_triton_version.sh [VERSION]
set -euo pipefail
VERSION=${1:-3.6.0}
VENV=${TRITON_CHECK_VENV:-${TMPDIR:-/tmp}/mpdistil-triton-$VERSION}
cd "$(dirname "$0")/.."
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --no-deps "triton==$VERSION"
# Triton 3.6's interpreter converts 1-element arrays with int(), which numpy >= 2.3 refuses.
"$VENV/bin/pip" install -q "numpy<2.3"
"$VENV/bin/python" -c "import triton; print('triton', triton.__version__, 'from', triton.__file__)"
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -k triton -p no:cacheprovider \
  tests/test_kd_kl_div.py tests/test_hidden_mse.py tests/test_meta_teacher.py
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_grid_sync.py  # all Triton
# GPU code generation (lowering, tl.dot constraints, shared memory, ptxas) of Triton $VERSION, interpreter off
env -u TRITON_INTERPRET "$VENV/bin/python" scripts/compile_triton_gpu.py
