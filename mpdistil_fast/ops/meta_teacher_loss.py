"""MPDistil meta-teacher loss op: plain-torch reference and the ``mpdistil::meta_teacher_loss_fwd`` / ``_bwd`` ops.

The meta-teacher D (Sengupta et al., "A Good Learner can Teach Better: Teacher-Student Collaborative Knowledge
Distillation", ICLR 2024) is a linear layer, or Linear -> GELU -> Linear, applied to the pooled teacher state h_T
and to the (optionally projected) pooled student state h_S' = h_S P^T + c.  With z_T = D(h_T), z_S = D(h_S'),
p_D(y | h) the softmax probability of the gold label and means over the batch:

    collaborative:  0.5 CE(z_T, y) + 0.5 CE(z_S, y)
    competitive:    CE(z_T, y) - mean p_D(y | h_T) + mean p_D(y | h_S)

The op returns the loss (float64 for float64 inputs, else float32) and both logit tensors (in h_teacher's dtype).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mpdistil_fast.ops.common import FusedOp, accumulation_dtype, fused_kernels


def discriminator_logits(h: Tensor, w1: Tensor, b1: Tensor, w2: Optional[Tensor], b2: Optional[Tensor]) -> Tensor:
    """D(h): ``h W1^T + b1``, or ``GELU(h W1^T + b1) W2^T + b2`` (exact erf GELU) when W2 is given."""
    out = F.linear(h, w1, b1)
    return out if w2 is None else F.linear(F.gelu(out), w2, b2)


def meta_teacher_loss_torch(h_teacher: Tensor, h_student: Tensor, proj_weight: Optional[Tensor],
                            proj_bias: Optional[Tensor], w1: Tensor, b1: Tensor, w2: Optional[Tensor],
                            b2: Optional[Tensor], labels: Tensor, competitive: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Composite reference ``(loss, z_T, z_S)`` with ordinary autograd (double backward works); the torch backend."""
    acc = accumulation_dtype(h_teacher.dtype)
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
    h_s = cast(h_student)
    if proj_weight is not None:
        h_s = F.linear(h_s, cast(proj_weight), cast(proj_bias))
    params = (cast(w1), cast(b1), cast(w2), cast(b2))
    z_t, z_s = discriminator_logits(cast(h_teacher), *params), discriminator_logits(h_s, *params)
    labels = labels.long()
    ce_t = F.cross_entropy(z_t, labels)
    if competitive:
        gold = lambda z: z.softmax(-1).gather(1, labels[:, None]).mean()  # noqa: E731
        loss = ce_t - gold(z_t) + gold(z_s)
    else:
        loss = 0.5 * ce_t + 0.5 * F.cross_entropy(z_s, labels)
    return loss, z_t.to(h_teacher.dtype), z_s.to(h_teacher.dtype)


def check_label_range(labels: Tensor, classes: int) -> None:
    """Labels must index one of ``classes`` logits (a ValueError naming ``labels`` otherwise).

    Run by the public function in eager mode and by the custom op's body, which runs eagerly also under
    ``torch.compile``: the Triton kernel would otherwise read out of range silently (and the CUDA one give NaN).
    """
    lowest, highest = (int(value) for value in torch.aminmax(labels))  # two scalars: cheaper than tensor compares
    if lowest < 0 or highest >= classes:
        raise ValueError(f"labels must lie in [0, {classes}), got values in [{lowest}, {highest}]")


@torch.library.custom_op("mpdistil::meta_teacher_loss_fwd", mutates_args=())
def meta_teacher_loss_fwd(h_teacher: Tensor, h_student: Tensor, proj_weight: Optional[Tensor],
                          proj_bias: Optional[Tensor], w1: Tensor, b1: Tensor, w2: Optional[Tensor],
                          b2: Optional[Tensor], labels: Tensor, competitive: bool,
                          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused forward: (loss, z_T, z_S, dL/dz [2B, K], hidden pre-activations or empty, projected h_S or empty)."""
    check_label_range(labels, (w2 if w2 is not None else w1).shape[0])
    kernels = fused_kernels(backend, "meta_teacher")
    return kernels.meta_teacher_loss_fwd(h_teacher, h_student, proj_weight, proj_bias, w1, b1, w2, b2, labels,
                                         competitive)


@meta_teacher_loss_fwd.register_fake
def _(h_teacher, h_student, proj_weight, proj_bias, w1, b1, w2, b2, labels, competitive, backend):
    acc = accumulation_dtype(h_teacher.dtype)
    batch, width = h_teacher.shape
    classes = (w2 if w2 is not None else w1).shape[0]
    new = lambda *shape, dtype=acc: h_teacher.new_empty(shape, dtype=dtype)  # noqa: E731
    return (new(), new(batch, classes, dtype=h_teacher.dtype), new(batch, classes, dtype=h_teacher.dtype),
            new(2 * batch, classes), new(2 * batch, w1.shape[0]) if w2 is not None else new(0),
            new(batch, width) if proj_weight is not None else new(0))


@torch.library.custom_op("mpdistil::meta_teacher_loss_bwd", mutates_args=())
def meta_teacher_loss_bwd(grad_loss: Tensor, dlogits: Tensor, h_teacher: Tensor, h_student: Tensor,
                          proj_weight: Optional[Tensor], proj_bias: Optional[Tensor], w1: Tensor,
                          w2: Optional[Tensor], hidden_pre: Tensor, projected: Tensor, need_h_teacher: bool,
                          need_h_student: bool, backend: str) -> list[Tensor]:
    """Fused backward: gradients of (h_T, h_S, P, c, W1, b1, W2, b2); empty tensors where absent or not wanted."""
    kernels = fused_kernels(backend, "meta_teacher")
    grads = kernels.meta_teacher_loss_bwd(grad_loss, dlogits, h_teacher, h_student, proj_weight, proj_bias, w1, w2,
                                          hidden_pre, projected, need_h_teacher, need_h_student)
    # A custom op's outputs must not alias each other (torch checks under torch.compile): the Triton kernel returns
    # the parameter gradients as views of one buffer (the eager path hands them out as they are).
    return [g.clone() if g._base is not None else g for g in grads]


@meta_teacher_loss_bwd.register_fake
def _(grad_loss, dlogits, h_teacher, h_student, proj_weight, proj_bias, w1, w2, hidden_pre, projected,
      need_h_teacher, need_h_student, backend):
    acc = dlogits.dtype
    like = lambda t, wanted=True: torch.empty_like(t) if t is not None and wanted else h_teacher.new_empty(0, dtype=acc)  # noqa: E731,E501
    b1_like = w1.new_empty(w1.shape[0])
    b2_like = None if w2 is None else w2.new_empty(w2.shape[0])
    proj_bias_like = None if proj_bias is None or proj_weight is None else proj_bias
    return [like(h_teacher, need_h_teacher), like(h_student, need_h_student), like(proj_weight), like(proj_bias_like),
            like(w1), like(b1_like), like(w2), like(b2_like)]


def _setup_context(ctx, inputs, output) -> None:
    h_teacher, h_student, proj_weight, proj_bias, w1, _b1, w2, _b2, _labels, _competitive, backend = inputs
    _loss, _z_t, _z_s, dlogits, hidden_pre, projected = output
    ctx.save_for_backward(dlogits, h_teacher, h_student, proj_weight, proj_bias, w1, w2, hidden_pre, projected)
    ctx.backend = backend
    ctx.has = tuple(t is not None for t in inputs[:8])


def _backward(ctx, bwd, grad_loss: Tensor, *_unused_grads: Tensor):
    grads = bwd(grad_loss, *ctx.saved_tensors, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    wanted = [has and need for has, need in zip(ctx.has, ctx.needs_input_grad[:8])]
    return (*[g if keep else None for g, keep in zip(grads, wanted)], None, None, None)


META_TEACHER_LOSS = FusedOp("meta_teacher_loss", "meta_teacher", meta_teacher_loss_fwd, meta_teacher_loss_bwd,
                            _setup_context, _backward, non_differentiable_outputs=(1, 2, 3, 4, 5))
META_TEACHER_LOSS.register_autograd()
