// CPU registration of the fused MPDistil meta-teacher loss (formulas in csrc/meta_teacher.h): the row passes
// (softmax / CE / gold probability / dL/dz, exact GELU and GELU') as parallel loops; GEMMs through MKL.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "meta_teacher.h"

namespace {

using mpdistil::cpu::lane_sum;
using mpdistil::cpu::row_grain;
using mpdistil::cpu::Vec;
using mpdistil::meta_teacher::RowCoefficients;

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

// Phi(x) = 0.5 (1 + erf(x / sqrt 2)) and phi(x) = exp(-x^2 / 2) / sqrt(2 pi), for scalars and ATen vectors.
template <typename T, typename acc_t>
inline T normal_cdf(const T& x) {
  if constexpr (std::is_same_v<T, acc_t>) return acc_t(0.5) * (acc_t(1) + std::erf(x * acc_t(M_SQRT1_2)));
  else return T(acc_t(0.5)) * (T(acc_t(1)) + (x * T(acc_t(M_SQRT1_2))).erf());
}

template <typename T, typename acc_t>
inline T normal_pdf(const T& x) {
  if constexpr (std::is_same_v<T, acc_t>) return acc_t(0.3989422804014327) * std::exp(acc_t(-0.5) * x * x);
  else return T(acc_t(0.3989422804014327)) * (T(acc_t(-0.5)) * x * x).exp();
}

// out[i] = f(i) over n values, vectorised with at::vec (f takes Vec<acc_t> or acc_t and an offset).
template <typename acc_t, typename F>
void elementwise(int64_t n, acc_t* out, const F& f) {
  using V = Vec<acc_t>;
  at::parallel_for(0, n, 8192, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + V::size() <= end; i += V::size()) f(V{}, i).store(out + i);
    for (; i < end; ++i) out[i] = f(acc_t{}, i);
  });
}

// act = GELU(a) = a Phi(a) (exact erf GELU, as BERT uses).
template <typename acc_t>
void gelu_forward(const acc_t* a, int64_t n, acc_t* out) {
  elementwise<acc_t>(n, out, [&](auto tag, int64_t i) {
    using T = decltype(tag);
    T x;
    if constexpr (std::is_same_v<T, acc_t>) x = a[i]; else x = T::loadu(a + i);
    return x * normal_cdf<T, acc_t>(x);
  });
}

// grad_a = grad_g * GELU'(a), GELU'(a) = Phi(a) + a phi(a).
template <typename acc_t>
void gelu_grad_rows(const acc_t* a, const acc_t* grad_g, int64_t n, acc_t* grad_a) {
  elementwise<acc_t>(n, grad_a, [&](auto tag, int64_t i) {
    using T = decltype(tag);
    T x, g;
    if constexpr (std::is_same_v<T, acc_t>) { x = a[i]; g = grad_g[i]; }
    else { x = T::loadu(a + i); g = T::loadu(grad_g + i); }
    return g * (normal_cdf<T, acc_t>(x) + x * normal_pdf<T, acc_t>(x));
  });
}

// A linear layer with at most kSkinnyOutputs outputs (the discriminator head: K labels) is memory-bound: one
// vectorised pass per input row beats a GEMM call, which handles such thin shapes poorly (forward and backward).
constexpr int64_t kSkinnyOutputs = 16;

// out[i, k] = b[k] + x_i . W_k (the row stays in L1 across the N dot products; two accumulators per dot).
template <typename acc_t>
void skinny_linear(const acc_t* x, const acc_t* w, const acc_t* b, int64_t rows, int64_t H, int64_t N, acc_t* out) {
  using V = Vec<acc_t>;
  constexpr int64_t width = V::size();
  at::parallel_for(0, rows, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* xi = x + i * H;
      for (int64_t k = 0; k < N; ++k) {
        const acc_t* wk = w + k * H;
        V even(acc_t(0)), odd(acc_t(0));
        int64_t h = 0;
        for (; h + 2 * width <= H; h += 2 * width) {
          even = at::vec::fmadd(V::loadu(xi + h), V::loadu(wk + h), even);
          odd = at::vec::fmadd(V::loadu(xi + h + width), V::loadu(wk + h + width), odd);
        }
        for (; h + width <= H; h += width) even = at::vec::fmadd(V::loadu(xi + h), V::loadu(wk + h), even);
        acc_t sum = lane_sum(even + odd);
        for (; h < H; ++h) sum += xi[h] * wk[h];
        out[i * N + k] = sum + b[k];
      }
    }
  });
}

// Rows [i, i + R) of the skinny backward below: grad_W partial gw [N, H] and gb [N] accumulate g[r, k] x_r, and
// grad_x_r = sum_k g[r, k] W_k when grad_x is given.  R rows share each load/store of gw and each load of W (the
// pass is bound by those L1 accesses, not by arithmetic).
template <typename acc_t, int R>
inline void skinny_backward_rows(const acc_t* g, const acc_t* x, const acc_t* w, int64_t i, int64_t H, int64_t N,
                                 acc_t* gw, acc_t* gb, acc_t* grad_x) {
  using V = Vec<acc_t>;
  constexpr int64_t width = V::size();
  acc_t c[R][kSkinnyOutputs];
  for (int r = 0; r < R; ++r)
    for (int64_t k = 0; k < N; ++k) {
      c[r][k] = g[(i + r) * N + k];
      gb[k] += c[r][k];
    }
  int64_t h = 0;
  for (; h + width <= H; h += width) {
    V xv[R], gx[R];
    for (int r = 0; r < R; ++r) {
      xv[r] = V::loadu(x + (i + r) * H + h);
      gx[r] = V(acc_t(0));
    }
    for (int64_t k = 0; k < N; ++k) {
      V partial = V::loadu(gw + k * H + h);
      for (int r = 0; r < R; ++r) partial = at::vec::fmadd(V(c[r][k]), xv[r], partial);
      partial.store(gw + k * H + h);
      if (grad_x != nullptr) {
        const V wv = V::loadu(w + k * H + h);
        for (int r = 0; r < R; ++r) gx[r] = at::vec::fmadd(V(c[r][k]), wv, gx[r]);
      }
    }
    if (grad_x != nullptr)
      for (int r = 0; r < R; ++r) gx[r].store(grad_x + (i + r) * H + h);
  }
  for (; h < H; ++h)
    for (int r = 0; r < R; ++r) {
      acc_t gx = 0;
      for (int64_t k = 0; k < N; ++k) {
        gw[k * H + h] += c[r][k] * x[(i + r) * H + h];
        gx += c[r][k] * w[k * H + h];
      }
      if (grad_x != nullptr) grad_x[(i + r) * H + h] = gx;
    }
}

// Backward of out = x W^T + b for a skinny W [N, H] in one pass over the rows of x (N <= kSkinnyOutputs):
//   grad_W[k] += sum_i g[i, k] x_i,   grad_b[k] += sum_i g[i, k],   grad_x_i = sum_k g[i, k] W_k (when wanted).
// Each thread owns a contiguous block of rows and an [N, H] partial of grad_W (in L1/L2), summed in block order
// at the end (deterministic for a given thread count); x is read once, grad_x written once.
template <typename acc_t>
void skinny_linear_backward(const acc_t* g, const acc_t* x, const acc_t* w, int64_t rows, int64_t H, int64_t N,
                            acc_t* grad_w, acc_t* grad_b, acc_t* grad_x) {
  constexpr int kRowsPerStep = 4;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                 rows / std::max<int64_t>(1, row_grain(H))));
  const int64_t stride = N * (H + 1);  // per block: [N, H] weight partial, then [N] bias partial
  std::vector<acc_t> partial(static_cast<size_t>(blocks * stride), acc_t(0));
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t last_block) {
    for (int64_t block = first_block; block < last_block; ++block) {
      acc_t* gw = partial.data() + block * stride;
      int64_t i = rows * block / blocks;
      const int64_t end = rows * (block + 1) / blocks;
      for (; i + kRowsPerStep <= end; i += kRowsPerStep)
        skinny_backward_rows<acc_t, kRowsPerStep>(g, x, w, i, H, N, gw, gw + N * H, grad_x);
      for (; i < end; ++i) skinny_backward_rows<acc_t, 1>(g, x, w, i, H, N, gw, gw + N * H, grad_x);
    }
  });
  for (int64_t j = 0; j < stride; ++j) {
    acc_t total = 0;
    for (int64_t block = 0; block < blocks; ++block) total += partial[block * stride + j];
    if (j < N * H) grad_w[j] += total;
    else grad_b[j - N * H] += total;
  }
}

struct CpuRowKernels final : mpdistil::meta_teacher::RowKernels {
  at::Tensor softmax_loss(const at::Tensor& z, const at::Tensor& labels, bool competitive,
                          at::Tensor& dz) const override {
    const int64_t B = labels.numel(), K = z.size(1);
    const int64_t* label_ptr = labels.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i)
      TORCH_CHECK(label_ptr[i] >= 0 && label_ptr[i] < K, "meta_teacher_loss: labels must lie in [0, ", K,
                  "), got ", label_ptr[i]);
    double loss = 0;
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "meta_teacher_softmax", [&] {
      const scalar_t* zp = z.data_ptr<scalar_t>();
      scalar_t* gp = dz.data_ptr<scalar_t>();
      for (const bool student : {false, true}) {
        const int64_t offset = student ? B * K : 0;
        loss += softmax_loss_rows<scalar_t>(zp + offset, label_ptr, B, K,
                                            mpdistil::meta_teacher::coefficients(competitive, student), B,
                                            gp + offset);
      }
    });
    return at::scalar_tensor(loss, z.options());
  }

  void gelu(const at::Tensor& pre, at::Tensor& act) const override {
    AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "meta_teacher_gelu", [&] {
      gelu_forward<scalar_t>(pre.data_ptr<scalar_t>(), pre.numel(), act.data_ptr<scalar_t>());
    });
  }

  void gelu_grad(const at::Tensor& pre, const at::Tensor& grad_act, at::Tensor& grad_pre) const override {
    AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "meta_teacher_gelu_grad", [&] {
      gelu_grad_rows<scalar_t>(pre.data_ptr<scalar_t>(), grad_act.data_ptr<scalar_t>(), pre.numel(),
                               grad_pre.data_ptr<scalar_t>());
    });
  }

  void linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor out) const override {
    if (weight.size(0) > kSkinnyOutputs) return RowKernels::linear(x, weight, bias, out);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "meta_teacher_linear", [&] {
      skinny_linear<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                              x.size(0), x.size(1), weight.size(0), out.data_ptr<scalar_t>());
    });
  }

  void linear_backward(const at::Tensor& grad_out, const at::Tensor& x_a, const at::Tensor& x_b,
                       const at::Tensor& weight, at::Tensor& grad_weight, at::Tensor& grad_bias, at::Tensor* grad_x_a,
                       at::Tensor* grad_x_b) const override {
    if (weight.size(0) > kSkinnyOutputs)
      return RowKernels::linear_backward(grad_out, x_a, x_b, weight, grad_weight, grad_bias, grad_x_a, grad_x_b);
    const int64_t N = weight.size(0), H = weight.size(1);
    const at::Tensor grad = grad_out.contiguous(), w = weight.contiguous();
    grad_weight = at::zeros_like(w);
    grad_bias = at::zeros({N}, w.options());
    const int64_t rows_a = x_a.size(0);
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "meta_teacher_linear_backward", [&] {
      auto half = [&](const at::Tensor& x, int64_t offset, at::Tensor* grad_x) {
        const at::Tensor rows = x.contiguous();
        if (grad_x != nullptr) *grad_x = at::empty_like(rows);
        skinny_linear_backward<scalar_t>(grad.data_ptr<scalar_t>() + offset * N, rows.data_ptr<scalar_t>(),
                                         w.data_ptr<scalar_t>(), rows.size(0), H, N, grad_weight.data_ptr<scalar_t>(),
                                         grad_bias.data_ptr<scalar_t>(),
                                         grad_x == nullptr ? nullptr : grad_x->data_ptr<scalar_t>());
      };
      half(x_a, 0, grad_x_a);
      if (x_b.defined()) half(x_b, rows_a, grad_x_b);
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_teacher_loss_fwd_cpu(
    const at::Tensor& h_teacher, const at::Tensor& h_student, const c10::optional<at::Tensor>& proj_weight,
    const c10::optional<at::Tensor>& proj_bias, const at::Tensor& w1, const at::Tensor& b1,
    const c10::optional<at::Tensor>& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& labels,
    bool competitive) {
  return mpdistil::meta_teacher::forward(h_teacher, h_student, proj_weight, proj_bias, w1, b1, w2, b2, labels,
                                         competitive, CpuRowKernels{});
}

std::vector<at::Tensor> meta_teacher_loss_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& dlogits, const at::Tensor& h_teacher, const at::Tensor& h_student,
    const c10::optional<at::Tensor>& proj_weight, const c10::optional<at::Tensor>& proj_bias, const at::Tensor& w1,
    const c10::optional<at::Tensor>& w2, const at::Tensor& hidden_pre, const at::Tensor& projected,
    bool need_h_teacher, bool need_h_student) {
  return mpdistil::meta_teacher::backward(grad_loss, dlogits, h_teacher, h_student, proj_weight, proj_bias, w1, w2,
                                          hidden_pre, projected, need_h_teacher, need_h_student, CpuRowKernels{});
}

}  // namespace

TORCH_LIBRARY_IMPL(mpdistil_C, CPU, m) {
  m.impl("meta_teacher_loss_fwd", &meta_teacher_loss_fwd_cpu);
  m.impl("meta_teacher_loss_bwd", &meta_teacher_loss_bwd_cpu);
}
