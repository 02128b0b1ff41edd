// Fused temperature-softmax KL divergence: the schemas of torch.ops.mpdistil_C.kd_kl_div_*, built into
// mpdistil_fast._C.  Kernels register against them from csrc/cpu/kd_kl_div.cpp (in the loaded
// mpdistil_fast._cpu_<isa> library) and csrc/cuda/kd_kl_div_binding.cpp (in _C, CUDA builds).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mpdistil_C, m) {
  m.def("kd_kl_div_fwd(Tensor p_logits, Tensor q_logits, float temperature) -> (Tensor kl, Tensor stats)");
  m.def(
      "kd_kl_div_bwd(Tensor grad_kl, Tensor p_logits, Tensor q_logits, Tensor stats, float temperature, "
      "bool need_grad_p, bool need_grad_q) -> (Tensor grad_p, Tensor grad_q)");
  // Forward and the gradients of sum_r weight * row_weight[r] * kl[r] in one pass over the logits.
  m.def(
      "kd_kl_div_fwd_grad(Tensor p_logits, Tensor q_logits, float temperature, Tensor? row_weight, float weight, "
      "bool need_grad_p, bool need_grad_q) -> (Tensor kl, Tensor stats, Tensor grad_p, Tensor grad_q)");
}
