"""Public MPDistil meta-teacher loss and logits: ``mpdistil_fast.meta_teacher_loss`` / ``meta_teacher_logits``."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from mpdistil_fast._validation import check_choice, check_same_device, check_tensor, promote_pair
from mpdistil_fast.functional.hidden_mse import Projection, projection_parts
from mpdistil_fast.ops.common import call_fused, graph_capture, resolve_backend_traceable
from mpdistil_fast.ops.meta_teacher_loss import (META_TEACHER_LOSS, check_label_range, discriminator_logits,
                                              meta_teacher_loss_torch)

MODES = ("collaborative", "competitive")
Params = Union[Tensor, tuple[Tensor, Tensor]]


class MetaTeacherOutput(NamedTuple):
    """The loss and the (detached) logits of the meta-teacher on the teacher and on the student representation."""

    loss: Tensor
    teacher_logits: Tensor
    student_logits: Tensor


def _check_shape(name: str, value: object, shape: tuple[int, ...]) -> Tensor:
    """``value`` must be a floating tensor of exactly ``shape``."""
    check_tensor(name, value)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    return value


def _check_bias(name: str, value: object, weight_name: str, weight: Tensor) -> Tensor:
    """``value`` must be a floating ``[rows of weight]`` tensor of ``weight``'s dtype (the fused kernels compute a
    layer's gradients together and return them in its weight's dtype)."""
    _check_shape(name, value, (weight.shape[0],))
    if value.dtype != weight.dtype:
        raise TypeError(f"{name} must have the dtype of {weight_name}, {weight.dtype}, got {value.dtype}")
    return value


def discriminator_parts(weight: Params, bias: Params, hidden: Optional[int],
                        in_features: int) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(W1, b1, W2, b2) of the discriminator after checking shapes: ``weight [K, H]`` and ``bias [K]`` for a linear
    D, or ``weight = (W1 [hidden, H], W2 [K, hidden])`` and ``bias = (b1 [hidden], b2 [K])`` when ``hidden``."""
    if hidden is None:
        check_tensor("weight", weight)
        if weight.dim() != 2 or weight.shape[1] != in_features or weight.shape[0] < 1:
            raise ValueError(f"weight must be [num_labels, {in_features}] (the representation width), got "
                             f"{tuple(weight.shape)}")
        return weight, _check_bias("bias", bias, "weight", weight), None, None
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be None or a positive int, got {hidden!r}")
    if not (isinstance(weight, (tuple, list)) and len(weight) == 2 and isinstance(bias, (tuple, list))
            and len(bias) == 2):
        raise TypeError("with hidden set, weight and bias must be (first, second) layer pairs")
    w1 = _check_shape("weight[0]", weight[0], (hidden, in_features))
    check_tensor("weight[1]", weight[1])
    if weight[1].dim() != 2 or weight[1].shape[1] != hidden or weight[1].shape[0] < 1:
        raise ValueError(f"weight[1] must be [num_labels, {hidden}], got {tuple(weight[1].shape)}")
    return w1, _check_bias("bias[0]", bias[0], "weight[0]", w1), weight[1], _check_bias("bias[1]", bias[1],
                                                                                        "weight[1]", weight[1])


def meta_teacher_logits(h: Tensor, weight: Params, bias: Params, *, hidden: Optional[int] = None,
                        projection: Projection = None) -> Tensor:
    """Differentiable meta-teacher logits D(h) of one ``[B, H]`` representation (e.g. to score a quiz batch);
    ``projection = (P [H, H_s], c [H])`` (or P alone) first maps a narrower ``[B, H_s]`` student state to the
    discriminator width.  ``weight`` / ``bias`` / ``hidden`` as in :func:`meta_teacher_loss`.  Returns ``[B, K]``
    logits in the dtype of ``h`` and the parameters (plain torch ops: differentiable to any order)."""
    check_tensor("h", h)
    if h.dim() != 2:
        raise ValueError(f"h must be [B, H], got shape {tuple(h.shape)}")
    proj_weight, proj_bias = projection_parts(projection)
    if proj_weight is not None:
        h = torch.nn.functional.linear(h, proj_weight, proj_bias)
    w1, b1, w2, b2 = discriminator_parts(weight, bias, hidden, h.shape[1])
    return discriminator_logits(h, w1, b1, w2, b2)


def meta_teacher_loss(h_teacher: Tensor, h_student: Tensor, weight: Params, bias: Params, labels: Tensor, *,
                      mode: str = "collaborative", hidden: Optional[int] = None,
                      student_projection: Projection = None, return_logits: bool = False,
                      validate_labels: bool = True, backend: str = "auto") -> Union[Tensor, MetaTeacherOutput]:
    """MPDistil meta-teacher loss (Sengupta et al., ICLR 2024), fused: both discriminator passes, loss, gradients.

    z_T = D(h_teacher), z_S = D(h_student') with D linear (``weight [K, H]``, ``bias [K]``) or Linear -> GELU ->
    Linear (``hidden`` set, ``weight = (W1, W2)``, ``bias = (b1, b2)``) and h_student' = h_student P^T + c when
    ``student_projection = (P [H, H_s], c)`` (a narrower student).  Means over the batch, p_D the softmax
    probability of the gold label:

        collaborative:  0.5 CE(z_T, y) + 0.5 CE(z_S, y)
        competitive:    CE(z_T, y) - mean p_D(y | h_teacher) + mean p_D(y | h_student)

    Gradients flow to the discriminator and projection parameters and to h_teacher / h_student when they require
    grad.  h_teacher and h_student of different dtypes are promoted to the wider one.  Returns the loss (float64
    for float64 inputs, else float32), or with ``return_logits=True`` a :class:`MetaTeacherOutput` whose logits
    (in the inputs' dtype) are detached, for rewards and metrics.

    Args:
        h_teacher, h_student: floating ``[B, H]`` and ``[B, H_s]`` pooled representations, B >= 1 (H_s = H unless
            ``student_projection`` is given).
        weight, bias: D's parameters, floating, each bias in its weight's dtype (see above for the shapes).
        labels: int64 or int32 ``[B]`` class ids in ``[0, K)``.
        mode: ``"collaborative"`` or ``"competitive"``.
        hidden: width of D's hidden layer, or None for a linear D.
        student_projection: None, ``P`` or ``(P, c)``.
        return_logits: return a :class:`MetaTeacherOutput` instead of the loss alone.
        validate_labels: see below.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.

    Raises:
        TypeError / ValueError naming the argument: shapes, dtypes or devices that do not match, an empty batch, an
        unknown ``mode`` or backend, labels out of range (when checked).

    ``validate_labels`` checks that every label indexes a logit (a ValueError otherwise).  On a GPU that check is a
    min/max reduction and a host synchronisation in front of the fused kernel; a loop whose labels are known to be
    valid can pass ``False``, so that the Triton backend's forward is a single kernel launch.  Out-of-range labels
    then give a meaningless loss (triton), a NaN loss (cuda) or the backend's own error (cpp, torch), never an
    out-of-bounds read.  Under torch.compile, torch.export and torch.jit.trace the fused op always checks.

    Example::

        >>> import torch, torch.nn.functional as F, mpdistil_fast
        >>> h_t, h_s, y = torch.randn(6, 16), torch.randn(6, 16), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> w, b = torch.randn(3, 16, requires_grad=True), torch.zeros(3, requires_grad=True)
        >>> loss = mpdistil_fast.meta_teacher_loss(h_t, h_s, w, b, y)              # collaborative
        >>> torch.allclose(loss, 0.5 * F.cross_entropy(h_t @ w.T + b, y) + 0.5 * F.cross_entropy(h_s @ w.T + b, y),
        ...                atol=1e-5)
        True
    """
    check_tensor("h_teacher", h_teacher)
    check_tensor("h_student", h_student)
    check_tensor("labels", labels, floating=False)
    check_choice("mode", mode, MODES)
    if h_teacher.dim() != 2 or h_student.dim() != 2:
        raise ValueError(f"h_teacher and h_student must be [B, H], got shapes {tuple(h_teacher.shape)} and "
                         f"{tuple(h_student.shape)}")
    if h_teacher.shape[0] == 0:
        raise ValueError("h_teacher: empty batch (the loss is a mean over the batch)")
    if h_student.shape[0] != h_teacher.shape[0] or tuple(labels.shape) != (h_teacher.shape[0],):
        raise ValueError(f"h_student and labels must have the batch size of h_teacher ({h_teacher.shape[0]}), got "
                         f"{tuple(h_student.shape)} and labels {tuple(labels.shape)}")
    h_teacher, h_student = promote_pair(h_teacher, h_student)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
    width = h_teacher.shape[1]
    proj_weight, proj_bias = projection_parts(student_projection, "student_projection")
    if proj_weight is None:
        if h_student.shape[1] != width:
            raise ValueError(f"h_student width {h_student.shape[1]} != h_teacher width {width}: pass a "
                             "student_projection")
    else:
        _check_shape("student_projection weight", proj_weight, (width, h_student.shape[1]))
        if proj_bias is not None:
            _check_bias("student_projection bias", proj_bias, "student_projection weight", proj_weight)
    w1, b1, w2, b2 = discriminator_parts(weight, bias, hidden, width)
    classes = (w2 if w2 is not None else w1).shape[0]
    first, second = ("weight", "bias") if w2 is None else ("weight[0]", "bias[0]")
    device = check_same_device(h_teacher=h_teacher, h_student=h_student, labels=labels, **{first: w1, second: b1},
                               **{"weight[1]": w2, "bias[1]": b2}, student_projection=proj_weight,
                               student_projection_bias=proj_bias)
    if validate_labels and not graph_capture():  # when a graph is captured, the custom op's body checks
        check_label_range(labels, classes)
    chosen = resolve_backend_traceable(backend, "meta_teacher_loss", device)
    competitive = mode == "competitive"
    if chosen == "torch":
        loss, z_t, z_s = meta_teacher_loss_torch(h_teacher, h_student, proj_weight, proj_bias, w1, b1, w2, b2,
                                                 labels, competitive)
    else:
        loss, z_t, z_s = call_fused(META_TEACHER_LOSS, h_teacher, h_student, proj_weight, proj_bias, w1, b1, w2, b2,
                                    labels, competitive, chosen)[:3]
    return MetaTeacherOutput(loss, z_t.detach(), z_s.detach()) if return_logits else loss
