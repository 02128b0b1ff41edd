"""``MetaTeacher``: the MPDistil meta-teacher (discriminator) as an nn.Module around the fused loss."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from mpdistil_fast.functional.meta_teacher_loss import MetaTeacherOutput, meta_teacher_logits, meta_teacher_loss


class MetaTeacher(nn.Module):
    """Classifier D over pooled representations, trained collaboratively or competitively (Sengupta et al., 2024).

    D is ``nn.Linear(in_features, num_labels)``, or ``Linear(in_features, hidden) -> GELU -> Linear(hidden,
    num_labels)`` when ``hidden`` is given.  When ``student_features`` differs from ``in_features`` (a narrower
    student), a learned ``nn.Linear(student_features, in_features)`` maps the student state to the teacher width
    inside the fused op.  ``forward`` returns a :class:`MetaTeacherOutput` (``.loss``, ``.teacher_logits``,
    ``.student_logits``); :meth:`logits` scores one representation differentiably.  ``validate_labels=False``
    skips the label-range check (see :func:`mpdistil_fast.meta_teacher_loss`).
    """

    def __init__(self, in_features: int, num_labels: int, hidden: Optional[int] = None,
                 student_features: Optional[int] = None, backend: str = "auto", validate_labels: bool = True) -> None:
        super().__init__()
        self.in_features, self.num_labels, self.hidden_features = in_features, num_labels, hidden
        self.hidden = nn.Linear(in_features, hidden) if hidden is not None else None
        self.classifier = nn.Linear(hidden if hidden is not None else in_features, num_labels)
        needs_projection = student_features is not None and student_features != in_features
        self.student_projection = nn.Linear(student_features, in_features) if needs_projection else None
        self.backend, self.validate_labels = backend, validate_labels

    def _params(self) -> tuple:
        if self.hidden is None:
            return self.classifier.weight, self.classifier.bias
        return (self.hidden.weight, self.classifier.weight), (self.hidden.bias, self.classifier.bias)

    def _projection(self) -> Optional[tuple[Tensor, Tensor]]:
        proj = self.student_projection
        return None if proj is None else (proj.weight, proj.bias)

    def forward(self, h_teacher: Tensor, h_student: Tensor, labels: Tensor,
                mode: str = "collaborative") -> MetaTeacherOutput:
        weight, bias = self._params()
        return meta_teacher_loss(h_teacher, h_student, weight, bias, labels, mode=mode, hidden=self.hidden_features,
                                 student_projection=self._projection(), return_logits=True,
                                 validate_labels=self.validate_labels, backend=self.backend)

    def logits(self, h: Tensor) -> Tensor:
        """D(h) for one ``[B, H]`` representation; a student state of width ``student_features`` is projected."""
        projection = self._projection() if self.student_projection is not None and \
            h.shape[-1] == self.student_projection.in_features else None
        weight, bias = self._params()
        return meta_teacher_logits(h, weight, bias, hidden=self.hidden_features, projection=projection)
