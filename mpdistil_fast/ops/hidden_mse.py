"""Hidden-state MSE op: plain-torch reference and the ``mpdistil::hidden_mse_fwd`` / ``_bwd`` custom ops.

The op works on layer stacks flattened to rows, ``student [L_s, N, H_s]`` and ``teacher [L_t, N, H_t]``, and a list
of layer pairs ``(student_layers[p], teacher_layers[p])``; it returns the per-pair sum of squared errors

    sse[p] = sum_{n valid} || f(W s_{p,n} + b) - f(t_{p,n}) ||^2,     f = x / max(||x||, 1e-12) if normalize else id

(FitNets, Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015; patient KD, Sun et al., "Patient Knowledge
Distillation for BERT Model Compression", EMNLP 2019, whose normalised [CLS] states are ``normalize=True``; TinyBERT,
Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding", Findings of EMNLP 2020, whose learned
W_h is the projection).  Reductions are ordinary torch arithmetic on ``sse`` (see
:mod:`mpdistil_fast.functional.hidden_mse`).  ``sse`` is float64 for float64
inputs and float32 otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mpdistil_fast.ops.common import FusedOp, accumulation_dtype, fused_kernels

#: Clamp of the L2 norm when normalising (the default of torch.nn.functional.normalize).
NORM_EPS = 1e-12


def hidden_mse_torch(student: Tensor, teacher: Tensor, student_layers: Tensor, teacher_layers: Tensor,
                     mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                     normalize: bool) -> Tensor:
    """Composite reference of ``sse[p]`` (ordinary autograd, so double backward works); the ``torch`` backend."""
    acc = accumulation_dtype(student.dtype)
    s = student.index_select(0, student_layers).to(acc)
    t = teacher.index_select(0, teacher_layers).to(acc)
    if mask is not None:  # zero the padding first, so non-finite padding reaches neither the loss nor a gradient
        s, t = torch.where(mask[:, None], s, 0.0), torch.where(mask[:, None], t, 0.0)
    if weight is not None:
        s = F.linear(s, weight.to(acc), None if bias is None else bias.to(acc))
    if normalize:
        s, t = F.normalize(s, dim=-1, eps=NORM_EPS), F.normalize(t, dim=-1, eps=NORM_EPS)
    squared = (s - t).square()
    if mask is not None:
        squared = torch.where(mask[:, None], squared, 0.0)
    return squared.sum(dim=(1, 2))


@torch.library.custom_op("mpdistil::hidden_mse_fwd", mutates_args=())
def hidden_mse_fwd(student: Tensor, teacher: Tensor, student_layers: Tensor, teacher_layers: Tensor,
                   mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], normalize: bool,
                   backend: str) -> tuple[Tensor, Tensor]:
    """Fused forward: ``(sse [P], projected rows [P, N, H_t] saved for backward, or an empty tensor)``."""
    kernels = fused_kernels(backend, "hidden_mse")
    return kernels.hidden_mse_fwd(student, teacher, student_layers, teacher_layers, mask, weight, bias, normalize)


@hidden_mse_fwd.register_fake
def _(student, teacher, student_layers, teacher_layers, mask, weight, bias, normalize, backend):
    acc = accumulation_dtype(student.dtype)
    pairs = student_layers.shape[0]
    projected_shape = (pairs, student.shape[1], teacher.shape[2]) if weight is not None else (0,)
    return student.new_empty((pairs,), dtype=acc), student.new_empty(projected_shape, dtype=acc)


@torch.library.custom_op("mpdistil::hidden_mse_bwd", mutates_args=())
def hidden_mse_bwd(grad_sse: Tensor, student: Tensor, teacher: Tensor, student_layers: Tensor, teacher_layers: Tensor,
                   mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], projected: Tensor,
                   normalize: bool, need_teacher_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused backward: gradients for (student, teacher, weight, bias); empty tensors for those not wanted."""
    kernels = fused_kernels(backend, "hidden_mse")
    return kernels.hidden_mse_bwd(grad_sse, student, teacher, student_layers, teacher_layers, mask, weight, bias,
                                  projected, normalize, need_teacher_grad)


@hidden_mse_bwd.register_fake
def _(grad_sse, student, teacher, student_layers, teacher_layers, mask, weight, bias, projected, normalize,
      need_teacher_grad, backend):
    empty = student.new_empty((0,))
    return (torch.empty_like(student), torch.empty_like(teacher) if need_teacher_grad else empty,
            torch.empty_like(weight) if weight is not None else empty,
            torch.empty_like(bias) if bias is not None else empty)


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, student_layers, teacher_layers, mask, weight, bias, normalize, backend = inputs
    ctx.save_for_backward(student, teacher, student_layers, teacher_layers, mask, weight, bias, output[1])
    ctx.normalize, ctx.backend = normalize, backend
    ctx.need_teacher_grad = ctx.needs_input_grad[1]


def _backward(ctx, bwd, grad_sse: Tensor, _grad_projected: Tensor):
    student, teacher, student_layers, teacher_layers, mask, weight, bias, projected = ctx.saved_tensors
    grad_student, grad_teacher, grad_weight, grad_bias = bwd(
        grad_sse, student, teacher, student_layers, teacher_layers, mask, weight, bias, projected, ctx.normalize,
        ctx.need_teacher_grad)
    return (grad_student, grad_teacher if ctx.need_teacher_grad else None, None, None, None,
            grad_weight if weight is not None else None, grad_bias if bias is not None else None, None, None)


HIDDEN_MSE = FusedOp("hidden_mse", "hidden_mse", hidden_mse_fwd, hidden_mse_bwd, _setup_context, _backward,
                     non_differentiable_outputs=(1,))
HIDDEN_MSE.register_autograd()
