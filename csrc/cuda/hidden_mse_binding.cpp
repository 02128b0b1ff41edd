// CUDA registration of mpdistil_C::hidden_mse_fwd/_bwd: argument checks, the optional projection as cuBLAS
// GEMMs over all layer pairs' rows (at::linear), and the fused row kernels of hidden_mse.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "grid_limits.h"
#include "hidden_mse.cuh"

namespace {

using mpdistil::cuda::ElementType;
using mpdistil::cuda::HiddenMSEArgs;
using mpdistil::cuda::kMaxGridX;
using mpdistil::cuda::kMaxGridY;

ElementType element_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kDouble: return ElementType::kFloat64;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    default: TORCH_CHECK(false, "hidden_mse: unsupported dtype ", t.scalar_type());
  }
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

struct Prepared {
  at::Tensor student, teacher, y, y_layers, t_layers, mask;
  HiddenMSEArgs args;
};

// The selected student layers x = student[student_layers] [P, N, H_s] in the accumulation type, gathered on the
// device (the layer lists never come to the host: no stream sync per call).
at::Tensor selected_layers(const at::Tensor& student, const at::Tensor& student_layers, at::ScalarType acc) {
  return student.index_select(0, student_layers).to(acc);
}

// The row stack the kernels read as y: the student itself, or its projection W x + b of every pair in one GEMM
// ([P, N, H_t]).  Layer indices are not checked on the host (that would copy them there, a stream sync per call):
// the kernels and index_select check them on the device, as torch's indexing kernels do (a device-side assert);
// the Python layer checks layer maps before any launch.
Prepared prepare(const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& student_layers,
                 const at::Tensor& teacher_layers, const c10::optional<at::Tensor>& mask,
                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                 const c10::optional<at::Tensor>& projected, bool normalize) {
  TORCH_CHECK(student_in.is_cuda() && teacher_in.device() == student_in.device(),
              "hidden_mse: student and teacher must be on one CUDA device");
  // the kernels read the index tensors and the mask through raw device pointers
  TORCH_CHECK(student_layers.device() == student_in.device() && teacher_layers.device() == student_in.device(),
              "hidden_mse: student_layers and teacher_layers must be on the stacks' device ", student_in.device());
  TORCH_CHECK(!mask.has_value() || mask->device() == student_in.device(), "hidden_mse: the mask must be on ",
              student_in.device());
  TORCH_CHECK(student_in.dim() == 3 && teacher_in.dim() == 3 && student_in.size(1) == teacher_in.size(1),
              "hidden_mse: student and teacher must be [L, N, H] stacks with the same rows");
  TORCH_CHECK(student_layers.numel() == teacher_layers.numel(), "hidden_mse: layer index lengths differ");
  // the kernels accumulate in the teacher's type into buffers of the student's: one dtype for both
  TORCH_CHECK(student_in.scalar_type() == teacher_in.scalar_type(), "hidden_mse: student and teacher dtypes differ");
  TORCH_CHECK(!mask.has_value() || (mask->scalar_type() == at::kBool && mask->numel() == student_in.size(1)),
              "hidden_mse: the mask must be a bool tensor with one entry per row");
  Prepared out;
  out.student = student_in.contiguous();
  out.teacher = teacher_in.contiguous();
  out.t_layers = teacher_layers.to(at::kLong).contiguous();
  const int64_t pairs = student_layers.numel(), rows = out.student.size(1), width = out.teacher.size(2);
  // the grids (hidden_mse.cu): forward row tiles along x and pairs along y, backward one block per row along x
  TORCH_CHECK(rows <= kMaxGridX, "hidden_mse: ", rows, " rows exceed the CUDA grid's ", kMaxGridX,
              " blocks along x (one block per row in the backward)");
  TORCH_CHECK(pairs <= kMaxGridY, "hidden_mse: ", pairs, " layer pairs exceed the CUDA grid's ", kMaxGridY,
              " blocks along y (one per pair in the forward)");
  const at::ScalarType acc = acc_type(out.student);
  if (weight.has_value()) {
    if (projected.has_value() && projected->numel() > 0) {
      // forward's projected rows, read as the y stack [P, N, H_t] (row stride H_t)
      TORCH_CHECK(projected->device() == student_in.device() && projected->dim() == 3 && projected->size(0) == pairs &&
                      projected->size(1) == rows && projected->size(2) == width && projected->is_contiguous(),
                  "hidden_mse: projected must be the forward's contiguous [", pairs, ", ", rows, ", ", width,
                  "] rows on ", student_in.device());
      out.y = *projected;
    } else {
      const at::Tensor x = selected_layers(out.student, student_layers, acc);
      out.y = at::linear(x, weight->to(acc), bias.has_value() ? c10::optional<at::Tensor>(bias->to(acc))
                                                               : c10::nullopt).contiguous();
    }
    out.y_layers = at::arange(pairs, out.t_layers.options());
  } else {
    TORCH_CHECK(out.student.size(2) == width, "hidden_mse: student and teacher widths differ and no projection given");
    out.y = out.student;
    out.y_layers = student_layers.to(at::kLong).contiguous();
  }
  if (mask.has_value()) out.mask = mask->contiguous();
  out.args = HiddenMSEArgs{out.y.data_ptr(), element_type(out.y), out.y.stride(0), out.y.size(0),
                           out.teacher.data_ptr(), element_type(out.teacher), out.teacher.stride(0),
                           out.teacher.size(0), out.y_layers.data_ptr<int64_t>(), out.t_layers.data_ptr<int64_t>(),
                           mask.has_value() ? out.mask.data_ptr<bool>() : nullptr, pairs, rows, width, normalize};
  return out;
}

std::tuple<at::Tensor, at::Tensor> hidden_mse_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                       const at::Tensor& student_layers,
                                                       const at::Tensor& teacher_layers,
                                                       const c10::optional<at::Tensor>& mask,
                                                       const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& bias, bool normalize) {
  const c10::cuda::CUDAGuard guard(student.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // a kernel: inner ATen calls skip autograd
  Prepared prep = prepare(student, teacher, student_layers, teacher_layers, mask, weight, bias, c10::nullopt,
                          normalize);
  const at::ScalarType acc = acc_type(prep.student);
  at::Tensor row_sse = at::empty({student_layers.numel(), prep.student.size(1)}, prep.student.options().dtype(acc));
  mpdistil::cuda::launch_hidden_mse_fwd(prep.args, row_sse.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor projected = weight.has_value() ? prep.y : at::empty({0}, row_sse.options());
  return {row_sse.sum(1), projected};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hidden_mse_bwd_cuda(
    const at::Tensor& grad_sse, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& student_layers, const at::Tensor& teacher_layers, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& projected,
    bool normalize, bool need_teacher_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // a kernel: inner ATen calls skip autograd
  Prepared prep = prepare(student, teacher, student_layers, teacher_layers, mask, weight, bias, projected, normalize);
  const at::TensorOptions acc_opts = prep.student.options().dtype(acc_type(prep.student));
  TORCH_CHECK(grad_sse.numel() == student_layers.numel() && grad_sse.device() == student.device(),
              "hidden_mse_bwd: grad_sse must have one entry per layer pair (", student_layers.numel(), ") on ",
              student.device());
  const at::Tensor scale = grad_sse.to(acc_opts.dtype()).contiguous();
  at::Tensor grad_y = at::zeros(prep.y.sizes(), acc_opts);
  at::Tensor grad_t = need_teacher_grad ? at::zeros(prep.teacher.sizes(), acc_opts) : at::empty({0}, acc_opts);
  mpdistil::cuda::launch_hidden_mse_bwd(prep.args, scale.data_ptr(), grad_y.data_ptr(),
                                        need_teacher_grad ? grad_t.data_ptr() : nullptr,
                                        c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor grad_teacher = grad_t.to(prep.teacher.scalar_type());
  if (!weight.has_value()) {
    return {grad_y.to(prep.student.scalar_type()), grad_teacher, at::empty({0}, acc_opts), at::empty({0}, acc_opts)};
  }
  // y_p = x_p W^T + b:  dW = sum_p g_p^T x_p and dx_p = g_p W (one GEMM each over all pairs' rows, fp32
  // accumulation), db = sum g; dx_p is added to student layer student_layers[p] (pairs may share a layer)
  const at::ScalarType acc = acc_type(prep.student);
  at::Tensor x = selected_layers(prep.student, student_layers, acc);
  // g is 0 on masked rows, but padding may hold NaN/inf: 0 * NaN in the GEMM would poison dW
  if (mask.has_value()) x.masked_fill_(prep.mask.logical_not().view({1, -1, 1}), 0);
  const int64_t width_s = prep.student.size(2);
  const at::Tensor grad_weight = at::mm(grad_y.view({-1, grad_y.size(2)}).t(), x.view({-1, width_s}));
  at::Tensor grad_student = at::zeros(prep.student.sizes(), acc_opts);
  grad_student.index_put_({student_layers}, at::matmul(grad_y, weight->to(acc)), /*accumulate=*/true);
  const at::Tensor grad_bias =
      bias.has_value() ? grad_y.sum(at::IntArrayRef{0, 1}).to(bias->scalar_type()) : at::empty({0}, acc_opts);
  return {grad_student.to(prep.student.scalar_type()), grad_teacher, grad_weight.to(weight->scalar_type()), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mpdistil_C, CUDA, m) {
  m.impl("hidden_mse_fwd", &hidden_mse_fwd_cuda);
  m.impl("hidden_mse_bwd", &hidden_mse_bwd_cuda);
}
