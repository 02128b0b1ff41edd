// Element type of the logits handed to the fused temperature-softmax CUDA launchers (kd_kl_div.cuh, kd_jsd.cuh):
// a plain enum, so the launcher headers need no torch or CUDA half-precision headers.
#pragma once

namespace mpdistil::cuda {

enum class LogitsType { kFloat32, kFloat16, kBFloat16, kFloat64 };

}  // namespace mpdistil::cuda
