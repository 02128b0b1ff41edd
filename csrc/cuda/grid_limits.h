// The CUDA grid's block-count limits (compute capability 3.0+), which the bindings check their launch grids
// against: a larger int64 count would be narrowed silently into a smaller grid.  No torch or CUDA headers.
#pragma once

#include <cstdint>

namespace mpdistil::cuda {

inline constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1 blocks along x
inline constexpr int64_t kMaxGridY = 65535;       // blocks along y (and z)

}  // namespace mpdistil::cuda
