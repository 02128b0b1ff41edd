// The MPDistil meta-teacher loss around its GEMMs, shared by the CPU and CUDA registrations
// (Sengupta et al., ICLR 2024):
//
//   h_S' = h_S P^T + c                        (optional projection of a narrower student to the teacher width)
//   D(h) = h W1^T + b1,  or  GELU(h W1^T + b1) W2^T + b2 when a hidden layer is given
//   z_T = D(h_T), z_S = D(h_S')
//   collaborative: 0.5 CE(z_T, y) + 0.5 CE(z_S, y)
//   competitive:   CE(z_T, y) - p_D(y | h_T) + p_D(y | h_S)         (each averaged over the batch)
//
// Each loss term is a_ce * CE + a_p * p_y per row, with d/dz = a_ce (p - e_y) + a_p p_y (e_y - p).  The GEMMs go
// through ATen (MKL on CPU, cuBLAS on CUDA); the device supplies the fused row passes (softmax / CE / gold
// probability / dL/dz, GELU and GELU') as RowKernels.  Forward already computes dL/dz (the loss is a scalar), so
// backward is GEMMs plus one GELU' pass.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <tuple>
#include <vector>

namespace mpdistil::meta_teacher {

// Loss coefficients (a_ce, a_p) of a row for each mode: teacher rows, then student rows.
struct RowCoefficients {
  double ce, gold_probability;
};

inline RowCoefficients coefficients(bool competitive, bool student_rows) {
  if (!competitive) return {0.5, 0.0};
  return student_rows ? RowCoefficients{0.0, 1.0} : RowCoefficients{1.0, -1.0};
}

// The device's fused row passes and linear layers (all tensors in the accumulation dtype, contiguous).
struct RowKernels {
  // Rows [0, B) of z [2B, K] are teacher rows, [B, 2B) student rows (labels [B] for both halves).  Writes dL/dz
  // into dz and returns the 0-dim loss; labels outside [0, K) raise (CPU) or give NaN (CUDA).
  virtual at::Tensor softmax_loss(const at::Tensor& z, const at::Tensor& labels, bool competitive,
                                  at::Tensor& dz) const = 0;
  // act = GELU(pre) (exact, erf).
  virtual void gelu(const at::Tensor& pre, at::Tensor& act) const = 0;
  // grad_pre = grad_act * GELU'(pre).
  virtual void gelu_grad(const at::Tensor& pre, const at::Tensor& grad_act, at::Tensor& grad_pre) const = 0;

  // out = x W^T + b (x [M, H], W [N, H]); ATen's GEMM unless a device has a faster path for the shape.
  virtual void linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor out) const {
    at::addmm_out(out, bias, x, weight.t());
  }

  // Gradients of out = [x_a; x_b] W^T + b (x_b may be undefined) for grad_out [M_a + M_b, N]: W and b always,
  // and dL/dx_a, dL/dx_b into the given tensors when not null (without concatenating the inputs).
  virtual void linear_backward(const at::Tensor& grad_out, const at::Tensor& x_a, const at::Tensor& x_b,
                               const at::Tensor& weight, at::Tensor& grad_weight, at::Tensor& grad_bias,
                               at::Tensor* grad_x_a, at::Tensor* grad_x_b) const {
    const int64_t rows_a = x_a.size(0);
    const at::Tensor grad_a = grad_out.narrow(0, 0, rows_a);
    grad_weight = at::mm(grad_a.t(), x_a);
    grad_bias = grad_out.sum(0);
    if (grad_x_a != nullptr) *grad_x_a = at::mm(grad_a, weight);
    if (x_b.defined()) {
      const at::Tensor grad_b = grad_out.narrow(0, rows_a, x_b.size(0));
      grad_weight.addmm_(grad_b.t(), x_b);
      if (grad_x_b != nullptr) *grad_x_b = at::mm(grad_b, weight);
    }
  }
  virtual ~RowKernels() = default;
};

inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// Returns (loss, teacher logits, student logits, dL/dz [2B, K], hidden pre-activations [2B, hidden] or empty,
// projected student [B, H] or empty).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& h_teacher, const at::Tensor& h_student, const c10::optional<at::Tensor>& proj_weight,
    const c10::optional<at::Tensor>& proj_bias, const at::Tensor& w1, const at::Tensor& b1,
    const c10::optional<at::Tensor>& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& labels_in,
    bool competitive, const RowKernels& kernels) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // a kernel: inner ATen calls skip autograd
  TORCH_CHECK(h_teacher.dim() == 2 && h_student.dim() == 2 && h_teacher.size(0) == h_student.size(0),
              "meta_teacher_loss: h_teacher and h_student must be [B, H] with the same batch");
  TORCH_CHECK(h_teacher.size(0) > 0, "meta_teacher_loss: empty batch");
  const at::ScalarType acc = h_teacher.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = h_teacher.size(0), H = h_teacher.size(1);
  const bool mlp = w2.has_value();
  // The shapes the kernels index by (the Python layer checks them too; a direct torch.ops call must not read past
  // a tensor).  Label values are checked there only (a min/max costs a host sync; validate_labels=False skips it).
  TORCH_CHECK(labels_in.numel() == B, "meta_teacher_loss: labels must have one entry per row");
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == H && b1.numel() == w1.size(0),
              "meta_teacher_loss: the first layer must be W [out, H] with a bias [out]");
  TORCH_CHECK(!mlp || (w2->dim() == 2 && w2->size(1) == w1.size(0) && b2.has_value() && b2->numel() == w2->size(0)),
              "meta_teacher_loss: the second layer must be W2 [K, hidden] with a bias [K]");
  TORCH_CHECK(proj_weight.has_value() ? (proj_weight->dim() == 2 && proj_weight->size(0) == H &&
                                         proj_weight->size(1) == h_student.size(1))
                                      : h_student.size(1) == H,
              "meta_teacher_loss: h_student must be [B, H], or [B, H_s] with a projection [H, H_s]");
  const int64_t K = mlp ? w2->size(0) : w1.size(0);
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::TensorOptions opts = h_teacher.options().dtype(acc);
  const at::Tensor h_t = to_acc(h_teacher, acc), w1_acc = to_acc(w1, acc), b1_acc = to_acc(b1, acc);
  at::Tensor projected = at::empty({0}, opts), h_s = to_acc(h_student, acc);
  if (proj_weight.has_value()) {
    projected = at::empty({B, H}, opts);
    const at::Tensor bias = proj_bias.has_value() ? to_acc(*proj_bias, acc) : at::zeros({H}, opts);
    kernels.linear(h_s, to_acc(*proj_weight, acc), bias, projected);
    h_s = projected;
  }
  at::Tensor z = at::empty({2 * B, K}, opts), hidden_pre = at::empty({0}, opts);
  if (mlp) {
    hidden_pre = at::empty({2 * B, w1.size(0)}, opts);
    kernels.linear(h_t, w1_acc, b1_acc, hidden_pre.narrow(0, 0, B));
    kernels.linear(h_s, w1_acc, b1_acc, hidden_pre.narrow(0, B, B));
    at::Tensor activation = at::empty_like(hidden_pre);
    kernels.gelu(hidden_pre, activation);
    kernels.linear(activation, to_acc(*w2, acc), to_acc(*b2, acc), z);
  } else {
    kernels.linear(h_t, w1_acc, b1_acc, z.narrow(0, 0, B));
    kernels.linear(h_s, w1_acc, b1_acc, z.narrow(0, B, B));
  }
  at::Tensor dlogits = at::empty_like(z);
  const at::Tensor loss = kernels.softmax_loss(z, labels, competitive, dlogits);
  const at::ScalarType out_dtype = h_teacher.scalar_type();
  return {loss, z.narrow(0, 0, B).to(out_dtype, false, true),
          z.narrow(0, B, B).to(out_dtype, false, true), dlogits, hidden_pre, projected};
}

// Gradients of grad_loss * loss: (h_teacher or empty, h_student or empty, proj_weight, proj_bias, w1, b1, w2, b2),
// empty tensors for parameters that are absent.
inline std::vector<at::Tensor> backward(
    const at::Tensor& grad_loss, const at::Tensor& dlogits, const at::Tensor& h_teacher, const at::Tensor& h_student,
    const c10::optional<at::Tensor>& proj_weight, const c10::optional<at::Tensor>& proj_bias, const at::Tensor& w1,
    const c10::optional<at::Tensor>& w2, const at::Tensor& hidden_pre, const at::Tensor& projected,
    bool need_h_teacher, bool need_h_student, const RowKernels& kernels) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = dlogits.scalar_type();
  const int64_t B = h_teacher.size(0);
  const at::TensorOptions opts = h_teacher.options().dtype(acc);
  const at::Tensor h_t = to_acc(h_teacher, acc), h_student_acc = to_acc(h_student, acc);
  const bool has_proj = proj_weight.has_value();
  const at::Tensor h_s = has_proj ? projected : h_student_acc;
  const at::Tensor dz = dlogits * grad_loss.to(acc);
  at::Tensor grad_w2 = at::empty({0}, opts), grad_b2 = at::empty({0}, opts), grad_rows = dz;
  if (w2.has_value()) {  // second layer, then GELU'
    at::Tensor activation = at::empty_like(hidden_pre);
    kernels.gelu(hidden_pre, activation);
    at::Tensor grad_act_t, grad_act_s, grad_pre = at::empty_like(hidden_pre);
    kernels.linear_backward(dz, activation.narrow(0, 0, B), activation.narrow(0, B, B), to_acc(*w2, acc), grad_w2,
                            grad_b2, &grad_act_t, &grad_act_s);
    kernels.gelu_grad(hidden_pre, at::cat({grad_act_t, grad_act_s}), grad_pre);
    grad_w2 = grad_w2.to(w2->scalar_type());
    grad_b2 = grad_b2.to(w2->scalar_type());
    grad_rows = grad_pre;
  }
  at::Tensor grad_w1, grad_b1, grad_h_t, grad_h_s;
  kernels.linear_backward(grad_rows, h_t, h_s, to_acc(w1, acc), grad_w1, grad_b1, need_h_teacher ? &grad_h_t : nullptr,
                          has_proj || need_h_student ? &grad_h_s : nullptr);
  at::Tensor grad_h_teacher = need_h_teacher ? grad_h_t.to(h_teacher.scalar_type()) : at::empty({0}, opts);
  at::Tensor grad_h_student = at::empty({0}, opts), grad_proj_weight = at::empty({0}, opts),
             grad_proj_bias = at::empty({0}, opts);
  if (has_proj) {  // h_S' = h_S P^T + c
    at::Tensor grad_x;
    kernels.linear_backward(grad_h_s, h_student_acc, at::Tensor(), to_acc(*proj_weight, acc), grad_proj_weight,
                            grad_proj_bias, need_h_student ? &grad_x : nullptr, nullptr);
    grad_proj_weight = grad_proj_weight.to(proj_weight->scalar_type());
    grad_proj_bias = proj_bias.has_value() ? grad_proj_bias.to(proj_bias->scalar_type()) : at::empty({0}, opts);
    if (need_h_student) grad_h_student = grad_x.to(h_student.scalar_type());
  } else if (need_h_student) {
    grad_h_student = grad_h_s.to(h_student.scalar_type());
  }
  return {grad_h_teacher, grad_h_student, grad_proj_weight, grad_proj_bias, grad_w1.to(w1.scalar_type()),
          grad_b1.to(w1.scalar_type()), grad_w2, grad_b2};
}

}  // namespace mpdistil::meta_teacher
