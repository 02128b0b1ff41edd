// Fused hidden-state MSE CUDA kernels, reading the selected layers in place.  Forward: one warp per (pair, row),
// warp reductions.  Backward: one block per row n loops over the layer pairs (so pairs sharing a layer never race);
// block reductions give, with normalize (patient KD), the norms and dot products of the L2-normalised rows.
#include <c10/macros/Macros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/block_reduce.cuh"
#include "cuda/hidden_mse.cuh"

namespace mpdistil::cuda {
namespace {

constexpr int kThreads = 256;
constexpr double kNormEps = 1e-12;  // torch.nn.functional.normalize's clamp

template <typename T> __device__ __forceinline__ float to_acc(T v, float) { return static_cast<float>(v); }
__device__ __forceinline__ float to_acc(__half v, float) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v, float) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ double to_acc(T v, double) { return static_cast<double>(v); }
__device__ __forceinline__ double to_acc(__half v, double) { return __half2float(v); }
__device__ __forceinline__ double to_acc(__nv_bfloat16 v, double) { return __bfloat162float(v); }

template <typename acc_t, typename y_t, typename t_t>
struct RowPair {
  const y_t* y;
  const t_t* t;
  acc_t inv_y = 1, inv_t = 1;
  bool clamped_y = false, clamped_t = false;

  __device__ acc_t ry(int64_t h) const { return to_acc(y[h], acc_t(0)) * inv_y; }
  __device__ acc_t rt(int64_t h) const { return to_acc(t[h], acc_t(0)) * inv_t; }

  __device__ void normalise(int64_t width, acc_t* shared) {
    acc_t yy = 0, tt = 0;
    for (int64_t h = threadIdx.x; h < width; h += kThreads) {
      const acc_t a = to_acc(y[h], acc_t(0)), b = to_acc(t[h], acc_t(0));
      yy += a * a;
      tt += b * b;
    }
    set_norms(sqrt(block_sum<kThreads>(yy, shared)), sqrt(block_sum<kThreads>(tt, shared)));
  }

  // 1 / max(norm, eps) as torch.nn.functional.normalize; a clamped row's gradient has no projection term.
  __device__ void set_norms(acc_t norm_y, acc_t norm_t) {
    clamped_y = norm_y < acc_t(kNormEps);
    clamped_t = norm_t < acc_t(kNormEps);
    inv_y = acc_t(1) / (clamped_y ? acc_t(kNormEps) : norm_y);
    inv_t = acc_t(1) / (clamped_t ? acc_t(kNormEps) : norm_t);
  }
};

// Layer p's index into its stack, checked on the device like torch's indexing kernels (a device-side assert; a
// host check would copy the indices to the host, a stream sync per call).
__device__ __forceinline__ int64_t checked_layer(const int64_t* layers, int64_t p, int64_t stack_layers) {
  const int64_t layer = layers[p];
  CUDA_KERNEL_ASSERT(0 <= layer && layer < stack_layers);
  return layer;
}

template <typename acc_t, typename y_t, typename t_t>
__device__ RowPair<acc_t, y_t, t_t> row_pair(const HiddenMSEArgs& a, int64_t p, int64_t n) {
  RowPair<acc_t, y_t, t_t> row;
  row.y = static_cast<const y_t*>(a.y) + checked_layer(a.y_layers, p, a.y_stack_layers) * a.y_layer_stride +
          n * a.width;
  row.t = static_cast<const t_t*>(a.teacher) + checked_layer(a.t_layers, p, a.t_stack_layers) * a.t_layer_stride +
          n * a.width;
  return row;
}

// Forward: one warp per (pair, row), kWarps rows of one pair per block (grid: row tiles x pairs), no block-wide
// synchronisation: each lane reads the row at stride 32 (coalesced, unrolled for loads in flight), warp shuffles
// give the norms (normalize) and the squared error.
constexpr int kWarps = kThreads / 32;

template <typename acc_t, typename y_t, typename t_t>
__global__ void __launch_bounds__(kThreads) hidden_mse_fwd_kernel(HiddenMSEArgs a, acc_t* row_sse) {
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32, p = blockIdx.y;
  if (n >= a.rows) return;
  if (a.mask != nullptr && !a.mask[n]) {
    if (lane == 0) row_sse[p * a.rows + n] = 0;
    return;
  }
  auto row = row_pair<acc_t, y_t, t_t>(a, p, n);
  if (a.normalize) {
    acc_t yy = 0, tt = 0;
#pragma unroll 4
    for (int64_t h = lane; h < a.width; h += 32) {
      const acc_t u = to_acc(row.y[h], acc_t(0)), v = to_acc(row.t[h], acc_t(0));
      yy += u * u;
      tt += v * v;
    }
    row.set_norms(sqrt(warp_sum(yy)), sqrt(warp_sum(tt)));
  }
  acc_t sum = 0;
#pragma unroll 4
  for (int64_t h = lane; h < a.width; h += 32) {
    const acc_t d = row.ry(h) - row.rt(h);
    sum += d * d;
  }
  sum = warp_sum(sum);
  if (lane == 0) row_sse[p * a.rows + n] = sum;
}

template <typename acc_t, typename y_t, typename t_t>
__global__ void __launch_bounds__(kThreads) hidden_mse_bwd_kernel(HiddenMSEArgs a, const acc_t* scale, acc_t* grad_y,
                                                                  acc_t* grad_t) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t n = blockIdx.x;
  if (a.mask != nullptr && !a.mask[n]) return;  // gradients stay zero
  for (int64_t p = 0; p < a.pairs; ++p) {
    auto row = row_pair<acc_t, y_t, t_t>(a, p, n);
    const acc_t two_s = acc_t(2) * scale[p];
    acc_t u_dot_gu = 0, v_dot_gv = 0;
    if (a.normalize) {
      row.normalise(a.width, shared);
      acc_t uu = 0, uv = 0, vv = 0;
      for (int64_t h = threadIdx.x; h < a.width; h += kThreads) {
        const acc_t u = row.ry(h), v = row.rt(h);
        uu += u * u;
        uv += u * v;
        vv += v * v;
      }
      uu = block_sum<kThreads>(uu, shared);
      uv = block_sum<kThreads>(uv, shared);
      vv = block_sum<kThreads>(vv, shared);
      u_dot_gu = row.clamped_y ? acc_t(0) : two_s * (uu - uv);
      v_dot_gv = row.clamped_t ? acc_t(0) : -two_s * (uv - vv);
    }
    acc_t* gy = grad_y + a.y_layers[p] * a.y_layer_stride + n * a.width;  // indices checked by row_pair
    acc_t* gt = grad_t == nullptr ? nullptr : grad_t + a.t_layers[p] * a.t_layer_stride + n * a.width;
    for (int64_t h = threadIdx.x; h < a.width; h += kThreads) {
      const acc_t u = row.ry(h), v = row.rt(h), g_u = two_s * (u - v);
      gy[h] += (g_u - u * u_dot_gu) * row.inv_y;
      if (gt != nullptr) gt[h] += (-g_u - v * v_dot_gv) * row.inv_t;
    }
    __syncthreads();  // the next pair may read-modify-write the same gradient row
  }
}

// Calls f(acc_t{}, y_t{}, t_t{}) with the element types of the arguments.
template <typename F>
void dispatch(const HiddenMSEArgs& a, F&& f) {
  auto with_teacher = [&](auto y_tag) {
    switch (a.t_type) {
      case ElementType::kFloat32: return f(float{}, y_tag, float{});
      case ElementType::kFloat64: return f(double{}, y_tag, double{});
      case ElementType::kFloat16: return f(float{}, y_tag, __half{});
      case ElementType::kBFloat16: return f(float{}, y_tag, __nv_bfloat16{});
    }
  };
  switch (a.y_type) {
    case ElementType::kFloat32: return with_teacher(float{});
    case ElementType::kFloat64: return with_teacher(double{});
    case ElementType::kFloat16: return with_teacher(__half{});
    case ElementType::kBFloat16: return with_teacher(__nv_bfloat16{});
  }
}

}  // namespace

void launch_hidden_mse_fwd(const HiddenMSEArgs& args, void* row_sse, cudaStream_t stream) {
  if (args.rows == 0 || args.pairs == 0) return;
  const dim3 grid(static_cast<unsigned>((args.rows + kWarps - 1) / kWarps), static_cast<unsigned>(args.pairs));
  dispatch(args, [&](auto acc, auto y, auto t) {
    using acc_t = decltype(acc);
    hidden_mse_fwd_kernel<acc_t, decltype(y), decltype(t)>
        <<<grid, kThreads, 0, stream>>>(args, static_cast<acc_t*>(row_sse));
  });
}

void launch_hidden_mse_bwd(const HiddenMSEArgs& args, const void* scale, void* grad_y, void* grad_t,
                           cudaStream_t stream) {
  if (args.rows == 0 || args.pairs == 0) return;
  dispatch(args, [&](auto acc, auto y, auto t) {
    using acc_t = decltype(acc);
    hidden_mse_bwd_kernel<acc_t, decltype(y), decltype(t)><<<args.rows, kThreads, 0, stream>>>(
        args, static_cast<const acc_t*>(scale), static_cast<acc_t*>(grad_y), static_cast<acc_t*>(grad_t));
  });
}

}  // namespace mpdistil::cuda
