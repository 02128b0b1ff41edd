// Row helpers shared by the fused temperature-softmax losses on CPU (kd_kl_div.cpp, kd_jsd.cpp): vector sweeps
// over a pair of logit rows, the online-softmax state of one row, and the checks of [rows, vocab] logits.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

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

  // Raise the running max to cover `chunk_max`; returns the factor that rescales sums taken at the old max.
  double raise_max(double chunk_max, double inv_t) {
    if (chunk_max <= max) return 1.0;
    const double factor = sum > 0.0 ? std::exp((max - chunk_max) * inv_t) : 1.0;
    max = chunk_max;
    sum *= factor;
    return factor;
  }
  // The value subtracted before exp: the max, or 0 while every entry so far is -inf (their exp is then 0).
  double shift() const { return std::isfinite(max) ? max : 0.0; }
};

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

}  // namespace mpdistil::cpu
