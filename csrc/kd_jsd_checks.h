// Argument check of the fused generalized-JSD kernels, shared by their CPU and CUDA registrations (the public API
// maps beta 0 / 1 to the plain KLs before calling them).
#pragma once

#include <c10/util/Exception.h>

namespace mpdistil {

inline void check_jsd_beta(double beta) {
  TORCH_CHECK(beta > 0.0 && beta < 1.0, "kd_jsd: beta must lie strictly between 0 and 1, got ", beta);
}

}  // namespace mpdistil
