// Launchers of the fused temperature-softmax KL CUDA kernels (kd_kl_div.cu); raw pointers, no torch headers.
// Per row of logits a (weighting P = softmax(a/T)) and b (Q = softmax(b/T)), see csrc/cpu/kd_kl_div.cpp:
//   forward : kl[row] and stats[row] = (max a, log_sum_a, max b, log_sum_b, E_P[a - b])
//   backward: grad_a = g/T * P (a - b - E_P[a - b])/T,  grad_b = g/T * (Q - P)   (either may be null)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/logits_type.h"

namespace mpdistil::cuda {

inline constexpr int kKlStatsPerRow = 5;

// kl [rows] and stats [rows, 5] are float64 for kFloat64 logits, float32 otherwise.  Rows of a and b have unit
// stride along the vocabulary and row strides stride_a, stride_b (in elements).
cudaError_t launch_kd_kl_div_fwd(const void* a, const void* b, void* kl, void* stats, int64_t rows, int64_t vocab,
                                 int64_t stride_a, int64_t stride_b, double temperature, LogitsType type,
                                 cudaStream_t stream);

// Forward and gradients of sum_r g_r kl[r], g_r = weight * row_weight[r] (row_weight [rows] in the stats' type, or
// null for all 1), in one launch; grad_a/grad_b as for the backward (either may be null).  resident_packs 1, 2 or 4
// asks for the row-resident kernel (a thread-block cluster per row holding it in registers, that many 16-byte packs
// of each input per thread, more when the row needs them), which runs on sm_90+ devices for 16-byte aligned
// float32/16-bit rows of up to 8 CTAs' worth; 0, or a row or device it cannot take, gives the two-sweep kernel.
cudaError_t launch_kd_kl_div_fwd_grad(const void* a, const void* b, void* kl, void* stats, const void* row_weight,
                                      double weight, void* grad_a, void* grad_b, int64_t rows, int64_t vocab,
                                      int64_t stride_a, int64_t stride_b, double temperature, int resident_packs,
                                      LogitsType type, cudaStream_t stream);

// grad_kl [rows] and stats are float64 for kFloat64 logits, float32 otherwise; grad_a/grad_b are contiguous
// [rows, vocab] of the logits' type, or null when not wanted.
cudaError_t launch_kd_kl_div_bwd(const void* grad_kl, const void* a, const void* b, const void* stats, void* grad_a,
                                 void* grad_b, int64_t rows, int64_t vocab, int64_t stride_a, int64_t stride_b,
                                 double temperature, LogitsType type, cudaStream_t stream);

}  // namespace mpdistil::cuda
