// Launchers of the fused hidden-state MSE CUDA kernels (raw pointers; no torch headers).
// Layout: y stack [*, N, H] read through y_layers, teacher stack [*, N, H] through t_layers, P layer pairs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mpdistil::cuda {

// Element types the kernels read; the accumulation type is double for kFloat64 teacher stacks, float otherwise.
enum class ElementType { kFloat32, kFloat64, kFloat16, kBFloat16 };

struct HiddenMSEArgs {
  const void* y;              // student stack or projected rows (accumulation type when projected)
  ElementType y_type;
  int64_t y_layer_stride;
  int64_t y_stack_layers;     // layers in the y stack: y_layers[p] must lie in [0, y_stack_layers)
  const void* teacher;
  ElementType t_type;
  int64_t t_layer_stride;
  int64_t t_stack_layers;     // the same for the teacher stack and t_layers
  const int64_t* y_layers;    // [P]
  const int64_t* t_layers;    // [P]
  const bool* mask;           // [N] or nullptr
  int64_t pairs, rows, width;
  bool normalize;
};

// row_sse[p * N + n] = squared error of row n in pair p (0 for masked rows); row_sse in the accumulation type.
void launch_hidden_mse_fwd(const HiddenMSEArgs& args, void* row_sse, cudaStream_t stream);

// grad_y[y_layers[p], n] += d(scale[p] * sse[p]) / dy and, if grad_t is not null, the same for the teacher.
// scale, grad_y and grad_t are in the accumulation type; pairs sharing a layer are summed without races.
void launch_hidden_mse_bwd(const HiddenMSEArgs& args, const void* scale, void* grad_y, void* grad_t,
                           cudaStream_t stream);

}  // namespace mpdistil::cuda
