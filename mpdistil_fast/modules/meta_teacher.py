"""``MetaTeacher``: the MPDistil meta-teacher (discriminator) as an nn.Module around the fused loss."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mpdistil_fast.functional.meta_teacher_loss import MetaTeacherOutput, meta_teacher_logits, meta_teacher_loss
from mpdistil_fast.modules import NotScriptable


class MetaTeacher(NotScriptable, nn.Module):
    """Classifier D over pooled representations, trained collaboratively or competitively: MPDistil's meta-teacher
    (Sengupta et al., "A Good Learner can Teach Better: Teacher-Student Collaborative Knowledge Distillation",
    ICLR 2024).  With z_T = D(h_teacher), z_S = D(h_student) and p_D(y | h) the softmax probability of the gold
    label, means over the batch:

        collaborative:  0.5 CE(z_T, y) + 0.5 CE(z_S, y)
        competitive:    CE(z_T, y) - mean p_D(y | h_teacher) + mean p_D(y | h_student)

    D is ``nn.Linear(in_features, num_labels)``, or ``Linear(in_features, hidden) -> GELU -> Linear(hidden,
    num_labels)`` when ``hidden`` is given.  When ``student_features`` differs from ``in_features`` (a narrower
    student), a learned ``nn.Linear(student_features, in_features)`` maps the student state to the teacher width
    inside the fused op.  ``forward`` returns a :class:`MetaTeacherOutput` (``.loss``, ``.teacher_logits``,
    ``.student_logits``); :meth:`logits` scores one representation differentiably.  ``validate_labels=False``
    skips the label-range check (see :func:`mpdistil_fast.meta_teacher_loss`).

    ``multiple_choice=True`` (a task such as COPA, whose ``num_labels`` choices each have their own pooled
    representation, inputs ``[B, num_labels, H]``): D scores each choice with one output and no output bias,
    ``z_c = D(h_c)``, and the logits over an example's choices are ``[B, num_labels]``.  The fused op runs unchanged
    on the choices concatenated, ``[B, C * H]``, with block-diagonal copies of D's layers (``I_C kron W``; GELU is
    elementwise, so this is D applied to each choice), and its gradients flow back to the one shared D.

    Args:
        in_features: width H of the teacher representation (D's input).
        num_labels: number of classes K (multiple choice: choices C).
        hidden: width of D's hidden layer; None: D is linear.
        student_features: width of the student representation, when it differs from ``in_features``.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.
        validate_labels: check that every label indexes a logit (a host synchronisation on a GPU).
        multiple_choice: score each choice's representation (see above).

    Example::

        >>> import torch, mpdistil_fast
        >>> meta_teacher = mpdistil_fast.MetaTeacher(32, 3, hidden=16, student_features=8)
        >>> out = meta_teacher(torch.randn(4, 32), torch.randn(4, 8), torch.tensor([0, 2, 1, 0]), mode="competitive")
        >>> out.loss.backward()                         # gradients of D and of the student projection
        >>> out.teacher_logits.shape, meta_teacher.logits(torch.randn(4, 8)).shape
        (torch.Size([4, 3]), torch.Size([4, 3]))
    """

    def __init__(self, in_features: int, num_labels: int, hidden: Optional[int] = None,
                 student_features: Optional[int] = None, backend: str = "auto", validate_labels: bool = True,
                 multiple_choice: bool = False) -> None:
        super().__init__()
        self.in_features, self.num_labels, self.hidden_features = in_features, num_labels, hidden
        self.multiple_choice = multiple_choice
        self.hidden = nn.Linear(in_features, hidden) if hidden is not None else None
        # A choice scorer has one output and no bias (adding one score to every choice changes no softmax).
        self.classifier = nn.Linear(hidden if hidden is not None else in_features, 1 if multiple_choice else num_labels,
                                    bias=not multiple_choice)
        needs_projection = student_features is not None and student_features != in_features
        self.student_projection = nn.Linear(student_features, in_features) if needs_projection else None
        self.backend, self.validate_labels = backend, validate_labels

    def extra_repr(self) -> str:
        return (f"num_labels={self.num_labels}, multiple_choice={self.multiple_choice}, "
                f"validate_labels={self.validate_labels}, backend={self.backend!r}")

    def _per_example(self, layer: nn.Linear) -> tuple[Tensor, Tensor]:
        """(weight, bias) of ``layer``, for multiple choice as one block per choice (``I_C kron W``, b repeated;
        zeros for the scorer's missing bias)."""
        if not self.multiple_choice:
            return layer.weight, layer.bias
        weight = layer.weight
        eye = torch.eye(self.num_labels, dtype=weight.dtype, device=weight.device)
        bias = layer.bias if layer.bias is not None else weight.new_zeros(weight.shape[0])
        return torch.kron(eye, weight), bias.repeat(self.num_labels)

    def _params(self) -> tuple:
        if self.hidden is None:
            return self._per_example(self.classifier)
        (w1, b1), (w2, b2) = self._per_example(self.hidden), self._per_example(self.classifier)
        return (w1, w2), (b1, b2)

    def _hidden_width(self) -> Optional[int]:
        if self.hidden_features is None:
            return None
        return self.hidden_features * (self.num_labels if self.multiple_choice else 1)

    def _projection(self) -> Optional[tuple[Tensor, Tensor]]:
        return None if self.student_projection is None else self._per_example(self.student_projection)

    def _rows(self, name: str, h: Tensor) -> Tensor:
        """``h`` as the fused op's rows, in this module's dtype (a representation may come in another, e.g. an fp32
        teacher cache beside a bf16 DeepSpeed engine): for multiple choice ``[B, C, H]`` -> ``[B, C * H]``."""
        h = h.to(next(self.parameters()).dtype)
        if not self.multiple_choice:
            return h
        if h.dim() != 3 or h.shape[1] != self.num_labels:
            raise ValueError(f"{name} must be [B, {self.num_labels}, H] (one representation per choice), got shape "
                             f"{tuple(h.shape)}")
        return h.reshape(h.shape[0], -1)

    def forward(self, h_teacher: Tensor, h_student: Tensor, labels: Tensor,
                mode: str = "collaborative") -> MetaTeacherOutput:
        """The meta-teacher's loss on one batch (:func:`mpdistil_fast.meta_teacher_loss`) and its detached logits.

        Args:
            h_teacher: pooled teacher states ``[B, in_features]`` (multiple choice: ``[B, num_labels,
                in_features]``), cast to the module's dtype.
            h_student: pooled student states of the same layout, ``student_features`` wide when a projection
                was made (pass them detached to train D alone).
            labels: int64 / int32 ``[B]`` in ``[0, num_labels)``.
            mode: ``"collaborative"`` (0.5 CE(z_T, y) + 0.5 CE(z_S, y)) or ``"competitive"`` (CE(z_T, y) - mean
                p_D(y | h_T) + mean p_D(y | h_S)).

        Returns:
            :class:`MetaTeacherOutput`: ``loss`` (0-d, float32; float64 for float64 parameters), and
            ``teacher_logits`` / ``student_logits`` ``[B, num_labels]`` (detached).

        Raises:
            ValueError / TypeError naming the argument (shapes, dtypes, ``mode``, labels out of range when
            ``validate_labels``).
        """
        weight, bias = self._params()
        return meta_teacher_loss(self._rows("h_teacher", h_teacher), self._rows("h_student", h_student), weight, bias,
                                 labels, mode=mode, hidden=self._hidden_width(), student_projection=self._projection(),
                                 return_logits=True, validate_labels=self.validate_labels, backend=self.backend)

    def logits(self, h: Tensor) -> Tensor:
        """D(h) for one ``[B, H]`` representation (multiple choice: ``[B, C, H]`` -> ``[B, C]``), differentiable in
        ``h`` and D's parameters; a student state of width ``student_features`` is projected first.  Returns
        ``[B, num_labels]`` logits in the module's dtype."""
        projection = self._projection() if self.student_projection is not None and \
            h.shape[-1] == self.student_projection.in_features else None
        weight, bias = self._params()
        return meta_teacher_logits(self._rows("h", h), weight, bias, hidden=self._hidden_width(), projection=projection)
