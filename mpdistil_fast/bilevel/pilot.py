"""MetaDistil's pilot update (Zhou et al., "BERT Learns to Teach", ACL 2022, Algorithm 1) on the bi-level engine.

One :meth:`PilotUpdate.step` on a training batch x and a quiz batch q:

1. experimental step  theta' = theta - lr * U(grad_theta L(theta, phi; x))   (functional, the student is untouched);
2. teacher update     phi <- teacher_optimizer(phi, dQ(theta'; q) / dphi)  (the hypergradient, any ``METHODS``);
3. real student step  theta <- student_optimizer(theta, grad_theta L(theta, phi_new; x))  on the same batch.

Usage::

    from mpdistil_fast.bilevel import PilotUpdate

    def inner_loss(student, teacher, batch):          # distillation loss, ordinary module calls
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        s, t = student(**inputs).logits, teacher(**inputs).logits
        return mpdistil_fast.kd_kl_div(s, t, 2.0) + F.cross_entropy(s, batch["labels"])

    def quiz_loss(student, batch):
        return F.cross_entropy(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch["labels"])

    pilot = PilotUpdate(student, teacher, torch.optim.AdamW(student.parameters(), 5e-5),
                        torch.optim.AdamW(teacher.parameters(), 1e-5), inner_loss, quiz_loss,
                        method="finite_difference", max_grad_norm=1.0, autocast_dtype=torch.bfloat16)
    for train_batch, quiz_batch in loader:
        stats = pilot.step(train_batch, quiz_batch)   # {"inner_loss": ..., "quiz_loss": ..., ...}

What the helper takes care of:

* the experimental step uses the student optimizer's own rule with its state frozen (SGD: MetaDistil; Adam/AdamW:
  SAMA's preconditioner) and its current learning rate, so schedulers are followed;
* ``max_grad_norm`` clips the teacher's hypergradient and the student's real-step gradient, and (with the default
  ``inner_optimizer``) the experimental step's inner gradient too, so the pilot is the clipped step the student then
  takes; ``student_scheduler`` / ``teacher_scheduler`` step after their optimizers;
* ``autocast_dtype=torch.bfloat16`` runs every loss evaluation under autocast (parameters, gradients and the
  finite difference stay in fp32; the difference step grows to bf16's cube-root epsilon);
* dropout: the experimental student, the shifted students and the real step see the same dropout masks, recorded
  on the first evaluation of the inner loss on x and replayed afterwards (:class:`~.functional.RandomStateReplay`);
* the real step runs the updated teacher without building its graph; with ``reuse_student_forward=True`` (first-
  order methods) it also reuses the student's forward on x at theta recorded by the pilot (one forward fewer, at
  the cost of keeping those activations alive);
* a non-finite inner or quiz loss or hypergradient raises ``FloatingPointError`` before anything is updated;
* the hypergradient reaches the teacher through ``teacher_optimizer``'s backward, as a surrogate loss (see
  :func:`~mpdistil_fast.bilevel.meta_gradient`): pass :class:`~.stepper.Stepper` s (a DeepSpeed engine's backward
  and step, a ZeRO-partitioned optimizer's state through :meth:`~.stepper.Stepper.optimizer_state`) and
  ``average`` (each rank's batches are its shares) and the same step runs data parallel, ZeRO-3 teacher included.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from mpdistil_fast._validation import check_positive_finite
from mpdistil_fast.bilevel.functional import (Average, RandomStateReplay, call_loss, check_finite_loss,
                                              trainable_parameters, without_parameter_grads)
from mpdistil_fast.bilevel.hypergradient import METHODS, InnerLoss, OuterLoss, meta_gradient
from mpdistil_fast.bilevel.inner_update import InnerOptimizer, OptimizerState, TorchOptimizerState
from mpdistil_fast.bilevel.stepper import OptimizerStepper, Stepper


class PilotUpdate:
    """MetaDistil's Algorithm 1 as a training-loop step (see the module docstring)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_optimizer: torch.optim.Optimizer | Stepper,
                 teacher_optimizer: torch.optim.Optimizer | Stepper, inner_loss: InnerLoss, outer_loss: OuterLoss, *,
                 method: str = "finite_difference", inner_optimizer: InnerOptimizer | None = None,
                 inner_lr: float | None = None, max_grad_norm: float | None = None,
                 student_scheduler: Any = None, teacher_scheduler: Any = None,
                 autocast_dtype: torch.dtype | None = None, epsilon: float | None = None,
                 reuse_student_forward: bool = False, average: Average | None = None) -> None:
        """
        Args:
            student, teacher: the modules (``teacher`` is whatever module the meta-learner trains).
            student_optimizer, teacher_optimizer: torch optimizers over their parameters, or :class:`~.Stepper` s
                (a training runtime's models: a DeepSpeed engine's ``backward``/``step``), which own their
                schedule and clipping (``max_grad_norm`` and the schedulers must then be left out).
            inner_loss, outer_loss: ``inner_loss(student, teacher, batch)``, ``outer_loss(student, batch)``.
            method: hypergradient method, one of :data:`~mpdistil_fast.bilevel.METHODS`.
            inner_optimizer: rule of the experimental step (default: the student optimizer's, which must then be
                SGD, Adam or AdamW); ``"sgd"`` gives MetaDistil's plain step.
            inner_lr: experimental learning rate (default: the optimizer's current one, read every step).
            max_grad_norm: clip norm for the teacher's hypergradient and the student's real gradient (and the
                experimental step's, when ``inner_optimizer`` is left to default).
            autocast_dtype: ``torch.bfloat16`` runs the losses under ``torch.autocast`` (float16 is refused: it would
                need loss scaling).
            epsilon: finite-difference step c (see :func:`~mpdistil_fast.bilevel.hypergradient`).
            reuse_student_forward: share the student's forward on the train batch between the pilot and the real
                step (first-order methods): saves one student forward (0.96x -> 0.92x exact's step time in the
                meta-step benchmark) but keeps its activations alive during the hypergradient (0.60x -> 0.73x
                exact's peak extra memory), hence off by default.
            average: data parallel (every rank steps on its share of the batches): averages tensors over the
                ranks in place, see :func:`~mpdistil_fast.bilevel.hypergradient`; the steppers' backward must
                average the gradients too (a DeepSpeed engine's does).
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if max_grad_norm is not None:
            max_grad_norm = check_positive_finite("max_grad_norm", max_grad_norm)
        self.student_stepper = _stepper("student_optimizer", student_optimizer, student_scheduler, max_grad_norm)
        self.teacher_stepper = _stepper("teacher_optimizer", teacher_optimizer, teacher_scheduler, max_grad_norm)
        if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
            raise TypeError(f"autocast_dtype must be a torch.dtype or None, got {type(autocast_dtype).__name__}")
        if autocast_dtype == torch.float16:
            raise ValueError("autocast_dtype=torch.float16 needs loss scaling (its gradients underflow), which the "
                             "pilot update's finite differences do not do: use torch.bfloat16")
        if autocast_dtype not in (None, torch.bfloat16):
            raise ValueError(f"autocast_dtype must be torch.bfloat16 or None, got {autocast_dtype}")
        if average is not None and method == "exact":
            raise ValueError("method='exact' runs in one process only; use a first-order method with average")
        self.student, self.teacher = student, teacher
        self.student_parameters = trainable_parameters(student, "student")
        self.teacher_parameters = trainable_parameters(teacher, "teacher")
        self.inner_loss, self.outer_loss = inner_loss, outer_loss
        self.method, self.epsilon, self.average = method, epsilon, average
        if inner_optimizer is None:
            inner_optimizer = self.student_stepper.optimizer_state()
        elif isinstance(inner_optimizer, torch.optim.Optimizer):
            inner_optimizer = TorchOptimizerState(inner_optimizer)
        self.inner_optimizer: str | OptimizerState = inner_optimizer
        self.inner_lr = inner_lr
        self.autocast_dtype = autocast_dtype
        self.reuse_student_forward = reuse_student_forward and method != "exact"

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = next(iter(self.student_parameters.values())).device.type
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def step(self, train_batch: Any, quiz_batch: Any) -> dict[str, float]:
        """One pilot update; returns the losses, gradient norms (before clipping) and the inner learning rate."""
        inner_lr = self.inner_lr
        if inner_lr is None:  # the student optimizer's current learning rate (its schedule is followed)
            rule = self.student_stepper.optimizer_state() if isinstance(self.inner_optimizer, str) \
                else self.inner_optimizer
            current_lr = float(rule.group(next(iter(self.student_parameters.values())))["lr"])
        reported_lr = inner_lr if inner_lr is not None else current_lr
        if inner_lr is None and isinstance(self.inner_optimizer, str):
            inner_lr = current_lr
        random_state = RandomStateReplay([p.device for p in (*self.student_parameters.values(),
                                                             *self.teacher_parameters.values())],
                                         (self.student, self.teacher))
        self.teacher_stepper.zero_grad()  # old gradients would only hold memory meanwhile
        self.student_stepper.zero_grad()
        with self._autocast():
            result = meta_gradient(self.student, self.teacher, self.inner_loss, self.outer_loss, train_batch,
                                   quiz_batch, inner_lr=inner_lr, method=self.method,
                                   inner_optimizer=self.inner_optimizer, epsilon=self.epsilon,
                                   keep_student_forward=self.reuse_student_forward, random_state=random_state,
                                   average=self.average, surrogate=True)
        # 2. teacher update with the hypergradient, through the teacher's own backward
        if result.teacher_surrogate.requires_grad:
            self.teacher_stepper.backward(result.teacher_surrogate)
        teacher_grad_norm = self.teacher_stepper.step()
        # 3. real student step on the same batch with the updated teacher
        student = result.student_calls.replay() if result.student_calls is not None else self.student
        with self._autocast(), random_state.replay():
            loss = call_loss(self.inner_loss, "inner_loss", student, without_parameter_grads(self.teacher),
                             train_batch)
        student_loss = check_finite_loss("inner_loss with the updated teacher", loss, self.average)
        self.student_stepper.backward(loss)
        student_grad_norm = self.student_stepper.step()
        stats = {"inner_loss": result.inner_loss, "quiz_loss": result.outer_loss, "student_loss": student_loss,
                 "teacher_grad_norm": teacher_grad_norm, "student_grad_norm": student_grad_norm,
                 "inner_lr": reported_lr}
        return {name: value for name, value in stats.items() if value is not None}


def _stepper(name: str, optimizer: torch.optim.Optimizer | Stepper, scheduler: Any,
             max_grad_norm: float | None) -> Stepper:
    """``optimizer`` as a :class:`~.Stepper` (a torch optimizer gets its schedule and clipping here)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return OptimizerStepper(optimizer, scheduler, max_grad_norm)
    if not isinstance(optimizer, Stepper):
        raise TypeError(f"{name} must be a torch.optim.Optimizer or a Stepper, got {type(optimizer).__name__}")
    if scheduler is not None or max_grad_norm is not None:
        raise ValueError(f"{name} is a Stepper, which owns its schedule and clipping: leave out the scheduler "
                         "and max_grad_norm")
    return optimizer
