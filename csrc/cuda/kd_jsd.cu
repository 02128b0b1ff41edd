// Fused generalized JSD, CUDA kernels (formulas: csrc/cpu/kd_jsd.cpp; launchers: kd_jsd.cuh).
// Forward: one block per row; sweep 1 merges every thread's online softmax of a and b over the block (16-byte
// vector loads), sweep 2 sums L_P and L_Q over the row.  Backward: elementwise over a 2-D grid (rows x vocabulary
// tiles), recomputing P, Q and the mixture logs from the per-row stats.
#include <cmath>
#include <cstdint>

#include "cuda/block_reduce.cuh"
#include "cuda/kd_jsd.cuh"
#include "cuda/softmax_rows.cuh"

namespace mpdistil::cuda {
namespace {

constexpr int kForwardThreads = 512;
constexpr int kBackwardThreads = 256;
constexpr int kBackwardPacksPerThread = 4;

__device__ __forceinline__ float accurate_log(float x) { return logf(x); }
__device__ __forceinline__ double accurate_log(double x) { return log(x); }

// Per-row constants and the per-entry terms: P, Q, log(M / P), log(M / Q), from the log-ratio
// d = log P - log Q = (a - b)/T - gap_offset without forming M (finite wherever the matching probability is not 0).
template <typename A>
struct MixtureRow {
  A max_a, log_sum_a, max_b, log_sum_b, inv_t, beta, gap_offset;

  __device__ __forceinline__ MixtureRow(A max_a_, A log_sum_a_, A max_b_, A log_sum_b_, A inv_t_, A beta_)
      : max_a(max_a_), log_sum_a(log_sum_a_), max_b(max_b_), log_sum_b(log_sum_b_), inv_t(inv_t_), beta(beta_),
        gap_offset((max_a_ - max_b_) * inv_t_ + log_sum_a_ - log_sum_b_) {}

  struct Terms {
    A prob_p, prob_q, log_m_over_p, log_m_over_q;
  };

  __device__ __forceinline__ Terms terms(A a, A b) const {
    const A d = (a - b) * inv_t - gap_offset;
    const A s = fabs(d);
    const A t = fast_exp(-s);
    const bool p_larger = d >= A(0);  // false for NaN (both entries -inf: both probabilities are 0)
    const A base = accurate_log(p_larger ? beta + (A(1) - beta) * t : (A(1) - beta) + beta * t);
    return {fast_exp((a - max_a) * inv_t - log_sum_a), fast_exp((b - max_b) * inv_t - log_sum_b),
            base + (p_larger ? A(0) : s), base + (p_larger ? s : A(0))};
  }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kForwardThreads)
    kd_jsd_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b, acc_t<T>* __restrict__ jsd,
                      acc_t<T>* __restrict__ stats, int64_t vocab, int64_t stride_a, int64_t stride_b, acc_t<T> inv_t,
                      acc_t<T> beta) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const T* a_row = a + row * stride_a;
  const T* b_row = b + row * stride_b;
  __shared__ RowState<A> warp_states[kForwardThreads / 32];
  __shared__ A warp_sums[kForwardThreads / 32];
  const RowState<A> state =
      block_merge<kForwardThreads>(thread_row_state<kForwardThreads, VEC>(a_row, b_row, vocab, inv_t), inv_t,
                                   warp_states);
  // a sum is 0 only for all -inf logits; a NaN sum counts (its row's loss and gradients are NaN)
  const bool has_pair = state.sum_a != A(0) && state.sum_b != A(0);
  const A log_sum_a = log(state.sum_a), log_sum_b = log(state.sum_b);
  A loss_p = 0, loss_q = 0;
  if (has_pair) {  // uniform over the block: every thread holds the same merged state
    const MixtureRow<A> mixture(state.max_a, log_sum_a, state.max_b, log_sum_b, inv_t, beta);
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < vocab; i += int64_t{kForwardThreads} * VEC) {
      const Pack<T, VEC> pa = *reinterpret_cast<const Pack<T, VEC>*>(a_row + i);
      const Pack<T, VEC> pb = *reinterpret_cast<const Pack<T, VEC>*>(b_row + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const auto m = mixture.terms(widen(pa.values[k]), widen(pb.values[k]));
        if (m.prob_p != A(0)) loss_p -= m.prob_p * m.log_m_over_p;
        if (m.prob_q != A(0)) loss_q -= m.prob_q * m.log_m_over_q;
      }
    }
    loss_p = beta * block_sum<kForwardThreads>(loss_p, warp_sums);
    loss_q = (A(1) - beta) * block_sum<kForwardThreads>(loss_q, warp_sums);
  }
  if (threadIdx.x != 0) return;
  jsd[row] = loss_p + loss_q;  // a row without both distributions counts 0
  A* row_stats = stats + row * kJsdStatsPerRow;
  row_stats[0] = has_pair ? state.max_a : negative_infinity<A>();  // -inf: backward writes zeros
  row_stats[1] = log_sum_a;
  row_stats[2] = state.max_b;
  row_stats[3] = log_sum_b;
  row_stats[4] = loss_p;
  row_stats[5] = loss_q;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBackwardThreads)
    kd_jsd_bwd_kernel(const acc_t<T>* __restrict__ grad_jsd, const T* __restrict__ a, const T* __restrict__ b,
                      const acc_t<T>* __restrict__ stats, T* __restrict__ grad_a, T* __restrict__ grad_b,
                      int64_t vocab, int64_t stride_a, int64_t stride_b, acc_t<T> inv_t, acc_t<T> beta) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const A* row_stats = stats + row * kJsdStatsPerRow;
  const MixtureRow<A> mixture(row_stats[0], row_stats[1], row_stats[2], row_stats[3], inv_t, beta);
  const A loss_p = row_stats[4], loss_q = row_stats[5];
  // Masked rows (g = 0) and rows without both distributions get exactly zero gradients.
  const A coefficient = row_stats[0] == negative_infinity<A>() ? A(0) : grad_jsd[row] * inv_t;
  T* grad_a_row = grad_a ? grad_a + row * vocab : nullptr;
  T* grad_b_row = grad_b ? grad_b + row * vocab : nullptr;
  backward_row_sweep<kBackwardThreads, VEC>(
      a + row * stride_a, b + row * stride_b, grad_a_row, grad_b_row, vocab, coefficient == A(0),
      [&](A va, A vb, A& out_a, A& out_b) {
        const auto m = mixture.terms(va, vb);
        out_a = m.prob_p == A(0) ? A(0) : coefficient * m.prob_p * (-beta * m.log_m_over_p - loss_p);
        out_b = m.prob_q == A(0) ? A(0) : coefficient * m.prob_q * (-(A(1) - beta) * m.log_m_over_q - loss_q);
      });
}

template <typename T>
cudaError_t launch_fwd_typed(const void* a, const void* b, void* jsd, void* stats, int64_t rows, int64_t vocab,
                             int64_t stride_a, int64_t stride_b, double temperature, double beta,
                             cudaStream_t stream) {
  using A = acc_t<T>;
  if (rows == 0) return cudaSuccess;
  const auto args = [&](auto kernel) {
    kernel<<<rows, kForwardThreads, 0, stream>>>(static_cast<const T*>(a), static_cast<const T*>(b),
                                                 static_cast<A*>(jsd), static_cast<A*>(stats), vocab, stride_a,
                                                 stride_b, static_cast<A>(1.0 / temperature), static_cast<A>(beta));
  };
  if (can_vectorize<T>(vocab, stride_a, stride_b, a, b)) {
    args(kd_jsd_fwd_kernel<T, 16 / sizeof(T)>);
  } else {
    args(kd_jsd_fwd_kernel<T, 1>);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd_typed(const void* grad_jsd, const void* a, const void* b, const void* stats, void* grad_a,
                             void* grad_b, int64_t rows, int64_t vocab, int64_t stride_a, int64_t stride_b,
                             double temperature, double beta, cudaStream_t stream) {
  using A = acc_t<T>;
  if (rows == 0 || (grad_a == nullptr && grad_b == nullptr)) return cudaSuccess;
  const bool vectorized = can_vectorize<T>(vocab, stride_a, stride_b, a, b);
  const dim3 grid = backward_grid<kBackwardThreads>(rows, vocab, vectorized ? 16 / sizeof(T) : 1,
                                                    kBackwardPacksPerThread);
  const auto args = [&](auto kernel) {
    kernel<<<grid, kBackwardThreads, 0, stream>>>(static_cast<const A*>(grad_jsd), static_cast<const T*>(a),
                                                  static_cast<const T*>(b), static_cast<const A*>(stats),
                                                  static_cast<T*>(grad_a), static_cast<T*>(grad_b), vocab, stride_a,
                                                  stride_b, static_cast<A>(1.0 / temperature), static_cast<A>(beta));
  };
  if (vectorized) {
    args(kd_jsd_bwd_kernel<T, 16 / sizeof(T)>);
  } else {
    args(kd_jsd_bwd_kernel<T, 1>);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_kd_jsd_fwd(const void* a, const void* b, void* jsd, void* stats, int64_t rows, int64_t vocab,
                              int64_t stride_a, int64_t stride_b, double temperature, double beta, LogitsType type,
                              cudaStream_t stream) {
  return dispatch_logits_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_fwd_typed<T>(a, b, jsd, stats, rows, vocab, stride_a, stride_b, temperature, beta, stream);
  });
}

cudaError_t launch_kd_jsd_bwd(const void* grad_jsd, const void* a, const void* b, const void* stats, void* grad_a,
                              void* grad_b, int64_t rows, int64_t vocab, int64_t stride_a, int64_t stride_b,
                              double temperature, double beta, LogitsType type, cudaStream_t stream) {
  return dispatch_logits_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_bwd_typed<T>(grad_jsd, a, b, stats, grad_a, grad_b, rows, vocab, stride_a, stride_b, temperature,
                               beta, stream);
  });
}

}  // namespace mpdistil::cuda
