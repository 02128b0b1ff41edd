"""Triton kernels of the fused generalized JSD (see ``mpdistil_fast/ops/kd_jsd.py`` and ``csrc/cpu/kd_jsd.cpp``
for the formulas).

One program per row.  Forward: an online-softmax sweep over blocks of both rows (max, then one rescale of the
running sums), then a second sweep for L_P = -beta sum P lP and L_Q = -(1 - beta) sum Q lQ, lP = log(M / P),
lQ = log(M / Q), M = beta P + (1 - beta) Q, both logs taken from d = log P - log Q without forming M.  Backward: one
more read, dJSD/da = g/T * P (-beta lP - L_P), dJSD/db = g/T * Q (-(1 - beta) lQ - L_Q).  ``kd_jsd_fwd_grad`` does
both in one launch when the row weights g are known in forward (a reduced loss).  a = teacher, b = student logits;
fp32 accumulation (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpdistil_fast.kernels.device import on_input_device
from mpdistil_fast.kernels.kd_kl_div import (_block, _gradients, _online_softmax_block, _row_outputs, _scalar,
                                             _this_row, _unit_stride_rows, launch_forward_grad)

STATS_PER_ROW = 6


@triton.jit
def _mixture_logs(a, b, max_a, log_sum_a, max_b, log_sum_b, inv_t, beta):
    """(P, Q, log(M / P), log(M / Q)) of a block of teacher logits a and student logits b."""
    log_p = (a - max_a) * inv_t - log_sum_a
    log_q = (b - max_b) * inv_t - log_sum_b
    d = (a - b) * inv_t - ((max_a - max_b) * inv_t + log_sum_a - log_sum_b)  # log P - log Q, from one rounding of a - b
    s = tl.abs(d)
    t = tl.exp(-s)
    p_larger = d >= 0  # false where d is NaN (both entries -inf): those lanes are dropped by the callers
    base = tl.log(tl.where(p_larger, beta + (1.0 - beta) * t, (1.0 - beta) + beta * t))
    log_m_over_p = base + tl.where(p_larger, 0.0, s)
    log_m_over_q = base + tl.where(p_larger, s, 0.0)
    return tl.exp(log_p), tl.exp(log_q), log_m_over_p, log_m_over_q


@triton.jit
def _jsd_row_statistics(a_row, b_row, vocab, inv_t, beta, BLOCK: tl.constexpr, IS_FP64: tl.constexpr):
    """(L_P, L_Q, max a, log_sum_a, max b, log_sum_b) of one row: sweep 1 (softmax statistics of both rows), sweep 2
    (the two KL terms against the mixture).  A row without both distributions gives L_P = L_Q = 0 and max a = -inf,
    which tells the gradients to be zeros."""
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    neg_inf = float("-inf")
    max_a = tl.full([], neg_inf, acc_dtype)
    max_b = tl.full([], neg_inf, acc_dtype)
    sum_a = tl.full([], 0.0, acc_dtype)
    sum_b = tl.full([], 0.0, acc_dtype)
    for start in range(0, vocab, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < vocab
        a = tl.load(a_row + offsets, mask=inside, other=neg_inf).to(acc_dtype)
        b = tl.load(b_row + offsets, mask=inside, other=neg_inf).to(acc_dtype)
        max_a, max_b, sum_a, sum_b, _, _ = _online_softmax_block(a, b, max_a, max_b, sum_a, sum_b, inv_t)
    log_sum_a = tl.log(sum_a)
    log_sum_b = tl.log(sum_b)
    has_pair = (sum_a != 0) & (sum_b != 0)  # a sum is 0 only for all -inf logits (a NaN sum counts: NaN loss)
    loss_p = tl.full([], 0.0, acc_dtype)
    loss_q = tl.full([], 0.0, acc_dtype)
    for start in range(0, vocab, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < vocab
        a = tl.load(a_row + offsets, mask=inside, other=neg_inf).to(acc_dtype)
        b = tl.load(b_row + offsets, mask=inside, other=neg_inf).to(acc_dtype)
        prob_p, prob_q, log_m_over_p, log_m_over_q = _mixture_logs(a, b, max_a, log_sum_a, max_b, log_sum_b,
                                                                   inv_t, beta)
        loss_p -= tl.sum(tl.where(prob_p == 0, 0.0, prob_p * log_m_over_p), axis=0)
        loss_q -= tl.sum(tl.where(prob_q == 0, 0.0, prob_q * log_m_over_q), axis=0)
    loss_p = tl.where(has_pair, loss_p * beta, 0.0)
    loss_q = tl.where(has_pair, loss_q * (1.0 - beta), 0.0)
    return loss_p, loss_q, tl.where(has_pair, max_a, neg_inf), log_sum_a, max_b, log_sum_b


@triton.jit
def _store_jsd_row(jsd_ptr, stats_ptr, row, loss_p, loss_q, max_a, log_sum_a, max_b, log_sum_b):
    tl.store(jsd_ptr + row, loss_p + loss_q)
    stats_row = stats_ptr + row * 6
    tl.store(stats_row + 0, max_a)
    tl.store(stats_row + 1, log_sum_a)
    tl.store(stats_row + 2, max_b)
    tl.store(stats_row + 3, log_sum_b)
    tl.store(stats_row + 4, loss_p)
    tl.store(stats_row + 5, loss_q)


@triton.jit
def _jsd_row_gradients(a_row, b_row, grad_a_row, grad_b_row, vocab, inv_t, beta, grad_row, max_a, log_sum_a, max_b,
                       log_sum_b, loss_p, loss_q, BLOCK: tl.constexpr, IS_FP64: tl.constexpr,
                       NEED_GRAD_A: tl.constexpr, NEED_GRAD_B: tl.constexpr):
    """Write grad_row * dJSD/da and grad_row * dJSD/db of one row (one more read of a and b); max_a = -inf marks a
    row without both distributions."""
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    # Masked rows (g = 0) and rows without a pair of distributions get exactly zero gradients.
    coefficient = tl.where(max_a == float("-inf"), 0.0, grad_row * inv_t)  # (a NaN max_a: NaN gradients)
    for start in range(0, vocab, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < vocab
        a = tl.load(a_row + offsets, mask=inside, other=0.0).to(acc_dtype)
        b = tl.load(b_row + offsets, mask=inside, other=0.0).to(acc_dtype)
        prob_p, prob_q, log_m_over_p, log_m_over_q = _mixture_logs(a, b, max_a, log_sum_a, max_b, log_sum_b,
                                                                   inv_t, beta)
        if NEED_GRAD_A:
            grad_a = coefficient * prob_p * (-beta * log_m_over_p - loss_p)
            grad_a = tl.where(coefficient != 0, tl.where(prob_p == 0, 0.0, grad_a), 0.0)
            tl.store(grad_a_row + offsets, grad_a.to(grad_a_row.dtype.element_ty), mask=inside)
        if NEED_GRAD_B:
            grad_b = coefficient * prob_q * (-(1.0 - beta) * log_m_over_q - loss_q)
            grad_b = tl.where(coefficient != 0, tl.where(prob_q == 0, 0.0, grad_b), 0.0)
            tl.store(grad_b_row + offsets, grad_b.to(grad_b_row.dtype.element_ty), mask=inside)


@triton.jit
def _kd_jsd_fwd_kernel(a_ptr, b_ptr, jsd_ptr, stats_ptr, vocab, stride_a, stride_b, temperature: tl.float64,
                       beta: tl.float64, BLOCK: tl.constexpr, IS_FP64: tl.constexpr):
    row, a_row, b_row, inv_t = _this_row(a_ptr, b_ptr, stride_a, stride_b, temperature, IS_FP64)
    beta = _scalar(beta, IS_FP64)
    loss_p, loss_q, max_a, log_sum_a, max_b, log_sum_b = _jsd_row_statistics(a_row, b_row, vocab, inv_t, beta,
                                                                             BLOCK, IS_FP64)
    _store_jsd_row(jsd_ptr, stats_ptr, row, loss_p, loss_q, max_a, log_sum_a, max_b, log_sum_b)


@triton.jit
def _kd_jsd_bwd_kernel(grad_jsd_ptr, a_ptr, b_ptr, stats_ptr, grad_a_ptr, grad_b_ptr, vocab, stride_a, stride_b,
                       temperature: tl.float64, beta: tl.float64, BLOCK: tl.constexpr, IS_FP64: tl.constexpr,
                       NEED_GRAD_A: tl.constexpr, NEED_GRAD_B: tl.constexpr):
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    row, a_row, b_row, inv_t = _this_row(a_ptr, b_ptr, stride_a, stride_b, temperature, IS_FP64)
    beta = _scalar(beta, IS_FP64)
    stats_row = stats_ptr + row * 6
    _jsd_row_gradients(a_row, b_row, grad_a_ptr + row * vocab, grad_b_ptr + row * vocab, vocab, inv_t, beta,
                       tl.load(grad_jsd_ptr + row).to(acc_dtype), tl.load(stats_row + 0).to(acc_dtype),
                       tl.load(stats_row + 1).to(acc_dtype), tl.load(stats_row + 2).to(acc_dtype),
                       tl.load(stats_row + 3).to(acc_dtype), tl.load(stats_row + 4).to(acc_dtype),
                       tl.load(stats_row + 5).to(acc_dtype), BLOCK, IS_FP64, NEED_GRAD_A, NEED_GRAD_B)


@triton.jit
def _kd_jsd_fwd_grad_kernel(a_ptr, b_ptr, jsd_ptr, stats_ptr, row_weight_ptr, weight: tl.float64, grad_a_ptr,
                            grad_b_ptr, vocab, stride_a, stride_b, temperature: tl.float64, beta: tl.float64,
                            BLOCK: tl.constexpr, IS_FP64: tl.constexpr,
                            HAS_ROW_WEIGHT: tl.constexpr, NEED_GRAD_A: tl.constexpr, NEED_GRAD_B: tl.constexpr):
    """Forward and gradients in one launch for the row weight ``weight * row_weight[row]``: the row's statistics,
    then at once its gradients (the row's later reads come from L2, just read)."""
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    row, a_row, b_row, inv_t = _this_row(a_ptr, b_ptr, stride_a, stride_b, temperature, IS_FP64)
    beta = _scalar(beta, IS_FP64)
    loss_p, loss_q, max_a, log_sum_a, max_b, log_sum_b = _jsd_row_statistics(a_row, b_row, vocab, inv_t, beta,
                                                                             BLOCK, IS_FP64)
    _store_jsd_row(jsd_ptr, stats_ptr, row, loss_p, loss_q, max_a, log_sum_a, max_b, log_sum_b)
    grad_row = _scalar(weight, IS_FP64)
    if HAS_ROW_WEIGHT:
        grad_row = grad_row * tl.load(row_weight_ptr + row).to(acc_dtype)
    _jsd_row_gradients(a_row, b_row, grad_a_ptr + row * vocab, grad_b_ptr + row * vocab, vocab, inv_t, beta,
                       grad_row, max_a, log_sum_a, max_b, log_sum_b, loss_p, loss_q, BLOCK, IS_FP64, NEED_GRAD_A,
                       NEED_GRAD_B)


@on_input_device
def kd_jsd_fwd(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
               beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row generalized JSD ``[N]`` and statistics ``[N, 6]`` of ``[N, V]`` logits."""
    a, b = _unit_stride_rows(teacher_logits), _unit_stride_rows(student_logits)
    rows, vocab = a.shape
    is_fp64, jsd, stats = _row_outputs(a, STATS_PER_ROW)
    if rows:
        _kd_jsd_fwd_kernel[(rows,)](a, b, jsd, stats, vocab, a.stride(0), b.stride(0), temperature, beta,
                                    BLOCK=_block(vocab), IS_FP64=is_fp64, num_warps=8)
    return jsd, stats


@on_input_device
def kd_jsd_bwd(grad_jsd: torch.Tensor, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
               stats: torch.Tensor, temperature: float, beta: float, need_grad_teacher: bool,
               need_grad_student: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum(grad_jsd * jsd) for the teacher and student logits (empty tensors when not needed)."""
    a, b = _unit_stride_rows(teacher_logits), _unit_stride_rows(student_logits)
    rows, vocab = a.shape
    grad_a, grad_b = _gradients(a, need_grad_teacher, need_grad_student)
    if rows and (need_grad_teacher or need_grad_student):
        _kd_jsd_bwd_kernel[(rows,)](grad_jsd.contiguous(), a, b, stats.contiguous(), grad_a, grad_b, vocab,
                                    a.stride(0), b.stride(0), temperature, beta, BLOCK=_block(vocab),
                                    IS_FP64=a.dtype == torch.float64, NEED_GRAD_A=need_grad_teacher,
                                    NEED_GRAD_B=need_grad_student, num_warps=8)
    return grad_a, grad_b


@on_input_device
def kd_jsd_fwd_grad(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float, beta: float,
                    row_weight: torch.Tensor | None, weight: float, need_grad_teacher: bool,
                    need_grad_student: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row JSD, statistics, grad_teacher, grad_student) in one launch: the gradients of sum_r w_r JSD_r with
    w_r = weight * row_weight[r] (``row_weight`` None: all 1), empty where not needed."""
    return launch_forward_grad(_kd_jsd_fwd_grad_kernel, teacher_logits, student_logits, STATS_PER_ROW,
                               (temperature, beta), row_weight, weight, need_grad_teacher, need_grad_student)
