// CUDA kernels of mpdistil_C::kd_kl_div_fwd / kd_kl_div_bwd / kd_kl_div_fwd_grad (schemas in csrc/cpu/kd_kl_div.cpp): tensor checks,
// outputs, then the raw-pointer launchers of kd_kl_div.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string_view>

#include "cuda/kd_kl_div.cuh"
#include "cuda/logits_binding.h"

namespace mpdistil::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> kd_kl_div_fwd_cuda(const at::Tensor& p_logits, const at::Tensor& q_logits,
                                                      double temperature) {
  const auto [a, b] = checked_rows("kd_kl_div", p_logits, q_logits);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto [kl, stats] = row_outputs(a, kKlStatsPerRow);
  C10_CUDA_CHECK(launch_kd_kl_div_fwd(a.const_data_ptr(), b.const_data_ptr(), kl.mutable_data_ptr(),
                                      stats.mutable_data_ptr(), a.size(0), a.size(1), a.stride(0), b.stride(0),
                                      temperature, logits_type("kd_kl_div", a), c10::cuda::getCurrentCUDAStream()));
  return {kl, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_kl_div_bwd_cuda(const at::Tensor& grad_kl, const at::Tensor& p_logits,
                                                      const at::Tensor& q_logits, const at::Tensor& stats,
                                                      double temperature, bool need_grad_p, bool need_grad_q) {
  const auto [a, b] = checked_rows("kd_kl_div", p_logits, q_logits);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t rows = a.size(0), vocab = a.size(1);
  TORCH_CHECK(grad_kl.numel() == rows && stats.numel() == rows * kKlStatsPerRow,
              "kd_kl_div_bwd: per-row tensors do not match ", rows, " rows");
  check_on_logits_device("kd_kl_div_bwd", "grad_kl", grad_kl, a);
  check_on_logits_device("kd_kl_div_bwd", "stats", stats, a);
  const auto acc = acc_scalar_type(a);
  const at::Tensor grad_rows = grad_kl.to(acc).contiguous(), stats_rows = stats.to(acc).contiguous();
  const auto [grad_p, grad_q] = gradient_outputs(a, need_grad_p, need_grad_q);
  C10_CUDA_CHECK(launch_kd_kl_div_bwd(grad_rows.const_data_ptr(), a.const_data_ptr(), b.const_data_ptr(),
                                      stats_rows.const_data_ptr(), need_grad_p ? grad_p.mutable_data_ptr() : nullptr,
                                      need_grad_q ? grad_q.mutable_data_ptr() : nullptr, rows, vocab, a.stride(0),
                                      b.stride(0), temperature, logits_type("kd_kl_div", a), c10::cuda::getCurrentCUDAStream()));
  return {grad_p, grad_q};
}

// Packs per thread asked of the row-resident forward+gradient kernel by MPDISTIL_KL_ROW_RESIDENT: "1", "2" or "4";
// unset, empty or "0" for the two-sweep kernel (see launch_kd_kl_div_fwd_grad).
int row_resident_packs() {
  const char* value = std::getenv("MPDISTIL_KL_ROW_RESIDENT");
  const std::string_view text = value == nullptr ? "" : value;
  if (text.empty() || text == "0") return 0;
  TORCH_CHECK(text == "1" || text == "2" || text == "4",
              "MPDISTIL_KL_ROW_RESIDENT must be 0, 1, 2 or 4 (16-byte packs per thread), got '", text, "'");
  return text[0] - '0';
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_kl_div_fwd_grad_cuda(
    const at::Tensor& p_logits, const at::Tensor& q_logits, double temperature,
    const std::optional<at::Tensor>& row_weight, double weight, bool need_grad_p, bool need_grad_q) {
  const auto [a, b] = checked_rows("kd_kl_div", p_logits, q_logits);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t rows = a.size(0), vocab = a.size(1);
  const auto [kl, stats] = row_outputs(a, kKlStatsPerRow);
  at::Tensor weights;
  if (row_weight.has_value()) {
    TORCH_CHECK(row_weight->numel() == rows, "kd_kl_div_fwd_grad: row_weight must have ", rows, " entries");
    check_on_logits_device("kd_kl_div_fwd_grad", "row_weight", *row_weight, a);
    weights = row_weight->to(stats.scalar_type()).contiguous();
  }
  const auto [grad_p, grad_q] = gradient_outputs(a, need_grad_p, need_grad_q);
  C10_CUDA_CHECK(launch_kd_kl_div_fwd_grad(
      a.const_data_ptr(), b.const_data_ptr(), kl.mutable_data_ptr(), stats.mutable_data_ptr(),
      weights.defined() ? weights.const_data_ptr() : nullptr, weight,
      need_grad_p ? grad_p.mutable_data_ptr() : nullptr, need_grad_q ? grad_q.mutable_data_ptr() : nullptr, rows,
      vocab, a.stride(0), b.stride(0), temperature, row_resident_packs(), logits_type("kd_kl_div", a),
      c10::cuda::getCurrentCUDAStream()));
  return {kl, stats, grad_p, grad_q};
}

}  // namespace
}  // namespace mpdistil::cuda

TORCH_LIBRARY_IMPL(mpdistil_C, CUDA, m) {
  m.impl("kd_kl_div_fwd", &mpdistil::cuda::kd_kl_div_fwd_cuda);
  m.impl("kd_kl_div_bwd", &mpdistil::cuda::kd_kl_div_bwd_cuda);
  m.impl("kd_kl_div_fwd_grad", &mpdistil::cuda::kd_kl_div_fwd_grad_cuda);
}
