"""``KDLoss``: the temperature-softmax KD loss as an nn.Module (a drop-in criterion)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from mpdistil_fast.functional.kd_kl_div import kd_kl_div
from mpdistil_fast.modules import NotScriptable


class KDLoss(NotScriptable, nn.Module):
    """``KDLoss(temperature, ...)(student_logits, teacher_logits, mask=None)`` = :func:`mpdistil_fast.kd_kl_div`
    with the configuration fixed at construction (Hinton et al., 2015)."""

    def __init__(self, temperature: float = 1.0, *, reduction: str = "batchmean", scale_by_t2: bool = True,
                 direction: str = "forward", beta: Optional[float] = None, backend: str = "auto") -> None:
        super().__init__()
        self.temperature, self.reduction, self.scale_by_t2 = temperature, reduction, scale_by_t2
        self.direction, self.beta, self.backend = direction, beta, backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return kd_kl_div(student_logits, teacher_logits, self.temperature, reduction=self.reduction,
                         scale_by_t2=self.scale_by_t2, mask=mask, direction=self.direction, beta=self.beta,
                         backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, scale_by_t2={self.scale_by_t2}, "
                f"direction={self.direction!r}, beta={self.beta}, backend={self.backend!r}")
