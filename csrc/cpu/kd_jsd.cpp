// Fused generalized Jensen-Shannon distillation loss per row, CPU kernels (Agarwal et al., ICLR 2024, "On-Policy
// Distillation of Language Models: Learning from Self-Generated Mistakes", the GKD objective).
//
// For each row of teacher logits a and student logits b, with P = softmax(a / T), Q = softmax(b / T) and the
// mixture M = beta P + (1 - beta) Q (0 < beta < 1):
//   jsd = beta KL(P || M) + (1 - beta) KL(Q || M) = L_P + L_Q,
//   L_P = -beta sum_i P_i lP_i,  L_Q = -(1 - beta) sum_i Q_i lQ_i,  with lP = log(M / P), lQ = log(M / Q).
// Both logs come from the log-ratio d = log P - log Q = (a - b)/T - k (k a per-row constant) without forming M:
//   s = |d|, t = exp(-s), base = log(beta + (1 - beta) t) if d >= 0 else log((1 - beta) + beta t),
//   lP = base + (d < 0 ? s : 0),  lQ = base + (d >= 0 ? s : 0)
// (finite whenever the matching probability is nonzero, also for a or b = -inf: no 0 * inf).
//   forward : pass 1 = online max / sum of both rows; pass 2 = L_P and L_Q.
//             stats = (max a, log_sum_a = log sum exp((a - max a)/T), max b, log_sum_b, L_P, L_Q).
//   backward: since dL/dP_i = -beta lP_i and dL/dQ_i = -(1 - beta) lQ_i, through the two softmaxes
//             dL/da_i = g/T * P_i (-beta lP_i - L_P),   dL/db_i = g/T * Q_i (-(1 - beta) lQ_i - L_Q),
//             in one read of each input, recomputing P, Q and the logs from the saved stats.
//   forward+gradient (a reduced loss: g known in forward): pass 2 also keeps, in a per-thread row buffer,
//             g/T P_i (-beta lP_i) and P_i (the same for b); once L_P, L_Q are summed, a last sweep over that buffer
//             subtracts g/T L_P P_i and writes the gradients: the exps and logs are computed once, not twice.
// Conventions: entries with P_i = 0 (Q_i = 0) contribute nothing to L_P (L_Q) and get a zero gradient in a (b); a
// row whose teacher or student logits are all -inf has no pair of distributions and gives 0 and zero gradients; a
// NaN logit makes its row's loss and gradients NaN (== 0 tests throughout, which a NaN does not pass).
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "cpu/softmax_rows.h"
#include "kd_jsd_checks.h"

namespace mpdistil::cpu {
namespace {

using mpdistil::check_jsd_beta;

constexpr int kStatsPerRow = 6;  // max_a, log_sum_a, max_b, log_sum_b, L_P, L_Q

// The per-row quantities both passes need, as vectors: P, Q and the log-ratios lP = log(M / P), lQ = log(M / Q).
template <typename acc_t>
struct MixtureTerms {
  Vec<acc_t> prob_p, prob_q, log_m_over_p, log_m_over_q;
};

// Row constants of MixtureTerms: the softmax statistics of a and b, 1/T and beta.
template <typename acc_t>
struct MixtureRow {
  Vec<acc_t> max_a, log2_sum_a, max_b, log2_sum_b, scale_log2, inv_t, gap_offset, beta, one_minus_beta;

  MixtureRow(double max_a_, double log_sum_a, double max_b_, double log_sum_b, acc_t inv_t_, double beta_)
      : max_a(static_cast<acc_t>(max_a_)), log2_sum_a(static_cast<acc_t>(log_sum_a * kLog2e)),
        max_b(static_cast<acc_t>(max_b_)), log2_sum_b(static_cast<acc_t>(log_sum_b * kLog2e)),
        scale_log2(static_cast<acc_t>(inv_t_ * kLog2e)), inv_t(inv_t_),
        // d = log P - log Q = (a - b)/T - [(max a - max b)/T + log_sum_a - log_sum_b]
        gap_offset(static_cast<acc_t>((max_a_ - max_b_) * inv_t_ + log_sum_a - log_sum_b)),
        beta(static_cast<acc_t>(beta_)), one_minus_beta(static_cast<acc_t>(1.0 - beta_)) {}

  MixtureTerms<acc_t> terms(const Vec<acc_t>& a, const Vec<acc_t>& b) const {
    const Vec<acc_t> one(1), zero(0);
    const Vec<acc_t> prob_p = vec_exp2(at::vec::fmsub(a - max_a, scale_log2, log2_sum_a));
    const Vec<acc_t> prob_q = vec_exp2(at::vec::fmsub(b - max_b, scale_log2, log2_sum_b));
    const Vec<acc_t> d = (a - b) * inv_t - gap_offset;
    const Vec<acc_t> s = d.abs();
    const Vec<acc_t> t = vec_exp2(Vec<acc_t>(-kLog2e) * s);
    const Vec<acc_t> p_larger = d >= zero;  // all-ones lanes where d >= 0 (false for NaN: both entries -inf)
    const Vec<acc_t> weight_t = Vec<acc_t>::blendv(beta, one_minus_beta, p_larger);
    const Vec<acc_t> weight_one = Vec<acc_t>::blendv(one_minus_beta, beta, p_larger);
    const Vec<acc_t> base = vec_log(at::vec::fmadd(weight_t, t, weight_one));
    return {prob_p, prob_q, base + Vec<acc_t>::blendv(s, zero, p_larger),
            base + Vec<acc_t>::blendv(zero, s, p_larger)};
  }
};

// Whether the row has both distributions: a sum is 0 only when all its logits are -inf (a NaN sum counts).
inline bool has_pair(const RunningSoftmax& p, const RunningSoftmax& q) { return p.sum != 0.0 && q.sum != 0.0; }

// Pass 1: the online softmax statistics (max, sum exp((x - max)/T)) of both rows.
template <typename scalar_t>
std::pair<RunningSoftmax, RunningSoftmax> softmax_statistics(const scalar_t* a_row, const scalar_t* b_row,
                                                             int64_t vocab, acc_type_t<scalar_t> inv_t) {
  using acc_t = acc_type_t<scalar_t>;
  acc_t a_buffer[kChunk], b_buffer[kChunk];
  RunningSoftmax p, q;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    acc_t max_a, max_b;
    const acc_t* a = load_chunk_max(a_row + start, n, a_buffer, max_a);
    const acc_t* b = load_chunk_max(b_row + start, n, b_buffer, max_b);
    p.raise_max(max_a, inv_t);
    q.raise_max(max_b, inv_t);
    const Vec<acc_t> shift_a(static_cast<acc_t>(p.shift())), shift_b(static_cast<acc_t>(q.shift()));
    const Vec<acc_t> scale_log2(inv_t * kLog2e);
    Vec<acc_t> sum_a(0), sum_b(0);
    for_each_vector(a, b, n, [&](Vec<acc_t> va, Vec<acc_t> vb, int64_t, int64_t) {
      sum_a += vec_exp2((va - shift_a) * scale_log2);
      sum_b += vec_exp2((vb - shift_b) * scale_log2);
    });
    p.sum += lane_sum(sum_a);
    q.sum += lane_sum(sum_b);
  }
  return {p, q};
}

// Pass 2 of a row with a pair of distributions: calls chunk_terms(start, n, terms_of_vector) per chunk, where
// terms_of_vector(lane_op) applies lane_op(MixtureTerms, offset, count) to the chunk's vectors, and returns
// (L_P, L_Q) = (-beta sum P lP, -(1 - beta) sum Q lQ).
template <typename scalar_t, typename ChunkTerms>
std::pair<double, double> mixture_losses(const scalar_t* a_row, const scalar_t* b_row, int64_t vocab,
                                         const MixtureRow<acc_type_t<scalar_t>>& row, double beta,
                                         const ChunkTerms& chunk_terms) {
  using acc_t = acc_type_t<scalar_t>;
  acc_t a_buffer[kChunk], b_buffer[kChunk];
  const Vec<acc_t> zero(0);
  double loss_p = 0.0, loss_q = 0.0;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const acc_t* a = load_chunk(a_row + start, n, a_buffer);
    const acc_t* b = load_chunk(b_row + start, n, b_buffer);
    Vec<acc_t> sum_p(0), sum_q(0);
    chunk_terms(start, n, [&](const auto& lane_op) {
      for_each_vector(a, b, n, [&](Vec<acc_t> va, Vec<acc_t> vb, int64_t offset, int64_t count) {
        const MixtureTerms<acc_t> m = row.terms(va, vb);
        sum_p += Vec<acc_t>::blendv(m.prob_p * m.log_m_over_p, zero, m.prob_p == zero);
        sum_q += Vec<acc_t>::blendv(m.prob_q * m.log_m_over_q, zero, m.prob_q == zero);
        lane_op(m, offset, count);
      });
    });
    loss_p -= lane_sum(sum_p);
    loss_q -= lane_sum(sum_q);
  }
  return {loss_p * beta, loss_q * (1.0 - beta)};
}

// Pass 2 with no other output.
constexpr auto kLossesOnly = [](int64_t, int64_t, const auto& sweep) { sweep([](const auto&, int64_t, int64_t) {}); };

// Pass 2 (when the row has a pair of distributions; else L_P = L_Q = 0) after pass 1's statistics p, q: stores the
// row's JSD and statistics (module comment) and returns (L_P, L_Q); chunk_terms as for mixture_losses.
template <typename scalar_t, typename ChunkTerms>
std::pair<double, double> losses_and_statistics(const scalar_t* a_row, const scalar_t* b_row, int64_t vocab,
                                                acc_type_t<scalar_t> inv_t, double beta, const RunningSoftmax& p,
                                                const RunningSoftmax& q, acc_type_t<scalar_t>* jsd,
                                                acc_type_t<scalar_t>* stats, const ChunkTerms& chunk_terms) {
  using acc_t = acc_type_t<scalar_t>;
  const bool pair = has_pair(p, q);  // otherwise max a = -inf tells backward to write zeros
  const double log_sum_a = std::log(p.sum), log_sum_b = std::log(q.sum);
  double loss_p = 0.0, loss_q = 0.0;
  if (pair) {
    const MixtureRow<acc_t> row(p.max, log_sum_a, q.max, log_sum_b, inv_t, beta);
    std::tie(loss_p, loss_q) = mixture_losses(a_row, b_row, vocab, row, beta, chunk_terms);
  }
  *jsd = static_cast<acc_t>(loss_p + loss_q);
  stats[0] = pair ? static_cast<acc_t>(p.max) : kNegInf<acc_t>;
  stats[1] = static_cast<acc_t>(log_sum_a);
  stats[2] = static_cast<acc_t>(q.max);
  stats[3] = static_cast<acc_t>(log_sum_b);
  stats[4] = static_cast<acc_t>(loss_p);
  stats[5] = static_cast<acc_t>(loss_q);
  return {loss_p, loss_q};
}

template <typename scalar_t>
void forward_row(const scalar_t* a_row, const scalar_t* b_row, int64_t vocab, acc_type_t<scalar_t> inv_t,
                 double beta, acc_type_t<scalar_t>* jsd, acc_type_t<scalar_t>* stats) {
  const auto [p, q] = softmax_statistics(a_row, b_row, vocab, inv_t);
  losses_and_statistics(a_row, b_row, vocab, inv_t, beta, p, q, jsd, stats, kLossesOnly);
}

// grad[i] = partial[i] - shift * prob[i] over a row, stored as scalar_t (fp32: streamed past the cache).
template <typename scalar_t, typename acc_t>
void finish_gradient(acc_t* partial, const acc_t* prob, acc_t shift, int64_t vocab, scalar_t* grad_row) {
  constexpr int64_t width = Vec<acc_t>::size();
  const Vec<acc_t> shift_vec(shift);
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t end = std::min(start + kChunk, vocab);
    for (int64_t i = start; i < end; i += width) {
      const int64_t count = std::min(width, end - i);
      const Vec<acc_t> value = Vec<acc_t>::loadu(partial + i, count) - shift_vec * Vec<acc_t>::loadu(prob + i, count);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        store_streaming(value, grad_row + i, count);
      } else {
        value.store(partial + i, count);
      }
    }
    if constexpr (!std::is_same_v<scalar_t, acc_t>) store_chunk(partial + start, end - start, grad_row + start);
  }
}

// Forward and gradients of one row of weight g (module comment): pass 1; pass 2 keeps g/T P (-beta lP) and P (and
// g/T Q (-(1 - beta) lQ) and Q) in this thread's row buffer; then the gradients from it.  A masked row (g = 0) or
// one without a pair of distributions gets its loss and zero gradients.
template <typename scalar_t>
void forward_grad_row(const scalar_t* a_row, const scalar_t* b_row, int64_t vocab, acc_type_t<scalar_t> inv_t,
                      double beta, acc_type_t<scalar_t> grad_row, acc_type_t<scalar_t>* jsd,
                      acc_type_t<scalar_t>* stats, scalar_t* grad_a_row, scalar_t* grad_b_row) {
  using acc_t = acc_type_t<scalar_t>;
  const auto [p, q] = softmax_statistics(a_row, b_row, vocab, inv_t);
  const bool nan_row = std::isnan(p.sum) || std::isnan(q.sum);
  if (grad_row == 0 || !has_pair(p, q) || nan_row) {
    losses_and_statistics(a_row, b_row, vocab, inv_t, beta, p, q, jsd, stats, kLossesOnly);
    fill_gradients(grad_a_row, grad_b_row, vocab,
                   grad_row != 0 && nan_row && has_pair(p, q) ? std::numeric_limits<scalar_t>::quiet_NaN()
                                                              : scalar_t(0));
    return;
  }
  acc_t* const partial_a = thread_scratch<acc_t>(4 * vocab);
  acc_t* const prob_a = partial_a + vocab;
  acc_t* const partial_b = prob_a + vocab;
  acc_t* const prob_b = partial_b + vocab;
  const Vec<acc_t> zero(0);
  const Vec<acc_t> weight_a(static_cast<acc_t>(-beta) * grad_row * inv_t);
  const Vec<acc_t> weight_b(static_cast<acc_t>(beta - 1.0) * grad_row * inv_t);
  const auto [loss_p, loss_q] = losses_and_statistics(
      a_row, b_row, vocab, inv_t, beta, p, q, jsd, stats, [&](int64_t start, int64_t, const auto& sweep) {
        sweep([&](const MixtureTerms<acc_t>& m, int64_t offset, int64_t count) {
          if (grad_a_row) {
            Vec<acc_t>::blendv(weight_a * m.prob_p * m.log_m_over_p, zero, m.prob_p == zero)
                .store(partial_a + start + offset, count);
            m.prob_p.store(prob_a + start + offset, count);
          }
          if (grad_b_row) {
            Vec<acc_t>::blendv(weight_b * m.prob_q * m.log_m_over_q, zero, m.prob_q == zero)
                .store(partial_b + start + offset, count);
            m.prob_q.store(prob_b + start + offset, count);
          }
        });
      });
  const acc_t c = grad_row * inv_t;
  if (grad_a_row) finish_gradient(partial_a, prob_a, static_cast<acc_t>(c * loss_p), vocab, grad_a_row);
  if (grad_b_row) finish_gradient(partial_b, prob_b, static_cast<acc_t>(c * loss_q), vocab, grad_b_row);
}

template <typename scalar_t>
void backward_row(const scalar_t* a_row, const scalar_t* b_row, int64_t vocab, acc_type_t<scalar_t> inv_t,
                  double beta, acc_type_t<scalar_t> grad_row, const acc_type_t<scalar_t>* stats,
                  scalar_t* grad_a_row, scalar_t* grad_b_row) {
  using acc_t = acc_type_t<scalar_t>;
  if (grad_row == 0 || stats[0] == kNegInf<acc_t>) {  // masked row, or no pair of distributions: zero gradients
    fill_gradients(grad_a_row, grad_b_row, vocab, scalar_t(0));
    return;
  }
  // a NaN logit (its sum is NaN): NaN gradients (vec_exp2 clamps its argument, so a NaN log-ratio would not reach
  // every entry by itself)
  if (std::isnan(stats[1]) || std::isnan(stats[3])) {
    fill_gradients(grad_a_row, grad_b_row, vocab, std::numeric_limits<scalar_t>::quiet_NaN());
    return;
  }
  acc_t a_buffer[kChunk], b_buffer[kChunk], grad_a_buffer[kChunk], grad_b_buffer[kChunk];
  const MixtureRow<acc_t> row(stats[0], stats[1], stats[2], stats[3], inv_t, beta);
  const Vec<acc_t> coefficient(grad_row * inv_t), zero(0), loss_p(stats[4]), loss_q(stats[5]);
  const Vec<acc_t> neg_beta(static_cast<acc_t>(-beta)), neg_one_minus_beta(static_cast<acc_t>(beta - 1.0));
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const acc_t* a = load_chunk(a_row + start, n, a_buffer);
    const acc_t* b = load_chunk(b_row + start, n, b_buffer);
    for_each_vector(a, b, n, [&](Vec<acc_t> va, Vec<acc_t> vb, int64_t offset, int64_t count) {
      const MixtureTerms<acc_t> m = row.terms(va, vb);
      if (grad_a_row) {
        const Vec<acc_t> da = coefficient * m.prob_p * at::vec::fmsub(neg_beta, m.log_m_over_p, loss_p);
        Vec<acc_t>::blendv(da, zero, m.prob_p == zero).store(grad_a_buffer + offset, count);
      }
      if (grad_b_row) {
        const Vec<acc_t> db = coefficient * m.prob_q * at::vec::fmsub(neg_one_minus_beta, m.log_m_over_q, loss_q);
        Vec<acc_t>::blendv(db, zero, m.prob_q == zero).store(grad_b_buffer + offset, count);
      }
    });
    if (grad_a_row) store_chunk(grad_a_buffer, n, grad_a_row + start);
    if (grad_b_row) store_chunk(grad_b_buffer, n, grad_b_row + start);
  }
}

std::tuple<at::Tensor, at::Tensor> kd_jsd_fwd_cpu(const at::Tensor& teacher_logits,
                                                  const at::Tensor& student_logits, double temperature,
                                                  double beta) {
  check_jsd_beta(beta);
  return rowwise_forward("kd_jsd", teacher_logits, student_logits, kStatsPerRow,
                         [&](const auto* a_row, const auto* b_row, int64_t vocab, auto* jsd, auto* stats) {
                           using scalar_t = row_scalar_t<decltype(a_row)>;
                           forward_row<scalar_t>(a_row, b_row, vocab,
                                                 static_cast<acc_type_t<scalar_t>>(1.0 / temperature), beta, jsd,
                                                 stats);
                         });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_jsd_fwd_grad_cpu(
    const at::Tensor& teacher_logits, const at::Tensor& student_logits, double temperature, double beta,
    const c10::optional<at::Tensor>& row_weight, double weight, bool need_grad_teacher, bool need_grad_student) {
  check_jsd_beta(beta);
  static OutputCache grad_teacher_cache, grad_student_cache;
  return rowwise_forward_grad(
      "kd_jsd", teacher_logits, student_logits, kStatsPerRow, row_weight, weight, need_grad_teacher,
      need_grad_student, grad_teacher_cache, grad_student_cache,
      [&](const auto* a_row, const auto* b_row, int64_t vocab, auto g, auto* jsd, auto* stats, auto* grad_a_row,
          auto* grad_b_row) {
        using scalar_t = row_scalar_t<decltype(a_row)>;
        forward_grad_row<scalar_t>(a_row, b_row, vocab, static_cast<decltype(g)>(1.0 / temperature), beta, g, jsd,
                                   stats, grad_a_row, grad_b_row);
      });
}

std::tuple<at::Tensor, at::Tensor> kd_jsd_bwd_cpu(const at::Tensor& grad_jsd, const at::Tensor& teacher_logits,
                                                  const at::Tensor& student_logits, const at::Tensor& stats,
                                                  double temperature, double beta, bool need_grad_teacher,
                                                  bool need_grad_student) {
  check_jsd_beta(beta);
  static OutputCache grad_teacher_cache, grad_student_cache;
  return rowwise_backward("kd_jsd", grad_jsd, teacher_logits, student_logits, stats, kStatsPerRow,
                          need_grad_teacher, need_grad_student, grad_teacher_cache, grad_student_cache,
                          [&](const auto* a_row, const auto* b_row, int64_t vocab, auto g, const auto* row_stats,
                              auto* grad_a_row, auto* grad_b_row) {
                            using scalar_t = row_scalar_t<decltype(a_row)>;
                            backward_row<scalar_t>(a_row, b_row, vocab, static_cast<decltype(g)>(1.0 / temperature),
                                                   beta, g, row_stats, grad_a_row, grad_b_row);
                          });
}

}  // namespace
}  // namespace mpdistil::cpu

TORCH_LIBRARY_IMPL(mpdistil_C, CPU, m) {
  m.impl("kd_jsd_fwd", &mpdistil::cpu::kd_jsd_fwd_cpu);
  m.impl("kd_jsd_bwd", &mpdistil::cpu::kd_jsd_bwd_cpu);
  m.impl("kd_jsd_fwd_grad", &mpdistil::cpu::kd_jsd_fwd_grad_cpu);
}
