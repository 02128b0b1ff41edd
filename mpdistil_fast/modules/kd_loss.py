"""``KDLoss``: the temperature-softmax KD loss as an nn.Module (a drop-in criterion)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from mpdistil_fast.functional.kd_kl_div import kd_kl_div
from mpdistil_fast.modules import NotScriptable


class KDLoss(NotScriptable, nn.Module):
    """Temperature-softmax distillation loss as a criterion: ``KDLoss(temperature, ...)(student_logits,
    teacher_logits, mask=None)`` is :func:`mpdistil_fast.kd_kl_div` with the configuration fixed at construction.

    The default is Hinton et al. (2015), "Distilling the Knowledge in a Neural Network": per row
    ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over the rows (``"batchmean"``); ``direction`` gives the
    reverse KL or the generalized JSD of GKD (Agarwal et al., ICLR 2024).  The module has no parameters and checks
    its arguments at the first call (the function's checks and errors).

    Args:
        temperature: T > 0.
        reduction: ``"batchmean"`` (sum over valid rows / their number), ``"sum"``, ``"mean"`` (/ (rows * V)) or
            ``"none"`` (per-row losses ``[...]``).
        scale_by_t2: multiply by T^2 (the KD convention).
        direction: ``"forward"`` KL(p_t || p_s), ``"reverse"`` KL(p_s || p_t) or ``"jsd"``.
        beta: the JSD's mixture weight in [0, 1] (``direction="jsd"`` only; default 0.5).
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.

    Example::

        >>> import torch, mpdistil_fast
        >>> criterion = mpdistil_fast.KDLoss(temperature=2.0)
        >>> student = torch.randn(8, 10, requires_grad=True)
        >>> loss = criterion(student, torch.randn(8, 10))    # a 0-d float32 tensor
        >>> loss.backward()
    """

    def __init__(self, temperature: float = 1.0, *, reduction: str = "batchmean", scale_by_t2: bool = True,
                 direction: str = "forward", beta: Optional[float] = None, backend: str = "auto") -> None:
        super().__init__()
        self.temperature, self.reduction, self.scale_by_t2 = temperature, reduction, scale_by_t2
        self.direction, self.beta, self.backend = direction, beta, backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The loss of ``[..., V]`` logits (same shape, one device), rows masked out where the bool ``mask [...]``
        is False; a 0-d tensor, or ``[...]`` for ``reduction="none"`` (float32; float64 for float64 logits).
        Raises what :func:`mpdistil_fast.kd_kl_div` raises (ValueError / TypeError naming the argument)."""
        return kd_kl_div(student_logits, teacher_logits, self.temperature, reduction=self.reduction,
                         scale_by_t2=self.scale_by_t2, mask=mask, direction=self.direction, beta=self.beta,
                         backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, scale_by_t2={self.scale_by_t2}, "
                f"direction={self.direction!r}, beta={self.beta}, backend={self.backend!r}")
