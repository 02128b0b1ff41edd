"""The runtime interface the training loop gets models, optimizers and devices through.

The loop never calls ``loss.backward()`` or ``optimizer.step()`` itself: it asks a :class:`Runtime` to build its
models (``build_model``: where a ZeRO-3 runtime would construct them inside ``HfDeepSpeedConfig``) and a
:class:`TrainedModel` (module + optimizer + scheduler), and drives that with ``backward`` / ``step``, so a
DeepSpeed engine can stand behind the same methods.  ``is_main`` gates logging and saving (rank 0 only).
:class:`LocalRuntime` (one process, one device) is the implementation that exists today.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn


@dataclass
class OptimizerSpec:
    """AdamW with linear warm-up then linear decay to zero over ``total_steps`` (BERT's schedule)."""

    lr: float
    total_steps: int
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split so that biases and LayerNorm weights are not decayed."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(optimizer: torch.optim.Optimizer, spec: OptimizerSpec) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(spec.warmup_ratio * spec.total_steps)
    total = max(spec.total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(total - warmup, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainedModel:
    """A module with its optimizer and scheduler; the loop calls ``backward`` then ``step``."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    max_grad_norm: float | None = None

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and scheduler state (the module's weights are checkpointed with the models)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class Runtime(Protocol):
    """What the training loop needs from a (possibly distributed) execution backend."""

    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def build_model(self, build: Callable[[], nn.Module], *, role: str, trainable: bool) -> nn.Module: ...

    def train(self, module: nn.Module, spec: OptimizerSpec, *, role: str,
              params: Iterable[nn.Parameter] | None = None) -> TrainedModel: ...

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def barrier(self) -> None: ...


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


class LocalRuntime:
    """One process, one device: plain modules, AdamW, a linear schedule."""

    rank = 0
    world_size = 1

    def __init__(self, device: str = "auto", num_threads: int | None = None):
        self.device = resolve_device(device)
        if num_threads is not None:
            torch.set_num_threads(num_threads)

    @property
    def is_main(self) -> bool:
        return True

    def build_model(self, build: Callable[[], nn.Module], *, role: str, trainable: bool) -> nn.Module:
        module = build().to(self.device)
        if not trainable:
            module.eval().requires_grad_(False)
        return module

    def train(self, module: nn.Module, spec: OptimizerSpec, *, role: str,
              params: Iterable[nn.Parameter] | None = None) -> TrainedModel:
        groups = parameter_groups(module, spec.weight_decay) if params is None else [
            {"params": list(params), "weight_decay": spec.weight_decay}]
        optimizer = torch.optim.AdamW(groups, lr=spec.lr)
        return TrainedModel(module, optimizer, linear_schedule(optimizer, spec), spec.max_grad_norm)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def barrier(self) -> None:
        return None


def make_runtime(kind: str, *, device: str = "auto", num_threads: int | None = None) -> Runtime:
    """The runtime named by ``runtime.kind`` in the config."""
    if kind == "local":
        return LocalRuntime(device, num_threads)
    raise ValueError(f"runtime.kind must be 'local', got {kind!r}")
