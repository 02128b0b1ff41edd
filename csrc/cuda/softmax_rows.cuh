// Device helpers shared by the fused temperature-softmax CUDA kernels (kd_kl_div.cu, kd_jsd.cu): accumulation
// types and conversions, 16-byte packs, the online-softmax state of a pair of logit rows with its warp merge, and
// the dispatch from LogitsType to an element type.  Everything has internal linkage (one copy per .cu file).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/logits_type.h"

namespace mpdistil::cuda {
namespace {

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

// Online softmax state of a and b over a set of entries (kd_jsd needs only the two softmaxes; the KL's cross term
// costs it one multiply-add per entry).
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
    // (== -inf tests: a NaN entry carries on into a NaN row, as on the CPU, instead of counting as -inf)
    const A exp_a = a == negative_infinity<A>() ? A(0) : fast_exp((a - max_a) * inv_t);
    sum_a += exp_a;
    sum_b += b == negative_infinity<A>() ? A(0) : fast_exp((b - max_b) * inv_t);
    if (exp_a != A(0)) cross += exp_a * (a - b);  // P = 0 entries contribute 0
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

// Widest vector width (16-byte accesses) that every row start allows, else 1.
template <typename T>
bool can_vectorize(int64_t vocab, int64_t stride_a, int64_t stride_b, const void* a, const void* b) {
  constexpr int vec = 16 / sizeof(T);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return vocab % vec == 0 && stride_a % vec == 0 && stride_b % vec == 0 && aligned(a) && aligned(b);
}

// Online softmax state of this thread's entries of a row pair: packs of VEC elements at stride kThreads * VEC.
template <int kThreads, int VEC, typename T>
__device__ __forceinline__ RowState<acc_t<T>> thread_row_state(const T* a_row, const T* b_row, int64_t vocab,
                                                               acc_t<T> inv_t) {
  RowState<acc_t<T>> state = RowState<acc_t<T>>::empty();
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < vocab; i += int64_t{kThreads} * VEC) {
    const Pack<T, VEC> pa = *reinterpret_cast<const Pack<T, VEC>*>(a_row + i);
    const Pack<T, VEC> pb = *reinterpret_cast<const Pack<T, VEC>*>(b_row + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) state.add(widen(pa.values[k]), widen(pb.values[k]), inv_t);
  }
  return state;
}

// The state of the whole row: the threads' states merged over the block of kThreads (every thread gets the same
// result); `shared` holds kThreads / 32 states.
template <int kThreads, typename A>
__device__ __forceinline__ RowState<A> block_merge(RowState<A> state, A inv_t, RowState<A>* shared) {
  state = warp_merge(state, inv_t);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = state;
  __syncthreads();
  RowState<A> total = RowState<A>::empty();
  for (int w = 0; w < kThreads / 32; ++w) total.merge(shared[w], inv_t);
  return total;
}

// The backward sweep of both losses over one row: this block's packs of the 2-D grid (rows x vocabulary tiles,
// kThreads threads), zeros when `zero` (a masked row, or one without a distribution), otherwise
// entry_grads(a, b, &grad_a, &grad_b) per entry in the accumulation type; grad_a_row / grad_b_row may be null.
template <int kThreads, int VEC, typename T, typename EntryGrads>
__device__ __forceinline__ void backward_row_sweep(const T* a_row, const T* b_row, T* grad_a_row, T* grad_b_row,
                                                   int64_t vocab, bool zero, const EntryGrads& entry_grads) {
  using A = acc_t<T>;
  const int64_t step = int64_t{gridDim.y} * kThreads * VEC;
  for (int64_t i = (int64_t{blockIdx.y} * kThreads + threadIdx.x) * VEC; i < vocab; i += step) {
    Pack<T, VEC> out_a, out_b;
    if (zero) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out_a.values[k] = out_b.values[k] = narrow<T>(A(0));
    } else {
      const Pack<T, VEC> pa = *reinterpret_cast<const Pack<T, VEC>*>(a_row + i);
      const Pack<T, VEC> pb = *reinterpret_cast<const Pack<T, VEC>*>(b_row + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        A grad_a = 0, grad_b = 0;
        entry_grads(widen(pa.values[k]), widen(pb.values[k]), grad_a, grad_b);
        out_a.values[k] = narrow<T>(grad_a);
        out_b.values[k] = narrow<T>(grad_b);
      }
    }
    if (grad_a_row) *reinterpret_cast<Pack<T, VEC>*>(grad_a_row + i) = out_a;
    if (grad_b_row) *reinterpret_cast<Pack<T, VEC>*>(grad_b_row + i) = out_b;
  }
}

// Grid of backward_row_sweep: one row per blockIdx.x; along y, tiles of kThreads threads x `vec`-wide packs x
// `packs_per_thread` (at most 65535 tiles; the sweep strides over the rest).
template <int kThreads>
inline dim3 backward_grid(int64_t rows, int64_t vocab, int64_t vec, int64_t packs_per_thread) {
  const int64_t per_block = int64_t{kThreads} * vec * packs_per_thread;
  return dim3(static_cast<unsigned>(rows),
              static_cast<unsigned>(std::min<int64_t>((vocab + per_block - 1) / per_block, 65535)));
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
}  // namespace mpdistil::cuda
