"""Triton kernels of the fused temperature-softmax KL (see ``mpdistil_fast/ops/kd_kl_div.py`` for the formulas).

One program per row.  Forward: online softmax over blocks of the row for both inputs (block max, then one rescale
of the running sums), giving KL(P || Q) with P = softmax(a / T), Q = softmax(b / T) and the per-row statistics
(max a, log sum exp((a - max a) / T), max b, log sum exp((b - max b) / T), E_P[a - b]).  Backward: one more
read of a and b, dKL/da = g/T * P (a - b - E_P[a - b])/T, dKL/db = g/T * (Q - P).  ``kd_kl_div_fwd_grad``
does both in one launch when the row weights g are known in forward (a reduced loss), so each row is read from
memory once (its second read hits L2).  fp32 accumulation (fp64
for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpdistil_fast.kernels.device import on_input_device

STATS_PER_ROW = 5
MAX_BLOCK = 4096


@triton.jit
def _scalar(value, IS_FP64: tl.constexpr):
    """A float argument of a kernel in the accumulation type.  The kernels annotate their float arguments
    ``tl.float64`` (a plain Python float reaches a kernel as float32, which would round T or beta on the fp64
    path); the interpreter passes them as Python floats, hence the addition to a float64 zero."""
    return (tl.zeros([], tl.float64) + value).to(tl.float64 if IS_FP64 else tl.float32)


@triton.jit
def _this_row(a_ptr, b_ptr, stride_a, stride_b, temperature, IS_FP64: tl.constexpr):
    """(row index, its a and b pointers, 1/T in the accumulation type) of this program."""
    row = tl.program_id(0).to(tl.int64)
    inv_t = _scalar(1.0 / (tl.zeros([], tl.float64) + temperature), IS_FP64)
    return row, a_ptr + row * stride_a, b_ptr + row * stride_b, inv_t


@triton.jit
def _online_softmax_block(a, b, max_a, max_b, sum_a, sum_b, inv_t):
    """One block of the online softmax of a row pair: (raised max a, raised max b, sum_a and sum_b rescaled to the
    new maxima plus this block's exp((x - max)/T), the factor that rescaled sum_a, this block's exp((a - max a)/T)).
    Sums still 0 are not rescaled (their max may be -inf); -inf entries give exp 0."""
    neg_inf = float("-inf")
    new_max_a = tl.maximum(max_a, tl.max(a, axis=0))
    new_max_b = tl.maximum(max_b, tl.max(b, axis=0))
    factor_a = tl.where(sum_a > 0, tl.exp((max_a - new_max_a) * inv_t), 1.0)
    factor_b = tl.where(sum_b > 0, tl.exp((max_b - new_max_b) * inv_t), 1.0)
    exp_a = tl.exp((a - tl.where(new_max_a > neg_inf, new_max_a, 0.0)) * inv_t)
    exp_b = tl.exp((b - tl.where(new_max_b > neg_inf, new_max_b, 0.0)) * inv_t)
    return (new_max_a, new_max_b, sum_a * factor_a + tl.sum(exp_a, axis=0), sum_b * factor_b + tl.sum(exp_b, axis=0),
            factor_a, exp_a)


@triton.jit
def _row_statistics(a_row, b_row, vocab, inv_t, BLOCK: tl.constexpr, IS_FP64: tl.constexpr):
    """(KL of the row, max a, log sum exp((a - max a)/T), max b, log sum exp((b - max b)/T), E_P[a - b])."""
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    neg_inf = float("-inf")
    max_a = tl.full([], neg_inf, acc_dtype)
    max_b = tl.full([], neg_inf, acc_dtype)
    sum_a = tl.full([], 0.0, acc_dtype)
    sum_b = tl.full([], 0.0, acc_dtype)
    cross = tl.full([], 0.0, acc_dtype)  # sum exp((a - max a)/T) * (a - b)
    for start in range(0, vocab, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < vocab
        a = tl.load(a_row + offsets, mask=inside, other=neg_inf).to(acc_dtype)
        b = tl.load(b_row + offsets, mask=inside, other=neg_inf).to(acc_dtype)
        max_a, max_b, sum_a, sum_b, factor_a, exp_a = _online_softmax_block(a, b, max_a, max_b, sum_a, sum_b, inv_t)
        # Entries with P = 0 contribute 0 (also where a - b is infinite or NaN).
        cross = cross * factor_a + tl.sum(tl.where(exp_a > 0, exp_a * (a - b), 0.0), axis=0)
    log_sum_a = tl.log(sum_a)
    log_sum_b = tl.log(sum_b)
    # (== 0 tests, so that a NaN sum, from a NaN logit, carries on into a NaN loss and NaN gradients)
    mean_diff = tl.where(sum_a == 0, 0.0, cross / sum_a)
    kl = (mean_diff - (max_a - max_b)) * inv_t - log_sum_a + log_sum_b
    kl = tl.where(sum_b == 0, float("inf"), kl)  # P has mass where Q has none
    kl = tl.where(sum_a == 0, 0.0, kl)  # no distribution P in this row
    return kl, max_a, log_sum_a, max_b, log_sum_b, mean_diff


@triton.jit
def _store_row_statistics(kl_ptr, stats_ptr, row, kl, max_a, log_sum_a, max_b, log_sum_b, mean_diff):
    tl.store(kl_ptr + row, kl)
    stats_row = stats_ptr + row * 5
    tl.store(stats_row + 0, max_a)
    tl.store(stats_row + 1, log_sum_a)
    tl.store(stats_row + 2, max_b)
    tl.store(stats_row + 3, log_sum_b)
    tl.store(stats_row + 4, mean_diff)


@triton.jit
def _row_gradients(a_row, b_row, grad_a_row, grad_b_row, vocab, inv_t, grad_row, max_a, log_sum_a, max_b,
                   log_sum_b, mean_diff, BLOCK: tl.constexpr, IS_FP64: tl.constexpr, NEED_GRAD_A: tl.constexpr,
                   NEED_GRAD_B: tl.constexpr):
    """Write grad_row * dKL/da and grad_row * dKL/db of one row (one more read of a and b)."""
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    # Masked rows (g = 0) and rows without a distribution P get exactly zero gradients; a row without a distribution
    # Q under P's mass (KL = +inf) has no gradient: NaN everywhere, as torch's.
    coefficient = tl.where(max_a == float("-inf"), 0.0, grad_row * inv_t)
    no_q = (log_sum_b == float("-inf")) & (coefficient != 0)
    for start in range(0, vocab, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < vocab
        a = tl.load(a_row + offsets, mask=inside, other=0.0).to(acc_dtype)
        b = tl.load(b_row + offsets, mask=inside, other=0.0).to(acc_dtype)
        log_p = (a - max_a) * inv_t - log_sum_a
        log_q = (b - max_b) * inv_t - log_sum_b
        prob_p = tl.exp(log_p)
        if NEED_GRAD_A:
            # (the difference before the division by T: no product minus a number for an FMA to contract)
            grad_a = tl.where(prob_p == 0, 0.0, coefficient * prob_p * ((a - b - mean_diff) * inv_t))
            grad_a = tl.where(no_q, float("nan"), tl.where(coefficient != 0, grad_a, 0.0))
            tl.store(grad_a_row + offsets, grad_a.to(grad_a_row.dtype.element_ty), mask=inside)
        if NEED_GRAD_B:
            grad_b = tl.where(coefficient != 0, coefficient * (tl.exp(log_q) - prob_p), 0.0)
            grad_b = tl.where(no_q, float("nan"), grad_b)
            tl.store(grad_b_row + offsets, grad_b.to(grad_b_row.dtype.element_ty), mask=inside)


@triton.jit
def _kd_kl_div_fwd_kernel(a_ptr, b_ptr, kl_ptr, stats_ptr, vocab, stride_a, stride_b, temperature: tl.float64,
                          BLOCK: tl.constexpr, IS_FP64: tl.constexpr):
    row, a_row, b_row, inv_t = _this_row(a_ptr, b_ptr, stride_a, stride_b, temperature, IS_FP64)
    kl, max_a, log_sum_a, max_b, log_sum_b, mean_diff = _row_statistics(a_row, b_row, vocab, inv_t, BLOCK, IS_FP64)
    _store_row_statistics(kl_ptr, stats_ptr, row, kl, max_a, log_sum_a, max_b, log_sum_b, mean_diff)


@triton.jit
def _kd_kl_div_bwd_kernel(grad_kl_ptr, a_ptr, b_ptr, stats_ptr, grad_a_ptr, grad_b_ptr, vocab, stride_a,
                          stride_b, temperature: tl.float64, BLOCK: tl.constexpr, IS_FP64: tl.constexpr,
                          NEED_GRAD_A: tl.constexpr, NEED_GRAD_B: tl.constexpr):
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    row, a_row, b_row, inv_t = _this_row(a_ptr, b_ptr, stride_a, stride_b, temperature, IS_FP64)
    stats_row = stats_ptr + row * 5
    _row_gradients(a_row, b_row, grad_a_ptr + row * vocab, grad_b_ptr + row * vocab, vocab, inv_t,
                   tl.load(grad_kl_ptr + row).to(acc_dtype), tl.load(stats_row + 0).to(acc_dtype),
                   tl.load(stats_row + 1).to(acc_dtype), tl.load(stats_row + 2).to(acc_dtype),
                   tl.load(stats_row + 3).to(acc_dtype), tl.load(stats_row + 4).to(acc_dtype), BLOCK, IS_FP64,
                   NEED_GRAD_A, NEED_GRAD_B)


@triton.jit
def _kd_kl_div_fwd_grad_kernel(a_ptr, b_ptr, kl_ptr, stats_ptr, row_weight_ptr, weight: tl.float64, grad_a_ptr,
                               grad_b_ptr, vocab, stride_a, stride_b, temperature: tl.float64, BLOCK: tl.constexpr,
                               IS_FP64: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr, NEED_GRAD_A: tl.constexpr,
                               NEED_GRAD_B: tl.constexpr):
    """Forward and gradient in one pass over HBM: the row's statistics, then at once its gradients for the row
    weight ``weight * row_weight[row]`` (the second read of the row comes from L2, just read)."""
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    row, a_row, b_row, inv_t = _this_row(a_ptr, b_ptr, stride_a, stride_b, temperature, IS_FP64)
    kl, max_a, log_sum_a, max_b, log_sum_b, mean_diff = _row_statistics(a_row, b_row, vocab, inv_t, BLOCK, IS_FP64)
    _store_row_statistics(kl_ptr, stats_ptr, row, kl, max_a, log_sum_a, max_b, log_sum_b, mean_diff)
    grad_row = _scalar(weight, IS_FP64)
    if HAS_ROW_WEIGHT:
        grad_row = grad_row * tl.load(row_weight_ptr + row).to(acc_dtype)
    _row_gradients(a_row, b_row, grad_a_ptr + row * vocab, grad_b_ptr + row * vocab, vocab, inv_t, grad_row, max_a,
                   log_sum_a, max_b, log_sum_b, mean_diff, BLOCK, IS_FP64, NEED_GRAD_A, NEED_GRAD_B)


def _unit_stride_rows(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(1) == 1 else logits.contiguous()


def _block(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), MAX_BLOCK)


def _row_outputs(a: torch.Tensor, stats_per_row: int) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(float64 inputs?, per-row loss [N], statistics [N, stats_per_row]) for [N, V] logits ``a``, in the
    accumulation dtype (float64 for float64 inputs, else float32)."""
    is_fp64 = a.dtype == torch.float64
    acc = torch.float64 if is_fp64 else torch.float32
    return (is_fp64, torch.empty(a.shape[0], dtype=acc, device=a.device),
            torch.empty(a.shape[0], stats_per_row, dtype=acc, device=a.device))


def _gradients(a: torch.Tensor, need_a: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient outputs like the [N, V] logits ``a``; an empty tensor for a gradient not wanted."""
    new = lambda needed: torch.empty(a.shape if needed else (0,), dtype=a.dtype, device=a.device)  # noqa: E731
    return new(need_a), new(need_b)


@on_input_device
def kd_kl_div_fwd(p_logits: torch.Tensor, q_logits: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(softmax(p/T) || softmax(q/T)) ``[N]`` and statistics ``[N, 5]`` of ``[N, V]`` logits."""
    a, b = _unit_stride_rows(p_logits), _unit_stride_rows(q_logits)
    rows, vocab = a.shape
    is_fp64, kl, stats = _row_outputs(a, STATS_PER_ROW)
    if rows:
        _kd_kl_div_fwd_kernel[(rows,)](a, b, kl, stats, vocab, a.stride(0), b.stride(0), temperature,
                                       BLOCK=_block(vocab), IS_FP64=is_fp64, num_warps=8)
    return kl, stats


@on_input_device
def kd_kl_div_bwd(grad_kl: torch.Tensor, p_logits: torch.Tensor, q_logits: torch.Tensor, stats: torch.Tensor,
                  temperature: float, need_grad_p: bool,
                  need_grad_q: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum(grad_kl * kl) for p and q logits (empty tensors when not needed)."""
    a, b = _unit_stride_rows(p_logits), _unit_stride_rows(q_logits)
    rows, vocab = a.shape
    grad_p, grad_q = _gradients(a, need_grad_p, need_grad_q)
    if rows and (need_grad_p or need_grad_q):
        _kd_kl_div_bwd_kernel[(rows,)](grad_kl.contiguous(), a, b, stats.contiguous(), grad_p, grad_q,
                                       vocab, a.stride(0), b.stride(0), temperature, BLOCK=_block(vocab),
                                       IS_FP64=a.dtype == torch.float64, NEED_GRAD_A=need_grad_p,
                                       NEED_GRAD_B=need_grad_q, num_warps=8)
    return grad_p, grad_q


@on_input_device
def kd_kl_div_fwd_grad(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float,
                       row_weight: torch.Tensor | None, weight: float, need_grad_p: bool,
                       need_grad_q: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row KL, statistics, grad_p, grad_q) in one launch: the gradients of sum_r w_r KL_r with
    w_r = weight * row_weight[r] (``row_weight`` None: all 1), empty where not needed."""
    return launch_forward_grad(_kd_kl_div_fwd_grad_kernel, p_logits, q_logits, STATS_PER_ROW, (temperature,),
                               row_weight, weight, need_grad_p, need_grad_q)


def launch_forward_grad(kernel, a_logits: torch.Tensor, b_logits: torch.Tensor, stats_per_row: int,
                        loss_args: tuple, row_weight: torch.Tensor | None, weight: float, need_grad_a: bool,
                        need_grad_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a forward+gradient ``kernel`` (KL or JSD: arguments a, b, loss, stats, row_weight, weight, grad_a,
    grad_b, vocab, stride_a, stride_b, *loss_args, then the constexprs; its float arguments annotated
    ``tl.float64``) with one program per row; returns (per-row loss, statistics, grad_a, grad_b)."""
    a, b = _unit_stride_rows(a_logits), _unit_stride_rows(b_logits)
    rows, vocab = a.shape
    is_fp64, loss, stats = _row_outputs(a, stats_per_row)
    grad_a, grad_b = _gradients(a, need_grad_a, need_grad_b)
    if rows:
        kernel[(rows,)](a, b, loss, stats, loss if row_weight is None else row_weight.contiguous(), weight, grad_a,
                        grad_b, vocab, a.stride(0), b.stride(0), *loss_args, BLOCK=_block(vocab), IS_FP64=is_fp64,
                        HAS_ROW_WEIGHT=row_weight is not None, NEED_GRAD_A=need_grad_a, NEED_GRAD_B=need_grad_b,
                        num_warps=8)
    return loss, stats, grad_a, grad_b
