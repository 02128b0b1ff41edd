"""What the bi-level engine needs from a trained model's optimisation: ``backward``, then ``step``.

:class:`Stepper` is the interface :class:`~mpdistil_fast.bilevel.PilotUpdate` drives; a DeepSpeed engine stands
behind it as well as a torch optimizer (:class:`OptimizerStepper`).  The meta step gives every hypergradient to
``backward`` as a loss, never by writing ``.grad``, so an engine that reduces or partitions gradients in its own
backward hooks (ZeRO) sees it like any other gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from mpdistil_fast.bilevel.inner_update import OptimizerState, TorchOptimizerState


@runtime_checkable
class Stepper(Protocol):
    """One optimised model (or group of parameters) as a training loop drives it."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate d loss / d parameters (a data-parallel engine also reduces it over the ranks)."""
        ...

    def step(self) -> float | None:
        """Clip, step the optimizer and its schedule, zero the gradients; returns the gradient norm before clipping
        (``None`` when the backend did not compute it)."""
        ...

    def zero_grad(self) -> None:
        """Drop the accumulated gradients."""
        ...

    def optimizer_state(self) -> OptimizerState:
        """The optimizer's rule and state, read-only (the pilot's experimental step follows it)."""
        ...


@dataclass
class OptimizerStepper:
    """:class:`Stepper` over a torch optimizer, with an optional schedule and gradient-norm clipping."""

    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    max_grad_norm: float | None = None

    def parameters(self) -> list[nn.Parameter]:
        """The optimizer's parameters, in its groups' order."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` for this optimizer's parameters only (other modules' ``.grad`` stay untouched)."""
        loss.backward(inputs=[p for p in self.parameters() if p.requires_grad])

    def step(self) -> float:
        """Clip to ``max_grad_norm`` (when set), step the optimizer and the scheduler, zero the gradients; returns the
        gradients' global L2 norm before clipping (0.0 when no parameter has a gradient)."""
        grads = [p for p in self.parameters() if p.grad is not None]
        if not grads:
            norm = 0.0
        elif self.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def zero_grad(self) -> None:
        """Set the parameters' gradients to None."""
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> OptimizerState:
        """The optimizer as a read-only :class:`OptimizerState`, with this stepper's ``max_grad_norm``."""
        return TorchOptimizerState(self.optimizer, self.max_grad_norm)
