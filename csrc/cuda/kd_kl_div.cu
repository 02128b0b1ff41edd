// Fused temperature-softmax KL, CUDA kernels (formulas: csrc/cpu/kd_kl_div.cpp; launchers: kd_kl_div.cuh).
// Forward: one block per row; every thread keeps an online softmax of its strided elements of a and b (running max,
// rescaled sums, and sum exp((a - max a)/T) (a - b)), with 16-byte vector loads; the block then merges the states.
// Backward: elementwise over a 2-D grid (rows x vocabulary tiles), recomputing P and Q from the per-row stats.
// Forward+gradient (a reduced loss, whose row weights are known in forward): the forward's block sweeps its row
// a second time right away and writes the gradients, so each logit comes from memory once.
#include <cmath>
#include <cstdint>

#include "cuda/kd_kl_div.cuh"
#include "cuda/softmax_rows.cuh"

namespace mpdistil::cuda {
namespace {

constexpr int kForwardThreads = 512;
constexpr int kBackwardThreads = 256;
constexpr int kBackwardPacksPerThread = 4;

// The merged online-softmax state of one row as its KL and statistics (max a, log sum a, max b, log sum b,
// E_P[(a - b)/T]).
template <typename A>
struct RowResult {
  A kl, stats[kKlStatsPerRow];
};

template <typename A>
__device__ __forceinline__ RowResult<A> row_result(const RowState<A>& state, A inv_t) {
  const A log_sum_a = log(state.sum_a), log_sum_b = log(state.sum_b);
  A mean_gap = 0, row_kl = 0;  // a row without any P entry has no distribution: 0
  if (state.sum_a > A(0)) {
    mean_gap = state.cross / state.sum_a * inv_t;
    row_kl = state.sum_b > A(0) ? mean_gap - (state.max_a - state.max_b) * inv_t - log_sum_a + log_sum_b
                                : static_cast<A>(INFINITY);
  }
  return {row_kl, {state.max_a, log_sum_a, state.max_b, log_sum_b, mean_gap}};
}

template <typename A>
__device__ __forceinline__ void store_row_result(const RowResult<A>& result, int64_t row, A* kl, A* stats) {
  kl[row] = result.kl;
#pragma unroll
  for (int k = 0; k < kKlStatsPerRow; ++k) stats[row * kKlStatsPerRow + k] = result.stats[k];
}

// grad_a = g/T P ((a - b)/T - E_P[(a - b)/T]) and grad_b = g/T (Q - P) of one row from its statistics; zeros
// for a masked row (g = 0) and a row without a distribution P.  Sweeps this block's tiles (backward_row_sweep).
template <int kThreads, int VEC, typename T>
__device__ __forceinline__ void row_gradients(const T* a_row, const T* b_row, T* grad_a_row, T* grad_b_row,
                                              int64_t vocab, acc_t<T> grad_row, const acc_t<T>* stats,
                                              acc_t<T> inv_t) {
  using A = acc_t<T>;
  const A max_a = stats[0], log_sum_a = stats[1], max_b = stats[2], log_sum_b = stats[3], mean_gap = stats[4];
  const A coefficient = max_a > negative_infinity<A>() ? grad_row * inv_t : A(0);
  backward_row_sweep<kThreads, VEC>(
      a_row, b_row, grad_a_row, grad_b_row, vocab, coefficient == A(0), [&](A va, A vb, A& out_a, A& out_b) {
        const A prob_p = fast_exp((va - max_a) * inv_t - log_sum_a);
        const A prob_q = fast_exp((vb - max_b) * inv_t - log_sum_b);
        out_a = prob_p > A(0) ? coefficient * prob_p * ((va - vb) * inv_t - mean_gap) : A(0);
        out_b = coefficient * (prob_q - prob_p);
      });
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kForwardThreads)
    kd_kl_div_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b, acc_t<T>* __restrict__ kl,
                         acc_t<T>* __restrict__ stats, int64_t vocab, int64_t stride_a, int64_t stride_b,
                         acc_t<T> inv_t) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  __shared__ RowState<A> warp_states[kForwardThreads / 32];
  const RowState<A> state = block_merge<kForwardThreads>(
      thread_row_state<kForwardThreads, VEC>(a + row * stride_a, b + row * stride_b, vocab, inv_t), inv_t,
      warp_states);
  if (threadIdx.x == 0) store_row_result(row_result(state, inv_t), row, kl, stats);
}

// Forward and gradients in one launch (the loss's row weights g = weight * row_weight[row] are known in forward):
// every thread of the row's block gets the merged state, then the block sweeps the row again, which it has just
// read (mostly L2 hits), and writes the gradients.  row_weight may be null (all 1).
template <typename T, int VEC>
__global__ void __launch_bounds__(kForwardThreads)
    kd_kl_div_fwd_grad_kernel(const T* __restrict__ a, const T* __restrict__ b, acc_t<T>* __restrict__ kl,
                              acc_t<T>* __restrict__ stats, const acc_t<T>* __restrict__ row_weight,
                              acc_t<T> weight, T* __restrict__ grad_a, T* __restrict__ grad_b, int64_t vocab,
                              int64_t stride_a, int64_t stride_b, acc_t<T> inv_t) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const T* a_row = a + row * stride_a;
  const T* b_row = b + row * stride_b;
  __shared__ RowState<A> warp_states[kForwardThreads / 32];
  const RowResult<A> result = row_result(
      block_merge<kForwardThreads>(thread_row_state<kForwardThreads, VEC>(a_row, b_row, vocab, inv_t), inv_t,
                                   warp_states),
      inv_t);
  if (threadIdx.x == 0) store_row_result(result, row, kl, stats);
  const A grad_row = row_weight ? weight * row_weight[row] : weight;
  row_gradients<kForwardThreads, VEC>(a_row, b_row, grad_a ? grad_a + row * vocab : nullptr,
                                      grad_b ? grad_b + row * vocab : nullptr, vocab, grad_row, result.stats, inv_t);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBackwardThreads)
    kd_kl_div_bwd_kernel(const acc_t<T>* __restrict__ grad_kl, const T* __restrict__ a, const T* __restrict__ b,
                         const acc_t<T>* __restrict__ stats, T* __restrict__ grad_a, T* __restrict__ grad_b,
                         int64_t vocab, int64_t stride_a, int64_t stride_b, acc_t<T> inv_t) {
  const int64_t row = blockIdx.x;
  row_gradients<kBackwardThreads, VEC>(a + row * stride_a, b + row * stride_b, grad_a ? grad_a + row * vocab : nullptr,
                                       grad_b ? grad_b + row * vocab : nullptr, vocab, grad_kl[row],
                                       stats + row * kKlStatsPerRow, inv_t);
}

template <typename T>
cudaError_t launch_fwd_typed(const void* a, const void* b, void* kl, void* stats, int64_t rows, int64_t vocab,
                             int64_t stride_a, int64_t stride_b, double temperature, cudaStream_t stream) {
  using A = acc_t<T>;
  if (rows == 0) return cudaSuccess;
  const A inv_t = static_cast<A>(1.0 / temperature);
  const auto* a_typed = static_cast<const T*>(a);
  const auto* b_typed = static_cast<const T*>(b);
  if (can_vectorize<T>(vocab, stride_a, stride_b, a, b)) {
    kd_kl_div_fwd_kernel<T, 16 / sizeof(T)><<<rows, kForwardThreads, 0, stream>>>(
        a_typed, b_typed, static_cast<A*>(kl), static_cast<A*>(stats), vocab, stride_a, stride_b, inv_t);
  } else {
    kd_kl_div_fwd_kernel<T, 1><<<rows, kForwardThreads, 0, stream>>>(
        a_typed, b_typed, static_cast<A*>(kl), static_cast<A*>(stats), vocab, stride_a, stride_b, inv_t);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd_grad_typed(const void* a, const void* b, void* kl, void* stats, const void* row_weight,
                                  double weight, void* grad_a, void* grad_b, int64_t rows, int64_t vocab,
                                  int64_t stride_a, int64_t stride_b, double temperature, cudaStream_t stream) {
  using A = acc_t<T>;
  if (rows == 0) return cudaSuccess;
  const auto args = [&](auto kernel) {
    kernel<<<rows, kForwardThreads, 0, stream>>>(
        static_cast<const T*>(a), static_cast<const T*>(b), static_cast<A*>(kl), static_cast<A*>(stats),
        static_cast<const A*>(row_weight), static_cast<A>(weight), static_cast<T*>(grad_a), static_cast<T*>(grad_b),
        vocab, stride_a, stride_b, static_cast<A>(1.0 / temperature));
  };
  if (can_vectorize<T>(vocab, stride_a, stride_b, a, b)) {
    args(kd_kl_div_fwd_grad_kernel<T, 16 / sizeof(T)>);
  } else {
    args(kd_kl_div_fwd_grad_kernel<T, 1>);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd_typed(const void* grad_kl, const void* a, const void* b, const void* stats, void* grad_a,
                             void* grad_b, int64_t rows, int64_t vocab, int64_t stride_a, int64_t stride_b,
                             double temperature, cudaStream_t stream) {
  using A = acc_t<T>;
  if (rows == 0 || (grad_a == nullptr && grad_b == nullptr)) return cudaSuccess;
  const A inv_t = static_cast<A>(1.0 / temperature);
  const bool vectorized = can_vectorize<T>(vocab, stride_a, stride_b, a, b);
  const dim3 grid = backward_grid<kBackwardThreads>(rows, vocab, vectorized ? 16 / sizeof(T) : 1,
                                                    kBackwardPacksPerThread);
  const auto args = [&](auto kernel) {
    kernel<<<grid, kBackwardThreads, 0, stream>>>(static_cast<const A*>(grad_kl), static_cast<const T*>(a),
                                                  static_cast<const T*>(b), static_cast<const A*>(stats),
                                                  static_cast<T*>(grad_a), static_cast<T*>(grad_b), vocab, stride_a,
                                                  stride_b, inv_t);
  };
  if (vectorized) {
    args(kd_kl_div_bwd_kernel<T, 16 / sizeof(T)>);
  } else {
    args(kd_kl_div_bwd_kernel<T, 1>);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_kd_kl_div_fwd(const void* a, const void* b, void* kl, void* stats, int64_t rows, int64_t vocab,
                                 int64_t stride_a, int64_t stride_b, double temperature, LogitsType type,
                                 cudaStream_t stream) {
  return dispatch_logits_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_fwd_typed<T>(a, b, kl, stats, rows, vocab, stride_a, stride_b, temperature, stream);
  });
}

cudaError_t launch_kd_kl_div_fwd_grad(const void* a, const void* b, void* kl, void* stats, const void* row_weight,
                                      double weight, void* grad_a, void* grad_b, int64_t rows, int64_t vocab,
                                      int64_t stride_a, int64_t stride_b, double temperature, LogitsType type,
                                      cudaStream_t stream) {
  return dispatch_logits_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_fwd_grad_typed<T>(a, b, kl, stats, row_weight, weight, grad_a, grad_b, rows, vocab, stride_a,
                                    stride_b, temperature, stream);
  });
}

cudaError_t launch_kd_kl_div_bwd(const void* grad_kl, const void* a, const void* b, const void* stats, void* grad_a,
                                 void* grad_b, int64_t rows, int64_t vocab, int64_t stride_a, int64_t stride_b,
                                 double temperature, LogitsType type, cudaStream_t stream) {
  return dispatch_logits_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_bwd_typed<T>(grad_kl, a, b, stats, grad_a, grad_b, rows, vocab, stride_a, stride_b, temperature,
                               stream);
  });
}

}  // namespace mpdistil::cuda
