"""Functional plumbing of the bi-level engine: modules evaluated at other parameters, recorded calls, RNG replay.

Users write ordinary losses that call modules (``student(**inputs)``).  The engine hands those losses stand-ins:

* :class:`FunctionalView` calls a module through :func:`torch.func.functional_call` with another parameter
  dictionary (the experimental student, the student at ``theta +/- eps * w``), without touching the module's
  own parameters (no in-place mutation, as DeepSpeed ZeRO-3 requires);
* :class:`RecordedCalls` remembers a module's outputs on the first evaluation of a loss and hands them back on
  later evaluations whose inputs are the same, so the teacher runs one forward (and, at the end, one backward)
  however many times the loss is evaluated;
* :class:`RandomStateReplay` gives every evaluation of one loss on one batch the same random draws: dropout
  masks are recorded on the first evaluation and handed back on the later ones, and the random number generators
  restart at the same state (a finite difference of two losses with different dropout masks would be noise).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

TensorDict = dict[str, torch.Tensor]
#: Averages a list of tensors over the data-parallel ranks, in place (a runtime's ``average_tensors``).
Average = Callable[[list[torch.Tensor]], None]


def trainable_parameters(module: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """``module``'s parameters that require grad, keyed as ``module.named_parameters()``.

    Raises ``TypeError`` when ``module`` is not an ``nn.Module`` and ``ValueError`` when nothing requires grad;
    both messages name the argument ``name``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(module).__name__}")
    parameters = {key: value for key, value in module.named_parameters() if value.requires_grad}
    if not parameters:
        raise ValueError(f"{name} has no parameter that requires grad")
    return parameters


class FunctionalView:
    """``module`` evaluated at ``parameters`` (a name -> tensor dict; missing names keep the module's own).

    Calling the view runs ``functional_call(module, parameters, args, kwargs)``; any other attribute
    (``config``, ``training``, ...) is read from the module itself.  Losses should reach the parameters through
    the module's forward: a submodule taken from the view (``view.classifier``) is the original one.
    """

    def __init__(self, module: nn.Module, parameters: TensorDict) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_parameters", parameters)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self._module, self._parameters, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _carries_derivative(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` is part of an autograd graph or carries a forward-mode tangent."""
    return tensor.requires_grad or fwAD.unpack_dual(tensor).tangent is not None


def _same_leaf(recorded: Any, current: Any) -> bool:
    if isinstance(recorded, torch.Tensor) or isinstance(current, torch.Tensor):
        if not (isinstance(recorded, torch.Tensor) and isinstance(current, torch.Tensor)):
            return False
        if recorded is current:
            return True
        return (recorded.shape == current.shape and recorded.dtype == current.dtype
                and recorded.device == current.device and not _carries_derivative(current)
                and torch.equal(recorded, current))
    return recorded is current or recorded == current


class RecordedCalls:
    """A module whose calls are recorded once and replayed while their inputs stay the same.

    ``detach_outputs=True`` (the teacher): recorded floating outputs are handed to the loss as detached leaves
    that require grad, while the recorded originals keep their graph to the module's parameters.  A caller then
    collects d loss / d leaves from every evaluation and runs *one* backward through the module with
    :meth:`backward_to`.  ``detach_outputs=False`` (the student's forward shared by the pilot and the real step):
    outputs are handed back unchanged, graph included.

    A call is only recorded when none of its inputs carries a derivative (a meta-teacher head fed with the
    student's hidden states depends on the student's parameters, so it is rerun on every evaluation).  Calls are
    matched by order; a replayed call whose inputs differ from the recorded ones is rerun.
    """

    def __init__(self, module: nn.Module, *, detach_outputs: bool) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_detach_outputs", detach_outputs)
        object.__setattr__(self, "_records", [])  # per call: (input leaves, input spec, outputs, handed) or None
        object.__setattr__(self, "_recording", True)
        object.__setattr__(self, "_call_index", 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def replay(self) -> "RecordedCalls":
        """Switch from recording to replaying, starting again at the first call."""
        object.__setattr__(self, "_recording", False)
        object.__setattr__(self, "_call_index", 0)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs, spec = pytree.tree_flatten((args, kwargs))
        if self._recording:
            outputs = self._module(*args, **kwargs)
            if any(isinstance(x, torch.Tensor) and _carries_derivative(x) for x in inputs):
                self._records.append(None)
                return outputs
            handed = pytree.tree_map(self._hand_out, outputs) if self._detach_outputs else outputs
            self._records.append((inputs, spec, outputs, handed))
            return handed
        index = self._call_index
        object.__setattr__(self, "_call_index", index + 1)
        record = self._records[index] if index < len(self._records) else None
        if record is not None and record[1] == spec and len(record[0]) == len(inputs) \
                and all(_same_leaf(a, b) for a, b in zip(record[0], inputs)):
            return record[3]
        return self._module(*args, **kwargs)

    @staticmethod
    def _hand_out(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad:
            return value.detach().requires_grad_(True)
        return value

    def leaves(self) -> list[torch.Tensor]:
        """The detached output leaves handed to the loss (``detach_outputs=True``), in a fixed order."""
        return [leaf for _, _, _, handed in filter(None, self._records) for leaf in pytree.tree_leaves(handed)
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.grad_fn is None]

    def _originals(self) -> list[torch.Tensor]:
        """The recorded outputs, with their graph, that :meth:`leaves` stand for (same order)."""
        return [orig for _, _, outputs, handed in filter(None, self._records)
                for orig, leaf in zip(pytree.tree_leaves(outputs), pytree.tree_leaves(handed))
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.grad_fn is None]

    def backward_to(self, parameters: list[torch.Tensor], leaf_grads: list[torch.Tensor | None]
                    ) -> tuple[torch.Tensor | None, ...]:
        """One backward through the recorded forwards: d <outputs, leaf_grads> / d parameters (None: unused)."""
        pairs = [(o, g.to(o.dtype)) for o, g in zip(self._originals(), leaf_grads) if g is not None]
        if not pairs:
            return (None,) * len(parameters)
        outs, grads = zip(*pairs)
        return torch.autograd.grad(outs, parameters, grads, allow_unused=True)

    def surrogate(self, leaf_grads: list[torch.Tensor | None]) -> torch.Tensor:
        """sum <outputs, leaf_grads> over the recorded forwards (:func:`gradient_loss`): its backward is
        :meth:`backward_to`'s, run by the caller (an optimizer's or a DeepSpeed engine's backward)."""
        return gradient_loss((o, g) for o, g in zip(self._originals(), leaf_grads) if g is not None)


def gradient_loss(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum <x, g> over ``(x, g)`` pairs with ``g`` held constant: a loss whose gradient in each ``x`` is its ``g``,
    for handing a computed gradient to a backward someone else owns; a zero without graph for no pairs."""
    terms = [(x * g.detach().to(x.dtype)).sum() for x, g in pairs]
    return sum(terms[1:], terms[0]) if terms else torch.zeros(())


def _generator_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_generator_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _dropout_arguments(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
                       ) -> tuple[torch.Tensor, float, bool, bool]:
    """The arguments of :func:`torch.nn.functional.dropout`, bound by its own signature."""
    return input, p, training, inplace


class _DropoutMasks(TorchFunctionMode):
    """Routes :func:`torch.nn.functional.dropout` (``nn.Dropout``, Hugging Face eager attention) through
    :meth:`RandomStateReplay._dropout` while active; every other function runs unchanged."""

    def __init__(self, owner: "RandomStateReplay") -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.dropout:
            return self.owner._dropout(func, args, kwargs)
        return func(*args, **kwargs)


class RandomStateReplay:
    """The same random draws at every evaluation of one loss on one batch (each :meth:`replay` block).

    * Dropout through :func:`torch.nn.functional.dropout` (``nn.Dropout`` and Hugging Face's eager attention) draws
      a boolean keep-mask m ~ Bernoulli(1 - p) on the first evaluation and computes x * m / (1 - p); later
      evaluations reuse m.  A mask is keyed by the module in ``modules`` that made the call (innermost, by forward
      hooks) and its position among that module's calls, so an evaluation that skips a module (the teacher
      replayed by :class:`RecordedCalls`) or calls the modules in another order still gets each module's own
      masks.  Replaying a mask costs one multiply instead of a Bernoulli draw (the draw dominates dropout on CPU),
      and the graph saves the mask as bool instead of a float noise tensor.  A call whose shape or ``p`` differs
      from the recorded one draws a fresh mask.
    * The CPU (and CUDA) random state is restored before every evaluation, and after each replayed dropout call set
      to the state that followed its recording, so other random ops (dropout inside SDPA kernels) draw the same
      numbers too.
    """

    def __init__(self, devices: Sequence[torch.device], modules: Sequence[nn.Module] = ()) -> None:
        generators = [torch.device("cpu")] + [torch.device("cuda", index)
                                              for index in sorted({d.index or 0 for d in devices if d.type == "cuda"})]
        self._states = [(device, _generator_state(device)) for device in generators]
        self._modules = list(modules)
        #: (module index or -1, call index within that module) -> (keep mask, p, generator state after the draw)
        self._masks: dict[tuple[int, int], tuple[torch.Tensor, float, torch.Tensor]] = {}
        self._recording = True
        self._active: list[int] = []  # stack of the modules whose forward is running
        self._calls: dict[int, int] = {}

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body with the recorded dropout masks (recording them on the first call) from the snapshot's
        random state.  Afterwards the global random state is what the recording left, or after a replay what it was
        before the replay: a replay's draws are the recording's, so it must not rewind the generators (the next
        forward, e.g. the quiz loss's or the next step's, would draw the recorded numbers again)."""
        before = None if self._recording else [(device, _generator_state(device)) for device, _ in self._states]
        for device, state in self._states:
            _set_generator_state(device, state)
        self._active, self._calls = [], {}
        handles = []
        for index, module in enumerate(self._modules):
            handles.append(module.register_forward_pre_hook(functools.partial(self._enter, index)))
            handles.append(module.register_forward_hook(self._leave, always_call=True))
        try:
            with _DropoutMasks(self):
                yield
        finally:
            for handle in handles:
                handle.remove()
            self._recording = False
            for device, state in before or ():
                _set_generator_state(device, state)

    def _enter(self, index: int, *_: Any) -> None:
        self._active.append(index)

    def _leave(self, *_: Any) -> None:
        self._active.pop()

    def _dropout(self, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        input, p, training, inplace = _dropout_arguments(*args, **kwargs)
        if not training or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
            return func(*args, **kwargs)  # identity, all zeros or an error: no draw to replay
        owner = self._active[-1] if self._active else -1
        key = (owner, self._calls.get(owner, 0))
        self._calls[owner] = key[1] + 1
        recorded = self._masks.get(key)
        if self._recording or recorded is None or recorded[0].shape != input.shape \
                or recorded[0].device != input.device or recorded[1] != p:
            keep = torch.empty_like(input, dtype=torch.uint8).bernoulli_(1.0 - p)
            if self._recording:
                self._masks[key] = (keep, p, _generator_state(input.device))
        else:
            keep = recorded[0]
            _set_generator_state(input.device, recorded[2])
        scale = 1.0 / (1.0 - p)
        return input.mul_(keep).mul_(scale) if inplace else input.mul(keep).mul_(scale)


def call_loss(loss_fn: Callable[..., torch.Tensor], name: str, *args: Any) -> torch.Tensor:
    """Call a user loss and check that it returned a real scalar tensor (the message names ``name``)."""
    value = loss_fn(*args)
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        raise TypeError(f"{name} must return a floating scalar tensor, got "
                        f"{type(value).__name__}{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}")
    return value.reshape(())


def check_finite_loss(name: str, value: torch.Tensor, average: Average | None = None) -> float:
    """The loss as a float; raises ``FloatingPointError`` naming ``name`` when it is NaN or infinite.

    With ``average`` (data parallel) the number is the mean over the ranks: a non-finite loss on any rank then
    stops every rank at the same point, instead of leaving the others waiting in the next collective."""
    if average is not None:
        mean = value.detach().reshape(1).to(torch.promote_types(value.dtype, torch.float32)).clone()
        average([mean])
        value = mean
    number = float(value.detach())
    if not math.isfinite(number):
        raise FloatingPointError(f"{name} is not finite ({number}); no update was applied")
    return number


class _WithoutParameterGrads:
    """``module`` called without building a graph to its own parameters (see :func:`without_parameter_grads`)."""

    def __init__(self, module: nn.Module) -> None:
        object.__setattr__(self, "_module", module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = pytree.tree_leaves((args, kwargs))
        if any(isinstance(x, torch.Tensor) and _carries_derivative(x) for x in inputs):
            return self._module(*args, **kwargs)  # the caller's gradient flows through this module's inputs
        with torch.no_grad():
            return self._module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def without_parameter_grads(module: nn.Module) -> _WithoutParameterGrads:
    """``module`` as a frozen participant of a loss: calls whose inputs carry no derivative run under no_grad.

    The real student step uses it for the teacher: the student's gradient never flows through the teacher's
    parameters, so building the teacher's graph would only cost memory.
    """
    return _WithoutParameterGrads(module)
