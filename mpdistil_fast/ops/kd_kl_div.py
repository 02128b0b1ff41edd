"""Temperature-softmax KL distillation loss: the torch reference and the fused custom op with its autograd.

Hinton, Vinyals and Dean (2015), "Distilling the Knowledge in a Neural Network": with p = softmax(z / T),

    forward KL  (direction="forward"):  KL(p_t || p_s) = sum_v p_t,v (log p_t,v - log p_s,v)
    reverse KL  (direction="reverse"):  KL(p_s || p_t)

per row of ``[..., V]`` logits, times T^2 when ``scale_by_t2`` (keeps gradient magnitudes independent of T), then
reduced over rows (see :func:`reduce_rows`).  The fused kernels compute KL(P || Q) per row for P = softmax(a / T),
Q = softmax(b / T) in one read of each input and save only per-row statistics; their backward gives

    dKL/da = P (log P - log Q - KL) / T,      dKL/db = (Q - P) / T

in one more read (log P - log Q - KL = (a - b - E_P[a - b])/T), so the teacher gradient (a trainable teacher,
or the finite-difference hypergradient of ``mpdistil_fast.bilevel``) costs no extra pass.  For a reduced loss the
row weights are known in forward, and ``kd_kl_div_fwd_grad`` computes the statistics and these gradients in one
pass (:class:`~mpdistil_fast.ops.common.GradInForward`).  Conventions shared by every backend: entries with P = 0
(logits -inf) contribute 0; a row whose P logits are all -inf has no distribution and contributes 0 loss and 0
gradient.
"""
from __future__ import annotations

import torch

from mpdistil_fast.ops.common import (FusedOp, GradInForward, accumulation_dtype, call_fused, fused_kernels,
                                     graph_capture)
from mpdistil_fast.ops.kd_jsd import row_jsd_fused, row_jsd_torch

#: Per-row statistics saved by the fused forward: max a, log sum exp((a - max a) / T), the same two for b, and
#: E_P[a - b], with which the backward's log P - log Q - KL = (a - b - E_P[a - b]) / T cancels nothing and, as the
#: difference is taken before the division by T, leaves an FMA-contracting compiler no product to subtract from (a
#: one-hot P row's gradient is exactly 0 for any T).
STATS_PER_ROW = 5


def _weighting_first(student: torch.Tensor, teacher: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) such that the loss is KL(softmax(a/T) || softmax(b/T)): (teacher, student) for forward KL."""
    return (student, teacher) if reverse else (teacher, student)


def row_kl_torch(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reverse: bool) -> torch.Tensor:
    """Per-row KL of ``[N, V]`` logits with plain torch ops (accumulated in fp32, or fp64 for fp64 inputs).

    Differentiable to any order.  Rows whose weighting logits are all -inf give 0 (and zero gradients); P > 0
    where Q = 0 gives +inf, as in the fused kernels (also for a row whose Q logits are all -inf).
    """
    acc = accumulation_dtype(student.dtype)
    a, b = _weighting_first(student.to(acc), teacher.to(acc), reverse)
    # (a NaN logit is "mass": its row computes on into a NaN loss and NaN gradients, as in the fused kernels)
    has_mass = a.amax(dim=-1, keepdim=True) != float("-inf")
    # keep empty rows out of log_softmax (it would give NaN, and a NaN gradient through where()): the weighting
    # row, and the other row too where the weighting row has no mass (the row is 0 with zero gradients then)
    a = torch.where(has_mass, a, torch.zeros_like(a))
    b = torch.where(has_mass, b, torch.zeros_like(b))
    log_p = torch.log_softmax(a / temperature, dim=-1)
    log_q = torch.log_softmax(b / temperature, dim=-1)
    log_q = torch.where(b.amax(dim=-1, keepdim=True) != float("-inf"), log_q, float("-inf"))  # not log_softmax's NaN
    prob_p = log_p.exp()
    # P = 0 where exp underflows too (a finite log P below about -104 in fp32), as in the fused kernels, whose exp
    # underflows alike: such an entry has no mass, and next to a -inf Q logit it must not make 0 * inf = NaN.
    positive = prob_p != 0  # (NaN included)
    # where() before the product: P = 0 entries (Q may be 0 there too) must not produce 0 * inf in the value or in
    # the gradient.
    zero = torch.zeros_like(log_p)
    terms = prob_p * (torch.where(positive, log_p, zero) - torch.where(positive, log_q, zero))
    terms = torch.where(positive, terms, zero)
    return torch.where(has_mass.squeeze(-1), terms.sum(dim=-1), zero[..., 0])


# ---------------------------------------------------------------------------------------------------------------
# Fused custom op: mpdistil::kd_kl_div_fwd -> (per-row KL(P || Q), per-row stats), with mpdistil::kd_kl_div_bwd as
# backward, on the (a, b) logits of :func:`_weighting_first` (the direction is chosen by the caller's argument order).
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("mpdistil::kd_kl_div_fwd", mutates_args=())
def kd_kl_div_fwd(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL ``[N]`` and statistics ``[N, 5]`` of ``[N, V]`` logits through the fused kernel ``backend``."""
    return fused_kernels(backend, "kd_kl_div").kd_kl_div_fwd(p_logits, q_logits, temperature)


@kd_kl_div_fwd.register_fake
def _(p_logits, q_logits, temperature, backend):
    acc = accumulation_dtype(p_logits.dtype)
    rows = p_logits.shape[0]
    return p_logits.new_empty((rows,), dtype=acc), p_logits.new_empty((rows, STATS_PER_ROW), dtype=acc)


@torch.library.custom_op("mpdistil::kd_kl_div_bwd", mutates_args=())
def kd_kl_div_bwd(grad_kl: torch.Tensor, p_logits: torch.Tensor, q_logits: torch.Tensor, stats: torch.Tensor,
                  temperature: float, need_grad_p: bool, need_grad_q: bool,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_p, grad_q) of sum(grad_kl * kl); a gradient not asked for comes back as an empty tensor."""
    return fused_kernels(backend, "kd_kl_div").kd_kl_div_bwd(grad_kl, p_logits, q_logits, stats, temperature,
                                                             need_grad_p, need_grad_q)


@kd_kl_div_bwd.register_fake
def _(grad_kl, p_logits, q_logits, stats, temperature, need_grad_p, need_grad_q, backend):
    def grad_like(needed: bool) -> torch.Tensor:
        return torch.empty_like(p_logits, memory_format=torch.contiguous_format) if needed else p_logits.new_empty((0,))

    return grad_like(need_grad_p), grad_like(need_grad_q)


def _setup_context(ctx, inputs, output) -> None:
    p_logits, q_logits, temperature, backend = inputs
    ctx.save_for_backward(p_logits, q_logits, output[1])
    ctx.temperature, ctx.backend = temperature, backend


def _backward(ctx, bwd, grad_kl: torch.Tensor, _grad_stats: torch.Tensor | None):
    p_logits, q_logits, stats = ctx.saved_tensors
    need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_p, grad_q = bwd(grad_kl, p_logits, q_logits, stats, ctx.temperature, need_p, need_q)
    return grad_p if need_p else None, grad_q if need_q else None, None, None


KD_KL_DIV = FusedOp("kd_kl_div", "kd_kl_div", kd_kl_div_fwd, kd_kl_div_bwd, _setup_context, _backward,
                    non_differentiable_outputs=(1,))
KD_KL_DIV.register_autograd()


def row_kl_fused(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reverse: bool,
                 backend: str) -> torch.Tensor:
    """Per-row KL of ``[N, V]`` logits through a fused backend (first-order differentiable in both inputs)."""
    a, b = _weighting_first(student, teacher, reverse)
    return call_fused(KD_KL_DIV, a, b, temperature, backend)[0]


# ---------------------------------------------------------------------------------------------------------------
# Gradient in the forward pass: one read of the logits from memory for forward + backward of a reduced loss.
# ---------------------------------------------------------------------------------------------------------------
#: Per fused op, the backends whose kernels compute the gradient together with the loss (``<op>_fwd_grad``, used
#: through :class:`~mpdistil_fast.ops.common.GradInForward`).  KL: all three (measured: 1.0-1.1x on the 2-core
#: CPU, where exp dominates; on H200s the cuda bf16 [2048, 32000] step went from 0.76 to 0.45 ms wall clock, two
#: runs on two machines).  JSD: cpp, whose forward keeps the per-entry terms of the gradient in a row buffer so the
#: exps and logs are computed once instead of twice (2x on the 2-core CPU), and triton (one launch; not yet timed
#: on a GPU).
GRAD_IN_FORWARD_BACKENDS: dict[str, frozenset[str]] = {"kd_kl_div": frozenset({"cpp", "triton", "cuda"}),
                                                       "kd_jsd": frozenset({"cpp", "triton"})}


def _denominator(reduction: str, valid_rows, vocab: int):
    """What a summed loss is divided by: valid rows ("batchmean"), valid rows * V ("mean"), 1 ("sum")."""
    if reduction == "sum":
        return 1
    return valid_rows if reduction == "batchmean" else valid_rows * vocab


#: Rows up to which a float32 (index 0) or float64 (index 1) sum of 0/1 row weights is the exact count of valid
#: rows, as reduce_rows's integer count converted is: below these, one count serves the weights and the value.
_EXACT_COUNT_ROWS = (2 ** 24, 2 ** 53)


def row_weights(mask: torch.Tensor | None, reduction: str, scale: float, vocab: int, rows: int,
                dtype: torch.dtype) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
    """(w, row weights r in ``dtype`` or None, denominator or None) with :func:`reduce_rows` = sum_i w r_i KL_i
    over valid rows (reduction not "none"): the factors by which each row's KL enters the loss, known before
    backward.  The denominator of a masked "batchmean" / "mean" comes back when :func:`reduce_rows` can reuse it
    (its count is then exact, :data:`_EXACT_COUNT_ROWS`), so the valid rows are counted once."""
    if mask is None:
        return scale / _denominator(reduction, max(rows, 1), vocab), None, None
    valid = mask.reshape(-1).to(dtype)
    if reduction == "sum":
        return scale, valid, None
    denominator = _denominator(reduction, valid.sum().clamp(min=1), vocab)
    exact = rows <= _EXACT_COUNT_ROWS[dtype == torch.float64]
    return scale, valid / denominator, denominator if exact else None


# ---------------------------------------------------------------------------------------------------------------
# Reductions (shared by every backend).
# ---------------------------------------------------------------------------------------------------------------
def reduce_rows(row_kl: torch.Tensor, mask: torch.Tensor | None, reduction: str, scale: float, vocab: int,
                leading_shape: torch.Size, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Mask and reduce per-row losses ``[N]`` (rows of ``[..., V]`` flattened) and multiply by ``scale``
    (``denominator``: a masked mean's divisor counted already, see :func:`row_weights`).

    ``"batchmean"``: sum / number of valid rows; ``"mean"``: sum / (valid rows * V) (torch's elementwise mean);
    ``"sum"``; ``"none"``: per-row losses of shape ``leading_shape`` (masked rows 0).  Masked rows are removed with
    ``where`` (so even a NaN in a masked row cannot leak) and get exactly zero gradient; with no valid row the
    loss is exactly 0.
    """
    if mask is not None:
        valid = mask.reshape(-1)
        row_kl = torch.where(valid, row_kl, 0.0)
    if reduction == "none":
        return (row_kl * scale).reshape(leading_shape)
    if mask is None:  # the divisor is known on the host: one sum and one multiply (launches, on a GPU)
        return row_kl.sum() * (scale / _denominator(reduction, max(row_kl.numel(), 1), vocab))
    total = row_kl.sum() * scale
    if reduction == "sum":
        return total
    if denominator is None:
        denominator = _denominator(reduction, valid.sum().clamp(min=1).to(row_kl.dtype), vocab)
    return total / denominator


def kd_kl_div_op(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str, scale_by_t2: bool,
                 mask: torch.Tensor | None, direction: str, beta: float | None, backend: str) -> torch.Tensor:
    """The loss of ``[..., V]`` logits for validated arguments and a resolved backend (public API:
    :func:`mpdistil_fast.kd_kl_div`): per-row KL (``direction`` "forward" / "reverse") or generalized JSD
    (``"jsd"`` with ``0 < beta < 1``, :mod:`mpdistil_fast.ops.kd_jsd`), then the shared reduction."""
    vocab = student.shape[-1]
    if student.dim() == 2:  # already rows: no reshape (each is a view, and a node of the backward graph)
        student_rows, teacher_rows = student, teacher
    else:
        student_rows, teacher_rows = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
    scale = temperature * temperature if scale_by_t2 else 1.0
    op = "kd_jsd" if direction == "jsd" else "kd_kl_div"
    if backend == "torch":
        if mask is not None:  # masked rows are not read: whatever they hold (NaN) gets no gradient
            keep = mask.reshape(-1, 1)
            student_rows, teacher_rows = torch.where(keep, student_rows, 0), torch.where(keep, teacher_rows, 0)
        if direction == "jsd":
            row_loss = row_jsd_torch(student_rows, teacher_rows, temperature, beta)
        else:
            row_loss = row_kl_torch(student_rows, teacher_rows, temperature, direction == "reverse")
    elif (backend in GRAD_IN_FORWARD_BACKENDS[op] and reduction != "none" and torch.is_grad_enabled()
          and (student.requires_grad or teacher.requires_grad) and not graph_capture()):
        weight, row_weight, denominator = row_weights(mask, reduction, scale, vocab, student_rows.shape[0],
                                                      accumulation_dtype(student.dtype))
        # without a mask reduce_rows is sum * weight, which GradInForward computes so (reduce None)
        reduce = None if mask is None else (
            lambda row_loss: reduce_rows(row_loss, mask, reduction, scale, vocab, student.shape[:-1], denominator))
        if direction == "jsd":  # the kernels' argument order: teacher, student, then (T, beta)
            a, b, loss_args = teacher_rows, student_rows, (temperature, beta)
        else:
            (a, b), loss_args = _weighting_first(student_rows, teacher_rows, direction == "reverse"), (temperature,)
        return GradInForward.apply(a, b, row_weight, (op, loss_args, weight, reduce, backend))
    elif direction == "jsd":
        row_loss = row_jsd_fused(student_rows, teacher_rows, temperature, beta, backend)
    else:
        row_loss = row_kl_fused(student_rows, teacher_rows, temperature, direction == "reverse", backend)
    return reduce_rows(row_loss, mask, reduction, scale, vocab, student.shape[:-1])
