// Fused temperature-softmax KL, CUDA kernels (formulas: csrc/cpu/kd_kl_div.cpp; launchers: kd_kl_div.cuh).
// Forward: one block per row; every thread keeps an online softmax of its strided elements of a and b (running max,
// rescaled sums, and sum exp((a - max a)/T) (a - b)), with 16-byte vector loads; the block then merges the states.
// Backward: elementwise over a 2-D grid (rows x vocabulary tiles), recomputing P and Q from the per-row stats.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kd_kl_div.cuh"

namespace mpdistil::cuda {
namespace {

constexpr int kForwardThreads = 512;
constexpr int kBackwardThreads = 256;
constexpr int kBackwardPacksPerThread = 4;

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T narrow(acc_t<T> x);
template <>
__device__ __forceinline__ float narrow<float>(float x) { return x; }
template <>
__device__ __forceinline__ double narrow<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half narrow<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }  // exp(-inf) = 0
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

template <typename T>
__device__ __forceinline__ T negative_infinity() {
  return -static_cast<T>(INFINITY);
}

// VEC consecutive elements, loaded/stored with one 16-byte (or narrower) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T values[VEC];
};

// Online softmax state of a and b over a set of entries.
template <typename A>
struct RowState {
  A max_a, sum_a, max_b, sum_b, cross;  // cross = sum exp((a - max a)/T) (a - b)

  __device__ __forceinline__ static RowState empty() {
    return {negative_infinity<A>(), A(0), negative_infinity<A>(), A(0), A(0)};
  }

  __device__ __forceinline__ void add(A a, A b, A inv_t) {
    if (a > max_a) {  // raise the max; sums taken at the old max shrink (they are 0 while it was -inf)
      const A factor = sum_a > A(0) ? fast_exp((max_a - a) * inv_t) : A(0);
      sum_a *= factor;
      cross *= factor;
      max_a = a;
    }
    if (b > max_b) {
      sum_b *= sum_b > A(0) ? fast_exp((max_b - b) * inv_t) : A(0);
      max_b = b;
    }
    const A exp_a = a > negative_infinity<A>() ? fast_exp((a - max_a) * inv_t) : A(0);
    sum_a += exp_a;
    sum_b += b > negative_infinity<A>() ? fast_exp((b - max_b) * inv_t) : A(0);
    if (exp_a > A(0)) cross += exp_a * (a - b);  // P = 0 entries contribute 0
  }

  __device__ __forceinline__ void merge(const RowState& other, A inv_t) {
    const A new_max_a = max(max_a, other.max_a), new_max_b = max(max_b, other.max_b);
    const A self_a = sum_a > A(0) ? fast_exp((max_a - new_max_a) * inv_t) : A(0);
    const A other_a = other.sum_a > A(0) ? fast_exp((other.max_a - new_max_a) * inv_t) : A(0);
    const A self_b = sum_b > A(0) ? fast_exp((max_b - new_max_b) * inv_t) : A(0);
    const A other_b = other.sum_b > A(0) ? fast_exp((other.max_b - new_max_b) * inv_t) : A(0);
    sum_a = sum_a * self_a + other.sum_a * other_a;
    cross = cross * self_a + other.cross * other_a;
    sum_b = sum_b * self_b + other.sum_b * other_b;
    max_a = new_max_a;
    max_b = new_max_b;
  }

  __device__ __forceinline__ RowState shuffle_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, max_a, offset), __shfl_down_sync(0xffffffffu, sum_a, offset),
            __shfl_down_sync(0xffffffffu, max_b, offset), __shfl_down_sync(0xffffffffu, sum_b, offset),
            __shfl_down_sync(0xffffffffu, cross, offset)};
  }
};

template <typename A>
__device__ __forceinline__ RowState<A> warp_merge(RowState<A> state, A inv_t) {
  for (int offset = 16; offset > 0; offset /= 2) state.merge(state.shuffle_down(offset), inv_t);
  return state;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kForwardThreads)
    kd_kl_div_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b, acc_t<T>* __restrict__ kl,
                         acc_t<T>* __restrict__ stats, int64_t vocab, int64_t stride_a, int64_t stride_b,
                         acc_t<T> inv_t) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const T* a_row = a + row * stride_a;
  const T* b_row = b + row * stride_b;
  RowState<A> state = RowState<A>::empty();
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < vocab; i += int64_t{kForwardThreads} * VEC) {
    const Pack<T, VEC> pa = *reinterpret_cast<const Pack<T, VEC>*>(a_row + i);
    const Pack<T, VEC> pb = *reinterpret_cast<const Pack<T, VEC>*>(b_row + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) state.add(widen(pa.values[k]), widen(pb.values[k]), inv_t);
  }
  __shared__ RowState<A> warp_states[kForwardThreads / 32];
  state = warp_merge(state, inv_t);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = state;
  __syncthreads();
  if (warp != 0) return;
  state = lane < kForwardThreads / 32 ? warp_states[lane] : RowState<A>::empty();
  state = warp_merge(state, inv_t);
  if (lane != 0) return;
  const A log_sum_a = log(state.sum_a), log_sum_b = log(state.sum_b);
  A mean_gap = 0, row_kl = 0;  // a row without any P entry has no distribution: 0
  if (state.sum_a > A(0)) {
    mean_gap = state.cross / state.sum_a * inv_t;
    row_kl = state.sum_b > A(0) ? mean_gap - (state.max_a - state.max_b) * inv_t - log_sum_a + log_sum_b
                                : static_cast<A>(INFINITY);
  }
  kl[row] = row_kl;
  A* row_stats = stats + row * kStatsPerRow;
  row_stats[0] = state.max_a;
  row_stats[1] = log_sum_a;
  row_stats[2] = state.max_b;
  row_stats[3] = log_sum_b;
  row_stats[4] = mean_gap;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBackwardThreads)
    kd_kl_div_bwd_kernel(const acc_t<T>* __restrict__ grad_kl, const T* __restrict__ a, const T* __restrict__ b,
                         const acc_t<T>* __restrict__ stats, T* __restrict__ grad_a, T* __restrict__ grad_b,
                         int64_t vocab, int64_t stride_a, int64_t stride_b, acc_t<T> inv_t) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const A* row_stats = stats + row * kStatsPerRow;
  const A max_a = row_stats[0], log_sum_a = row_stats[1], max_b = row_stats[2], log_sum_b = row_stats[3];
  const A mean_gap = row_stats[4];
  // Masked rows (g = 0) and rows without a distribution P get exactly zero gradients.
  const A coefficient = max_a > negative_infinity<A>() ? grad_kl[row] * inv_t : A(0);
  const T* a_row = a + row * stride_a;
  const T* b_row = b + row * stride_b;
  const int64_t step = int64_t{gridDim.y} * kBackwardThreads * VEC;
  for (int64_t i = (int64_t{blockIdx.y} * kBackwardThreads + threadIdx.x) * VEC; i < vocab; i += step) {
    Pack<T, VEC> out_a, out_b;
    if (coefficient == A(0)) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out_a.values[k] = out_b.values[k] = narrow<T>(A(0));
    } else {
      const Pack<T, VEC> pa = *reinterpret_cast<const Pack<T, VEC>*>(a_row + i);
      const Pack<T, VEC> pb = *reinterpret_cast<const Pack<T, VEC>*>(b_row + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A va = widen(pa.values[k]), vb = widen(pb.values[k]);
        const A prob_p = fast_exp((va - max_a) * inv_t - log_sum_a);
        const A prob_q = fast_exp((vb - max_b) * inv_t - log_sum_b);
        out_a.values[k] = narrow<T>(prob_p > A(0) ? coefficient * prob_p * ((va - vb) * inv_t - mean_gap) : A(0));
        out_b.values[k] = narrow<T>(coefficient * (prob_q - prob_p));
      }
    }
    if (grad_a) *reinterpret_cast<Pack<T, VEC>*>(grad_a + row * vocab + i) = out_a;
    if (grad_b) *reinterpret_cast<Pack<T, VEC>*>(grad_b + row * vocab + i) = out_b;
  }
}

// Widest vector width (16-byte accesses) that every row start allows, else 1.
template <typename T>
bool can_vectorize(int64_t vocab, int64_t stride_a, int64_t stride_b, const void* a, const void* b) {
  constexpr int vec = 16 / sizeof(T);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return vocab % vec == 0 && stride_a % vec == 0 && stride_b % vec == 0 && aligned(a) && aligned(b);
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
cudaError_t launch_bwd_typed(const void* grad_kl, const void* a, const void* b, const void* stats, void* grad_a,
                             void* grad_b, int64_t rows, int64_t vocab, int64_t stride_a, int64_t stride_b,
                             double temperature, cudaStream_t stream) {
  using A = acc_t<T>;
  if (rows == 0 || (grad_a == nullptr && grad_b == nullptr)) return cudaSuccess;
  const A inv_t = static_cast<A>(1.0 / temperature);
  const bool vectorized = can_vectorize<T>(vocab, stride_a, stride_b, a, b);
  const int64_t vec = vectorized ? 16 / sizeof(T) : 1;
  const int64_t per_block = int64_t{kBackwardThreads} * vec * kBackwardPacksPerThread;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(std::min<int64_t>((vocab + per_block - 1) / per_block, 65535)));
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

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls launch(TypeTag<T>{}) with the element type T of `type`.
template <typename Launch>
cudaError_t dispatch_logits_type(LogitsType type, Launch&& launch) {
  switch (type) {
    case LogitsType::kFloat32:
      return launch(TypeTag<float>{});
    case LogitsType::kFloat16:
      return launch(TypeTag<__half>{});
    case LogitsType::kBFloat16:
      return launch(TypeTag<__nv_bfloat16>{});
    case LogitsType::kFloat64:
      return launch(TypeTag<double>{});
  }
  return cudaErrorInvalidValue;
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
