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

    Args:
        student_features, teacher_features: widths H_s, H_t of a learned projection (both or neither).
        normalize: L2-normalise each (projected) student and teacher state before the squared error (patient KD).
        layer_map: which student layer matches which teacher layer (stacked inputs): None (layer k to k),
            ``"skip"`` / ``"last"`` (patient KD's presets), a teacher index per student layer or (student, teacher)
            pairs; see :func:`mpdistil_fast.functional.hidden_mse.layer_pairs`.
        reduction: ``"mean"`` (per element of the valid positions, H_t and the layer pairs), ``"sum"`` or
            ``"none"`` (one value per layer pair).
        bias: whether the projection has a bias.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.

    Example::

        >>> import torch, mpdistil_fast
        >>> criterion = mpdistil_fast.HiddenMSELoss(16, 32, normalize=True, layer_map="skip")
        >>> student, teacher = torch.randn(3, 2, 5, 16), torch.randn(6, 2, 5, 32)   # [L, B, S, H]
        >>> criterion(student, teacher, mask=torch.ones(2, 5, dtype=torch.bool)).shape
        torch.Size([])
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
        """The loss between ``[L, B, S, H]`` layer stacks, ``[B, S, H]`` token states or ``[B, H]`` pooled states
        (``mask``: bool ``[B, S]`` / ``[B]``, True = keep), reduced as configured (see
        :func:`mpdistil_fast.hidden_mse`, whose errors it raises)."""
        projection = None if self.projection is None else (self.projection.weight, self.projection.bias)
        return hidden_mse(student_hidden, teacher_hidden, mask=mask, normalize=self.normalize, projection=projection,
                          layer_map=self.layer_map, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"normalize={self.normalize}, layer_map={self.layer_map!r}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
