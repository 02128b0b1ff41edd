// Fused temperature-softmax KL divergence per row, CPU kernels (Hinton et al. 2015, "Distilling the Knowledge in a
// Neural Network").
//
// For each row of logits a (the weighting distribution P) and b (Q), with P = softmax(a / T), Q = softmax(b / T):
//   forward : kl = sum_i P_i (log P_i - log Q_i) = E_P[a - b]/T - (max a - max b)/T - log_sum_a + log_sum_b,
//             stats = (max a, log_sum_a = log sum exp((a - max a)/T), max b, log_sum_b, E_P[a - b]).
//             One read of each input: chunks of kChunk elements, online max/rescale between chunks, vectorised exp.
//   backward: with g the row's upstream coefficient, since log P_i - log Q_i - kl = (a_i - b_i - E_P[a - b])/T,
//             dkl/da_i = g/T * P_i (a_i - b_i - E_P[a - b])/T,   dkl/db_i = g/T * (Q_i - P_i),
//             both in one read of each input, recomputing P and Q from the saved stats (the forward+gradient of a
//             reduced loss instead keeps the forward's exps in a per-thread row buffer: no exp in its gradient sweep).
//             Keeping E_P[a - b] (not kl) avoids cancelling two large numbers: with one-hot P the teacher
//             gradient is exactly 0 even for logits of size 1e4.  The difference is taken before the division by
//             T, so no product is subtracted: a compiler that contracts x * y - z into an unrounded FMA (GCC does
//             by default) cannot leave the product's rounding error behind (0.02 for T = 1e-3 when it did).
// The caller maps student/teacher to (a, b): forward KL(p_t || p_s) has a = teacher, b = student; reverse swaps them.
// Conventions: entries with P_i = 0 (a_i = -inf) contribute exactly 0; a row whose a is all -inf has no distribution
// and gives kl = 0 and zero gradients (like a masked row); rows with g == 0 get zero gradients without reading.
#include <torch/library.h>

#include "cpu/softmax_rows.h"

namespace mpdistil::cpu {
namespace {

constexpr int kStatsPerRow = 5;  // max_a, log_sum_a, max_b, log_sum_b, mean_diff = E_P[a - b]

// What the forward+gradient keeps of a row's forward (in a per-thread buffer) so that its gradient sweep computes
// no exponential: e_i = exp((x_i - s_c)/T) of both rows, and per chunk c the running max s_c it used (-inf: every
// entry so far was -inf, so the chunk's e_i are 0).  Then P_i = e_i * exp((s_c - max a)/T - log_sum_a), same for Q.
template <typename acc_t>
struct RowExps {
  acc_t *exp_a, *exp_b;
  double *shift_a, *shift_b;

  // This thread's buffers (thread_scratch) for rows of `vocab` entries.
  static RowExps for_row(int64_t vocab) {
    const int64_t chunks = (vocab + kChunk - 1) / kChunk;
    acc_t* exps = thread_scratch<acc_t>(2 * vocab);
    double* shifts = thread_scratch<double, 1>(2 * chunks);
    return {exps, exps + vocab, shifts, shifts + chunks};
  }
};

// The forward of one row (module comment); keeps its exps in `exps` when not null.
template <typename scalar_t>
void forward_row(const scalar_t* a_row, const scalar_t* b_row, int64_t vocab, acc_type_t<scalar_t> inv_t,
                 acc_type_t<scalar_t>* kl, acc_type_t<scalar_t>* stats,
                 RowExps<acc_type_t<scalar_t>>* exps = nullptr) {
  using acc_t = acc_type_t<scalar_t>;
  acc_t a_buffer[kChunk], b_buffer[kChunk];
  RunningSoftmax p, q;
  double cross = 0.0;  // sum_i exp((a_i - max a)/T) * (a_i - b_i)
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    acc_t max_a, max_b;
    const acc_t* a = load_chunk_max(a_row + start, n, a_buffer, max_a);
    const acc_t* b = load_chunk_max(b_row + start, n, b_buffer, max_b);
    cross *= p.raise_max(max_a, inv_t);
    q.raise_max(max_b, inv_t);
    const Vec<acc_t> shift_a(static_cast<acc_t>(p.shift())), shift_b(static_cast<acc_t>(q.shift()));
    const Vec<acc_t> scale_log2(inv_t * kLog2e), zero(0);
    Vec<acc_t> sum_a(0), sum_b(0), cross_ab(0);
    if (exps) {
      exps->shift_a[start / kChunk] = p.max;
      exps->shift_b[start / kChunk] = q.max;
    }
    for_each_vector(a, b, n, [&](Vec<acc_t> va, Vec<acc_t> vb, int64_t offset, int64_t count) {
      const Vec<acc_t> ea = vec_exp2((va - shift_a) * scale_log2);  // exp((a - max a) / T)
      const Vec<acc_t> eb = vec_exp2((vb - shift_b) * scale_log2);
      sum_a += ea;
      sum_b += eb;
      // P_i = 0 contributes 0 (also when a_i - b_i is infinite or NaN from -inf - -inf).
      cross_ab += Vec<acc_t>::blendv(ea * (va - vb), zero, ea == zero);
      if (exps) {
        ea.store(exps->exp_a + start + offset, count);
        eb.store(exps->exp_b + start + offset, count);
      }
    });
    p.sum += lane_sum(sum_a);
    q.sum += lane_sum(sum_b);
    cross += lane_sum(cross_ab);
  }
  const double log_sum_a = std::log(p.sum), log_sum_b = std::log(q.sum);
  double mean_diff = 0.0;
  if (p.sum == 0.0) {
    *kl = 0;  // no distribution P in this row
  } else if (q.sum == 0.0) {
    *kl = std::numeric_limits<acc_t>::infinity();  // P has mass where Q has none
  } else {
    // The max gap rounded like the per-element differences a_i - b_i, so that identical rows give exactly 0.
    const double max_gap = static_cast<acc_t>(p.max - q.max);
    mean_diff = cross / p.sum;
    *kl = static_cast<acc_t>((mean_diff - max_gap) * inv_t - log_sum_a + log_sum_b);
  }
  stats[0] = static_cast<acc_t>(p.max);
  stats[1] = static_cast<acc_t>(log_sum_a);
  stats[2] = static_cast<acc_t>(q.max);
  stats[3] = static_cast<acc_t>(log_sum_b);
  stats[4] = static_cast<acc_t>(mean_diff);
}

// The gradients of one row (module comment); P and Q from the forward's kept exps when `exps` is not null, else
// recomputed from the statistics.
template <typename scalar_t>
void backward_row(const scalar_t* a_row, const scalar_t* b_row, int64_t vocab, acc_type_t<scalar_t> inv_t,
                  acc_type_t<scalar_t> grad_row, const acc_type_t<scalar_t>* stats,
                  scalar_t* grad_a_row, scalar_t* grad_b_row, const RowExps<acc_type_t<scalar_t>>* exps = nullptr) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr bool kConvertOut = !std::is_same_v<scalar_t, acc_t>;
  // masked row, or no distribution P (every a is -inf): zero gradients; a NaN row computes on into NaN gradients
  if (grad_row == 0 || stats[0] == -std::numeric_limits<acc_t>::infinity()) {
    fill_gradients(grad_a_row, grad_b_row, vocab, scalar_t(0));
    return;
  }
  // no distribution Q (every b is -inf) under P's mass: the KL is +inf and has no gradient (NaN, as torch's)
  if (stats[3] == -std::numeric_limits<acc_t>::infinity()) {
    fill_gradients(grad_a_row, grad_b_row, vocab, std::numeric_limits<scalar_t>::quiet_NaN());
    return;
  }
  acc_t a_buffer[kChunk], b_buffer[kChunk], grad_a_buffer[kChunk], grad_b_buffer[kChunk];
  // P = exp((a - max a)/T - log_sum_a) = exp2((a - max a) * log2(e)/T - log_sum_a * log2(e)); same for Q.
  const Vec<acc_t> max_a(stats[0]), log2_sum_a(stats[1] * kLog2e), max_b(stats[2]), log2_sum_b(stats[3] * kLog2e);
  const Vec<acc_t> scale_log2(inv_t * kLog2e);
  const Vec<acc_t> mean_diff(stats[4]);
  const Vec<acc_t> scale(inv_t), coefficient(grad_row * inv_t), zero(0);
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const acc_t* a = load_chunk(a_row + start, n, a_buffer);
    const acc_t* b = load_chunk(b_row + start, n, b_buffer);
    acc_t* grad_a = nullptr;
    acc_t* grad_b = nullptr;
    if constexpr (kConvertOut) {
      grad_a = grad_a_row ? grad_a_buffer : nullptr;
      grad_b = grad_b_row ? grad_b_buffer : nullptr;
    } else {
      grad_a = grad_a_row ? grad_a_row + start : nullptr;
      grad_b = grad_b_row ? grad_b_row + start : nullptr;
    }
    // Gradients go straight to memory, or to an L1 buffer that is converted to bf16/fp16 below.
    const auto store = [](const Vec<acc_t>& v, acc_t* dst, int64_t count) {
      if constexpr (kConvertOut) {
        v.store(dst, count);
      } else {
        store_streaming(v, dst, count);
      }
    };
    // P = e * exp((s_c - max a)/T - log_sum_a) from the kept exps (0 for a chunk whose entries were all -inf).
    const auto chunk_factor = [&](const double* shifts, int stat) {
      const double shift = shifts[start / kChunk];
      return Vec<acc_t>(shift != -std::numeric_limits<double>::infinity()
                            ? static_cast<acc_t>(std::exp((shift - stats[stat]) * inv_t - stats[stat + 1]))
                            : acc_t(0));
    };
    const Vec<acc_t> factor_a = exps ? chunk_factor(exps->shift_a, 0) : zero;
    const Vec<acc_t> factor_b = exps ? chunk_factor(exps->shift_b, 2) : zero;
    for_each_vector(a, b, n, [&](Vec<acc_t> va, Vec<acc_t> vb, int64_t offset, int64_t count) {
      const Vec<acc_t> prob_p = exps ? Vec<acc_t>::loadu(exps->exp_a + start + offset, count) * factor_a
                                     : vec_exp2(at::vec::fmsub(va - max_a, scale_log2, log2_sum_a));
      if (grad_a) {
        const Vec<acc_t> da = coefficient * prob_p * ((va - vb - mean_diff) * scale);
        store(Vec<acc_t>::blendv(da, zero, prob_p == zero), grad_a + offset, count);
      }
      if (grad_b) {
        const Vec<acc_t> prob_q = exps ? Vec<acc_t>::loadu(exps->exp_b + start + offset, count) * factor_b
                                       : vec_exp2(at::vec::fmsub(vb - max_b, scale_log2, log2_sum_b));
        store(coefficient * (prob_q - prob_p), grad_b + offset, count);
      }
    });
    if constexpr (kConvertOut) {
      if (grad_a_row) store_chunk(grad_a, n, grad_a_row + start);
      if (grad_b_row) store_chunk(grad_b, n, grad_b_row + start);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> kd_kl_div_fwd_cpu(const at::Tensor& p_logits, const at::Tensor& q_logits,
                                                     double temperature) {
  return rowwise_forward("kd_kl_div", p_logits, q_logits, kStatsPerRow,
                         [&](const auto* a_row, const auto* b_row, int64_t vocab, auto* kl, auto* stats) {
                           using scalar_t = row_scalar_t<decltype(a_row)>;
                           forward_row<scalar_t>(a_row, b_row, vocab,
                                                 static_cast<acc_type_t<scalar_t>>(1.0 / temperature), kl, stats);
                         });
}

std::tuple<at::Tensor, at::Tensor> kd_kl_div_bwd_cpu(const at::Tensor& grad_kl, const at::Tensor& p_logits,
                                                     const at::Tensor& q_logits, const at::Tensor& stats,
                                                     double temperature, bool need_grad_p, bool need_grad_q) {
  static OutputCache grad_p_cache, grad_q_cache;
  return rowwise_backward("kd_kl_div", grad_kl, p_logits, q_logits, stats, kStatsPerRow, need_grad_p, need_grad_q,
                          grad_p_cache, grad_q_cache,
                          [&](const auto* a_row, const auto* b_row, int64_t vocab, auto g, const auto* row_stats,
                              auto* grad_a_row, auto* grad_b_row) {
                            using scalar_t = row_scalar_t<decltype(a_row)>;
                            backward_row<scalar_t>(a_row, b_row, vocab, static_cast<decltype(g)>(1.0 / temperature),
                                                   g, row_stats, grad_a_row, grad_b_row);
                          });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_kl_div_fwd_grad_cpu(
    const at::Tensor& p_logits, const at::Tensor& q_logits, double temperature,
    const c10::optional<at::Tensor>& row_weight, double weight, bool need_grad_p, bool need_grad_q) {
  static OutputCache grad_p_cache, grad_q_cache;
  return rowwise_forward_grad(
      "kd_kl_div", p_logits, q_logits, kStatsPerRow, row_weight, weight, need_grad_p, need_grad_q, grad_p_cache,
      grad_q_cache,
      [&](const auto* a_row, const auto* b_row, int64_t vocab, auto g, auto* kl, auto* stats, auto* grad_a_row,
          auto* grad_b_row) {  // the forward, then the gradients from its kept exps while the row is in cache
        using scalar_t = row_scalar_t<decltype(a_row)>;
        const auto inv_t = static_cast<decltype(g)>(1.0 / temperature);
        auto exps = RowExps<decltype(g)>::for_row(vocab);
        forward_row<scalar_t>(a_row, b_row, vocab, inv_t, kl, stats, &exps);
        backward_row<scalar_t>(a_row, b_row, vocab, inv_t, g, stats, grad_a_row, grad_b_row, &exps);
      });
}

}  // namespace
}  // namespace mpdistil::cpu

TORCH_LIBRARY_IMPL(mpdistil_C, CPU, m) {
  m.impl("kd_kl_div_fwd", &mpdistil::cpu::kd_kl_div_fwd_cpu);
  m.impl("kd_kl_div_bwd", &mpdistil::cpu::kd_kl_div_bwd_cpu);
  m.impl("kd_kl_div_fwd_grad", &mpdistil::cpu::kd_kl_div_fwd_grad_cpu);
}
