"""The runtime interface the training loop gets models, optimizers and devices through.

The loop never calls ``loss.backward()`` or ``optimizer.step()`` itself: it asks a :class:`Runtime` to build its
models (``build_model``: the DeepSpeed runtime builds a ZeRO-3 model inside ``HfDeepSpeedConfig``) and a
:class:`TrainedModel` (optimizer + schedule + clipping), and drives that with ``backward`` / ``step``, so a
DeepSpeed engine can stand behind the same methods (the bi-level engine's ``Stepper``); ``release(module)`` at
the end of a stage frees whatever the runtime holds for training ``module``.  ``is_main`` gates logging and saving
(rank 0 only); ``local_rows`` gives each data-parallel rank its slice of a global batch, ``average`` averages
logged metrics over ranks, ``average_tensors`` averages tensors in place (the bi-level engine's gradients),
``read_weights(module)`` / ``write_weights(module, state)`` read and load a model's whole weights (a ZeRO-3
model's partitioned parameters gathered a few at a time; every rank takes part), ``snapshot_weights`` /
``restore_snapshot`` keep and put back only what the rank holds (its partitions, under ZeRO-3); ``from_main``
hands every rank rank 0's decision; ``rank_rows``/``gather_rows`` share an evaluation pass over the ranks;
``close`` ends the runtime once a run is done, and ``close(failed=True)`` once it failed, without waiting for the other
ranks (:func:`closed_after` calls the one or the other).
:class:`LocalRuntime` is one process on one device;
:class:`~mpdistil_fast.distributed.deepspeed_runtime.DeepSpeedRuntime` is data parallel over DeepSpeed engines
(``runtime.kind: deepspeed``).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import torch
from torch import nn

from mpdistil_fast.bilevel.stepper import OptimizerStepper

LOG = logging.getLogger(__name__)


class RanksFailedToStartError(RuntimeError):
    """Other ranks of this launch failed before the run started (a config error, a data folder or file missing on
    their node, a bad flag): each prints its own error on its node, and this rank stops too instead of waiting for
    them in a collective until the timeout."""

    def __init__(self, ranks: list[int]) -> None:
        self.ranks = list(ranks)
        super().__init__(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} could not start the run "
                         "(its error is printed on its node: a config error, a data folder or file missing there, "
                         "a bad flag); nothing ran")


@dataclass
class OptimizerSpec:
    """AdamW with linear warm-up then linear decay to zero over ``total_steps`` (BERT's schedule)."""

    lr: float
    total_steps: int
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in AdamW groups: biases and LayerNorm weights are not decayed, and each entry of an
    ``nn.ModuleDict`` (a task head, a task's meta-teacher: alternatives one step picks among) gets groups of its own,
    apart from the rest of the model (a parameter belongs to the deepest entry it lies in).  Groups are in the
    module's order, decayed before not decayed; empty ones are left out.

    For a torch optimizer the split changes nothing (its state is per parameter); an optimizer wrapper that keeps one
    flat state per group (DeepSpeed's ZeRO) can then leave a whole group alone on a step that did not use it
    (:class:`~mpdistil_fast.distributed.unused_groups.UnusedGroupGuard`)."""
    entries = [f"{name}.{key}." if name else f"{key}."
               for name, child in module.named_modules() if isinstance(child, nn.ModuleDict) for key in child]
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        entry = max((e for e in entries if name.startswith(e)), key=len, default="")
        decayed = not (param.ndim < 2 or "LayerNorm" in name or "norm" in name.lower())
        groups.setdefault((entry, True), [])
        groups.setdefault((entry, False), [])
        groups[(entry, decayed)].append(param)
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0}
            for (_, decayed), params in groups.items() if params]


def linear_schedule(optimizer: torch.optim.Optimizer, spec: OptimizerSpec) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate factor of ``spec``: ``(s + 1) / (W + 1)`` for steps s < W = int(warmup_ratio * total_steps),
    then ``(total_steps - s) / (total_steps - W)`` down to 0."""
    warmup = int(spec.warmup_ratio * spec.total_steps)
    total = max(spec.total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(total - warmup, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainedModel(OptimizerStepper):
    """A model's optimizer, schedule and clipping (a :class:`~mpdistil_fast.bilevel.stepper.Stepper`); the loop
    calls ``backward`` then ``step``, and checkpoints :meth:`state_dict`."""

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and scheduler state (the module's weights are checkpointed with the models)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class Runtime(Protocol):
    """What the training loop needs from a (possibly distributed) execution backend."""

    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Whether this process logs and saves (rank 0)."""
        ...

    def build_model(self, build: Callable[[], nn.Module], *, role: str, trainable: bool) -> nn.Module:
        """The module ``build()`` makes, placed for this runtime (``role``: "teacher", "student", ...); one that is
        not ``trainable`` is in eval mode without gradients."""
        ...

    def train(self, module: nn.Module, spec: OptimizerSpec, *, role: str,
              params: Iterable[nn.Parameter] | None = None) -> TrainedModel:
        """The optimizer, schedule and clipping of ``spec`` over ``params`` (default: ``module``'s trainable ones)."""
        ...

    def release(self, module: nn.Module) -> None:
        """Training of ``module`` is over: free what the runtime holds for it."""
        ...

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch``'s tensors on this rank's device (other values unchanged)."""
        ...

    def local_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slice of the rows of a global batch."""
        ...

    def average(self, metrics: dict[str, float]) -> dict[str, float]:
        """Logged metrics averaged over the ranks."""
        ...

    def average_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` over the ranks in place (every rank passes the same shapes)."""
        ...

    def read_weights(self, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of ``module``'s whole weights (partitioned ones gathered; every rank takes part)."""
        ...

    def write_weights(self, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Load whole weights into ``module`` (strict; every rank takes part)."""
        ...

    def snapshot_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """A CPU copy of what this rank holds of ``module``'s weights, for :meth:`restore_snapshot`."""
        ...

    def restore_snapshot(self, module: nn.Module, snapshot: Mapping[str, torch.Tensor]) -> None:
        """Put back the weights :meth:`snapshot_weights` copied."""
        ...

    def from_main(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a decision they must share)."""
        ...

    def rank_rows(self, n: int) -> torch.Tensor:
        """Indices of the rows of an ``n``-row evaluation pass that this rank computes."""
        ...

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's results on its :meth:`rank_rows`, as the ``n`` rows in order."""
        ...

    def barrier(self) -> None:
        """Wait until every rank arrives."""
        ...

    def close(self, *, failed: bool = False) -> None:
        """End the runtime after a run (``failed``: without waiting for the other ranks)."""
        ...


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def is_partitioned(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are partitioned over ranks by ZeRO-3 (DeepSpeed marks them with ``ds_id``)."""
    return any(hasattr(param, "ds_id") for param in module.parameters())


def place_model(module: nn.Module, device: torch.device, trainable: bool) -> nn.Module:
    """``module`` on ``device``; a model that is not trained is put in eval mode with its gradients off."""
    module = module.to(device)
    if not trainable:
        module.eval().requires_grad_(False)
    return module


def cpu_copy(weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{name: a CPU copy of the tensor}`` of ``(name, tensor)`` pairs (a runtime's ``read_weights``)."""
    return {name: tensor.to("cpu", copy=True) for name, tensor in weights}


def build_optimizer(module: nn.Module, spec: OptimizerSpec, params: Iterable[nn.Parameter] | None = None
                    ) -> torch.optim.AdamW:
    """AdamW over ``params`` (default: :func:`parameter_groups` of ``module``)."""
    groups = parameter_groups(module, spec.weight_decay) if params is None else [
        {"params": list(params), "weight_decay": spec.weight_decay}]
    return torch.optim.AdamW(groups, lr=spec.lr)


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` with its tensors copied to ``device`` (non-blocking); other values as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class LocalRuntime:
    """One process, one device: plain modules, AdamW, a linear schedule."""

    rank = 0
    world_size = 1

    def __init__(self, device: str = "auto", num_threads: int | None = None) -> None:
        """``device``: "auto" (CUDA when available), "cpu" or "cuda"; ``num_threads``: torch's CPU threads."""
        self.device = resolve_device(device)
        if num_threads is not None:
            torch.set_num_threads(num_threads)

    @property
    def is_main(self) -> bool:
        """Always True: the only process."""
        return True

    def build_model(self, build: Callable[[], nn.Module], *, role: str, trainable: bool) -> nn.Module:
        """``build()`` on this device; a model not ``trainable`` in eval mode without gradients."""
        return place_model(build(), self.device, trainable)

    def train(self, module: nn.Module, spec: OptimizerSpec, *, role: str,
              params: Iterable[nn.Parameter] | None = None) -> TrainedModel:
        """AdamW (:func:`build_optimizer`), :func:`linear_schedule` and ``spec.max_grad_norm`` clipping."""
        optimizer = build_optimizer(module, spec, params)
        return TrainedModel(optimizer, linear_schedule(optimizer, spec), spec.max_grad_norm)

    def release(self, module: nn.Module) -> None:
        """Training of ``module`` is over (its optimizer state goes with the last reference to its
        :class:`TrainedModel`; this runtime holds none)."""

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch``'s tensors on this runtime's device."""
        return batch_to_device(batch, self.device)

    def local_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole batch (one rank)."""
        return batch

    def average(self, metrics: dict[str, float]) -> dict[str, float]:
        """``metrics`` as they are (one rank)."""
        return metrics

    def average_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` over the ranks in place (one rank: nothing to do)."""

    def read_weights(self, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """``module.state_dict()``'s entries (each valid until the next is yielded; copy what you keep)."""
        yield from module.state_dict().items()

    def write_weights(self, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """``module.load_state_dict(state)``, strict."""
        module.load_state_dict(state)

    def snapshot_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """A CPU copy of what this rank needs to put ``module``'s weights back later (here: all of them)."""
        return cpu_copy(self.read_weights(module))

    def restore_snapshot(self, module: nn.Module, snapshot: Mapping[str, torch.Tensor]) -> None:
        """Put back the weights :meth:`snapshot_weights` copied."""
        self.write_weights(module, snapshot)

    def from_main(self, value: int) -> int:
        """Rank 0's ``value`` (a decision every rank must share, such as a curriculum action)."""
        return value

    def rank_rows(self, n: int) -> torch.Tensor:
        """The rows of an ``n``-row pass this rank computes (all of them)."""
        return torch.arange(n)

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's results on its :meth:`rank_rows`, as the ``n`` rows in order (here: ``local`` itself)."""
        return local

    def barrier(self) -> None:
        """Nothing to wait for in one process."""
        return None

    def close(self, *, failed: bool = False) -> None:
        """Nothing to end in one process."""


@contextmanager
def closed_after(runtime: Runtime) -> Iterator[Runtime]:
    """``runtime`` for the block, closed when it ends, also when it raises: then with ``close(failed=True)``, which
    waits for no other rank (the error may be this rank's alone, the others busy or waiting in a collective it will
    never join: a barrier would hold this process forever, where its exit lets the launcher stop the others).  An
    error of that close is logged, and the block's own error is the one raised (its type sets the exit status)."""
    try:
        yield runtime
    except BaseException:
        try:
            runtime.close(failed=True)
        except Exception:
            LOG.exception("closing the runtime after the run failed raised as well; the run's own error follows")
        raise
    runtime.close()


def make_runtime(kind: str, *, device: str = "auto", num_threads: int | None = None,
                 deepspeed_configs: dict[str, str] | None = None, batch_size: int = 1,
                 collective_timeout: timedelta | None = None) -> Runtime:
    """The runtime named by ``runtime.kind`` in the config (``deepspeed_configs``, ``batch_size`` and
    ``collective_timeout``: DeepSpeed only)."""
    if kind == "local":
        return LocalRuntime(device, num_threads)
    if kind == "deepspeed":
        from mpdistil_fast.distributed.deepspeed_runtime import DeepSpeedRuntime

        return DeepSpeedRuntime(deepspeed_configs or {}, device=device, num_threads=num_threads,
                                batch_size=batch_size, collective_timeout=collective_timeout)
    raise ValueError(f"runtime.kind must be 'local' or 'deepspeed', got {kind!r}")
