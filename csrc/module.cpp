// Python module stub for mpdistil_fast._C and the one TORCH_LIBRARY block of the `mpdistil_C` namespace.
// Each op lives in its own file and adds its schema with TORCH_LIBRARY_FRAGMENT(mpdistil_C, m) and its
// kernels with TORCH_LIBRARY_IMPL(mpdistil_C, CPU|CUDA, m); importing this module runs those registrations.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mpdistil_C, m) {}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C",
      "mpdistil_fast fused kernels; the ops are registered as torch.ops.mpdistil_C.*", -1, nullptr};
  return PyModule_Create(&module);
}
