// Fused temperature-softmax KL, CUDA kernels (formulas: csrc/cpu/kd_kl_div.cpp; launchers: kd_kl_div.cuh).
// Forward: one block per row; every thread keeps an online softmax of its strided elements of a and b (running max,
// rescaled sums, and sum exp((a - max a)/T) (a - b)), with 16-byte vector loads; the block then merges the states.
// Backward: elementwise over a 2-D grid (rows x vocabulary tiles), recomputing P and Q from the per-row stats.
// Forward+gradient (a reduced loss, whose row weights are known in forward): the forward's block sweeps its row
// a second time right away and writes the gradients (mostly L2 hits).  With MPDISTIL_KL_ROW_RESIDENT set (sm_90+,
// 16-byte aligned rows) a thread-block cluster holds the row in registers instead, so each logit crosses the memory
// bus exactly once (kd_kl_div_fwd_grad_resident_kernel).
#include <cooperative_groups.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/kd_kl_div.cuh"
#include "cuda/softmax_rows.cuh"

namespace mpdistil::cuda {
namespace {

constexpr int kForwardThreads = 512;
constexpr int kBackwardThreads = 256;
constexpr int kBackwardPacksPerThread = 4;

// The merged online-softmax state of one row as its KL and statistics (max a, log sum a, max b, log sum b,
// E_P[a - b]).
template <typename A>
struct RowResult {
  A kl, stats[kKlStatsPerRow];
};

template <typename A>
__device__ __forceinline__ RowResult<A> row_result(const RowState<A>& state, A inv_t) {
  const A log_sum_a = log(state.sum_a), log_sum_b = log(state.sum_b);
  A mean_diff = 0, row_kl = 0;  // a row without any P entry has no distribution: 0
  if (state.sum_a != A(0)) {  // (!= and ==, so that a NaN sum, from a NaN logit, carries on into NaN)
    mean_diff = state.cross / state.sum_a;
    row_kl = state.sum_b == A(0) ? static_cast<A>(INFINITY)
                                 : (mean_diff - (state.max_a - state.max_b)) * inv_t - log_sum_a + log_sum_b;
  }
  return {row_kl, {state.max_a, log_sum_a, state.max_b, log_sum_b, mean_diff}};
}

template <typename A>
__device__ __forceinline__ void store_row_result(const RowResult<A>& result, int64_t row, A* kl, A* stats) {
  kl[row] = result.kl;
#pragma unroll
  for (int k = 0; k < kKlStatsPerRow; ++k) stats[row * kKlStatsPerRow + k] = result.stats[k];
}

// grad_a = g/T P (a - b - E_P[a - b])/T and grad_b = g/T (Q - P) per entry of one row, from the row's
// statistics and weight g; `zero` (g = 0: a masked row, or a row without a distribution P) means all zeros.  A row
// without a distribution Q under P's mass (KL = +inf) has no gradient: NaN, as torch's.
template <typename A>
struct EntryGradients {
  A max_a, log_sum_a, max_b, log_sum_b, mean_diff, coefficient, inv_t;
  bool no_q;

  __device__ __forceinline__ EntryGradients(const A* stats, A grad_row, A inv_t)
      : max_a(stats[0]), log_sum_a(stats[1]), max_b(stats[2]), log_sum_b(stats[3]), mean_diff(stats[4]),
        coefficient(stats[0] == negative_infinity<A>() ? A(0) : grad_row * inv_t), inv_t(inv_t),
        no_q(stats[3] == negative_infinity<A>()) {}

  __device__ __forceinline__ bool zero() const { return coefficient == A(0); }

  __device__ __forceinline__ void operator()(A va, A vb, A& out_a, A& out_b) const {
    const A prob_p = fast_exp((va - max_a) * inv_t - log_sum_a);
    const A prob_q = fast_exp((vb - max_b) * inv_t - log_sum_b);
    // (the difference before the division by T: no product minus a number for nvcc to contract into an FMA)
    out_a = no_q ? A(NAN) : prob_p == A(0) ? A(0) : coefficient * prob_p * ((va - vb - mean_diff) * inv_t);
    out_b = no_q ? A(NAN) : coefficient * (prob_q - prob_p);
  }
};

// EntryGradients over this block's tiles of one row (backward_row_sweep).
template <int kThreads, int VEC, typename T>
__device__ __forceinline__ void row_gradients(const T* a_row, const T* b_row, T* grad_a_row, T* grad_b_row,
                                              int64_t vocab, acc_t<T> grad_row, const acc_t<T>* stats,
                                              acc_t<T> inv_t) {
  const EntryGradients<acc_t<T>> entry_grads(stats, grad_row, inv_t);
  backward_row_sweep<kThreads, VEC>(a_row, b_row, grad_a_row, grad_b_row, vocab, entry_grads.zero(), entry_grads);
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

// Row-resident forward+gradient (sm_90+): a cluster of gridDim.x / rows CTAs per row, CTA `rank` holding the
// slice [rank * kSlice, (rank + 1) * kSlice) of a and b in registers (PACKS 16-byte packs of each per thread).
// Each CTA merges its online-softmax state, the cluster exchanges the CTA states through distributed shared
// memory (one warp per CTA merges them in the same order everywhere, so all agree bit for bit), and the gradients
// are written from the registers: each logit is read from memory once and nothing is read twice.  Rows need
// 16-byte packs (can_vectorize); the launcher keeps the cluster at most kMaxClusterSize CTAs (portable size).
// Two CTAs per multiprocessor (at most 64 registers a thread), so one CTA's loads overlap the other's merges.
constexpr int kResidentThreads = 512;
constexpr int kMaxClusterSize = 8;

// The resident kernel's widening to the accumulation type.  bf16 is the upper half of a float32, so a shift, which
// ptxas schedules freely: with __bfloat162float (an inline-asm mov) the bf16 PACKS=4 variant needed more than its 64
// registers and spilled 80 bytes a thread to local memory (nvcc -Xptxas -v; tests/test_cuda_compile.py checks it).
template <typename T>
__device__ __forceinline__ acc_t<T> resident_widen(T x) {
  return widen(x);
}
template <>
__device__ __forceinline__ float resident_widen(__nv_bfloat16 x) {
  return __uint_as_float(static_cast<unsigned>(__bfloat16_as_ushort(x)) << 16);
}

template <typename T, int PACKS>
__global__ void __launch_bounds__(kResidentThreads, 2)
    kd_kl_div_fwd_grad_resident_kernel(const T* __restrict__ a, const T* __restrict__ b, acc_t<T>* __restrict__ kl,
                                       acc_t<T>* __restrict__ stats, const acc_t<T>* __restrict__ row_weight,
                                       acc_t<T> weight, T* __restrict__ grad_a, T* __restrict__ grad_b, int64_t vocab,
                                       int64_t stride_a, int64_t stride_b, acc_t<T> inv_t) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using A = acc_t<T>;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int64_t kSlice = int64_t{kResidentThreads} * PACKS * VEC;
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), ranks = cluster.num_blocks();
  const int64_t row = blockIdx.x / ranks;
  const T* a_row = a + row * stride_a;
  const T* b_row = b + row * stride_b;
  const auto entry = [&](int p) { return rank * kSlice + (int64_t{p} * kResidentThreads + threadIdx.x) * VEC; };

  Pack<T, VEC> packs_a[PACKS], packs_b[PACKS];
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {  // every load in flight before the first use
    if (entry(p) < vocab) {
      packs_a[p] = *reinterpret_cast<const Pack<T, VEC>*>(a_row + entry(p));
      packs_b[p] = *reinterpret_cast<const Pack<T, VEC>*>(b_row + entry(p));
    }
  }
  RowState<A> state = RowState<A>::empty();
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    if (entry(p) < vocab) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        state.add(resident_widen(packs_a[p].values[k]), resident_widen(packs_b[p].values[k]), inv_t);
      }
    }
  }
  __shared__ RowState<A> warp_states[kResidentThreads / 32];
  __shared__ RowState<A> cta_state, row_state;
  state = block_merge<kResidentThreads>(state, inv_t, warp_states);
  if (threadIdx.x == 0) cta_state = state;
  cluster.sync();  // release this CTA's state, acquire the others'
  if (threadIdx.x < 32) {  // lane r fetches CTA r's state; the warp merges them (same order in every CTA)
    state = threadIdx.x < ranks ? *cluster.map_shared_rank(&cta_state, threadIdx.x) : RowState<A>::empty();
    state = warp_merge(state, inv_t);
    if (threadIdx.x == 0) row_state = state;
  }
  __syncthreads();
  const RowState<A> total = row_state;
  const RowResult<A> result = row_result(total, inv_t);
  if (rank == 0 && threadIdx.x == 0) store_row_result(result, row, kl, stats);

  const EntryGradients<A> entry_grads(result.stats, row_weight ? weight * row_weight[row] : weight, inv_t);
  T* grad_a_row = grad_a ? grad_a + row * vocab : nullptr;
  T* grad_b_row = grad_b ? grad_b + row * vocab : nullptr;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    if (entry(p) >= vocab) continue;
    Pack<T, VEC> out_a, out_b;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      A value_a = 0, value_b = 0;
      if (!entry_grads.zero()) {
        entry_grads(resident_widen(packs_a[p].values[k]), resident_widen(packs_b[p].values[k]), value_a, value_b);
      }
      out_a.values[k] = narrow<T>(value_a);
      out_b.values[k] = narrow<T>(value_b);
    }
    if (grad_a_row) *reinterpret_cast<Pack<T, VEC>*>(grad_a_row + entry(p)) = out_a;
    if (grad_b_row) *reinterpret_cast<Pack<T, VEC>*>(grad_b_row + entry(p)) = out_b;
  }
  cluster.sync();  // cta_state stays alive until every CTA of the cluster has read it
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched: the launcher checks that the loaded binary is sm_90+
#endif
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

// The arguments of both forward+gradient kernels.
template <typename T>
struct FwdGradArgs {
  const T* a;
  const T* b;
  acc_t<T>* kl;
  acc_t<T>* stats;
  const acc_t<T>* row_weight;
  acc_t<T> weight;
  T* grad_a;
  T* grad_b;
  int64_t vocab, stride_a, stride_b;
  acc_t<T> inv_t;
};

// The launch of `blocks` CTAs of `threads` on `stream`, in clusters of `cluster` CTAs when cluster > 0 (the cluster
// shape is an attribute the config points to: it lives as long as the struct, which is neither copied nor moved).
struct LaunchConfig {
  cudaLaunchAttribute attribute = {};
  cudaLaunchConfig_t config = {};

  LaunchConfig(int64_t blocks, int threads, unsigned cluster, cudaStream_t stream) {
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = cluster;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.gridDim = dim3(static_cast<unsigned>(blocks));
    config.blockDim = dim3(threads);
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = cluster > 0 ? 1 : 0;
  }
  LaunchConfig(const LaunchConfig&) = delete;
  LaunchConfig& operator=(const LaunchConfig&) = delete;
};

template <typename T, typename Kernel>
cudaError_t launch_fwd_grad_kernel(Kernel kernel, const LaunchConfig& launch, const FwdGradArgs<T>& x) {
  return cudaLaunchKernelEx(&launch.config, kernel, x.a, x.b, x.kl, x.stats, x.row_weight, x.weight, x.grad_a,
                            x.grad_b, x.vocab, x.stride_a, x.stride_b, x.inv_t);
}

// Whether the code loaded for the current device is sm_90+ code (the resident kernel's body; a build for older
// architectures alone holds only a trap there).
template <typename Kernel>
bool loads_sm90_code(Kernel kernel) {
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // not an error of this launch: fall back to the two-sweep kernel
    return false;
  }
  return attributes.binaryVersion >= 90 && attributes.ptxVersion >= 90;
}

// Whether the device can hold a cluster of `launch`'s shape of the resident kernel <T, PACKS> at all
// (cudaOccupancyMaxActiveClusters > 0).  A cluster it cannot schedule (a MIG slice, a cluster larger than a GPC
// can hold) may be refused not by cudaLaunchKernelEx but only asynchronously, as a sticky error that no fallback
// undoes.  The answer does not change in a process: cached per device and cluster size (this template instance
// being the kernel variant); racing first calls both query and store the same answer.
template <typename T, int PACKS>
bool cluster_fits(const LaunchConfig& launch, unsigned cluster) {
  constexpr int kCachedDevices = 64;  // devices past these are asked every launch
  static std::atomic<signed char> known[kCachedDevices][kMaxClusterSize + 1];  // 0 not asked, 1 fits, -1 not
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  std::atomic<signed char>* slot =
      device >= 0 && device < kCachedDevices && cluster <= kMaxClusterSize ? &known[device][cluster] : nullptr;
  if (slot != nullptr) {
    const signed char answer = slot->load(std::memory_order_relaxed);
    if (answer != 0) return answer > 0;
  }
  int clusters = 0;
  const cudaError_t status =
      cudaOccupancyMaxActiveClusters(&clusters, kd_kl_div_fwd_grad_resident_kernel<T, PACKS>, &launch.config);
  if (status != cudaSuccess) (void)cudaGetLastError();  // not an error of this launch: the two-sweep kernel
  const bool fits = status == cudaSuccess && clusters > 0;
  if (slot != nullptr) slot->store(fits ? 1 : -1, std::memory_order_relaxed);
  return fits;
}

// The row-resident kernel with PACKS (or, when its cluster would exceed kMaxClusterSize CTAs, more) packs per
// thread; false when no variant fits the row or this device cannot run it (nothing launched then).
template <typename T, int PACKS>
bool launch_resident(const FwdGradArgs<T>& x, int64_t rows, cudaStream_t stream, cudaError_t& error) {
  constexpr int64_t kSlice = int64_t{kResidentThreads} * PACKS * (16 / sizeof(T));
  const int64_t ranks = (x.vocab + kSlice - 1) / kSlice;
  if (ranks > kMaxClusterSize) {
    if constexpr (PACKS < 4) {
      return launch_resident<T, PACKS * 2>(x, rows, stream, error);
    } else {
      return false;
    }
  }
  const auto kernel = kd_kl_div_fwd_grad_resident_kernel<T, PACKS>;
  if (rows * ranks > INT32_MAX || !loads_sm90_code(kernel)) return false;
  const LaunchConfig launch(rows * ranks, kResidentThreads, static_cast<unsigned>(ranks), stream);
  if (!cluster_fits<T, PACKS>(launch, static_cast<unsigned>(ranks))) return false;
  error = launch_fwd_grad_kernel(kernel, launch, x);
  if (error != cudaSuccess) {  // refused at launch after all: the two-sweep kernel
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

template <typename T>
cudaError_t launch_fwd_grad_typed(const void* a, const void* b, void* kl, void* stats, const void* row_weight,
                                  double weight, void* grad_a, void* grad_b, int64_t rows, int64_t vocab,
                                  int64_t stride_a, int64_t stride_b, double temperature, int resident_packs,
                                  cudaStream_t stream) {
  using A = acc_t<T>;
  if (rows == 0) return cudaSuccess;
  const FwdGradArgs<T> x{static_cast<const T*>(a), static_cast<const T*>(b), static_cast<A*>(kl),
                         static_cast<A*>(stats), static_cast<const A*>(row_weight), static_cast<A>(weight),
                         static_cast<T*>(grad_a), static_cast<T*>(grad_b), vocab, stride_a, stride_b,
                         static_cast<A>(1.0 / temperature)};
  const bool vectorized = can_vectorize<T>(vocab, stride_a, stride_b, a, b);
  if constexpr (!std::is_same_v<T, double>) {
    cudaError_t error = cudaSuccess;
    const auto resident = [&] {
      switch (resident_packs) {
        case 1:
          return launch_resident<T, 1>(x, rows, stream, error);
        case 2:
          return launch_resident<T, 2>(x, rows, stream, error);
        case 4:
          return launch_resident<T, 4>(x, rows, stream, error);
        default:
          return false;
      }
    };
    if (vectorized && resident()) return error;
  }
  const LaunchConfig launch(rows, kForwardThreads, 0, stream);
  if (vectorized) return launch_fwd_grad_kernel(kd_kl_div_fwd_grad_kernel<T, 16 / sizeof(T)>, launch, x);
  return launch_fwd_grad_kernel(kd_kl_div_fwd_grad_kernel<T, 1>, launch, x);
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
                                      int64_t stride_a, int64_t stride_b, double temperature, int resident_packs,
                                      LogitsType type, cudaStream_t stream) {
  return dispatch_logits_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_fwd_grad_typed<T>(a, b, kl, stats, row_weight, weight, grad_a, grad_b, rows, vocab, stride_a,
                                    stride_b, temperature, resident_packs, stream);
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
