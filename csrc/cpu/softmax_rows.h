// Row helpers shared by the fused temperature-softmax losses on CPU (kd_kl_div.cpp, kd_jsd.cpp): vector sweeps
// over a pair of logit rows, the online-softmax state of one row, and the checks of [rows, vocab] logits.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cpu/common.h"

namespace mpdistil::cpu {

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// Apply `lane_op(va, vb, offset, count)` to consecutive vectors of two acc_t arrays of length n; the last, partial
// vector is padded with -inf (an entry of probability zero) and has count < width.
template <typename acc_t, typename LaneOp>
inline void for_each_vector(const acc_t* a, const acc_t* b, int64_t n, LaneOp&& lane_op) {
  constexpr int64_t width = Vec<acc_t>::size();
  int64_t i = 0;
  for (; i + width <= n; i += width) lane_op(Vec<acc_t>::loadu(a + i), Vec<acc_t>::loadu(b + i), i, width);
  if (i < n) {
    const int64_t rest = n - i;
    const Vec<acc_t> pad(kNegInf<acc_t>);
    lane_op(Vec<acc_t>::set(pad, Vec<acc_t>::loadu(a + i, rest), rest),
            Vec<acc_t>::set(pad, Vec<acc_t>::loadu(b + i, rest), rest), i, rest);
  }
}

// Online softmax state of one row: running max and sum of exp((x - max) / T), combined in double.
struct RunningSoftmax {
  double max = -std::numeric_limits<double>::infinity();
  double sum = 0.0;

  // Raise the running max to cover `chunk_max`; returns the factor that rescales sums taken at the old max.  A NaN
  // (in the chunk, or already in the row) makes the max and the sum NaN for good: the row's loss and gradients are
  // NaN, wherever the NaN sat.
  double raise_max(double chunk_max, double inv_t) {
    if (std::isnan(chunk_max) || std::isnan(max)) {
      max = sum = std::numeric_limits<double>::quiet_NaN();
      return max;
    }
    if (chunk_max <= max) return 1.0;
    const double factor = sum > 0.0 ? std::exp((max - chunk_max) * inv_t) : 1.0;
    max = chunk_max;
    sum *= factor;
    return factor;
  }
  // The value subtracted before exp: the max, or 0 while every entry so far is -inf (their exp is then 0).
  double shift() const { return std::isfinite(max) ? max : 0.0; }
};

// Both gradient rows of a row pair (those asked for: not null) set to `value`.
template <typename scalar_t>
void fill_gradients(scalar_t* grad_a_row, scalar_t* grad_b_row, int64_t vocab, scalar_t value) {
  if (grad_a_row) std::fill(grad_a_row, grad_a_row + vocab, value);
  if (grad_b_row) std::fill(grad_b_row, grad_b_row + vocab, value);
}

// Rows of a [N, V] tensor with unit stride along V (a strided row view, copied only when V is strided).
inline at::Tensor unit_stride_rows(const at::Tensor& logits) {
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

// Two equal-shaped, equal-dtype [rows, vocab >= 1] logit tensors; `op` names the caller in the error.
inline void check_logits(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": logits must be 2-D [rows, vocab], got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": logits shapes differ: ", a.sizes(), " vs ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": logits dtypes differ: ", a.scalar_type(), " vs ",
              b.scalar_type());
  TORCH_CHECK(a.size(1) >= 1, op, ": vocabulary size must be >= 1");
}

inline at::ScalarType acc_scalar_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// The element type of a row pointer handed to the row functions below (const scalar_t*, or scalar_t*).
template <typename Pointer>
using row_scalar_t = std::remove_cv_t<std::remove_pointer_t<Pointer>>;

// The host side of a fused loss's forward over pairs of logit rows a, b ([rows, vocab], any row strides):
// checks, the [rows] loss and [rows, stats_per_row] statistics in the accumulation dtype, then, in parallel over
// rows, forward_row(a_row, b_row, vocab, loss_out, stats_out); forward_row is generic over the dtype (row pointers
// const scalar_t*, outputs acc_type_t<scalar_t>*).
template <typename ForwardRow>
std::tuple<at::Tensor, at::Tensor> rowwise_forward(const char* op, const at::Tensor& a_logits,
                                                   const at::Tensor& b_logits, int64_t stats_per_row,
                                                   const ForwardRow& forward_row) {
  check_logits(op, a_logits, b_logits);
  const at::Tensor a = unit_stride_rows(a_logits), b = unit_stride_rows(b_logits);
  const int64_t rows = a.size(0), vocab = a.size(1), a_stride = a.stride(0), b_stride = b.stride(0);
  const auto options = a.options().dtype(acc_scalar_type(a.scalar_type()));
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor stats = at::empty({rows, stats_per_row}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "mpdistil_rowwise_forward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* a_data = a.const_data_ptr<scalar_t>();
    const scalar_t* b_data = b.const_data_ptr<scalar_t>();
    acc_t* loss_data = loss.mutable_data_ptr<acc_t>();
    acc_t* stats_data = stats.mutable_data_ptr<acc_t>();
    at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        forward_row(a_data + r * a_stride, b_data + r * b_stride, vocab, loss_data + r, stats_data + r * stats_per_row);
    });
  });
  return {loss, stats};
}

// Gradient outputs shaped like the [N, V] logits `a` (reused buffers, see OutputCache); empty when not needed.
inline std::pair<at::Tensor, at::Tensor> gradient_outputs(const at::Tensor& a, bool need_grad_a, bool need_grad_b,
                                                          OutputCache& grad_a_cache, OutputCache& grad_b_cache) {
  const auto gradient = [&](bool needed, OutputCache& cache) {
    return needed ? cache.take(a.sizes(), a.options()) : at::empty({0}, a.options());
  };
  return {gradient(need_grad_a, grad_a_cache), gradient(need_grad_b, grad_b_cache)};
}

// The host side of the matching backward: checks, the gradients (reused buffers, see OutputCache; empty when not
// needed), then, in parallel over rows, backward_row(a_row, b_row, vocab, g, stats_row, grad_a_row, grad_b_row)
// with g the row's upstream gradient and null gradient rows when not needed; each thread fences its streaming
// stores when done.
template <typename BackwardRow>
std::tuple<at::Tensor, at::Tensor> rowwise_backward(const char* op, const at::Tensor& grad_loss,
                                                    const at::Tensor& a_logits, const at::Tensor& b_logits,
                                                    const at::Tensor& stats, int64_t stats_per_row, bool need_grad_a,
                                                    bool need_grad_b, OutputCache& grad_a_cache,
                                                    OutputCache& grad_b_cache, const BackwardRow& backward_row) {
  check_logits(op, a_logits, b_logits);
  const at::Tensor a = unit_stride_rows(a_logits), b = unit_stride_rows(b_logits);
  const int64_t rows = a.size(0), vocab = a.size(1), a_stride = a.stride(0), b_stride = b.stride(0);
  TORCH_CHECK(grad_loss.numel() == rows && stats.numel() == rows * stats_per_row, op,
              "_bwd: per-row tensors do not match ", rows, " rows");
  const auto acc = acc_scalar_type(a.scalar_type());
  const at::Tensor grad_rows = grad_loss.to(acc).contiguous(), stats_rows = stats.to(acc).contiguous();
  auto [grad_a, grad_b] = gradient_outputs(a, need_grad_a, need_grad_b, grad_a_cache, grad_b_cache);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "mpdistil_rowwise_backward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* a_data = a.const_data_ptr<scalar_t>();
    const scalar_t* b_data = b.const_data_ptr<scalar_t>();
    const acc_t* g_data = grad_rows.const_data_ptr<acc_t>();
    const acc_t* stats_data = stats_rows.const_data_ptr<acc_t>();
    scalar_t* grad_a_data = need_grad_a ? grad_a.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_b_data = need_grad_b ? grad_b.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        backward_row(a_data + r * a_stride, b_data + r * b_stride, vocab, g_data[r], stats_data + r * stats_per_row,
                     grad_a_data ? grad_a_data + r * vocab : nullptr, grad_b_data ? grad_b_data + r * vocab : nullptr);
      stream_fence();
    });
  });
  return {grad_a, grad_b};
}

// Forward and gradients in one pass over the rows, for a loss whose row weights g_r = weight * row_weight[r] are
// known in forward (row_weight empty: all 1): in parallel over rows, forward_grad_row(a_row, b_row, vocab, g_r,
// loss_out, stats_out, grad_a_row, grad_b_row) (arguments as for rowwise_forward and rowwise_backward), which works
// on the row while it is in this core's cache.  Returns (loss, stats, grad_a, grad_b).
template <typename ForwardGradRow>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rowwise_forward_grad(
    const char* op, const at::Tensor& a_logits, const at::Tensor& b_logits, int64_t stats_per_row,
    const c10::optional<at::Tensor>& row_weight, double weight, bool need_grad_a, bool need_grad_b,
    OutputCache& grad_a_cache, OutputCache& grad_b_cache, const ForwardGradRow& forward_grad_row) {
  check_logits(op, a_logits, b_logits);
  const at::Tensor a = unit_stride_rows(a_logits), b = unit_stride_rows(b_logits);
  const int64_t rows = a.size(0), vocab = a.size(1), a_stride = a.stride(0), b_stride = b.stride(0);
  const auto acc = acc_scalar_type(a.scalar_type());
  const auto options = a.options().dtype(acc);
  TORCH_CHECK(!row_weight.has_value() || row_weight->numel() == rows, op, "_fwd_grad: row_weight must have ", rows,
              " entries");
  const at::Tensor weights = row_weight.has_value() ? row_weight->to(acc).contiguous() : at::Tensor();
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor stats = at::empty({rows, stats_per_row}, options);
  auto [grad_a, grad_b] = gradient_outputs(a, need_grad_a, need_grad_b, grad_a_cache, grad_b_cache);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "mpdistil_rowwise_forward_grad", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* a_data = a.const_data_ptr<scalar_t>();
    const scalar_t* b_data = b.const_data_ptr<scalar_t>();
    const acc_t* weight_data = weights.defined() ? weights.const_data_ptr<acc_t>() : nullptr;
    acc_t* loss_data = loss.mutable_data_ptr<acc_t>();
    acc_t* stats_data = stats.mutable_data_ptr<acc_t>();
    scalar_t* grad_a_data = need_grad_a ? grad_a.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_b_data = need_grad_b ? grad_b.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t g = static_cast<acc_t>(weight_data ? weight * weight_data[r] : weight);
        forward_grad_row(a_data + r * a_stride, b_data + r * b_stride, vocab, g, loss_data + r,
                         stats_data + r * stats_per_row, grad_a_data ? grad_a_data + r * vocab : nullptr,
                         grad_b_data ? grad_b_data + r * vocab : nullptr);
      }
      stream_fence();
    });
  });
  return {loss, stats, grad_a, grad_b};
}

}  // namespace mpdistil::cpu
