// CUDA kernels of mpdistil_C::kd_kl_div_fwd / kd_kl_div_bwd (schemas in csrc/cpu/kd_kl_div.cpp): tensor checks,
// outputs, then the raw-pointer launchers of kd_kl_div.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/kd_kl_div.cuh"

namespace mpdistil::cuda {
namespace {

LogitsType logits_type(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return LogitsType::kFloat32;
    case at::kHalf:
      return LogitsType::kFloat16;
    case at::kBFloat16:
      return LogitsType::kBFloat16;
    case at::kDouble:
      return LogitsType::kFloat64;
    default:
      TORCH_CHECK(false, "kd_kl_div: logits must be float32, float16, bfloat16 or float64, got ",
                  logits.scalar_type());
  }
}

at::ScalarType acc_scalar_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// [N, V] logits with unit stride along V, on one CUDA device.
std::pair<at::Tensor, at::Tensor> checked_rows(const at::Tensor& p_logits, const at::Tensor& q_logits) {
  TORCH_CHECK(p_logits.dim() == 2 && p_logits.sizes() == q_logits.sizes(),
              "kd_kl_div: logits must be two equal-shaped 2-D [rows, vocab] tensors, got ", p_logits.sizes(), " and ",
              q_logits.sizes());
  TORCH_CHECK(p_logits.scalar_type() == q_logits.scalar_type(), "kd_kl_div: logits dtypes differ");
  TORCH_CHECK(p_logits.is_cuda() && q_logits.device() == p_logits.device(),
              "kd_kl_div: logits must be on one CUDA device");
  TORCH_CHECK(p_logits.size(1) >= 1, "kd_kl_div: vocabulary size must be >= 1");
  const auto unit_stride = [](const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); };
  return {unit_stride(p_logits), unit_stride(q_logits)};
}

std::tuple<at::Tensor, at::Tensor> kd_kl_div_fwd_cuda(const at::Tensor& p_logits, const at::Tensor& q_logits,
                                                      double temperature) {
  const auto [a, b] = checked_rows(p_logits, q_logits);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto options = a.options().dtype(acc_scalar_type(a));
  at::Tensor kl = at::empty({a.size(0)}, options);
  at::Tensor stats = at::empty({a.size(0), kStatsPerRow}, options);
  C10_CUDA_CHECK(launch_kd_kl_div_fwd(a.const_data_ptr(), b.const_data_ptr(), kl.mutable_data_ptr(),
                                      stats.mutable_data_ptr(), a.size(0), a.size(1), a.stride(0), b.stride(0),
                                      temperature, logits_type(a), c10::cuda::getCurrentCUDAStream()));
  return {kl, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_kl_div_bwd_cuda(const at::Tensor& grad_kl, const at::Tensor& p_logits,
                                                      const at::Tensor& q_logits, const at::Tensor& stats,
                                                      double temperature, bool need_grad_p, bool need_grad_q) {
  const auto [a, b] = checked_rows(p_logits, q_logits);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t rows = a.size(0), vocab = a.size(1);
  TORCH_CHECK(grad_kl.numel() == rows && stats.numel() == rows * kStatsPerRow,
              "kd_kl_div_bwd: per-row tensors do not match ", rows, " rows");
  const auto acc = acc_scalar_type(a);
  const at::Tensor grad_rows = grad_kl.to(acc).contiguous(), stats_rows = stats.to(acc).contiguous();
  const auto gradient = [&](bool needed) {
    return needed ? at::empty({rows, vocab}, a.options()) : at::empty({0}, a.options());
  };
  at::Tensor grad_p = gradient(need_grad_p), grad_q = gradient(need_grad_q);
  C10_CUDA_CHECK(launch_kd_kl_div_bwd(grad_rows.const_data_ptr(), a.const_data_ptr(), b.const_data_ptr(),
                                      stats_rows.const_data_ptr(), need_grad_p ? grad_p.mutable_data_ptr() : nullptr,
                                      need_grad_q ? grad_q.mutable_data_ptr() : nullptr, rows, vocab, a.stride(0),
                                      b.stride(0), temperature, logits_type(a), c10::cuda::getCurrentCUDAStream()));
  return {grad_p, grad_q};
}

}  // namespace
}  // namespace mpdistil::cuda

TORCH_LIBRARY_IMPL(mpdistil_C, CUDA, m) {
  m.impl("kd_kl_div_fwd", &mpdistil::cuda::kd_kl_div_fwd_cuda);
  m.impl("kd_kl_div_bwd", &mpdistil::cuda::kd_kl_div_bwd_cuda);
}
