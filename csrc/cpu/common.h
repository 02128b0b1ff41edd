// Small helpers shared by the fused CPU kernels: accumulation types, a fast accurate vectorised exp, and
// chunked row loads/stores that convert bf16/fp16 to the accumulation type once per element.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mpdistil::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// fp32 accumulation for fp32/bf16/fp16 inputs, fp64 for fp64 inputs (so gradcheck in float64 is meaningful).
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements per chunk of a row: small enough that two inputs stay in L1 while a chunk is revisited.
inline constexpr int64_t kChunk = 2048;

// exp(x) for fp32 vectors, x <= 88: Cody-Waite range reduction x = n ln2 + r, then Cephes' degree-7 polynomial
// for exp(r) (about 1 ulp). Inputs below -87.3 (including -inf) give exactly 0; NaN propagates.
inline Vec<float> vec_exp(Vec<float> x) {
  const Vec<float> lowest(-87.3f), highest(88.0f);
  const Vec<float> underflow = x < lowest;
  x = at::vec::minimum(at::vec::maximum(x, lowest), highest);
  const Vec<float> n = (x * Vec<float>(1.44269504088896341f)).round();
  Vec<float> r = at::vec::fmadd(n, Vec<float>(-0.693359375f), x);
  r = at::vec::fmadd(n, Vec<float>(2.12194440e-4f), r);
  Vec<float> poly(1.9875691500e-4f);
  poly = at::vec::fmadd(poly, r, Vec<float>(1.3981999507e-3f));
  poly = at::vec::fmadd(poly, r, Vec<float>(8.3334519073e-3f));
  poly = at::vec::fmadd(poly, r, Vec<float>(4.1665795894e-2f));
  poly = at::vec::fmadd(poly, r, Vec<float>(1.6666665459e-1f));
  poly = at::vec::fmadd(poly, r, Vec<float>(5.0000001201e-1f));
  const Vec<float> exp_r = at::vec::fmadd(poly, r * r, r + Vec<float>(1.0f));
  const Vec<int32_t> biased = at::vec::convert_to_int_of_same_size(n) + Vec<int32_t>(127);
  const Vec<float> two_to_n = at::vec::cast<float>(biased << Vec<int32_t>(23));
  return Vec<float>::blendv(exp_r * two_to_n, Vec<float>(0.0f), underflow);
}

// fp64 vectors: ATen's SLEEF exp (1 ulp); fp64 is for checks, not speed.
inline Vec<double> vec_exp(Vec<double> x) { return x.exp(); }

// A view of `n` consecutive elements of `src` as acc_t: the pointer itself when no conversion is needed,
// otherwise converted into `buffer` (kChunk elements).
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
inline const acc_t* load_chunk(const scalar_t* src, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    constexpr int64_t width = Vec<scalar_t>::size();
    int64_t i = 0;
    for (; i + width <= n; i += width) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec<scalar_t>::loadu(src + i));
      lo.store(buffer + i);
      hi.store(buffer + i + width / 2);
    }
    for (; i < n; ++i) buffer[i] = static_cast<acc_t>(src[i]);
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

// Largest of `n` values (-inf for none).
template <typename acc_t>
inline acc_t chunk_max(const acc_t* values, int64_t n) {
  constexpr int64_t width = Vec<acc_t>::size();
  Vec<acc_t> best(-std::numeric_limits<acc_t>::infinity());
  int64_t i = 0;
  for (; i + width <= n; i += width) best = at::vec::maximum(best, Vec<acc_t>::loadu(values + i));
  acc_t result = at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return at::vec::maximum(a, b); },
                                                best);
  for (; i < n; ++i) result = std::max(result, values[i]);
  return result;
}

// Sum of a vector's lanes.
template <typename acc_t>
inline acc_t lane_sum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; }, v);
}

// Grain size for at::parallel_for over rows of length `row_length`: about 32K elements per task.
inline int64_t row_grain(int64_t row_length) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_length)); }

// at::empty for a large output that is about to be written once: on Linux the pages are advised as transparent huge
// pages before the first touch, which makes first-touch page faults (a third of the time of a [2048, 32000] fp32
// gradient on a 2-core VM) about 3x cheaper.  Only an advice: without THP it is an ordinary at::empty.
inline at::Tensor empty_for_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return out;
}

}  // namespace mpdistil::cpu
