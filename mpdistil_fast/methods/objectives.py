"""Student objectives of the KD family, built on the project's fused losses.

* ``finetune``: cross-entropy on the labels only.
* ``kd`` (Hinton et al., 2015): ``(1 - alpha) CE(z_s, y) + alpha KL(softmax(z_t/T) || softmax(z_s/T))`` (the fused
  :func:`mpdistil_fast.kd_kl_div`, which applies the ``T^2`` factor); ``direction`` picks the reverse KL or the
  generalized JSD with weight ``jsd_beta`` (GKD, Agarwal et al., 2024) instead.
* ``pkd`` (Sun et al., EMNLP 2019, "Patient Knowledge Distillation for BERT Model Compression"): ``kd`` plus
  ``beta * mean_{i, j, d} (h_s^{i,j}/||h_s^{i,j}|| - h_t^{i,m(j)}/||h_t^{i,m(j)}||)_d^2`` over the [CLS] states of
  the batch rows i, the student's layers j and the teacher layers m(j) they are mapped to (PKD-skip or PKD-last),
  and the H hidden units d, via :class:`mpdistil_fast.HiddenMSELoss`.  For a model pooled otherwise than by its
  first token (a decoder's ``last``: the last attended token; ``mean``: the masked mean over the tokens), the states
  at its pooling position replace [CLS] (:meth:`mpdistil_fast.models.TaskModel.pooled_layer_states`).  The paper
  writes the sum over rows and layers of the squared distances; its released code takes this elementwise mean
  (``F.mse_loss``), which is what its beta values (and this project's ``distill.beta``) weight: the sum is
  B * (mapped layers) * H times larger.

MetaDistil and MPDistil use these same objectives for the student (see :mod:`mpdistil_fast.pipeline.stages` and
:mod:`.mpdistil`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import mpdistil_fast


@dataclass
class LossParts:
    """The total loss and its parts (floats, for logging)."""

    loss: torch.Tensor
    parts: dict[str, float]


class StudentObjective(nn.Module):
    """The student's loss for one method (module docstring); holds the hidden-state loss (and its projection, when
    sizes differ).  Called as ``objective(student_logits, labels, teacher_logits=..., student_hidden=...,
    teacher_hidden=...)``, it returns :class:`LossParts`."""

    def __init__(self, method: str, *, alpha: float = 0.5, temperature: float = 2.0, direction: str = "forward",
                 jsd_beta: float = 0.5, beta: float = 0.0, layer_map: str = "skip", student_hidden: int | None = None,
                 teacher_hidden: int | None = None, backend: str = "auto") -> None:
        """
        Args:
            method: ``"finetune"``, ``"kd"`` or ``"pkd"``.
            alpha: weight of the KD term, in [0, 1] (1 - alpha weights the CE).
            temperature: T > 0 of the KD term (which is multiplied by T^2).
            direction: ``"forward"``, ``"reverse"`` or ``"jsd"`` (:func:`mpdistil_fast.kd_kl_div`).
            jsd_beta: the JSD's beta (``direction="jsd"`` only).
            beta: weight of the patient hidden-state loss (``"pkd"``).
            layer_map: patient KD's ``"skip"`` or ``"last"`` teacher layers.
            student_hidden, teacher_hidden: layer widths; a learned projection maps the student's to the teacher's
                when they differ.
            backend: of the KD and hidden-state losses (``"torch"`` where a hypergradient differentiates them twice
                or in forward mode, which the fused kernels do not support).
        """
        super().__init__()
        if method not in ("finetune", "kd", "pkd"):
            raise ValueError(f"method must be one of ('finetune', 'kd', 'pkd'), got {method!r}")
        self.method = method
        self.alpha = alpha
        self.temperature = temperature
        self.direction = direction
        self.jsd_beta = jsd_beta if direction == "jsd" else None
        self.beta = beta
        self.backend = backend
        self.hidden_loss = None
        if method == "pkd":
            project = student_hidden is not None and student_hidden != teacher_hidden
            self.hidden_loss = mpdistil_fast.HiddenMSELoss(student_hidden if project else None,
                                                           teacher_hidden if project else None,
                                                           normalize=True, layer_map=layer_map, backend=backend)

    @property
    def needs_teacher(self) -> bool:
        """Whether :meth:`forward` needs ``teacher_logits`` (every method but finetune)."""
        return self.method != "finetune"

    @property
    def needs_hidden(self) -> bool:
        """Whether :meth:`forward` needs the layer states (``"pkd"``)."""
        return self.hidden_loss is not None

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor, *,
                teacher_logits: torch.Tensor | None = None,
                student_hidden: torch.Tensor | None = None,
                teacher_hidden: torch.Tensor | None = None) -> LossParts:
        """The loss for ``student_logits [B, K]`` and int64 ``labels [B]``: ``teacher_logits [B, K]`` for kd / pkd,
        ``student_hidden`` / ``teacher_hidden`` (pkd) the per-layer states at the pooling position ``[L, B, 1, H]``
        (``TaskModelOutput.layer_states``).  Returns the differentiable total and its parts as floats (``ce``,
        ``kd``, ``hidden``, ``loss``); ValueError when an input the method needs is missing."""
        ce = F.cross_entropy(student_logits.float(), labels)
        if self.method == "finetune":
            return LossParts(ce, {"ce": ce.item()})
        if teacher_logits is None:
            raise ValueError(f"teacher_logits is required for method {self.method!r}")
        kd = mpdistil_fast.kd_kl_div(student_logits, teacher_logits.to(student_logits.dtype),
                                     temperature=self.temperature, direction=self.direction, beta=self.jsd_beta,
                                     backend=self.backend)
        loss = (1.0 - self.alpha) * ce + self.alpha * kd
        parts = {"ce": ce.item(), "kd": kd.item()}
        if self.hidden_loss is not None:
            if student_hidden is None or teacher_hidden is None:
                raise ValueError("student_hidden and teacher_hidden are required for method 'pkd'")
            hidden = self.hidden_loss(student_hidden, teacher_hidden.to(student_hidden.dtype))
            loss = loss + self.beta * hidden
            parts["hidden"] = hidden.item()
        parts["loss"] = loss.item()
        return LossParts(loss, parts)
