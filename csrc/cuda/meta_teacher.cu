// Meta-teacher row kernels on CUDA: one thread per logit row for the softmax-CE terms (K is the number of
// labels, small), grid-stride elementwise GELU and GELU'.  The GEMMs around them are cuBLAS calls made by
// csrc/cuda/meta_teacher_binding.cpp (formulas in csrc/meta_teacher.h).
#include <cmath>

#include "meta_teacher.cuh"

namespace mpdistil::cuda {
namespace {

constexpr int kThreads = kMetaTeacherRowThreads;  // (the GELU kernels' too)

template <typename acc_t>
__global__ void softmax_kernel(const acc_t* z, const int64_t* labels, int64_t batch, int64_t classes, acc_t ce_t,
                               acc_t gold_t, acc_t ce_s, acc_t gold_s, acc_t* dz, acc_t* row_loss) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= 2 * batch) return;
  const bool student = i >= batch;
  const acc_t a_ce = (student ? ce_s : ce_t) / batch, a_p = (student ? gold_s : gold_t) / batch;
  const acc_t* zi = z + i * classes;
  acc_t* gi = dz + i * classes;
  const int64_t y = labels[student ? i - batch : i];
  if (y < 0 || y >= classes) {
    row_loss[i] = NAN;
    for (int64_t k = 0; k < classes; ++k) gi[k] = NAN;
    return;
  }
  acc_t max_z = zi[0];
  for (int64_t k = 1; k < classes; ++k) max_z = max(max_z, zi[k]);
  acc_t sum = 0;
  for (int64_t k = 0; k < classes; ++k) sum += exp(zi[k] - max_z);
  const acc_t lse = max_z + log(sum), p_y = exp(zi[y] - lse);
  for (int64_t k = 0; k < classes; ++k) {
    const acc_t p = exp(zi[k] - lse), onehot = k == y ? acc_t(1) : acc_t(0);
    gi[k] = a_ce * (p - onehot) + a_p * p_y * (onehot - p);
  }
  row_loss[i] = a_ce * (lse - zi[y]) + a_p * p_y;
}

template <typename acc_t>
__device__ __forceinline__ acc_t normal_cdf(acc_t x) {
  return acc_t(0.5) * (acc_t(1) + erf(x * acc_t(0.70710678118654752)));
}

template <typename acc_t>
__global__ void gelu_forward_kernel(const acc_t* pre, acc_t* act, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    act[i] = pre[i] * normal_cdf(pre[i]);
}

template <typename acc_t>
__global__ void gelu_grad_kernel(const acc_t* pre, const acc_t* grad_act, acc_t* grad_pre, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t x = pre[i], cdf = normal_cdf(x);
    grad_pre[i] = grad_act[i] * (cdf + x * acc_t(0.39894228040143268) * exp(acc_t(-0.5) * x * x));
  }
}

unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

template <typename acc_t>
void softmax(const void* z, const int64_t* labels, int64_t batch, int64_t classes, const double c[4], void* dz,
             void* row_loss, cudaStream_t stream) {
  const int64_t blocks = (2 * batch + kThreads - 1) / kThreads;
  softmax_kernel<acc_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      static_cast<const acc_t*>(z), labels, batch, classes, acc_t(c[0]), acc_t(c[1]), acc_t(c[2]), acc_t(c[3]),
      static_cast<acc_t*>(dz), static_cast<acc_t*>(row_loss));
}

}  // namespace

void launch_meta_teacher_softmax(const void* z, const int64_t* labels, int64_t batch, int64_t classes,
                                 const double coefficients[4], void* dz, void* row_loss, bool is_double,
                                 cudaStream_t stream) {
  if (batch == 0) return;
  if (is_double) softmax<double>(z, labels, batch, classes, coefficients, dz, row_loss, stream);
  else softmax<float>(z, labels, batch, classes, coefficients, dz, row_loss, stream);
}

void launch_gelu_forward(const void* pre, void* act, int64_t n, bool is_double, cudaStream_t stream) {
  if (n == 0) return;
  if (is_double) {
    gelu_forward_kernel<double><<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const double*>(pre),
                                                                        static_cast<double*>(act), n);
  } else {
    gelu_forward_kernel<float><<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const float*>(pre),
                                                                       static_cast<float*>(act), n);
  }
}

void launch_gelu_grad(const void* pre, const void* grad_act, void* grad_pre, int64_t n, bool is_double,
                      cudaStream_t stream) {
  if (n == 0) return;
  if (is_double) {
    gelu_grad_kernel<double><<<blocks_for(n), kThreads, 0, stream>>>(
        static_cast<const double*>(pre), static_cast<const double*>(grad_act), static_cast<double*>(grad_pre), n);
  } else {
    gelu_grad_kernel<float><<<blocks_for(n), kThreads, 0, stream>>>(
        static_cast<const float*>(pre), static_cast<const float*>(grad_act), static_cast<float*>(grad_pre), n);
  }
}

}  // namespace mpdistil::cuda
