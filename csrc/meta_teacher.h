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

#include <ATen/ATen.h>

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

// The device's fused row passes (all tensors in the accumulation dtype, contiguous).
struct RowKernels {
  // Rows [0, B) of z [2B, K] are teacher rows, [B, 2B) student rows (labels [B] for both halves).  Writes dL/dz
  // into dz and returns the 0-dim loss; labels outside [0, K) raise (CPU) or give NaN (CUDA).
  virtual at::Tensor softmax_loss(const at::Tensor& z, const at::Tensor& labels, bool competitive,
                                  at::Tensor& dz) const = 0;
  // act = GELU(pre) (exact, erf).
  virtual void gelu(const at::Tensor& pre, at::Tensor& act) const = 0;
  // act = GELU(pre), grad_pre = grad_act * GELU'(pre), in one pass.
  virtual void gelu_backward(const at::Tensor& pre, const at::Tensor& grad_act, at::Tensor& act,
                             at::Tensor& grad_pre) const = 0;
  virtual ~RowKernels() = default;
};

// out = x W^T + b through ATen's GEMM.
inline void linear_out(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  at::addmm_out(out, bias, x, weight.t());
}

inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// Returns (loss, teacher logits, student logits, dL/dz [2B, K], hidden pre-activations [2B, hidden] or empty,
// projected student [B, H] or empty).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& h_teacher, const at::Tensor& h_student, const c10::optional<at::Tensor>& proj_weight,
    const c10::optional<at::Tensor>& proj_bias, const at::Tensor& w1, const at::Tensor& b1,
    const c10::optional<at::Tensor>& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& labels_in,
    bool competitive, const RowKernels& kernels) {
  TORCH_CHECK(h_teacher.dim() == 2 && h_student.dim() == 2 && h_teacher.size(0) == h_student.size(0),
              "meta_teacher_loss: h_teacher and h_student must be [B, H] with the same batch");
  TORCH_CHECK(h_teacher.size(0) > 0, "meta_teacher_loss: empty batch");
  const at::ScalarType acc = h_teacher.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = h_teacher.size(0), H = h_teacher.size(1);
  const bool mlp = w2.has_value();
  const int64_t K = mlp ? w2->size(0) : w1.size(0);
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::TensorOptions opts = h_teacher.options().dtype(acc);
  const at::Tensor h_t = to_acc(h_teacher, acc), w1_acc = to_acc(w1, acc), b1_acc = to_acc(b1, acc);
  at::Tensor projected = at::empty({0}, opts), h_s = to_acc(h_student, acc);
  if (proj_weight.has_value()) {
    projected = at::empty({B, H}, opts);
    const at::Tensor bias = proj_bias.has_value() ? to_acc(*proj_bias, acc) : at::zeros({H}, opts);
    linear_out(projected, h_s, to_acc(*proj_weight, acc), bias);
    h_s = projected;
  }
  at::Tensor z = at::empty({2 * B, K}, opts), hidden_pre = at::empty({0}, opts);
  if (mlp) {
    const int64_t hidden = w1.size(0);
    hidden_pre = at::empty({2 * B, hidden}, opts);
    linear_out(hidden_pre.narrow(0, 0, B), h_t, w1_acc, b1_acc);
    linear_out(hidden_pre.narrow(0, B, B), h_s, w1_acc, b1_acc);
    at::Tensor activation = at::empty_like(hidden_pre);
    kernels.gelu(hidden_pre, activation);
    linear_out(z, activation, to_acc(*w2, acc), to_acc(*b2, acc));
  } else {
    linear_out(z.narrow(0, 0, B), h_t, w1_acc, b1_acc);
    linear_out(z.narrow(0, B, B), h_s, w1_acc, b1_acc);
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
  const at::ScalarType acc = dlogits.scalar_type();
  const int64_t B = h_teacher.size(0);
  const at::TensorOptions opts = h_teacher.options().dtype(acc);
  const at::Tensor h_t = to_acc(h_teacher, acc), h_student_acc = to_acc(h_student, acc);
  const at::Tensor h_s = proj_weight.has_value() ? projected : h_student_acc;
  const at::Tensor w1_acc = to_acc(w1, acc);
  const at::Tensor dz = dlogits * grad_loss.to(acc);
  const auto split_weight_grad = [&](const at::Tensor& grad_rows, const at::Tensor& input_t, const at::Tensor& input_s) {
    // d W = grad_rows^T [input_t; input_s] without concatenating the inputs.
    return at::mm(grad_rows.narrow(0, 0, B).t(), input_t).addmm_(grad_rows.narrow(0, B, B).t(), input_s);
  };
  at::Tensor grad_w2 = at::empty({0}, opts), grad_b2 = at::empty({0}, opts), grad_rows = dz, weight_rows = w1_acc;
  if (w2.has_value()) {
    const at::Tensor w2_acc = to_acc(*w2, acc);
    at::Tensor activation = at::empty_like(hidden_pre), grad_pre = at::empty_like(hidden_pre);
    const at::Tensor grad_activation = at::mm(dz, w2_acc);
    kernels.gelu_backward(hidden_pre, grad_activation, activation, grad_pre);
    grad_w2 = at::mm(dz.t(), activation).to(w2->scalar_type());
    grad_b2 = dz.sum(0).to(w2->scalar_type());
    grad_rows = grad_pre;
  }
  const at::Tensor grad_w1 = split_weight_grad(grad_rows, h_t, h_s).to(w1.scalar_type());
  const at::Tensor grad_b1 = grad_rows.sum(0).to(w1.scalar_type());
  at::Tensor grad_h_teacher = at::empty({0}, opts), grad_h_student = at::empty({0}, opts);
  at::Tensor grad_proj_weight = at::empty({0}, opts), grad_proj_bias = at::empty({0}, opts);
  if (need_h_teacher) grad_h_teacher = at::mm(grad_rows.narrow(0, 0, B), weight_rows).to(h_teacher.scalar_type());
  if (proj_weight.has_value() || need_h_student) {
    const at::Tensor grad_h_s = at::mm(grad_rows.narrow(0, B, B), weight_rows);
    if (proj_weight.has_value()) {
      grad_proj_weight = at::mm(grad_h_s.t(), h_student_acc).to(proj_weight->scalar_type());
      if (proj_bias.has_value()) grad_proj_bias = grad_h_s.sum(0).to(proj_bias->scalar_type());
      if (need_h_student) grad_h_student = at::mm(grad_h_s, to_acc(*proj_weight, acc)).to(h_student.scalar_type());
    } else {
      grad_h_student = grad_h_s.to(h_student.scalar_type());
    }
  }
  return {grad_h_teacher, grad_h_student, grad_proj_weight, grad_proj_bias, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace mpdistil::meta_teacher
