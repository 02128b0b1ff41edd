"""Teacher hypergradients of MetaDistil's pilot update, with and without double backward.

Student parameters theta, teacher parameters phi, inner (distillation) loss L(theta, phi) on a training batch,
outer (quiz) loss Q(theta) on a quiz batch.  One experimental student step (see :mod:`.inner_update`)

    theta'(phi) = theta - (scale * grad_theta L(theta, phi) + offset + decay * theta)

and the hypergradient (MetaDistil, Zhou et al. ACL 2022, Eq. 5; DARTS, Liu et al. ICLR 2019, Eq. 7)

    h = dQ(theta'(phi)) / dphi = - d/dphi < w, grad_theta L(theta, phi) >,    w = scale * grad Q(theta')

(w held constant in the derivative; Q does not depend on phi directly, so this mixed second derivative of the inner
loss is all of h).

Methods (:data:`METHODS`):

``exact``              unrolled second order: the inner gradient with ``create_graph=True`` (``inner_steps``
                       steps allowed), Q at the result, backward to phi.  The reference; needs double backward
                       through student, teacher and loss (fails with a clear message for fused kernels, SDPA /
                       flash attention and DeepSpeed ZeRO-3).
``finite_difference``  central difference along w (DARTS; SAMA, Choe et al. NeurIPS 2023):
                       h ~= -[grad_phi L(theta + eps w) - grad_phi L(theta - eps w)] / (2 eps),
                       eps = c / ||w_A||, c = (machine epsilon of the compute dtype)^(1/3); error O(eps^2).
                       A = the coordinates where grad_theta L is not exactly zero: embedding rows of tokens
                       absent from the training batch do not move L, yet Adam's preconditioner 1/(sqrt(v)+eps)
                       is ~1e8 x larger there (v = 0 with decoupled weight decay), so ||w|| over all coordinates
                       made eps so small that rounding swamped the difference (100% error in fp32 with AdamW).
                       Only first-order backward passes; the difference is formed in fp32 or wider.
``forward_mode``       the directional derivative d/dt L(theta + t w, phi) by forward-mode AD (dual numbers
                       through ``functional_call``), then one reverse pass of that scalar to phi; exact up to
                       rounding.  Needs forward-mode AD through the student and the loss (eager ops).
``first_order``        one-sided difference -[grad_phi L(theta + eps w) - grad_phi L(theta)] / eps, reusing the
                       gradient at theta from the inner step: one student forward fewer than the central
                       difference, O(eps) truncation error.  (Dropping the mixed term altogether, DARTS'
                       "first-order" variant, would give exactly zero here: Q does not see the teacher.)

The teacher's forward does not depend on theta, so in the three first-order methods the teacher runs once: its
outputs enter the loss as leaves (:class:`~.functional.RecordedCalls`), every evaluation at a shifted theta gives
d L / d(teacher outputs), and one teacher backward with the combined output gradient yields h.  That backward can
also be left to the caller as a *surrogate* loss, sum <teacher outputs, combined output gradient>, whose gradient
in phi is h: a DeepSpeed engine then runs it through its own backward (ZeRO-3 gathers the teacher's partitioned
parameters there and reduces h over the ranks).

Data parallel (``average``): each rank evaluates L on its share of the training batch and Q on its share of the quiz
batch; the inner gradient and the quiz gradient are averaged over the ranks before they are used, so theta', w and
eps are those of the whole batches on every rank, and since h is linear in L the ranks' hypergradients average to
the whole batch's (the engine's backward averages the surrogate's gradient; the dictionary is averaged here).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from mpdistil_fast._validation import check_choice, check_positive_finite
from mpdistil_fast.bilevel.functional import (Average, FunctionalView, RandomStateReplay, RecordedCalls,
                                              TensorDict, call_loss, check_finite_loss, gradient_loss,
                                              trainable_parameters)
from mpdistil_fast.bilevel.inner_update import (InnerOptimizer, InnerUpdate, experimental_step, make_inner_update,
                                                 precondition_)

METHODS: tuple[str, ...] = ("exact", "finite_difference", "forward_mode", "first_order")

InnerLoss = Callable[[Any, Any, Any], torch.Tensor]
OuterLoss = Callable[[Any, Any], torch.Tensor]


@dataclass
class MetaGradient:
    """Everything one hypergradient computation produced (the pilot update reuses ``student_calls``).

    Exactly one of ``teacher_grads`` (``{name: h}``) and ``teacher_surrogate`` (a scalar whose gradient in the
    teacher's parameters is h, for the caller's backward) is set, as :func:`meta_gradient` was asked."""

    teacher_grads: dict[str, torch.Tensor] | None
    inner_loss: float
    outer_loss: float
    student_calls: RecordedCalls | None = None
    teacher_surrogate: torch.Tensor | None = None


def hypergradient_surrogate(parameters: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_p <p, g_p>: a loss whose gradient in each parameter p is ``grads[name]`` (treated as a constant), for
    handing a computed gradient to a backward that an optimizer or a DeepSpeed engine owns."""
    return gradient_loss((parameters[name], grad) for name, grad in grads.items())


def hypergradient(student: nn.Module, teacher: nn.Module, inner_loss: InnerLoss, outer_loss: OuterLoss,
                  train_batch: Any, quiz_batch: Any, *, inner_lr: float | None = None,
                  method: str = "finite_difference", inner_optimizer: InnerOptimizer = "sgd",
                  inner_steps: int = 1, epsilon: float | None = None, average: Average | None = None
                  ) -> dict[str, torch.Tensor]:
    """d outer_loss(theta') / d phi for every teacher parameter that requires grad (see the module docstring).

    Args:
        student, teacher: the modules; ``teacher`` is any module whose parameters enter ``inner_loss`` (a whole
            teacher, a meta-teacher head, a projection).  Neither module's parameters are modified.
        inner_loss: ``inner_loss(student, teacher, batch) -> scalar``, written with ordinary module calls.
        outer_loss: ``outer_loss(student, batch) -> scalar`` (the quiz loss).
        train_batch, quiz_batch: whatever ``inner_loss`` / ``outer_loss`` take as their batch (passed through).
        inner_lr: learning rate of the experimental step (default: the optimizer's, when ``inner_optimizer`` is
            an optimizer).
        method: one of :data:`METHODS`.
        inner_optimizer: ``"sgd"`` (MetaDistil), ``"adam"`` (fresh state) or the student's torch SGD / Adam /
            AdamW, whose frozen state preconditions the direction (SAMA), or an
            :class:`~mpdistil_fast.bilevel.inner_update.OptimizerState` view of one (whose ``max_grad_norm`` also
            clips the inner gradient, as the student's real step does).
        inner_steps: experimental steps on the train batch; only ``"exact"`` takes more than one.
        epsilon: the finite-difference step c in eps = c / ||w_A||, w_A the direction w restricted to the coordinates
            where the inner gradient is not exactly zero (default: cube root of the compute dtype's machine
            epsilon); ignored by ``"exact"`` and ``"forward_mode"``.
        average: data parallel: averages a list of tensors over the ranks in place (every rank calls with the same
            shapes); the batches are then this rank's shares, and the result is the whole batches' hypergradient
            on every rank.  Not with ``"exact"``.

    Returns:
        ``{name: gradient}`` keyed as ``teacher.named_parameters()``, zeros where a parameter does not influence
        the loss.  When no teacher parameter does, a ``UserWarning`` says so and all gradients are zero.

    Raises:
        ValueError / TypeError naming the bad argument; ``FloatingPointError`` when the inner loss, the quiz loss
        or the hypergradient is not finite; ``RuntimeError`` when ``"exact"`` or ``"forward_mode"`` meets an op
        without double-backward / forward-mode support (the message names the first-order alternative).

    Example (float64, where the central difference agrees with the exact unrolled gradient to about 1e-8)::

        >>> import torch, torch.nn.functional as F, mpdistil_fast
        >>> from mpdistil_fast.bilevel import hypergradient
        >>> _ = torch.manual_seed(0)
        >>> student, teacher = torch.nn.Linear(4, 3).double(), torch.nn.Linear(4, 3).double()
        >>> def inner_loss(student, teacher, x):          # KD of the student towards the teacher on a train batch
        ...     return mpdistil_fast.kd_kl_div(student(x), teacher(x), 2.0, backend="torch")
        >>> def quiz_loss(student, batch):                # the student's loss on a quiz batch
        ...     x, y = batch
        ...     return F.cross_entropy(student(x), y)
        >>> train, quiz = torch.randn(8, 4).double(), (torch.randn(8, 4).double(), torch.randint(0, 3, (8,)))
        >>> h = hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=0.1)
        >>> exact = hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=0.1, method="exact")
        >>> sorted(h), all(torch.allclose(h[name], exact[name], rtol=1e-6, atol=1e-10) for name in h)
        (['bias', 'weight'], True)
    """
    grads = meta_gradient(student, teacher, inner_loss, outer_loss, train_batch, quiz_batch, inner_lr=inner_lr,
                          method=method, inner_optimizer=inner_optimizer, inner_steps=inner_steps,
                          epsilon=epsilon, average=average).teacher_grads
    if average is not None:
        average(list(grads.values()))
    return grads


def meta_gradient(student: nn.Module, teacher: nn.Module, inner_loss: InnerLoss, outer_loss: OuterLoss,
                  train_batch: Any, quiz_batch: Any, *, inner_lr: float | None, method: str,
                  inner_optimizer: InnerOptimizer, inner_steps: int = 1, epsilon: float | None = None,
                  keep_student_forward: bool = False, random_state: RandomStateReplay | None = None,
                  average: Average | None = None, surrogate: bool = False) -> MetaGradient:
    """:func:`hypergradient` plus the losses and, with ``keep_student_forward`` (first-order methods only), the
    student's recorded forward at theta, graph retained, for a real step on the same batch.  ``random_state``
    (fresh by default) lets that real step replay the dropout masks recorded here.  ``surrogate``: return h as
    :attr:`MetaGradient.teacher_surrogate` instead of a dictionary (no teacher backward is run here).  With
    ``average`` (see :func:`hypergradient`) the hypergradient returned is this rank's share of the batches; the
    caller's backward or :func:`hypergradient` averages it."""
    check_choice("method", method, METHODS)
    if average is not None and method == "exact":
        raise ValueError("method='exact' runs in one process only (its double backward cannot be averaged over "
                         "ranks); use method='finite_difference'")
    for name, fn in (("inner_loss", inner_loss), ("outer_loss", outer_loss)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be an int >= 1, got {inner_steps!r}")
    if inner_steps != 1 and method != "exact":
        raise ValueError(f"inner_steps > 1 needs method='exact', got method={method!r}")
    if epsilon is not None:
        epsilon = check_positive_finite("epsilon", epsilon)
    theta = trainable_parameters(student, "student")
    phi = trainable_parameters(teacher, "teacher")
    if random_state is None:
        random_state = RandomStateReplay([p.device for p in (*theta.values(), *phi.values())], (student, teacher))
    if method == "exact":
        result = _exact(student, teacher, inner_loss, outer_loss, train_batch, quiz_batch, theta, phi,
                        random_state, inner_optimizer, inner_lr, inner_steps)
        if surrogate:
            result.teacher_surrogate, result.teacher_grads = hypergradient_surrogate(phi, result.teacher_grads), None
        return result
    return _first_order_passes(student, teacher, inner_loss, outer_loss, train_batch, quiz_batch, theta, phi,
                               random_state, inner_optimizer, inner_lr, method, epsilon, keep_student_forward,
                               average, surrogate)


def _warn_if_unused(grads: list[torch.Tensor | None]) -> None:
    if all(g is None for g in grads):
        warnings.warn("no teacher parameter influences inner_loss: the hypergradient is zero "
                      "(does inner_loss call the teacher?)", UserWarning, stacklevel=5)


def _check_finite(grads: list[torch.Tensor | None], average: Average | None = None) -> None:
    """Raises ``FloatingPointError`` when a gradient is not finite; with ``average`` (data parallel) when it is not
    finite on any rank, so every rank stops here instead of the others waiting in their next collective."""
    bad = not all(torch.isfinite(g).all() for g in grads if g is not None)
    if average is not None:
        device = next((g.device for g in grads if g is not None), torch.device("cpu"))
        flag = torch.tensor([1.0 if bad else 0.0], dtype=torch.float32, device=device)
        average([flag])
        bad = float(flag) > 0.0
    if bad:
        raise FloatingPointError("the teacher hypergradient is not finite; no update was applied")


def _zeros_for_unused(grads: dict[str, torch.Tensor | None], phi: dict[str, nn.Parameter],
                      average: Average | None = None) -> dict[str, torch.Tensor]:
    _warn_if_unused(list(grads.values()))
    out = {name: (torch.zeros_like(phi[name]) if g is None else g.to(phi[name].dtype).detach())
           for name, g in grads.items()}
    _check_finite(list(out.values()), average)
    return out


def _grad_dict(output: torch.Tensor, wrt: TensorDict, **kwargs: Any) -> tuple[TensorDict, set[str]]:
    """(d output / d wrt as a dict, zeros where ``output`` does not depend on a tensor; the names of those)."""
    grads = torch.autograd.grad(output, list(wrt.values()), allow_unused=True, **kwargs)
    unreached = {name for name, g in zip(wrt, grads) if g is None}
    zeros_filled = {name: torch.zeros_like(value) if g is None else g for (name, value), g in zip(wrt.items(), grads)}
    return zeros_filled, unreached


_DOUBLE_BACKWARD_HINT = ("method='exact' differentiates through the inner gradient (double backward), which failed "
                         "here: fused kernels (kd_kl_div's cpp/cuda/triton backends), SDPA / flash attention and "
                         "DeepSpeed ZeRO-3 do not support it.  Use method='finite_difference' (first-order "
                         "passes only) or eager attention with backend='torch'.  Cause: ")


def _exact(student: nn.Module, teacher: nn.Module, inner_loss: InnerLoss, outer_loss: OuterLoss, train_batch: Any,
           quiz_batch: Any, theta: dict[str, nn.Parameter], phi: dict[str, nn.Parameter],
           random_state: RandomStateReplay, inner_optimizer: InnerOptimizer, inner_lr: float | None,
           inner_steps: int) -> MetaGradient:
    current: TensorDict = dict(theta)
    update: InnerUpdate | None = None
    first_inner = math.nan
    try:
        for step in range(inner_steps):
            with random_state.replay():
                loss = call_loss(inner_loss, "inner_loss", FunctionalView(student, current), teacher, train_batch)
            value = check_finite_loss("inner_loss", loss)
            first_inner = value if step == 0 else first_inner
            grads, unreached = _grad_dict(loss, current, create_graph=True)
            if not any(g.requires_grad for g in grads.values()):
                raise RuntimeError("the inner gradient carries no graph: an op's backward in inner_loss is not "
                                   "differentiable (once_differentiable or a fused kernel)")
            if update is None:
                update = make_inner_update(inner_optimizer, inner_lr, theta, {n: g.detach() for n, g in grads.items()},
                                           unused=unreached)
            current = update.step(current, grads)
        quiz = call_loss(outer_loss, "outer_loss", FunctionalView(student, current), quiz_batch)
        outer = check_finite_loss("outer_loss", quiz)
        teacher_grads = torch.autograd.grad(quiz, list(phi.values()), allow_unused=True)
    except (RuntimeError, NotImplementedError) as exc:
        raise RuntimeError(_DOUBLE_BACKWARD_HINT + str(exc)) from exc
    return MetaGradient(_zeros_for_unused(dict(zip(phi, teacher_grads)), phi), first_inner, outer)


def _inactive_coordinates(inner_grads: TensorDict) -> dict[str, torch.Tensor]:
    """Per tensor with exact zeros in the inner gradient, the bool mask of those zeros (coordinates the inner loss
    does not touch, such as embedding rows of absent tokens); tensors without zeros are left out."""
    inactive = {}
    for name, g in inner_grads.items():
        zero = g == 0
        if zero.any():
            inactive[name] = zero
    return inactive


def _finite_difference_step(direction: TensorDict, epsilon: float | None, inactive: dict[str, torch.Tensor]
                            ) -> float:
    """eps = c / ||w_A|| (see the module docstring), c = cube root of the machine epsilon of the compute dtype
    unless given; ``inactive`` masks the coordinates outside A."""
    reference = next(iter(direction.values()))
    dtype = reference.dtype
    if torch.is_autocast_enabled(reference.device.type):
        dtype = torch.get_autocast_dtype(reference.device.type)
    c = epsilon if epsilon is not None else torch.finfo(dtype).eps ** (1.0 / 3.0)
    norms = []
    for name, w in direction.items():  # per-tensor norms accumulated in fp32 or wider, no wide copies
        active = w.masked_fill(inactive[name], 0.0) if name in inactive else w
        norms.append(torch.linalg.vector_norm(active, dtype=torch.promote_types(w.dtype, torch.float32)).double())
    norm = float(torch.linalg.vector_norm(torch.stack(norms)))
    if not math.isfinite(norm):
        raise FloatingPointError(f"the gradient of outer_loss at the experimental student is not finite (norm "
                                 f"{norm}); no update was applied")
    return c / norm if norm > 0 else 0.0


def _combine(terms: list[tuple[float, tuple[torch.Tensor | None, ...]]]) -> list[torch.Tensor | None]:
    """sum_k coefficient_k * grads_k per slot, differences formed in fp32 or wider before scaling."""
    combined: list[torch.Tensor | None] = []
    for slot in zip(*(grads for _, grads in terms)):
        total: torch.Tensor | None = None
        for (coefficient, _), g in zip(terms, slot):
            if g is None:
                continue
            wide = g.to(torch.promote_types(g.dtype, torch.float32)) * coefficient
            total = wide if total is None else total + wide
        combined.append(total)
    return combined


def _first_order_passes(student: nn.Module, teacher: nn.Module, inner_loss: InnerLoss, outer_loss: OuterLoss,
                        train_batch: Any, quiz_batch: Any, theta: dict[str, nn.Parameter],
                        phi: dict[str, nn.Parameter], random_state: RandomStateReplay,
                        inner_optimizer: InnerOptimizer, inner_lr: float | None, method: str,
                        epsilon: float | None, keep_student_forward: bool, average: Average | None,
                        surrogate: bool) -> MetaGradient:
    teacher_calls = RecordedCalls(teacher, detach_outputs=True)
    student_calls = RecordedCalls(student, detach_outputs=False) if keep_student_forward else None
    with random_state.replay():
        loss = call_loss(inner_loss, "inner_loss", student_calls if student_calls is not None else student,
                         teacher_calls, train_batch)
    inner = check_finite_loss("inner_loss", loss, average)
    leaves = teacher_calls.leaves()
    targets = leaves + list(phi.values())  # d L / d(teacher outputs) and d L / d phi directly
    reference_wrt = targets if method == "first_order" else []
    grads = torch.autograd.grad(loss, list(theta.values()) + reference_wrt, allow_unused=True,
                                retain_graph=keep_student_forward)
    del loss
    reference_grads = grads[len(theta):]
    inner_grads = {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(theta.items(), grads)}
    # reached on some rank: 1 where this rank's backward reached the parameter (averaged with the gradients)
    reached = torch.tensor([g is not None for g in grads[:len(theta)]], dtype=torch.float32,
                           device=next(iter(theta.values())).device)
    del grads
    if average is not None:
        average(list(inner_grads.values()) + [reached])
    unused = {name for name, hit in zip(theta, reached.tolist()) if hit == 0.0}
    base = {name: p.detach() for name, p in theta.items()}
    inactive = _inactive_coordinates(inner_grads)
    # parameter-sized copies dominate the memory: the step consumes the gradients as it goes and keeps only scale
    experimental, scale = experimental_step(inner_optimizer, inner_lr, theta, inner_grads, unused)
    experimental = {name: value.requires_grad_(True) for name, value in experimental.items()}
    quiz = call_loss(outer_loss, "outer_loss", FunctionalView(student, experimental), quiz_batch)
    outer = check_finite_loss("outer_loss", quiz, average)
    quiz_grads, _ = _grad_dict(quiz, experimental)
    if average is not None:
        average(list(quiz_grads.values()))
    direction = precondition_(quiz_grads, scale)
    del quiz, quiz_grads, experimental, scale
    eps = _finite_difference_step(direction, epsilon, inactive)
    del inactive
    if eps == 0.0:  # the quiz loss is flat in theta': nothing to propagate
        if surrogate:  # a zero loss still runs the teacher's backward, as data-parallel engines need on every rank
            zeros = teacher_calls.surrogate([torch.zeros_like(leaf) for leaf in leaves])
            return MetaGradient(None, inner, outer, student_calls, zeros)
        return MetaGradient({name: torch.zeros_like(p) for name, p in phi.items()}, inner, outer, student_calls)

    shifted: TensorDict = {}  # one buffer for every shift, made on first use

    def grads_at(shift: float) -> tuple[torch.Tensor | None, ...]:
        for name, value in base.items():  # the previous evaluation's graph is gone: overwriting is safe
            if name in shifted:
                torch.add(value, direction[name], alpha=shift, out=shifted[name])
            else:
                shifted[name] = torch.add(value, direction[name], alpha=shift)
        with random_state.replay():
            value = call_loss(inner_loss, "inner_loss", FunctionalView(student, shifted), teacher_calls.replay(),
                              train_batch)
        if not value.requires_grad:  # the loss does not involve the teacher at all
            return (None,) * len(targets)
        return torch.autograd.grad(value, targets, allow_unused=True)

    if method == "finite_difference":
        terms = [(-0.5 / eps, grads_at(eps)), (0.5 / eps, grads_at(-eps))]
    elif method == "first_order":
        terms = [(-1.0 / eps, grads_at(eps)), (1.0 / eps, reference_grads)]
    else:
        terms = [(-1.0, _directional_derivative_grads(student, inner_loss, train_batch, teacher_calls.replay(),
                                                      base, direction, targets, random_state))]
    combined = _combine(terms)
    if surrogate:
        _warn_if_unused(combined)
        _check_finite(combined, average)
        loss = teacher_calls.surrogate(combined[:len(leaves)]) + hypergradient_surrogate(
            phi, {name: g for name, g in zip(phi, combined[len(leaves):]) if g is not None})
        return MetaGradient(None, inner, outer, student_calls, loss)
    through_outputs = teacher_calls.backward_to(list(phi.values()), combined[:len(leaves)])
    teacher_grads = {}
    for name, via_outputs, direct in zip(phi, through_outputs, combined[len(leaves):]):
        parts = [g for g in (via_outputs, direct) if g is not None]
        teacher_grads[name] = sum(parts[1:], parts[0]) if parts else None
    return MetaGradient(_zeros_for_unused(teacher_grads, phi, average), inner, outer, student_calls)


def _directional_derivative_grads(student: nn.Module, inner_loss: InnerLoss, train_batch: Any,
                                  teacher_calls: RecordedCalls, base: TensorDict, direction: TensorDict,
                                  targets: list[torch.Tensor], random_state: RandomStateReplay
                                  ) -> tuple[torch.Tensor | None, ...]:
    """d/d targets of d/dt L(theta + t w) at t = 0: forward-mode AD in theta, then one reverse pass."""
    try:
        with fwAD.dual_level():
            duals = {name: fwAD.make_dual(base[name], direction[name].to(base[name].dtype)) for name in base}
            with random_state.replay():
                value = call_loss(inner_loss, "inner_loss", FunctionalView(student, duals), teacher_calls,
                                  train_batch)
            tangent = fwAD.unpack_dual(value).tangent
    except (RuntimeError, NotImplementedError) as exc:
        raise RuntimeError("method='forward_mode' needs forward-mode AD (jvp) through the student and inner_loss, "
                           "which failed here (custom autograd Functions such as kd_kl_div's fused backends "
                           f"define no jvp); use method='finite_difference'.  Cause: {exc}") from exc
    if tangent is None or not tangent.requires_grad:
        return (None,) * len(targets)
    try:
        return torch.autograd.grad(tangent, targets, allow_unused=True)
    except RuntimeError as exc:
        raise RuntimeError("method='forward_mode' could not differentiate the forward-mode derivative to the teacher "
                           "(torch's jvp formulas of softmax / log_softmax are not reverse-differentiable, which "
                           "matters when a teacher output depending on the student enters a softmax); use "
                           f"method='finite_difference'.  Cause: {exc}") from exc
