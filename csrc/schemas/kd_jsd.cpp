// Fused generalized Jensen-Shannon divergence: the schemas of torch.ops.mpdistil_C.kd_jsd_*, built into
// mpdistil_fast._C.  Kernels register against them from csrc/cpu/kd_jsd.cpp (in the loaded
// mpdistil_fast._cpu_<isa> library) and csrc/cuda/kd_jsd_binding.cpp (in _C, CUDA builds).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mpdistil_C, m) {
  m.def("kd_jsd_fwd(Tensor teacher_logits, Tensor student_logits, float temperature, float beta) "
        "-> (Tensor jsd, Tensor stats)");
  m.def(
      "kd_jsd_bwd(Tensor grad_jsd, Tensor teacher_logits, Tensor student_logits, Tensor stats, float temperature, "
      "float beta, bool need_grad_teacher, bool need_grad_student) -> (Tensor grad_teacher, Tensor grad_student)");
  // Forward and the gradients of sum_r weight * row_weight[r] * jsd[r] in one pass over the logits.
  m.def(
      "kd_jsd_fwd_grad(Tensor teacher_logits, Tensor student_logits, float temperature, float beta, "
      "Tensor? row_weight, float weight, bool need_grad_teacher, bool need_grad_student) "
      "-> (Tensor jsd, Tensor stats, Tensor grad_teacher, Tensor grad_student)");
}
