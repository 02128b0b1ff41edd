"""Generalized Jensen-Shannon distillation loss: the torch reference and the fused custom op with its autograd.

Agarwal et al. (ICLR 2024), "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
(GKD): with P = softmax(z_t / T) (teacher), Q = softmax(z_s / T) (student) and the mixture M = beta P + (1 - beta) Q,
0 < beta < 1, each row of ``[..., V]`` logits gives

    JSD_beta(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M)

(beta = 0.5 is the symmetric Jensen-Shannon divergence; it is bounded by the binary entropy of beta, so a student
that puts no mass where the teacher does gets a finite loss and a useful gradient).  The fused kernels make two
reads of the logits in forward (softmax statistics, then the two KL terms L_P, L_Q against the mixture) and save
six numbers per row; backward reads them once more and gives, with lP = log(M / P), lQ = log(M / Q),

    dJSD/dz_t = P (-beta lP - L_P) / T,        dJSD/dz_s = Q (-(1 - beta) lQ - L_Q) / T

so a trainable teacher's gradient comes from the same pass.  Both logs are computed from d = log P - log Q without
forming M (see ``csrc/cpu/kd_jsd.cpp``).  Entries with P = 0 (Q = 0) contribute nothing to their KL term; a row
whose teacher or student logits are all -inf gives 0 and zero gradients; a NaN logit, a NaN loss and NaN gradients.
"""
from __future__ import annotations

import math

import torch

from mpdistil_fast.ops.common import FusedOp, accumulation_dtype, call_fused, fused_kernels

#: Per-row statistics saved by the fused forward: max and log sum exp((z - max) / T) of the teacher and the student
#: logits, then L_P = beta KL(P || M) and L_Q = (1 - beta) KL(Q || M).
STATS_PER_ROW = 6


def row_jsd_torch(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """Per-row generalized JSD of ``[N, V]`` logits with plain torch ops (fp32 accumulation, fp64 for fp64 inputs).

    Differentiable to any order.  Rows whose teacher or student logits are all -inf give 0 (and zero gradients); a
    NaN logit makes its row's loss and gradients NaN, as in the fused kernels.
    """
    acc = accumulation_dtype(student.dtype)
    s, t = student.to(acc), teacher.to(acc)
    # (a NaN logit is "mass": its row computes on into a NaN loss and NaN gradients)
    has_pair = (t.amax(dim=-1, keepdim=True) != float("-inf")) & (s.amax(dim=-1, keepdim=True) != float("-inf"))
    s, t = torch.where(has_pair, s, torch.zeros_like(s)), torch.where(has_pair, t, torch.zeros_like(t))
    log_p = torch.log_softmax(t / temperature, dim=-1)
    log_q = torch.log_softmax(s / temperature, dim=-1)
    positive_p, positive_q = log_p != float("-inf"), log_q != float("-inf")  # (NaN included)
    # Entries where both are 0 are kept out of logaddexp (its gradient at (-inf, -inf) is NaN).
    either = positive_p | positive_q
    log_m = torch.logaddexp(torch.where(either, log_p, 0.0) + math.log(beta),
                            torch.where(either, log_q, 0.0) + math.log1p(-beta))

    def kl_terms(log_x: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        safe = torch.where(positive, log_x, torch.zeros_like(log_x))  # no 0 * inf in the value or the gradient
        return torch.where(positive, safe.exp() * (safe - log_m), torch.zeros_like(safe))

    rows = (beta * kl_terms(log_p, positive_p) + (1.0 - beta) * kl_terms(log_q, positive_q)).sum(dim=-1)
    return torch.where(has_pair.squeeze(-1), rows, torch.zeros_like(rows))


# ---------------------------------------------------------------------------------------------------------------
# Fused custom op: mpdistil::kd_jsd_fwd -> (per-row JSD, per-row stats), with mpdistil::kd_jsd_bwd as backward.
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("mpdistil::kd_jsd_fwd", mutates_args=())
def kd_jsd_fwd(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float, beta: float,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row JSD ``[N]`` and statistics ``[N, 6]`` of ``[N, V]`` logits through the fused kernel ``backend``."""
    return fused_kernels(backend, "kd_jsd").kd_jsd_fwd(teacher_logits, student_logits, temperature, beta)


@kd_jsd_fwd.register_fake
def _(teacher_logits, student_logits, temperature, beta, backend):
    acc = accumulation_dtype(teacher_logits.dtype)
    rows = teacher_logits.shape[0]
    return teacher_logits.new_empty((rows,), dtype=acc), teacher_logits.new_empty((rows, STATS_PER_ROW), dtype=acc)


@torch.library.custom_op("mpdistil::kd_jsd_bwd", mutates_args=())
def kd_jsd_bwd(grad_jsd: torch.Tensor, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
               stats: torch.Tensor, temperature: float, beta: float, need_grad_teacher: bool,
               need_grad_student: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_teacher, grad_student) of sum(grad_jsd * jsd); a gradient not asked for comes back empty."""
    return fused_kernels(backend, "kd_jsd").kd_jsd_bwd(grad_jsd, teacher_logits, student_logits, stats, temperature,
                                                       beta, need_grad_teacher, need_grad_student)


@kd_jsd_bwd.register_fake
def _(grad_jsd, teacher_logits, student_logits, stats, temperature, beta, need_grad_teacher, need_grad_student,
      backend):
    def grad_like(needed: bool) -> torch.Tensor:
        if needed:
            return torch.empty_like(teacher_logits, memory_format=torch.contiguous_format)
        return teacher_logits.new_empty((0,))

    return grad_like(need_grad_teacher), grad_like(need_grad_student)


def _setup_context(ctx, inputs, output) -> None:
    teacher_logits, student_logits, temperature, beta, backend = inputs
    ctx.save_for_backward(teacher_logits, student_logits, output[1])
    ctx.temperature, ctx.beta, ctx.backend = temperature, beta, backend


def _backward(ctx, bwd, grad_jsd: torch.Tensor, _grad_stats: torch.Tensor | None):
    teacher_logits, student_logits, stats = ctx.saved_tensors
    need_teacher, need_student = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_teacher, grad_student = bwd(grad_jsd, teacher_logits, student_logits, stats, ctx.temperature, ctx.beta,
                                     need_teacher, need_student)
    return grad_teacher if need_teacher else None, grad_student if need_student else None, None, None, None


KD_JSD = FusedOp("kd_jsd", "kd_jsd", kd_jsd_fwd, kd_jsd_bwd, _setup_context, _backward,
                 non_differentiable_outputs=(1,))
KD_JSD.register_autograd()


def row_jsd_fused(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float,
                  backend: str) -> torch.Tensor:
    """Per-row generalized JSD of ``[N, V]`` logits through a fused backend (first-order, both inputs)."""
    return call_fused(KD_JSD, teacher, student, temperature, beta, backend)[0]
