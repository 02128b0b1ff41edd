// Block-wide reductions shared by the CUDA kernels (internal linkage: one copy per .cu file).
#pragma once

#include <cuda_runtime.h>

namespace mpdistil::cuda {
namespace {

// Sum of `value` over a warp (every lane gets the result, summed in the same order).
template <typename A>
__device__ __forceinline__ A warp_sum(A value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Sum of `value` over a block of kThreads threads (every thread gets the result, summed in the same order);
// `shared` holds kThreads / 32 values and may be reused by the next call.
template <int kThreads, typename A>
__device__ A block_sum(A value, A* shared) {
  value = warp_sum(value);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

}  // namespace
}  // namespace mpdistil::cuda
