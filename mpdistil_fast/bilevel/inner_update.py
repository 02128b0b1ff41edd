"""The student's experimental ("inner") step as an affine function of its gradient.

With the optimizer's state frozen inside the step (SAMA: Choe et al., "Making Scalable Meta Learning Practical",
NeurIPS 2023), SGD (momentum, dampening, Nesterov, weight decay) and Adam/AdamW are all affine in the inner gradient
g, per parameter tensor:

    theta' = theta - (scale * g + offset + decay * theta)

``scale`` is the diagonal Jacobian d(step)/dg (learning rate included): 1 * lr for plain SGD, and for Adam
lr (1 - beta1) / ((1 - beta1^t) (sqrt(v_hat) + eps)) with v_hat the second moment updated with the gradient at
theta and then held fixed.  ``offset`` (momentum buffer, Adam's first moment) and ``decay`` do not depend on the
teacher.  When the optimizer's owner clips the gradient's global norm to ``max_grad_norm`` before its step (as
``torch.nn.utils.clip_grad_norm_``), the step sees c * g with c = min(1, max_grad_norm / (||g|| + 1e-6)), c
computed at the gradient at theta and held fixed like v_hat: ``scale`` gains the factor c and Adam's v_hat is
built from c * g, so the experimental step is the clipped step the student then takes.  The teacher
hypergradient therefore needs only the preconditioned direction w = scale * v (:func:`precondition_`), and the
exact method differentiates :meth:`InnerUpdate.step` itself.

A parameter that the inner loss does not reach (its gradient is None: another task's head, say) is not
stepped: theta' = theta there, with scale, offset and decay 0, as a ``torch.optim`` optimizer skips a parameter
whose ``.grad`` is None (no update, no weight decay, no momentum), which the student's real step also does (under
DeepSpeed through :mod:`mpdistil_fast.distributed.unused_groups`).

The optimizer's rule and state are read through :class:`OptimizerState`: :class:`TorchOptimizerState` for a torch
optimizer; a ZeRO-partitioned optimizer gives its own view, whose :meth:`~OptimizerState.state` assembles each
parameter's state whole (see :mod:`mpdistil_fast.distributed.deepspeed_runtime`).  The terms are computed one
parameter at a time, in the order of the student's parameters, so such a view may run collectives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Collection, Protocol, runtime_checkable

import torch

from mpdistil_fast._validation import check_positive_finite

TensorDict = dict[str, torch.Tensor]
INNER_OPTIMIZERS = ("sgd", "adam")
#: The rules :class:`OptimizerState` can describe (AdamW: decoupled weight decay).
OPTIMIZER_KINDS = ("sgd", "adam", "adamw")


@runtime_checkable
class OptimizerState(Protocol):
    """Read-only view of the optimizer behind the student's parameters: its rule and, per parameter, its group's
    hyperparameters and its state."""

    #: ``"sgd"``, ``"adam"`` or ``"adamw"`` (one of :data:`OPTIMIZER_KINDS`)
    kind: str
    #: the global gradient norm the optimizer's owner clips to before each step (None: no clipping); a view
    #: without the attribute counts as None
    max_grad_norm: float | None

    def group(self, parameter: torch.Tensor) -> dict[str, Any]:
        """The hyperparameters of ``parameter``'s group (``lr``, ``betas``, ``eps``, ``weight_decay``, ...)."""
        ...

    def state(self, parameter: torch.Tensor) -> dict[str, Any]:
        """``parameter``'s state as torch keeps it (``step``, ``exp_avg``, ``exp_avg_sq`` / ``momentum_buffer``, each
        shaped like the parameter); empty before the first step."""
        ...


class TorchOptimizerState:
    """:class:`OptimizerState` of a ``torch.optim`` SGD, Adam or AdamW (whose gradients are clipped to
    ``max_grad_norm`` before each step, when given)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> None:
        # AdamW subclasses Adam in recent torch, and Adam(decoupled_weight_decay=True) is AdamW's rule
        kind = ("adamw" if isinstance(optimizer, torch.optim.AdamW) else
                "adam" if isinstance(optimizer, torch.optim.Adam) else
                "sgd" if isinstance(optimizer, torch.optim.SGD) else None)
        if kind is None:
            raise ValueError(f"inner_optimizer must be 'sgd', 'adam' or a torch.optim SGD/Adam/AdamW, "
                             f"got {type(optimizer).__name__}")
        self.optimizer, self.kind = optimizer, kind
        self.max_grad_norm = None if max_grad_norm is None else check_positive_finite("max_grad_norm", max_grad_norm)

    def group(self, parameter: torch.Tensor) -> dict[str, Any]:
        """The param group holding ``parameter`` (ValueError when none does)."""
        for group in self.optimizer.param_groups:
            if any(p is parameter for p in group["params"]):
                return group
        raise ValueError("inner_optimizer does not hold every trainable student parameter")

    def state(self, parameter: torch.Tensor) -> dict[str, Any]:
        """The optimizer's state of ``parameter`` (empty before its first step)."""
        return self.optimizer.state.get(parameter, {})


class _FreshState:
    """:class:`OptimizerState` of an optimizer named ``"sgd"`` or ``"adam"``: torch's default hyperparameters and
    no state yet."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.max_grad_norm = None

    def group(self, parameter: torch.Tensor) -> dict[str, Any]:
        return {}

    def state(self, parameter: torch.Tensor) -> dict[str, Any]:
        return {}


InnerOptimizer = str | torch.optim.Optimizer | OptimizerState


@dataclass(frozen=True)
class InnerUpdate:
    """theta' = theta - (scale * g + offset + decay * theta), per named parameter (see the module docstring)."""

    scale: dict[str, torch.Tensor | float]
    offset: dict[str, torch.Tensor | float]
    decay: dict[str, torch.Tensor | float]

    def step(self, theta: TensorDict, grads: TensorDict) -> TensorDict:
        """The experimental parameters; differentiable in ``grads`` (the exact method builds on this)."""
        return {name: _step_tensor(value, grads[name], self.scale[name], self.offset[name], self.decay[name])
                for name, value in theta.items()}


Term = torch.Tensor | float


def _step_tensor(value: torch.Tensor, grad: torch.Tensor, scale: Term, offset: Term, decay: Term) -> torch.Tensor:
    """value - (scale * grad + offset + decay * value) in one new tensor.

    One out-of-place op creates the result and the other terms are applied to it in place (autograd saves none of
    the result for these ops, so it stays differentiable): these parameter-sized passes are a visible part of a
    meta step when the vocabulary embedding is large."""
    if isinstance(scale, torch.Tensor):
        new = torch.addcmul(value, scale, grad, value=-1.0)
    else:
        new = torch.add(value, grad, alpha=-scale)
    if isinstance(offset, torch.Tensor) or offset != 0.0:
        new = new.sub_(offset)
    if isinstance(decay, torch.Tensor):
        new = new.addcmul_(decay, value, value=-1.0)
    elif decay != 0.0:
        new = new.add_(value, alpha=-decay)
    return new


def precondition_(vector: TensorDict, scale: dict[str, torch.Tensor | float]) -> TensorDict:
    """scale * vector, in place: d(step)/dg (:attr:`InnerUpdate.scale`) applied to ``vector`` (the quiz gradient v,
    no longer needed afterwards)."""
    return {name: value.mul_(scale[name]) for name, value in vector.items()}


def _sgd_terms(group: dict, state: dict, lr: float, clip: float) -> tuple[float, object, float]:
    if group.get("maximize", False):
        raise ValueError("inner_optimizer: SGD with maximize is not supported by the bi-level engine")
    momentum, dampening = group.get("momentum", 0.0), group.get("dampening", 0.0)
    nesterov, weight_decay = group.get("nesterov", False), group.get("weight_decay", 0.0)
    buffer = state.get("momentum_buffer")
    if momentum == 0:
        coefficient, offset = 1.0, 0.0
    elif buffer is None:  # torch's first momentum step: buffer = g (no dampening)
        coefficient, offset = (1.0 + momentum) if nesterov else 1.0, 0.0
    elif nesterov:
        coefficient, offset = 1.0 + momentum * (1.0 - dampening), momentum * momentum * buffer
    else:
        coefficient, offset = 1.0 - dampening, momentum * buffer
    return lr * coefficient * clip, lr * offset, lr * coefficient * weight_decay


def _adam_terms(group: dict, state: dict, lr: float, grad: torch.Tensor, clip: float, *, theta: torch.Tensor,
                decoupled: bool) -> tuple[torch.Tensor, object, object]:
    if group.get("amsgrad", False) or group.get("maximize", False):
        raise ValueError("inner_optimizer: Adam with amsgrad or maximize is not supported by the bi-level engine")
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    eps, weight_decay = group.get("eps", 1e-8), group.get("weight_decay", 0.0)
    step = int(state["step"]) + 1 if "step" in state else 1
    grad = grad.detach() if clip == 1.0 else grad.detach() * clip
    if weight_decay and not decoupled:
        grad = grad + weight_decay * theta.detach()
    first, second = state.get("exp_avg"), state.get("exp_avg_sq")
    bias1, bias2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    # denominator = sqrt(v_hat) + eps with v = beta2 * second + (1 - beta2) g^2, built in one buffer that then
    # becomes scale = lr (1 - beta1) / (bias1 * denominator)
    second_moment = (grad * grad).mul_(1.0 - beta2) if second is None else \
        torch.mul(second, beta2).addcmul_(grad, grad, value=1.0 - beta2)
    scale = second_moment.sqrt_().div_(math.sqrt(bias2)).add_(eps).reciprocal_().mul_(lr * (1.0 - beta1) / bias1)
    offset = 0.0 if first is None else first * scale * (beta1 / (1.0 - beta1))
    decay = lr * weight_decay if decoupled else scale * weight_decay
    return (scale if clip == 1.0 else scale.mul_(clip)), offset, decay


def clip_factor(grads: TensorDict, max_grad_norm: float | None) -> float:
    """c = min(1, max_grad_norm / (||g|| + 1e-6)) over all of ``grads`` (the factor of
    ``torch.nn.utils.clip_grad_norm_``; NaN when the norm is not finite, which the caller's finiteness check
    reports); 1 without ``max_grad_norm``."""
    if max_grad_norm is None or not grads:
        return 1.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads.values()]))
    return float(torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0))


def _inner_terms(inner_optimizer: InnerOptimizer, inner_lr: float | None, theta: TensorDict, grads: TensorDict,
                 unused: Collection[str] = ()
                 ) -> list[tuple[str, Callable[[torch.Tensor], tuple[Term, Term, Term]]]]:
    """Per parameter tensor, a function of its inner gradient computing its (scale, offset, decay); arguments are
    checked and the clipping factor of ``grads`` (:func:`clip_factor`) is computed at once, the state is read and
    the parameter-sized terms are built only when called (one tensor at a time if the caller wants).  The
    parameters named in ``unused`` (no inner gradient reached them) get (0, 0, 0): no step."""
    view: OptimizerState
    if isinstance(inner_optimizer, torch.optim.Optimizer):
        view = TorchOptimizerState(inner_optimizer)
    elif isinstance(inner_optimizer, str) and inner_optimizer in INNER_OPTIMIZERS:
        view = _FreshState(inner_optimizer)
        if inner_lr is None:
            raise ValueError("inner_lr is required when inner_optimizer is a name")
    elif isinstance(inner_optimizer, OptimizerState):
        view = inner_optimizer
        if view.kind not in OPTIMIZER_KINDS:
            raise ValueError(f"inner_optimizer.kind must be one of {OPTIMIZER_KINDS}, got {view.kind!r}")
    else:
        raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, a torch.optim SGD/Adam/AdamW or an "
                         f"OptimizerState, got {inner_optimizer!r}")
    if inner_lr is not None:
        inner_lr = check_positive_finite("inner_lr", inner_lr)
    clip = clip_factor(grads, getattr(view, "max_grad_norm", None))
    terms = []
    for name, value in theta.items():
        if name in unused:
            terms.append((name, _no_step))
            continue
        group = view.group(value)
        lr = inner_lr if inner_lr is not None else float(group["lr"])
        if view.kind == "sgd":
            terms.append((name, lambda grad, group=group, value=value, lr=lr:
                          _sgd_terms(group, view.state(value), lr, clip)))
        else:
            decoupled = view.kind == "adamw" or bool(group.get("decoupled_weight_decay", False))
            terms.append((name, lambda grad, group=group, value=value, lr=lr, decoupled=decoupled:
                          _adam_terms(group, view.state(value), lr, grad, clip, theta=value, decoupled=decoupled)))
    return terms


def _no_step(grad: torch.Tensor) -> tuple[Term, Term, Term]:
    """The terms of a parameter that no inner gradient reached: theta' = theta."""
    return 0.0, 0.0, 0.0


def make_inner_update(inner_optimizer: InnerOptimizer, inner_lr: float | None, theta: TensorDict,
                      grads: TensorDict, unused: Collection[str] = ()) -> InnerUpdate:
    """The frozen-state inner update at ``theta`` with inner gradient ``grads``, every term stored (the exact
    method applies it, differentiably, for several steps).  ``unused``: the names of the parameters that no inner
    gradient reached (their ``grads`` entry is ignored), which the update leaves where they are, as a torch
    optimizer skips a parameter whose ``.grad`` is None.

    ``inner_optimizer`` is ``"sgd"``, ``"adam"`` (fresh state, torch's default betas and eps), a
    ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` holding the student's parameters, or an :class:`OptimizerState`
    view of one; its hyperparameters and state are read (never changed).  ``inner_lr`` overrides the learning
    rate; it is required with a string.
    """
    scale, offset, decay = {}, {}, {}
    for name, compute in _inner_terms(inner_optimizer, inner_lr, theta, grads, unused):
        scale[name], offset[name], decay[name] = compute(grads[name])
    return InnerUpdate(scale, offset, decay)


def experimental_step(inner_optimizer: InnerOptimizer, inner_lr: float | None, theta: TensorDict,
                      grads: TensorDict, unused: Collection[str] = ()) -> tuple[TensorDict, dict[str, Term]]:
    """One frozen-state inner step for the first-order methods: ``(theta', scale)``, with the same rule as
    :func:`make_inner_update` (``unused`` included), at the memory of two parameter-sized copies; ``theta'`` is
    detached from ``theta`` (the student's parameters, by which the optimizer's state is found).

    Consumes ``grads``: each gradient is dropped from the dictionary as soon as its parameter is stepped, and
    offsets and decays live one tensor at a time; only ``scale`` (for :func:`precondition_`) is kept.
    """
    stepped, scales = {}, {}
    for name, compute in _inner_terms(inner_optimizer, inner_lr, theta, grads, unused):
        grad = grads.pop(name)
        scale, offset, decay = compute(grad)
        stepped[name] = _step_tensor(theta[name].detach(), grad, scale, offset, decay)
        scales[name] = scale
        del grad, scale, offset, decay
    return stepped, scales
