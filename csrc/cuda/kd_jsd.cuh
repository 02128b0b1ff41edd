// Launchers of the fused generalized-JSD CUDA kernels (kd_jsd.cu); raw pointers, no torch headers.
// Per row of teacher logits a (P = softmax(a/T)) and student logits b (Q = softmax(b/T)), M = beta P + (1 - beta) Q,
// see csrc/cpu/kd_jsd.cpp:
//   forward : jsd[row] = L_P + L_Q and stats[row] = (max a, log_sum_a, max b, log_sum_b, L_P, L_Q)
//   backward: grad_a = g/T * P (-beta log(M/P) - L_P),  grad_b = g/T * Q (-(1 - beta) log(M/Q) - L_Q)  (either null)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/logits_type.h"

namespace mpdistil::cuda {

inline constexpr int kJsdStatsPerRow = 6;

// jsd [rows] and stats [rows, 6] are float64 for kFloat64 logits, float32 otherwise.  Rows of a and b have unit
// stride along the vocabulary and row strides stride_a, stride_b (in elements).  0 < beta < 1.
cudaError_t launch_kd_jsd_fwd(const void* a, const void* b, void* jsd, void* stats, int64_t rows, int64_t vocab,
                              int64_t stride_a, int64_t stride_b, double temperature, double beta, LogitsType type,
                              cudaStream_t stream);

// grad_jsd [rows] and stats are float64 for kFloat64 logits, float32 otherwise; grad_a/grad_b are contiguous
// [rows, vocab] of the logits' type, or null when not wanted.
cudaError_t launch_kd_jsd_bwd(const void* grad_jsd, const void* a, const void* b, const void* stats, void* grad_a,
                              void* grad_b, int64_t rows, int64_t vocab, int64_t stride_a, int64_t stride_b,
                              double temperature, double beta, LogitsType type, cudaStream_t stream);

}  // namespace mpdistil::cuda
