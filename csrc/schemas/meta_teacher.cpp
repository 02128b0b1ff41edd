// Fused meta-teacher discriminator loss: the schemas of torch.ops.mpdistil_C.meta_teacher_loss_*, built into
// mpdistil_fast._C.  Kernels register against them from csrc/cpu/meta_teacher.cpp (in the loaded
// mpdistil_fast._cpu_<isa> library) and csrc/cuda/meta_teacher_binding.cpp (in _C, CUDA builds).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mpdistil_C, m) {
  m.def("meta_teacher_loss_fwd(Tensor h_teacher, Tensor h_student, Tensor? proj_weight, Tensor? proj_bias, "
        "Tensor w1, Tensor b1, Tensor? w2, Tensor? b2, Tensor labels, bool competitive) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("meta_teacher_loss_bwd(Tensor grad_loss, Tensor dlogits, Tensor h_teacher, Tensor h_student, "
        "Tensor? proj_weight, Tensor? proj_bias, Tensor w1, Tensor? w2, Tensor hidden_pre, Tensor projected, "
        "bool need_h_teacher, bool need_h_student) -> Tensor[]");
}
