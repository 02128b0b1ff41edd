// Fused hidden-state MSE (FitNets / patient KD / TinyBERT hint loss) on CPU, forward and backward.
//
// For every layer pair p = (student_layers[p], teacher_layers[p]) and every valid row n (token or pooled vector):
//   y = W s + b            (projection, optional; s = student[student_layers[p], n])
//   t = teacher[teacher_layers[p], n]
//   y, t <- y / max(||y||, eps), t / max(||t||, eps)      (normalize=True, patient KD)
//   sse[p] += ||y - t||^2
// The selected layers are read in place through the index tensors (no gathered copy of the teacher).  The
// projection GEMMs go through ATen (MKL) on the valid rows only; everything elementwise is one fused pass per row.
// Forward saves the projected rows (when projecting); backward recomputes norms in one pass per row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using mpdistil::cpu::acc_type_t;
using mpdistil::cpu::OutputCache;
using mpdistil::cpu::row_grain;

// Buffers reused from call to call once nothing references them (see OutputCache): the projected rows saved for
// backward, the returned gradients, and the packed-row workspaces of the projection GEMMs.  Without them the
// first-touch page faults of fresh buffers cost ~10% of a projected, masked step at [6, 32, 128, 768].
OutputCache projected_cache, grad_student_cache, grad_teacher_cache, packed_cache, grad_y_cache, grad_x_cache;

constexpr double kNormEps = 1e-12;  // same clamp as torch.nn.functional.normalize

// Rows that take part in the loss: the indices of true mask entries, or all rows.
std::vector<int64_t> valid_rows(const c10::optional<at::Tensor>& mask, int64_t rows) {
  std::vector<int64_t> out;
  if (!mask.has_value()) {
    out.resize(rows);
    for (int64_t n = 0; n < rows; ++n) out[n] = n;
    return out;
  }
  const at::Tensor m = mask->contiguous();
  const bool* flags = m.data_ptr<bool>();
  out.reserve(rows);
  for (int64_t n = 0; n < rows; ++n)
    if (flags[n]) out.push_back(n);
  return out;
}

// The layer indices of one side as a host list, each checked against that stack's `layers` (the Python layer checks
// them too; a direct torch.ops call must not read outside the stack).
std::vector<int64_t> index_list(const at::Tensor& index, int64_t layers) {
  const at::Tensor idx = index.to(at::kLong).contiguous();
  std::vector<int64_t> list(idx.data_ptr<int64_t>(), idx.data_ptr<int64_t>() + idx.numel());
  for (const int64_t layer : list) {
    TORCH_CHECK(0 <= layer && layer < layers, "hidden_mse: layer index ", layer, " outside a stack of ", layers);
  }
  return list;
}

// sum_h f(y_h, t_h) in acc_t; f takes two acc_t or two Vec<acc_t>.  Vectorised (two accumulators) when both rows
// are already acc_t (float32 / float64 inputs), a plain loop for bf16 / fp16 rows.
template <typename acc_t, typename y_t, typename t_t, typename F>
acc_t row_reduce(const y_t* y, const t_t* t, int64_t H, const F& f) {
  acc_t sum = 0;
  int64_t h = 0;
  if constexpr (std::is_same_v<y_t, acc_t> && std::is_same_v<t_t, acc_t>) {
    using V = mpdistil::cpu::Vec<acc_t>;
    constexpr int64_t width = V::size();
    V even(acc_t(0)), odd(acc_t(0));
    for (; h + 2 * width <= H; h += 2 * width) {
      even += f(V::loadu(y + h), V::loadu(t + h));
      odd += f(V::loadu(y + h + width), V::loadu(t + h + width));
    }
    sum = mpdistil::cpu::lane_sum(even + odd);
  }
  for (; h < H; ++h) sum += f(static_cast<acc_t>(y[h]), static_cast<acc_t>(t[h]));
  return sum;
}

// Norm of a row clamped at kNormEps, and whether the clamp was active (then the norm is a constant).
template <typename acc_t>
struct ClampedNorm {
  acc_t value;
  bool clamped;
};

template <typename acc_t, typename in_t>
ClampedNorm<acc_t> clamped_norm(const in_t* x, int64_t H) {
  const acc_t norm = std::sqrt(row_reduce<acc_t>(x, x, H, [](auto a, auto) { return a * a; }));
  return norm < acc_t(kNormEps) ? ClampedNorm<acc_t>{acc_t(kNormEps), true} : ClampedNorm<acc_t>{norm, false};
}

// Squared error of one row pair, optionally after L2 normalisation of both rows.
template <typename acc_t, typename y_t, typename t_t>
acc_t row_sse(const y_t* y, const t_t* t, int64_t H, bool normalize) {
  if (!normalize) return row_reduce<acc_t>(y, t, H, [](auto a, auto b) { return (a - b) * (a - b); });
  const acc_t inv_y = acc_t(1) / clamped_norm<acc_t>(y, H).value;
  const acc_t inv_t = acc_t(1) / clamped_norm<acc_t>(t, H).value;
  return row_reduce<acc_t>(y, t, H, [&](auto a, auto b) {
    using T = decltype(a);
    const T d = a * T(inv_y) - b * T(inv_t);
    return d * d;
  });
}

// Gradient of scale * row_sse with respect to y (written or added into gy) and t (added into gt, if not null).
// normalize: u = y / n_y, v = t / n_t, d = u - v;  dL/dy = (2 s d - u (u . 2 s d) [n_y not clamped]) / n_y,
// and symmetrically dL/dt with -2 s d.
template <typename acc_t, typename y_t, typename t_t, bool kAccumulateY>
void row_sse_backward(const y_t* y, const t_t* t, int64_t H, bool normalize, acc_t scale, acc_t* gy, acc_t* gt) {
  if (!normalize) {
    for (int64_t h = 0; h < H; ++h) {
      const acc_t g = acc_t(2) * scale * (static_cast<acc_t>(y[h]) - static_cast<acc_t>(t[h]));
      if constexpr (kAccumulateY) gy[h] += g; else gy[h] = g;
      if (gt) gt[h] -= g;
    }
    return;
  }
  const ClampedNorm<acc_t> ny = clamped_norm<acc_t>(y, H), nt = clamped_norm<acc_t>(t, H);
  const acc_t inv_y = acc_t(1) / ny.value, inv_t = acc_t(1) / nt.value;
  const acc_t uu = row_reduce<acc_t>(y, y, H, [](auto a, auto) { return a * a; }) * inv_y * inv_y;
  const acc_t uv = row_reduce<acc_t>(y, t, H, [](auto a, auto b) { return a * b; }) * inv_y * inv_t;
  const acc_t vv = row_reduce<acc_t>(t, t, H, [](auto a, auto) { return a * a; }) * inv_t * inv_t;
  const acc_t two_s = acc_t(2) * scale;
  const acc_t u_dot_gu = ny.clamped ? acc_t(0) : two_s * (uu - uv);   // u . dL/du
  const acc_t v_dot_gv = nt.clamped ? acc_t(0) : -two_s * (uv - vv);  // v . dL/dv
  for (int64_t h = 0; h < H; ++h) {
    const acc_t u = static_cast<acc_t>(y[h]) * inv_y, v = static_cast<acc_t>(t[h]) * inv_t;
    const acc_t gu = two_s * (u - v);
    const acc_t g = (gu - u * u_dot_gu) * inv_y;
    if constexpr (kAccumulateY) gy[h] += g; else gy[h] = g;
    if (gt) gt[h] += (-gu - v * v_dot_gv) * inv_t;
  }
}

// Student rows of one layer converted to acc_t and packed: out[r] = layer[rows[r]].
template <typename scalar_t, typename acc_t>
void gather_rows(const scalar_t* layer, const std::vector<int64_t>& rows, int64_t H, acc_t* out) {
  at::parallel_for(0, static_cast<int64_t>(rows.size()), row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = layer + rows[r] * H;
      acc_t* dst = out + r * H;
      for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<acc_t>(src[h]);
    }
  });
}

// The valid rows of one student layer as an acc_t [R, H_s] matrix: the layer itself when every row is valid and
// already acc_t (no copy), otherwise gathered into `packed`.
template <typename scalar_t, typename acc_t>
at::Tensor student_rows(const at::Tensor& student, int64_t layer, const std::vector<int64_t>& rows, bool all_rows,
                        at::Tensor& packed) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (all_rows) return student[layer];
  }
  gather_rows<scalar_t, acc_t>(student[layer].data_ptr<scalar_t>(), rows, student.size(2), packed.data_ptr<acc_t>());
  return packed;
}

// row += b (the projection's bias, added in the loss pass while the row is in L1: no broadcast copy of b into
// the GEMM output, which measured 11 ms per step at [6, 32, 128, 768]).
template <typename acc_t>
void add_bias_row(acc_t* row, const acc_t* b, int64_t H) {
  using V = mpdistil::cpu::Vec<acc_t>;
  int64_t h = 0;
  for (; h + V::size() <= H; h += V::size()) (V::loadu(row + h) + V::loadu(b + h)).store(row + h);
  for (; h < H; ++h) row[h] += b[h];
}

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& student_layers,
                  const at::Tensor& teacher_layers, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3, "hidden_mse: student and teacher must be [L, N, H] stacks");
  TORCH_CHECK(student.size(1) == teacher.size(1), "hidden_mse: student and teacher must have the same rows");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "hidden_mse: student and teacher dtypes differ");
  TORCH_CHECK(student_layers.numel() == teacher_layers.numel(), "hidden_mse: layer index lengths differ");
  TORCH_CHECK(!mask.has_value() || (mask->scalar_type() == at::kBool && mask->numel() == student.size(1)),
              "hidden_mse: mask must be a bool [N] tensor");
}

// Returns (sse [P] in the accumulation dtype, projected rows [P, N, H_t] or an empty tensor).
std::tuple<at::Tensor, at::Tensor> hidden_mse_fwd_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                      const at::Tensor& student_layers, const at::Tensor& teacher_layers,
                                                      const c10::optional<at::Tensor>& mask,
                                                      const c10::optional<at::Tensor>& weight,
                                                      const c10::optional<at::Tensor>& bias, bool normalize) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // a kernel: inner ATen calls skip autograd
  check_inputs(student_in, teacher_in, student_layers, teacher_layers, mask);
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const int64_t N = student.size(1), H_t = teacher.size(2), P = student_layers.numel();
  const at::ScalarType acc = acc_type(student);
  const std::vector<int64_t> rows = valid_rows(mask, N), s_idx = index_list(student_layers, student.size(0)),
                             t_idx = index_list(teacher_layers, teacher.size(0));
  const int64_t R = static_cast<int64_t>(rows.size());
  at::Tensor sse = at::zeros({P}, student.options().dtype(at::kDouble));
  at::Tensor projected = at::empty({0}, student.options().dtype(acc));
  at::Tensor weight_acc, packed;
  c10::optional<at::Tensor> bias_acc;
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == H_t && weight->size(1) == student.size(2),
                "hidden_mse: weight must be [H_teacher, H_student]");
    projected = projected_cache.take({P, N, H_t}, student.options().dtype(acc));
    weight_acc = weight->to(acc).contiguous();
    if (bias.has_value()) bias_acc = bias->to(acc).contiguous();
    packed = packed_cache.take_scratch({R, student.size(2)}, student.options().dtype(acc));
  } else {
    TORCH_CHECK(student.size(2) == H_t, "hidden_mse: student and teacher widths differ and no projection given");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "hidden_mse_fwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    double* sse_ptr = sse.data_ptr<double>();
    for (int64_t p = 0; p < P; ++p) {
      const scalar_t* t_layer = teacher[t_idx[p]].data_ptr<scalar_t>();
      auto reduce_rows = [&](auto row_sse_of) {
        return at::parallel_reduce(0, R, row_grain(H_t), 0.0, [&](int64_t begin, int64_t end, double partial) {
          for (int64_t r = begin; r < end; ++r) partial += static_cast<double>(row_sse_of(r));
          return partial;
        }, std::plus<double>());
      };
      if (weight.has_value()) {  // y = packed W^T (MKL), then y += b and the loss in one pass per row
        at::Tensor out = projected[p].narrow(0, 0, R);
        at::mm_out(out, student_rows<scalar_t, acc_t>(student, s_idx[p], rows, !mask.has_value(), packed),
                   weight_acc.t());
        acc_t* y = out.data_ptr<acc_t>();
        const acc_t* b = bias_acc.has_value() ? bias_acc->data_ptr<acc_t>() : nullptr;
        sse_ptr[p] = reduce_rows([&](int64_t r) {
          if (b != nullptr) add_bias_row(y + r * H_t, b, H_t);
          return row_sse<acc_t>(y + r * H_t, t_layer + rows[r] * H_t, H_t, normalize);
        });
      } else {
        const scalar_t* s_layer = student[s_idx[p]].data_ptr<scalar_t>();
        sse_ptr[p] = reduce_rows([&](int64_t r) {
          return row_sse<acc_t>(s_layer + rows[r] * H_t, t_layer + rows[r] * H_t, H_t, normalize);
        });
      }
    }
  });
  return {sse.to(acc), projected};
}

// Gradients of sum_p grad_sse[p] * sse[p]: (student, teacher or empty, weight or empty, bias or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hidden_mse_bwd_cpu(
    const at::Tensor& grad_sse, const at::Tensor& student_in, const at::Tensor& teacher_in,
    const at::Tensor& student_layers, const at::Tensor& teacher_layers, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& projected,
    bool normalize, bool need_teacher_grad) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_inputs(student_in, teacher_in, student_layers, teacher_layers, mask);
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const int64_t N = student.size(1), H_s = student.size(2), H_t = teacher.size(2), P = student_layers.numel();
  const at::ScalarType acc = acc_type(student);
  const std::vector<int64_t> rows = valid_rows(mask, N), s_idx = index_list(student_layers, student.size(0)),
                             t_idx = index_list(teacher_layers, teacher.size(0));
  const int64_t R = static_cast<int64_t>(rows.size());
  const at::Tensor scale = grad_sse.to(at::kDouble).contiguous();
  const at::TensorOptions acc_opts = student.options().dtype(acc);
  // Gradients are accumulated in the accumulation dtype (several pairs may share a layer), cast at the end.
  at::Tensor grad_student = grad_student_cache.take(student.sizes(), acc_opts).zero_();
  at::Tensor grad_teacher = need_teacher_grad ? grad_teacher_cache.take(teacher.sizes(), acc_opts).zero_()
                                              : at::empty({0}, acc_opts);
  at::Tensor grad_weight = at::empty({0}, acc_opts), grad_bias = at::empty({0}, acc_opts);
  at::Tensor weight_acc, packed, grad_y, grad_x;
  if (weight.has_value()) {
    weight_acc = weight->to(acc).contiguous();
    grad_weight = at::zeros({H_t, H_s}, acc_opts);
    grad_bias = at::zeros({H_t}, acc_opts);
    packed = packed_cache.take_scratch({R, H_s}, acc_opts);
    grad_y = grad_y_cache.take_scratch({R, H_t}, acc_opts);
    grad_x = grad_x_cache.take_scratch({R, H_s}, acc_opts);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "hidden_mse_bwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const double* scale_ptr = scale.data_ptr<double>();
    for (int64_t p = 0; p < P; ++p) {
      const acc_t s = static_cast<acc_t>(scale_ptr[p]);
      const scalar_t* t_layer = teacher[t_idx[p]].data_ptr<scalar_t>();
      acc_t* gt_layer = need_teacher_grad ? grad_teacher[t_idx[p]].data_ptr<acc_t>() : nullptr;
      acc_t* gs_layer = grad_student[s_idx[p]].data_ptr<acc_t>();
      if (weight.has_value()) {
        const acc_t* y = projected[p].data_ptr<acc_t>();
        acc_t* gy = grad_y.data_ptr<acc_t>();
        at::parallel_for(0, R, row_grain(H_t), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r)
            row_sse_backward<acc_t, acc_t, scalar_t, false>(y + r * H_t, t_layer + rows[r] * H_t, H_t, normalize, s,
                                                             gy + r * H_t, gt_layer ? gt_layer + rows[r] * H_t : nullptr);
        });
        const bool all_rows = !mask.has_value();
        const at::Tensor x = student_rows<scalar_t, acc_t>(student, s_idx[p], rows, all_rows, packed);
        grad_weight.addmm_(grad_y.t(), x);  // fp32 (or fp64) accumulation across pairs and rows
        grad_bias.add_(grad_y.sum(0));
        if (std::is_same_v<scalar_t, acc_t> && all_rows) {  // every row valid: accumulate in place, no scatter
          grad_student[s_idx[p]].addmm_(grad_y, weight_acc);
          continue;
        }
        at::mm_out(grad_x, grad_y, weight_acc);
        const acc_t* gx = grad_x.data_ptr<acc_t>();
        at::parallel_for(0, R, row_grain(H_t), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            acc_t* dst = gs_layer + rows[r] * H_s;
            const acc_t* src = gx + r * H_s;
            for (int64_t h = 0; h < H_s; ++h) dst[h] += src[h];
          }
        });
      } else {
        const scalar_t* s_layer = student[s_idx[p]].data_ptr<scalar_t>();
        at::parallel_for(0, R, row_grain(H_t), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t n = rows[r];
            row_sse_backward<acc_t, scalar_t, scalar_t, true>(s_layer + n * H_t, t_layer + n * H_t, H_t, normalize, s,
                                                              gs_layer + n * H_t, gt_layer ? gt_layer + n * H_t : nullptr);
          }
        });
      }
    }
  });
  const at::Tensor grad_bias_out = bias.has_value() ? grad_bias.to(bias->scalar_type()) : at::empty({0}, acc_opts);
  const at::Tensor grad_weight_out = weight.has_value() ? grad_weight.to(weight->scalar_type()) : grad_weight;
  return {grad_student.to(student.scalar_type()), grad_teacher.to(teacher.scalar_type()), grad_weight_out,
          grad_bias_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(mpdistil_C, CPU, m) {
  m.impl("hidden_mse_fwd", &hidden_mse_fwd_cpu);
  m.impl("hidden_mse_bwd", &hidden_mse_bwd_cpu);
}
