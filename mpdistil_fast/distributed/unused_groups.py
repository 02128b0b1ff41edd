"""torch's rule for parameters that a step did not use, kept under optimizer wrappers that hand out zero gradients.

A ``torch.optim`` optimizer skips a parameter whose ``.grad`` is ``None``: no update, no weight decay, and its
state (Adam's moments and step count) stays as it was.  DeepSpeed's engines give their optimizer a gradient for
every parameter instead (ZeRO steps flat partitions that hold zeros where the backward pass reached nothing), so
AdamW's momentum and weight decay would still move the head of a task that the step did not train, and its step
count would run on with the rest of the model's.  :class:`UnusedGroupGuard` restores torch's rule for every
parameter group that received no gradient on any rank: the wrapped torch optimizer steps it like the others (a
flat partition cannot be left out of the wrapper's step), and the guard puts the group's parameters and state back
as they were before the step.  The unit is the group, so the groups must be built to match what a step can leave
unused (:func:`~mpdistil_fast.distributed.runtime.parameter_groups` gives each task head its own).  ZeRO-3 also
keeps a parameter's last gradient partition when a step's backward pass does not reach it (it copies gradients in
only for the parameters that it reduces), so the global norm that clipping divides by would count a stale head's
gradient: the guard has such gradients cleared before the step (``clear_gradients``).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn


class UnusedGroupGuard:
    """Undo the optimizer step of every parameter group that no backward pass reached since the last step.

    ``optimizer`` is the torch optimizer a wrapper steps (its ``param_groups`` may hold the wrapper's flat partitions
    by then); ``groups[i]`` are the model parameters of its group ``i`` as it was built.  ``reduce_max`` takes the
    maximum of a float tensor over the data-parallel ranks in place, so that a group counts as used when any rank
    used it (a data-parallel step averages their gradients).  Run the wrapper's step inside :meth:`step` on every
    rank, and call :meth:`remove` when the wrapper is retired.

    ``clear_gradients``, when given, is called before the step with the parameters that no rank's backward pass
    reached since the last step, to zero whatever gradient the wrapper still holds for them.  A group that a step
    used only in part cannot be left out; the guard warns once about it, naming the parameters (``names``: id of a
    parameter -> its name).

    A group that had no state before the step is left with zero tensors and step 0: Adam's and AdamW's fresh state
    (their first step starts from zero moments and counts from 0), which keeps checkpoints of the wrapper complete.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, groups: list[list[nn.Parameter]],
                 reduce_max: Callable[[torch.Tensor], None] | None = None,
                 clear_gradients: Callable[[list[nn.Parameter]], None] | None = None,
                 names: dict[int, str] | None = None) -> None:
        if len(groups) != len(optimizer.param_groups):
            raise ValueError(f"groups has {len(groups)} entries for an optimizer with "
                             f"{len(optimizer.param_groups)} parameter groups")
        self.optimizer = optimizer
        self._groups = groups
        self._reduce_max = reduce_max
        self._clear_gradients = clear_gradients
        self._names = names or {}  # id(parameter) -> its name, for the warning below
        self._warned: set[int] = set()  # groups warned about once already
        self._reached: set[int] = set()  # ids of the parameters a backward pass reached since the last step
        self._skipped: set[int] = set()  # ids of the optimizer's group dicts to leave alone in this step
        self._saved: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any] | None]] = []
        self._keep_on: torch.device | None = None  # where the values of the skipped groups are kept meanwhile
        self._handles = [param.register_post_accumulate_grad_hook(self._mark_reached)
                         for params in groups for param in params]
        self._handles += [optimizer.register_step_pre_hook(self._save_skipped),
                          optimizer.register_step_post_hook(self._restore_skipped)]

    def _mark_reached(self, param: nn.Parameter) -> None:
        self._reached.add(id(param))

    @contextmanager
    def step(self) -> Iterator[list[int]]:
        """Around the wrapper's step, on every rank: the groups that no rank's backward pass reached since the last
        step are left as they were (their indices are yielded); the next step's record starts empty."""
        params = [p for group in self._groups for p in group]
        reached = torch.tensor([id(p) in self._reached for p in params], dtype=torch.float32)
        self._reached.clear()
        if self._reduce_max is not None:
            self._reduce_max(reached)
        flags, skipped, offset = reached.tolist(), [], 0
        for index, group in enumerate(self._groups):
            group_flags, offset = flags[offset:offset + len(group)], offset + len(group)
            if not any(group_flags):
                skipped.append(index)
            elif not all(group_flags) and index not in self._warned:
                self._warned.add(index)
                names = [self._names.get(id(p), "?") for p, flag in zip(group, group_flags) if not flag]
                warnings.warn(f"no gradient reached {names} in a step that trained the rest of their optimizer "
                              "group: the DeepSpeed optimizer steps them with zero gradients (weight decay and "
                              "momentum still move them, unlike torch's AdamW); give them a group of their own "
                              "(an nn.ModuleDict entry) or freeze them", stacklevel=3)
        unreached = [p for p, flag in zip(params, flags) if not flag]
        if unreached and self._clear_gradients is not None:
            self._clear_gradients(unreached)
        with self._leaving_alone(skipped):
            yield skipped

    @contextmanager
    def untouched(self) -> Iterator[None]:
        """Around code that may step the optimizer but must leave it as it is: DeepSpeed's ZeRO-0 bf16/fp16
        wrapper (``FP16_UnfusedOptimizer``) takes a step with zero gradients while it is built, to allocate the
        state, which would weight-decay every parameter once and count one step more than torch.  What the step
        would change is kept in host memory meanwhile (a whole model's fp32 copy must not double on the device)."""
        with self._leaving_alone(list(range(len(self._groups))), keep_on=torch.device("cpu")):
            yield

    @contextmanager
    def _leaving_alone(self, groups: list[int], keep_on: torch.device | None = None) -> Iterator[None]:
        """Steps inside leave ``groups`` as they were; their values are kept on ``keep_on`` (default: where they
        are) in the meantime."""
        self._skipped = {id(self.optimizer.param_groups[i]) for i in groups}
        self._keep_on = keep_on
        try:
            yield
        finally:
            self._skipped = set()
            self._saved.clear()

    def _save_skipped(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # a wrapper may step its groups one at a time (ZeRO 1/2 and 3 do): look for the skipped ones in each call
        for group in optimizer.param_groups:
            if id(group) not in self._skipped:
                continue
            for param in group["params"]:
                state = optimizer.state.get(param)
                saved = None if not state else {key: self._kept(value) if torch.is_tensor(value) else value
                                                for key, value in state.items()}
                self._saved.append((param, self._kept(param.detach()), saved))

    def _kept(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self._keep_on or tensor.device, copy=True)

    @torch.no_grad()
    def _restore_skipped(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for param, value, saved in self._saved:
            param.copy_(value)
            state = optimizer.state[param]
            for key, current in state.items():
                before = 0 if saved is None else saved[key]
                if not torch.is_tensor(current):
                    state[key] = before
                elif torch.is_tensor(before):
                    current.copy_(before)
                else:
                    current.fill_(before)
        self._saved.clear()

    def remove(self) -> None:
        """Take the hooks off the parameters and the optimizer."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
