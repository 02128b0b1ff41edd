// Fused MPDistil meta-teacher (discriminator) loss on CPU, forward and backward (Sengupta et al., ICLR 2024).
//
//   h_S' = h_S P^T + c                        (optional projection of a narrower student to the teacher width)
//   D(h) = h W1^T + b1,  or  GELU(h W1^T + b1) W2^T + b2 when a hidden layer is given
//   z_T = D(h_T), z_S = D(h_S')
//   collaborative: 0.5 CE(z_T, y) + 0.5 CE(z_S, y)
//   competitive:   CE(z_T, y) - p_D(y | h_T) + p_D(y | h_S)         (each averaged over the batch)
// Each loss term is a_ce * CE + a_p * p_y per row, with d/dz = a_ce (p - e_y) + a_p p_y (e_y - p).
// The GEMMs run through ATen (MKL); bias, GELU, softmax, CE, gold probabilities and their derivatives are fused
// row passes.  Forward already computes dL/dz (the loss is a scalar), so backward is GEMMs plus one GELU' pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common.h"

namespace {

using mpdistil::cpu::acc_type_t;
using mpdistil::cpu::row_grain;

// Loss coefficients (a_ce, a_p) of the teacher and student rows for each mode.
struct RowCoefficients {
  double ce, gold_probability;
};

RowCoefficients teacher_coefficients(bool competitive) { return competitive ? RowCoefficients{1, -1} : RowCoefficients{0.5, 0}; }
RowCoefficients student_coefficients(bool competitive) { return competitive ? RowCoefficients{0, 1} : RowCoefficients{0.5, 0}; }

// Loss of rows [0, rows) of z ([rows, K]) under coefficients c, divided by `batch`; writes dL/dz into dz.
template <typename acc_t>
double softmax_loss_rows(const acc_t* z, const int64_t* labels, int64_t rows, int64_t K, RowCoefficients c,
                         double batch, acc_t* dz) {
  return at::parallel_reduce(0, rows, row_grain(K), 0.0, [&](int64_t begin, int64_t end, double partial) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* zi = z + i * K;
      acc_t* gi = dz + i * K;
      const int64_t y = labels[i];
      acc_t max_z = -std::numeric_limits<acc_t>::infinity();
      for (int64_t k = 0; k < K; ++k) max_z = std::max(max_z, zi[k]);
      acc_t sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        gi[k] = std::exp(zi[k] - max_z);
        sum += gi[k];
      }
      const acc_t inv_sum = acc_t(1) / sum;
      const acc_t ce = max_z + std::log(sum) - zi[y];
      const acc_t p_y = gi[y] * inv_sum;
      const acc_t a_ce = static_cast<acc_t>(c.ce / batch), a_p = static_cast<acc_t>(c.gold_probability / batch);
      for (int64_t k = 0; k < K; ++k) {
        const acc_t p = gi[k] * inv_sum;
        const acc_t onehot = k == y ? acc_t(1) : acc_t(0);
        gi[k] = a_ce * (p - onehot) + a_p * p_y * (onehot - p);
      }
      partial += static_cast<double>(a_ce * ce + a_p * p_y);
    }
    return partial;
  }, std::plus<double>());
}

template <typename acc_t>
inline acc_t gelu(acc_t x) {
  return acc_t(0.5) * x * (acc_t(1) + std::erf(x * acc_t(M_SQRT1_2)));
}

// g = GELU(a) in place of `out`, elementwise over n values.
template <typename acc_t>
void gelu_forward(const acc_t* a, int64_t n, acc_t* out) {
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = gelu(a[i]);
  });
}

// g = GELU(a) and grad_a = grad_g * GELU'(a) in one pass; GELU'(a) = Phi(a) + a phi(a).
template <typename acc_t>
void gelu_backward(const acc_t* a, const acc_t* grad_g, int64_t n, acc_t* g, acc_t* grad_a) {
  const acc_t inv_sqrt_2pi = acc_t(0.3989422804014327);
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t x = a[i];
      const acc_t cdf = acc_t(0.5) * (acc_t(1) + std::erf(x * acc_t(M_SQRT1_2)));
      g[i] = x * cdf;
      grad_a[i] = grad_g[i] * (cdf + x * inv_sqrt_2pi * std::exp(acc_t(-0.5) * x * x));
    }
  });
}

// out = x W^T + b through ATen's GEMM.
void linear_out(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  at::addmm_out(out, bias, x, weight.t());
}

at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// Returns (loss, teacher logits, student logits, dL/dz [2B, K], hidden pre-activations [2B, hidden] or empty,
// projected student [B, H] or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_teacher_loss_fwd_cpu(
    const at::Tensor& h_teacher, const at::Tensor& h_student, const c10::optional<at::Tensor>& proj_weight,
    const c10::optional<at::Tensor>& proj_bias, const at::Tensor& w1, const at::Tensor& b1,
    const c10::optional<at::Tensor>& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& labels_in,
    bool competitive) {
  TORCH_CHECK(h_teacher.dim() == 2 && h_student.dim() == 2 && h_teacher.size(0) == h_student.size(0),
              "meta_teacher_loss: h_teacher and h_student must be [B, H] with the same batch");
  TORCH_CHECK(h_teacher.size(0) > 0, "meta_teacher_loss: empty batch");
  const at::ScalarType acc = h_teacher.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = h_teacher.size(0), H = h_teacher.size(1);
  const bool mlp = w2.has_value();
  const int64_t K = mlp ? w2->size(0) : w1.size(0);
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t* label_ptr = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i)
    TORCH_CHECK(label_ptr[i] >= 0 && label_ptr[i] < K, "meta_teacher_loss: labels must lie in [0, ", K, "), got ",
                label_ptr[i]);
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
    AT_DISPATCH_FLOATING_TYPES(acc, "meta_teacher_gelu", [&] {
      gelu_forward<scalar_t>(hidden_pre.data_ptr<scalar_t>(), hidden_pre.numel(), activation.data_ptr<scalar_t>());
    });
    linear_out(z, activation, to_acc(*w2, acc), to_acc(*b2, acc));
  } else {
    linear_out(z.narrow(0, 0, B), h_t, w1_acc, b1_acc);
    linear_out(z.narrow(0, B, B), h_s, w1_acc, b1_acc);
  }
  at::Tensor dlogits = at::empty_like(z);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "meta_teacher_softmax", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* gp = dlogits.data_ptr<scalar_t>();
    loss = softmax_loss_rows<scalar_t>(zp, label_ptr, B, K, teacher_coefficients(competitive), B, gp) +
           softmax_loss_rows<scalar_t>(zp + B * K, label_ptr, B, K, student_coefficients(competitive), B, gp + B * K);
  });
  const at::ScalarType out_dtype = h_teacher.scalar_type();
  return {at::scalar_tensor(loss, opts), z.narrow(0, 0, B).to(out_dtype, false, true),
          z.narrow(0, B, B).to(out_dtype, false, true), dlogits, hidden_pre, projected};
}

// Gradients of grad_loss * loss: (h_teacher or empty, h_student or empty, proj_weight, proj_bias, w1, b1, w2, b2),
// empty tensors for parameters that are absent.
std::vector<at::Tensor> meta_teacher_loss_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& dlogits, const at::Tensor& h_teacher, const at::Tensor& h_student,
    const c10::optional<at::Tensor>& proj_weight, const c10::optional<at::Tensor>& proj_bias, const at::Tensor& w1,
    const c10::optional<at::Tensor>& w2, const at::Tensor& hidden_pre, const at::Tensor& projected,
    bool need_h_teacher, bool need_h_student) {
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
    AT_DISPATCH_FLOATING_TYPES(acc, "meta_teacher_gelu_bwd", [&] {
      gelu_backward<scalar_t>(hidden_pre.data_ptr<scalar_t>(), grad_activation.data_ptr<scalar_t>(),
                              hidden_pre.numel(), activation.data_ptr<scalar_t>(), grad_pre.data_ptr<scalar_t>());
    });
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(mpdistil_C, m) {
  m.def("meta_teacher_loss_fwd(Tensor h_teacher, Tensor h_student, Tensor? proj_weight, Tensor? proj_bias, "
        "Tensor w1, Tensor b1, Tensor? w2, Tensor? b2, Tensor labels, bool competitive) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("meta_teacher_loss_bwd(Tensor grad_loss, Tensor dlogits, Tensor h_teacher, Tensor h_student, "
        "Tensor? proj_weight, Tensor? proj_bias, Tensor w1, Tensor? w2, Tensor hidden_pre, Tensor projected, "
        "bool need_h_teacher, bool need_h_student) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mpdistil_C, CPU, m) {
  m.impl("meta_teacher_loss_fwd", &meta_teacher_loss_fwd_cpu);
  m.impl("meta_teacher_loss_bwd", &meta_teacher_loss_bwd_cpu);
}
