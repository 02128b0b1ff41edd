// Python module stub for mpdistil_fast._C and the one TORCH_LIBRARY block of the `mpdistil_C` namespace.
// _C holds the op schemas (csrc/schemas/, one file per op, TORCH_LIBRARY_FRAGMENT) and the CUDA kernels
// (csrc/cuda/, TORCH_LIBRARY_IMPL(mpdistil_C, CUDA, m)).  The CPU kernels (csrc/cpu/) are built once per
// instruction set into separate libraries mpdistil_fast._cpu_<isa>; mpdistil_fast.backends loads exactly one of
// them after this module, the widest that torch's CPU capability allows.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mpdistil_C, m) {}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C",
      "mpdistil_fast fused kernels; the ops are registered as torch.ops.mpdistil_C.*", -1, nullptr};
  return PyModule_Create(&module);
}
