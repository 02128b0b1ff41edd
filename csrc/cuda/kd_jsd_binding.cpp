// CUDA kernels of mpdistil_C::kd_jsd_fwd / kd_jsd_bwd (schemas in csrc/cpu/kd_jsd.cpp): tensor checks, outputs,
// then the raw-pointer launchers of kd_jsd.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/kd_jsd.cuh"
#include "cuda/logits_binding.h"
#include "kd_jsd_checks.h"

namespace mpdistil::cuda {
namespace {

using mpdistil::check_jsd_beta;

std::tuple<at::Tensor, at::Tensor> kd_jsd_fwd_cuda(const at::Tensor& teacher_logits,
                                                   const at::Tensor& student_logits, double temperature,
                                                   double beta) {
  check_jsd_beta(beta);
  const auto [a, b] = checked_rows("kd_jsd", teacher_logits, student_logits);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto [jsd, stats] = row_outputs(a, kJsdStatsPerRow);
  C10_CUDA_CHECK(launch_kd_jsd_fwd(a.const_data_ptr(), b.const_data_ptr(), jsd.mutable_data_ptr(),
                                   stats.mutable_data_ptr(), a.size(0), a.size(1), a.stride(0), b.stride(0),
                                   temperature, beta, logits_type("kd_jsd", a), c10::cuda::getCurrentCUDAStream()));
  return {jsd, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_jsd_bwd_cuda(const at::Tensor& grad_jsd, const at::Tensor& teacher_logits,
                                                   const at::Tensor& student_logits, const at::Tensor& stats,
                                                   double temperature, double beta, bool need_grad_teacher,
                                                   bool need_grad_student) {
  check_jsd_beta(beta);
  const auto [a, b] = checked_rows("kd_jsd", teacher_logits, student_logits);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t rows = a.size(0), vocab = a.size(1);
  TORCH_CHECK(grad_jsd.numel() == rows && stats.numel() == rows * kJsdStatsPerRow,
              "kd_jsd_bwd: per-row tensors do not match ", rows, " rows");
  check_on_logits_device("kd_jsd_bwd", "grad_jsd", grad_jsd, a);
  check_on_logits_device("kd_jsd_bwd", "stats", stats, a);
  const auto acc = acc_scalar_type(a);
  const at::Tensor grad_rows = grad_jsd.to(acc).contiguous(), stats_rows = stats.to(acc).contiguous();
  const auto [grad_teacher, grad_student] = gradient_outputs(a, need_grad_teacher, need_grad_student);
  C10_CUDA_CHECK(launch_kd_jsd_bwd(grad_rows.const_data_ptr(), a.const_data_ptr(), b.const_data_ptr(),
                                   stats_rows.const_data_ptr(),
                                   need_grad_teacher ? grad_teacher.mutable_data_ptr() : nullptr,
                                   need_grad_student ? grad_student.mutable_data_ptr() : nullptr, rows, vocab,
                                   a.stride(0), b.stride(0), temperature, beta, logits_type("kd_jsd", a),
                                   c10::cuda::getCurrentCUDAStream()));
  return {grad_teacher, grad_student};
}

}  // namespace
}  // namespace mpdistil::cuda

TORCH_LIBRARY_IMPL(mpdistil_C, CUDA, m) {
  m.impl("kd_jsd_fwd", &mpdistil::cuda::kd_jsd_fwd_cuda);
  m.impl("kd_jsd_bwd", &mpdistil::cuda::kd_jsd_bwd_cuda);
}
