"""``HiddenMSELoss``: the hidden-state MSE as an nn.Module that owns the optional student -> teacher projection."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from mpdistil_fast.functional.hidden_mse import LayerMap, hidden_mse
from mpdistil_fast.modules import NotScriptable


class HiddenMSELoss(NotScriptable, nn.Module):
    """Hint / patient-KD loss between student and teacher hidden states (see :func:`mpdistil_fast.hidden_mse`).

    When ``student_features`` and ``teacher_features`` are both given, a learned ``nn.Linear(student_features,
    teacher_features)`` maps the student states to the teacher width inside the fused op (FitNets regressor,
    TinyBERT's W_h); otherwise the widths must already agree.
    """

    def __init__(self, student_features: Optional[int] = None, teacher_features: Optional[int] = None, *,
                 normalize: bool = False, layer_map: LayerMap = None, reduction: str = "mean", bias: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        if (student_features is None) != (teacher_features is None):
            raise ValueError("give both student_features and teacher_features (for a projection) or neither")
        self.projection = nn.Linear(student_features, teacher_features, bias=bias) if student_features else None
        self.normalize, self.layer_map, self.reduction, self.backend = normalize, layer_map, reduction, backend

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        projection = None if self.projection is None else (self.projection.weight, self.projection.bias)
        return hidden_mse(student_hidden, teacher_hidden, mask=mask, normalize=self.normalize, projection=projection,
                          layer_map=self.layer_map, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"normalize={self.normalize}, layer_map={self.layer_map!r}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
