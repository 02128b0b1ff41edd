"""Public temperature-softmax KD loss: ``mpdistil_fast.kd_kl_div`` (Hinton et al., 2015; generalized JSD of
Agarwal et al., 2024)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from mpdistil_fast._validation import (check_choice, check_mask, check_positive_finite, check_same_device,
                                       check_same_shape, check_tensor, check_unit_interval, promote_pair)
from mpdistil_fast.ops.common import resolve_backend_traceable
from mpdistil_fast.ops.kd_kl_div import kd_kl_div_op

REDUCTIONS = ("batchmean", "sum", "mean", "none")
DIRECTIONS = ("forward", "reverse", "jsd")
#: beta of ``direction="jsd"`` when none is given: the symmetric Jensen-Shannon divergence.
DEFAULT_JSD_BETA = 0.5


def kd_kl_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, *,
              reduction: str = "batchmean", scale_by_t2: bool = True, mask: Optional[Tensor] = None,
              direction: str = "forward", beta: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Knowledge-distillation loss between temperature-softened distributions: forward or reverse KL (Hinton et al.,
    2015) or the generalized Jensen-Shannon divergence (Agarwal et al., 2024).

    With p_s = softmax(student_logits / T) and p_t = softmax(teacher_logits / T) over the last dimension V,
    each row ``r`` of the leading dimensions ``[...]`` gives

        forward:  l_r = KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)      (Hinton KD; ``F.kl_div(log p_s, p_t)``)
        reverse:  l_r = KL(p_s || p_t)
        jsd:      l_r = beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
                  (generalized JSD of GKD, Agarwal et al. 2024; beta = 0.5 is the symmetric JSD)

    multiplied by T^2 when ``scale_by_t2`` (the usual KD convention: the soft-target gradients scale as 1/T^2 for large
    T, Hinton et al. Sec. 2, so the factor keeps their size roughly independent of T; pass ``scale_by_t2=False`` for
    parity with libraries that do not scale).  ``reduction``: ``"batchmean"`` =
    sum of l_r over valid rows / number of valid rows (every leading position is a row, so ``[B, L, V]`` is
    averaged over B*L rows); ``"sum"``; ``"mean"`` = sum / (valid rows * V) (torch's elementwise mean);
    ``"none"`` = l_r with shape ``[...]``.

    Args:
        student_logits, teacher_logits: ``[..., V]`` float32/bfloat16/float16/float64 logits of the same shape, on
            one device, any strides (different dtypes are promoted to the wider one).  Accumulation is fp32 (fp64
            for float64 inputs) and the loss is float32 (float64 for float64 inputs).
        temperature: T > 0, finite.
        mask: optional bool ``[...]``; False rows contribute nothing and are not counted. All-False gives exactly 0
            loss and zero gradients, as a batch with no rows does (``F.kl_div``'s batchmean gives NaN there).
        direction: ``"forward"``, ``"reverse"`` or ``"jsd"``.
        beta: only for ``direction="jsd"`` (default 0.5), in [0, 1].  As in GKD's reference code (TRL) and
            Liger-Kernel, the end points mean the plain KLs: beta = 0 is ``"forward"``, beta = 1 is ``"reverse"``
            (the JSD itself vanishes there).
        backend: ``"auto"`` (fastest available; env ``MPDISTIL_BACKEND`` overrides), ``"torch"``, ``"cpp"``,
            ``"triton"`` or ``"cuda"``.  Fused backends differentiate once, in both inputs (the teacher gradient
            comes from the same pass); double backward needs ``backend="torch"``.

    Teacher entries of -inf (masked vocabulary) have p_t = 0 and contribute 0 in forward KL; a row whose weighting
    logits (teacher for forward, student for reverse) are all -inf has no distribution and contributes 0; mass where
    the other distribution has none (its logits -inf there, or in the whole row) gives +inf.  The JSD
    is finite whatever the supports (p = 0 entries leave their KL term); a row whose teacher or student logits are
    all -inf contributes 0.  A NaN logit makes its row's loss and gradients NaN (KL and JSD; unless the other row is
    all -inf: see the README).

    Returns:
        A 0-d tensor, or ``[...]`` for ``reduction="none"`` (masked rows 0); float32, float64 for float64 inputs.
        Differentiable in both logits.

    Raises:
        TypeError / ValueError naming the argument: a non-floating or non-tensor input, shapes or devices that
        differ, an empty vocabulary dimension, a mask of the wrong shape or dtype, T <= 0 or not finite, an unknown
        ``reduction`` / ``direction`` / ``backend``, ``beta`` outside [0, 1] or given without ``direction="jsd"``, a
        backend that cannot run here (the message says why); RuntimeError on double backward through a fused
        backend.

    Example::

        >>> import torch, torch.nn.functional as F, mpdistil_fast
        >>> student, teacher = torch.randn(4, 7, 32, requires_grad=True), torch.randn(4, 7, 32)   # [B, L, V]
        >>> loss = mpdistil_fast.kd_kl_div(student, teacher, temperature=2.0)    # mean over the 28 rows, times T^2
        >>> reference = 4.0 * F.kl_div(F.log_softmax(student / 2, -1), F.softmax(teacher / 2, -1),
        ...                            reduction="sum") / 28
        >>> torch.allclose(loss, reference, atol=1e-5)
        True
        >>> mpdistil_fast.kd_kl_div(student, teacher, 2.0, direction="jsd", reduction="none").shape
        torch.Size([4, 7])
    """
    check_tensor("student_logits", student_logits)
    check_tensor("teacher_logits", teacher_logits)
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits must have a non-empty last (vocabulary) dimension, got shape "
                         f"{tuple(student_logits.shape)}")
    device = check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    if mask is not None:
        mask = check_mask(mask, student_logits.shape[:-1], device)
    temperature = check_positive_finite("temperature", temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("direction", direction, DIRECTIONS)
    if direction != "jsd" and beta is not None:
        raise ValueError(f"beta is only used with direction='jsd', got beta={beta!r} with direction={direction!r}")
    if direction == "jsd":
        beta = check_unit_interval("beta", DEFAULT_JSD_BETA if beta is None else beta)
        if beta in (0.0, 1.0):  # the GKD / TRL / Liger convention for the end points
            direction, beta = ("forward" if beta == 0.0 else "reverse"), None
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2 must be a bool, got {type(scale_by_t2).__name__}")
    chosen = resolve_backend_traceable(backend, "kd_jsd" if direction == "jsd" else "kd_kl_div", device)
    student_logits, teacher_logits = promote_pair(student_logits, teacher_logits)
    return kd_kl_div_op(student_logits, teacher_logits, temperature, reduction, scale_by_t2, mask, direction, beta,
                        chosen)
