// Launchers of the meta-teacher row kernels (raw pointers; no torch headers).  All arrays are contiguous and of
// one floating type: float (is_double = false) or double.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mpdistil::cuda {

// Threads per block of the softmax row kernel: one thread per row of z, ceil(2B / this) blocks along grid x.
inline constexpr int kMetaTeacherRowThreads = 256;

// Softmax / CE / gold-probability rows of z [2B, K] (teacher rows first): row_loss[i] = a_ce CE + a_p p_y and
// dz[i] = a_ce (p - e_y) + a_p p_y (e_y - p), with (a_ce, a_p) = coefficients[0..1] / B for teacher rows and
// coefficients[2..3] / B for student rows.  A label outside [0, K) gives a NaN loss.
void launch_meta_teacher_softmax(const void* z, const int64_t* labels, int64_t batch, int64_t classes,
                                 const double coefficients[4], void* dz, void* row_loss, bool is_double,
                                 cudaStream_t stream);

// act = GELU(pre) (exact, erf), n elements.
void launch_gelu_forward(const void* pre, void* act, int64_t n, bool is_double, cudaStream_t stream);

// grad_pre = grad_act * GELU'(pre), n elements.
void launch_gelu_grad(const void* pre, const void* grad_act, void* grad_pre, int64_t n, bool is_double,
                      cudaStream_t stream);

}  // namespace mpdistil::cuda
