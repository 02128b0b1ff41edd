// Host-side checks shared by the CUDA bindings of the fused temperature-softmax losses (kd_kl_div_binding.cpp,
// kd_jsd_binding.cpp); `op` names the caller in every error.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "cuda/grid_limits.h"
#include "cuda/logits_type.h"

namespace mpdistil::cuda {

inline LogitsType logits_type(const char* op, const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return LogitsType::kFloat32;
    case at::kHalf:
      return LogitsType::kFloat16;
    case at::kBFloat16:
      return LogitsType::kBFloat16;
    case at::kDouble:
      return LogitsType::kFloat64;
    default:
      TORCH_CHECK(false, op, ": logits must be float32, float16, bfloat16 or float64, got ", logits.scalar_type());
  }
}

inline at::ScalarType acc_scalar_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// [N, V] logits with unit stride along V, on one CUDA device; N fits the grid's x dimension, which every kernel of
// these losses spends one block per row on (the forward+gradient's row-resident variant checks its own cluster
// grid, falling back to the one-block-per-row kernel).
inline std::pair<at::Tensor, at::Tensor> checked_rows(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && a.sizes() == b.sizes(), op,
              ": logits must be two equal-shaped 2-D [rows, vocab] tensors, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(0) <= kMaxGridX, op, ": ", a.size(0), " rows exceed the CUDA grid's ", kMaxGridX,
              " blocks along x (one block per row)");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": logits dtypes differ");
  TORCH_CHECK(a.is_cuda() && b.device() == a.device(), op, ": logits must be on one CUDA device");
  TORCH_CHECK(a.size(1) >= 1, op, ": vocabulary size must be >= 1");
  const auto unit_stride = [](const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); };
  return {unit_stride(a), unit_stride(b)};
}

// A per-row tensor (upstream gradient, statistics, row weights) that the kernels read through a raw pointer: it must
// be on the logits' device (the dispatcher sends a call with CUDA logits here whatever device the others are on).
inline void check_on_logits_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on the logits' device ", logits.device(),
              ", got ", t.device());
}

// Per-row loss [N] and statistics [N, stats_per_row] in the accumulation type of the [N, V] logits `a`.
inline std::pair<at::Tensor, at::Tensor> row_outputs(const at::Tensor& a, int64_t stats_per_row) {
  const auto options = a.options().dtype(acc_scalar_type(a));
  return {at::empty({a.size(0)}, options), at::empty({a.size(0), stats_per_row}, options)};
}

// Gradients shaped like the [N, V] logits `a`; an empty tensor for one not wanted.
inline std::pair<at::Tensor, at::Tensor> gradient_outputs(const at::Tensor& a, bool need_a, bool need_b) {
  const auto gradient = [&](bool needed) {
    return needed ? at::empty(a.sizes(), a.options()) : at::empty({0}, a.options());
  };
  return {gradient(need_a), gradient(need_b)};
}

}  // namespace mpdistil::cuda
