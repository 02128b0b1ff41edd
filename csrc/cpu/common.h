// Small helpers shared by the fused CPU kernels: accumulation types, a fast accurate vectorised exp, and
// chunked row loads/stores that convert bf16/fp16 to the accumulation type once per element.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace mpdistil::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// fp32 accumulation for fp32/bf16/fp16 inputs, fp64 for fp64 inputs (so gradcheck in float64 is meaningful).
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements per chunk of a row: small enough that two inputs stay in L1 while a chunk is revisited.
inline constexpr int64_t kChunk = 2048;

// log2(e): exp(x) = exp2(x * kLog2e); callers fold it into the scale they already apply (1/T).
inline constexpr double kLog2e = 1.4426950408889634;

// 2^y for fp32 vectors, y <= 127: y = n + f with n = round(y), Cephes' exp2f polynomial for 2^f on [-1/2, 1/2]
// (relative error < 2e-7), times 2^n built in the exponent bits.  y < -126 (including -inf) gives exactly 0.
inline Vec<float> vec_exp2(Vec<float> y) {
  const Vec<float> lowest(-126.0f);
  const Vec<float> underflow = y < lowest;
  y = at::vec::clamp_min(y, lowest);
  const Vec<float> n = y.round();
  const Vec<float> f = y - n;
  Vec<float> poly(1.535336188319500e-4f);
  poly = at::vec::fmadd(poly, f, Vec<float>(1.339887440266574e-3f));
  poly = at::vec::fmadd(poly, f, Vec<float>(9.618437357674640e-3f));
  poly = at::vec::fmadd(poly, f, Vec<float>(5.550332471162809e-2f));
  poly = at::vec::fmadd(poly, f, Vec<float>(2.402264791363012e-1f));
  poly = at::vec::fmadd(poly, f, Vec<float>(6.931472028550421e-1f));
  const Vec<float> two_to_f = at::vec::fmadd(poly, f, Vec<float>(1.0f));
  const Vec<int32_t> biased = at::vec::convert_to_int_of_same_size(n) + Vec<int32_t>(127);
  const Vec<float> two_to_n = at::vec::cast<float>(biased << Vec<int32_t>(23));
  return Vec<float>::blendv(two_to_f * two_to_n, Vec<float>(0.0f), underflow);
}

// fp64 vectors: ATen's SLEEF exp2 (1 ulp); fp64 is for checks, not speed.
inline Vec<double> vec_exp2(Vec<double> y) { return y.exp2(); }

// Natural log of fp32 vectors with x >= FLT_MIN (smaller inputs are clamped to it): x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), log x = e ln 2 + log(1 + f), f = m - 1, the latter as f - f^2/2 + f^3 P(f) with Cephes'
// logf polynomial (relative error < 1e-7).  About twice as fast as ATen's SLEEF log, which dominated the JSD.
inline Vec<float> vec_log(Vec<float> x) {
  const Vec<float> one(1.0f);
  x = at::vec::clamp_min(x, Vec<float>(std::numeric_limits<float>::min()));
  const Vec<int32_t> bits = at::vec::cast<int32_t>(x);
  Vec<float> m = at::vec::cast<float>((bits & Vec<int32_t>(0x007fffff)) | Vec<int32_t>(0x3f800000));  // [1, 2)
  // The biased exponent as a float without an int -> float conversion: the bits of 2^23 + e.
  Vec<float> e = at::vec::cast<float>((bits >> Vec<int32_t>(23)) | Vec<int32_t>(0x4b000000)) -
                 Vec<float>(8388608.0f + 127.0f);
  const Vec<float> high = m > Vec<float>(1.41421356237f);
  m = Vec<float>::blendv(m, m * Vec<float>(0.5f), high);
  e = e + (high & one);
  const Vec<float> f = m - one;
  Vec<float> poly(7.0376836292e-2f);
  poly = at::vec::fmadd(poly, f, Vec<float>(-1.1514610310e-1f));
  poly = at::vec::fmadd(poly, f, Vec<float>(1.1676998740e-1f));
  poly = at::vec::fmadd(poly, f, Vec<float>(-1.2420140846e-1f));
  poly = at::vec::fmadd(poly, f, Vec<float>(1.4249322787e-1f));
  poly = at::vec::fmadd(poly, f, Vec<float>(-1.6668057665e-1f));
  poly = at::vec::fmadd(poly, f, Vec<float>(2.0000714765e-1f));
  poly = at::vec::fmadd(poly, f, Vec<float>(-2.4999993993e-1f));
  poly = at::vec::fmadd(poly, f, Vec<float>(3.3333331174e-1f));
  const Vec<float> f2 = f * f;
  Vec<float> y = at::vec::fmadd(f * f2, poly, Vec<float>(-0.5f) * f2);
  // e ln 2 in two parts (ln 2 = 0.693359375 - 2.12194440e-4) so that e ln 2 adds no rounding of its own.
  y = at::vec::fmadd(e, Vec<float>(-2.12194440e-4f), y);
  return at::vec::fmadd(e, Vec<float>(0.693359375f), f + y);
}

// fp64 vectors: ATen's SLEEF log (1 ulp); fp64 is for checks, not speed.
inline Vec<double> vec_log(Vec<double> x) { return x.log(); }

// max(a, b), NaN when either is NaN (std::max and clamp_min keep one operand whatever the other holds).
template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return std::isnan(b) ? b : std::max(a, b);
}

// Largest of `n` values (-inf for none; NaN when any is NaN, wherever it sits).
template <typename acc_t>
inline acc_t chunk_max(const acc_t* values, int64_t n) {
  constexpr int64_t width = Vec<acc_t>::size();
  Vec<acc_t> best(-std::numeric_limits<acc_t>::infinity());
  int64_t i = 0;
  for (; i + width <= n; i += width) best = at::vec::maximum(Vec<acc_t>::loadu(values + i), best);
  acc_t result = at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return at::vec::maximum(a, b); },
                                                best);
  for (; i < n; ++i) result = nan_max(result, values[i]);
  return result;
}

// `n` consecutive elements of `src` converted to acc_t into `buffer` (kChunk elements); with kTrackMax also their
// largest value (-inf for none, NaN when any is NaN), taken while the converted values are in registers.
template <bool kTrackMax, typename scalar_t, typename acc_t>
inline acc_t convert_chunk(const scalar_t* src, int64_t n, acc_t* buffer) {
  constexpr int64_t width = Vec<scalar_t>::size();
  Vec<acc_t> best(-std::numeric_limits<acc_t>::infinity());
  int64_t i = 0;
  for (; i + width <= n; i += width) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec<scalar_t>::loadu(src + i));
    lo.store(buffer + i);
    hi.store(buffer + i + width / 2);
    if constexpr (kTrackMax) best = at::vec::maximum(hi, at::vec::maximum(lo, best));
  }
  acc_t result = -std::numeric_limits<acc_t>::infinity();
  if constexpr (kTrackMax) {
    result = at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return at::vec::maximum(a, b); },
                                            best);
  }
  for (; i < n; ++i) {
    buffer[i] = static_cast<acc_t>(src[i]);
    if constexpr (kTrackMax) result = nan_max(result, buffer[i]);
  }
  return result;
}

// A view of `n` consecutive elements of `src` as acc_t: the pointer itself when no conversion is needed,
// otherwise converted into `buffer` (kChunk elements).
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
inline const acc_t* load_chunk(const scalar_t* src, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    convert_chunk<false>(src, n, buffer);
    return buffer;
  }
}

// load_chunk and the largest of the `n` values (-inf for none) in one pass over a 16-bit source.
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
inline const acc_t* load_chunk_max(const scalar_t* src, int64_t n, acc_t* buffer, acc_t& largest) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    largest = chunk_max(src, n);
    return src;
  } else {
    largest = convert_chunk<true>(src, n, buffer);
    return buffer;
  }
}

// Store `n` acc_t values to `dst` of type scalar_t (rounding bf16/fp16 to nearest even).
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
inline void store_chunk(const acc_t* values, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(values, values + n, dst);
  } else {
    constexpr int64_t width = Vec<scalar_t>::size();
    int64_t i = 0;
    for (; i + width <= n; i += width) {
      at::vec::convert_from_float<scalar_t>(Vec<float>::loadu(values + i), Vec<float>::loadu(values + i + width / 2))
          .store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(values[i]);
  }
}


// This thread's scratch array of at least `n` elements of T in slot kSlot, kept between calls (a row loop allocates
// once): the row buffers of the forward+gradient kernels.
template <typename T, int kSlot = 0>
inline T* thread_scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// Sum of a vector's lanes.
template <typename acc_t>
inline acc_t lane_sum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; }, v);
}

// Store the first `count` lanes of `v` to `dst`.  Full, aligned fp32 vectors bypass the cache (non-temporal
// stores): a large output written once then costs no read-for-ownership traffic and does not evict the inputs.
// Call stream_fence() before other threads may read what was streamed.
template <typename acc_t>
inline void store_streaming(const Vec<acc_t>& v, acc_t* dst, int64_t count) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (count == Vec<float>::size() && reinterpret_cast<uintptr_t>(dst) % sizeof(Vec<float>) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      _mm512_stream_ps(dst, v);
#else
      _mm256_stream_ps(dst, v);
#endif
      return;
    }
  }
#endif
  v.store(dst, count);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Grain size for at::parallel_for over rows of length `row_length`: about 32K elements per task.
inline int64_t row_grain(int64_t row_length) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_length)); }

// A large buffer that reuses the previous call's memory once nobody else holds it.  The CPU allocator returns big
// blocks to the OS, so every fresh multi-MB buffer costs first-touch page faults: on a 2-core VM that is more than
// the fused kernel itself.  The buffer is reused only when this cache holds the last reference to its storage (no
// tensor, view, autograd graph or .grad uses it), so nothing handed out is ever overwritten.  Keeps one buffer per
// OutputCache alive between calls.
//   take():       exactly `sizes` (outputs returned to the caller, e.g. a gradient);
//   take_scratch(): a view of the first numel(sizes) elements of a buffer at least that large (workspaces and
//                 saved activations whose size follows a mask, so it changes from batch to batch).
class OutputCache {
 public:
  at::Tensor take(at::IntArrayRef sizes, const at::TensorOptions& options) { return get(sizes, options, false); }
  at::Tensor take_scratch(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return get(sizes, options, true);
  }

 private:
  at::Tensor get(at::IntArrayRef sizes, const at::TensorOptions& options, bool larger_ok) {
    // An inference tensor cannot be saved for backward: under inference mode hand out a fresh buffer, and never
    // keep one made there for later (training) calls.
    if (c10::InferenceMode::is_enabled()) return at::empty(sizes, options);
    const std::lock_guard<std::mutex> lock(mutex_);
    const int64_t numel = c10::multiply_integers(sizes);
    const bool reusable = buffer_.defined() && buffer_.use_count() == 1 && buffer_.storage().use_count() == 1 &&
                          (larger_ok ? buffer_.numel() >= numel : buffer_.numel() == numel) &&
                          buffer_.dtype() == options.dtype() && buffer_.device() == options.device() &&
                          !buffer_.is_inference();
    if (!reusable) buffer_ = at::empty({numel}, options);
    return buffer_.narrow(0, 0, numel).view(sizes);
  }

  std::mutex mutex_;
  at::Tensor buffer_;
};

}  // namespace mpdistil::cpu
