// CUDA registration of mpdistil_C::meta_teacher_loss_fwd/_bwd: the shared GEMM orchestration of
// csrc/meta_teacher.h (cuBLAS through ATen) with the row kernels of meta_teacher.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "grid_limits.h"
#include "meta_teacher.cuh"
#include "meta_teacher.h"

namespace {

namespace mt = mpdistil::meta_teacher;

struct CudaRowKernels final : mt::RowKernels {
  at::Tensor softmax_loss(const at::Tensor& z, const at::Tensor& labels, bool competitive,
                          at::Tensor& dz) const override {
    // the row kernel reads the labels through a raw device pointer (the Python layer checks the device too)
    TORCH_CHECK(labels.device() == z.device(), "meta_teacher_loss: labels must be on ", z.device(), ", got ",
                labels.device());
    const int64_t batch = labels.numel();
    // 2B rows, one thread each, in blocks along grid x (meta_teacher.cu; the GELU kernels stride a capped grid)
    using mpdistil::cuda::kMaxGridX, mpdistil::cuda::kMetaTeacherRowThreads;
    TORCH_CHECK((2 * batch + kMetaTeacherRowThreads - 1) / kMetaTeacherRowThreads <= kMaxGridX, "meta_teacher_loss: ",
                2 * batch, " rows (2 x ", batch, " labels) exceed the CUDA grid's ", kMaxGridX, " blocks of ",
                kMetaTeacherRowThreads, " rows along x");
    const mt::RowCoefficients teacher = mt::coefficients(competitive, false), student = mt::coefficients(competitive, true);
    const double coefficients[4] = {teacher.ce, teacher.gold_probability, student.ce, student.gold_probability};
    at::Tensor row_loss = at::empty({2 * batch}, z.options());
    mpdistil::cuda::launch_meta_teacher_softmax(z.data_ptr(), labels.data_ptr<int64_t>(), batch, z.size(1),
                                                coefficients, dz.data_ptr(), row_loss.data_ptr(),
                                                z.scalar_type() == at::kDouble, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return row_loss.sum();
  }

  void gelu(const at::Tensor& pre, at::Tensor& act) const override {
    mpdistil::cuda::launch_gelu_forward(pre.data_ptr(), act.data_ptr(), pre.numel(), pre.scalar_type() == at::kDouble,
                                        c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void gelu_grad(const at::Tensor& pre, const at::Tensor& grad_act, at::Tensor& grad_pre) const override {
    mpdistil::cuda::launch_gelu_grad(pre.data_ptr(), grad_act.data_ptr(), grad_pre.data_ptr(), pre.numel(),
                                     pre.scalar_type() == at::kDouble, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_teacher_loss_fwd_cuda(
    const at::Tensor& h_teacher, const at::Tensor& h_student, const c10::optional<at::Tensor>& proj_weight,
    const c10::optional<at::Tensor>& proj_bias, const at::Tensor& w1, const at::Tensor& b1,
    const c10::optional<at::Tensor>& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& labels,
    bool competitive) {
  const c10::cuda::CUDAGuard guard(h_teacher.device());
  return mt::forward(h_teacher, h_student, proj_weight, proj_bias, w1, b1, w2, b2, labels, competitive,
                     CudaRowKernels{});
}

std::vector<at::Tensor> meta_teacher_loss_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& dlogits, const at::Tensor& h_teacher, const at::Tensor& h_student,
    const c10::optional<at::Tensor>& proj_weight, const c10::optional<at::Tensor>& proj_bias, const at::Tensor& w1,
    const c10::optional<at::Tensor>& w2, const at::Tensor& hidden_pre, const at::Tensor& projected,
    bool need_h_teacher, bool need_h_student) {
  const c10::cuda::CUDAGuard guard(h_teacher.device());
  return mt::backward(grad_loss, dlogits, h_teacher, h_student, proj_weight, proj_bias, w1, w2, hidden_pre, projected,
                      need_h_teacher, need_h_student, CudaRowKernels{});
}

}  // namespace

TORCH_LIBRARY_IMPL(mpdistil_C, CUDA, m) {
  m.impl("meta_teacher_loss_fwd", &meta_teacher_loss_fwd_cuda);
  m.impl("meta_teacher_loss_bwd", &meta_teacher_loss_bwd_cuda);
}
