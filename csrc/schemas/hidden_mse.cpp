// Fused hidden-state MSE: the schemas of torch.ops.mpdistil_C.hidden_mse_*, built into
// mpdistil_fast._C.  Kernels register against them from csrc/cpu/hidden_mse.cpp (in the loaded
// mpdistil_fast._cpu_<isa> library) and csrc/cuda/hidden_mse_binding.cpp (in _C, CUDA builds).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mpdistil_C, m) {
  m.def("hidden_mse_fwd(Tensor student, Tensor teacher, Tensor student_layers, Tensor teacher_layers, Tensor? mask, "
        "Tensor? weight, Tensor? bias, bool normalize) -> (Tensor, Tensor)");
  m.def("hidden_mse_bwd(Tensor grad_sse, Tensor student, Tensor teacher, Tensor student_layers, "
        "Tensor teacher_layers, Tensor? mask, Tensor? weight, Tensor? bias, Tensor projected, bool normalize, "
        "bool need_teacher_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}
