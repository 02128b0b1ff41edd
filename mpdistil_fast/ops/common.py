"""Helpers shared by the fused-op layers (custom-op registration, dtypes, backend choice under torch.compile)."""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Callable, NamedTuple, NoReturn

import torch

from mpdistil_fast.backends import ENV_OVERRIDE, cpu_kernel_build, inside_torch_func_transform, resolve_backend


@functools.lru_cache(maxsize=256)
def _resolve_backend_cached(requested: str, op: str, device: torch.device, environment: tuple,
                            transformed: bool) -> str:
    return resolve_backend(requested, op, device, transformed=transformed)


#: The environment variables the backend choice depends on (read at every call: the memo is keyed on them).
_BACKEND_ENVIRONMENT = (ENV_OVERRIDE, "TRITON_INTERPRET")
#: Their keys in ``os.environ``'s raw mapping (bytes on POSIX), encoded once.
_RAW_OVERRIDE, _RAW_INTERPRET = (tuple(os.environ.encodekey(name) for name in _BACKEND_ENVIRONMENT)
                                 if isinstance(os.environ, os._Environ) else (None, None))


def _backend_environment() -> tuple:
    """The values of :data:`_BACKEND_ENVIRONMENT` now, as a memo key.  From ``os.environ``'s raw mapping when it is
    the usual ``os._Environ`` (one dict lookup each: ``os.environ.get`` encodes the key and decodes the value, 0.7 us
    a variable on this project's CPU, on every call of every public op); ``os.environ.get`` otherwise (a mapping put
    in its place).  Updates through ``os.environ`` (``monkeypatch.setenv``, ``mock.patch.dict``) write the raw
    mapping, so they are seen at the next call."""
    environ = os.environ
    if type(environ) is os._Environ and _RAW_OVERRIDE is not None:
        data = environ._data
        return data.get(_RAW_OVERRIDE), data.get(_RAW_INTERPRET)
    return environ.get(ENV_OVERRIDE, ""), environ.get("TRITON_INTERPRET", "")


def _resolve_backend_memo(requested: str, op: str, device: torch.device) -> str:
    """``resolve_backend`` memoised per (request, op, device, backend-related environment variables, inside a
    torch.func transform or not): the registry queries the dispatcher on every call, a visible cost next to a
    0.1 ms kernel."""
    return _resolve_backend_cached(requested, op, device, _backend_environment(), inside_torch_func_transform())


#: The backend choice for code that torch.compile traces: a constant of the call site, so Dynamo takes its
#: result instead of tracing the registry (which imports modules and queries the dispatcher).
resolve_backend_traceable = torch.compiler.assume_constant_result(_resolve_backend_memo)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype (what the fused kernels accumulate in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_double_backward(op: str) -> Callable[..., NoReturn]:
    """An autograd backward for a fused ``<op>_bwd`` custom op that refuses double backward with a clear error."""

    def backward(ctx, *grads) -> NoReturn:
        raise RuntimeError(f"{op}: double backward through the fused kernels (cpp, cuda, triton) is not supported; "
                           "use backend='torch' (composite, differentiable twice) or a first-order hypergradient "
                           "(mpdistil_fast.bilevel's 'finite_difference' method)")

    return backward


def fused_kernels(backend: str, triton_module: str) -> ModuleType | object:
    """Where a fused backend's ``<op>_fwd`` / ``<op>_bwd`` live: ``torch.ops.mpdistil_C`` for cpp and cuda (the
    dispatcher picks the CPU or CUDA kernel by device) or the Triton module ``mpdistil_fast.kernels.<name>``."""
    if backend in ("cpp", "cuda"):
        if backend == "cpp":
            cpu_kernel_build()  # the CPU kernels are a library of their own, loaded once
        return torch.ops.mpdistil_C
    if backend == "triton":
        return importlib.import_module(f"mpdistil_fast.kernels.{triton_module}")
    raise ValueError(f"backend must be 'cpp', 'cuda' or 'triton' for a fused op, got {backend!r}")


class FusedOp(NamedTuple):
    """The pieces of a fused op shared by its ``torch.library`` custom op (what torch.compile traces) and its eager
    path (:func:`call_fused`).  ``setup_context(ctx, inputs, outputs)`` saves what backward needs;
    ``backward(ctx, bwd, *grads)`` returns the input gradients, calling ``bwd(*args)`` for the fused backward
    (the ``<name>_bwd`` arguments without ``backend``)."""

    name: str
    triton_module: str
    forward_op: Callable
    backward_op: Callable
    setup_context: Callable
    backward: Callable
    non_differentiable_outputs: tuple[int, ...] = ()

    def register_autograd(self) -> None:
        """Wire ``backward`` and the double-backward refusal into the custom ops."""

        def custom_backward(ctx, *grads):
            return self.backward(ctx, functools.partial(self.backward_op, backend=ctx.backend), *grads)

        self.forward_op.register_autograd(custom_backward, setup_context=self.setup_context)
        self.backward_op.register_autograd(no_double_backward(self.name))


def graph_capture() -> bool:
    """True while torch.compile / torch.export or ``torch.jit.trace`` records the call: the fused ops must then run
    as their ``torch.library`` custom ops, which a graph can hold (``torch.jit.trace`` cannot record the eager
    autograd.Functions with Python arguments: it failed with ``RuntimeError: unordered_map::at``, or, without
    grad, recorded a Python call that ``torch.jit.save`` refuses)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def call_fused(op: FusedOp, *inputs):
    """Run a fused op (inputs end with ``backend``): the custom op when a graph is captured (torch.compile,
    torch.export, torch.jit.trace: :func:`graph_capture`); in eager mode an autograd.Function that calls the same
    kernels and formulas without the custom-op dispatch layers (which cost about 0.3 ms per forward+backward on this
    project's CPU, more than the meta-teacher's kernels themselves)."""
    if graph_capture():
        return op.forward_op(*inputs)
    return _EagerFused.apply(*inputs, op)


class _EagerFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        inputs, op = args[:-1], args[-1]
        ctx.op, ctx.kernels = op, fused_kernels(inputs[-1], op.triton_module)
        outputs = getattr(ctx.kernels, f"{op.name}_fwd")(*inputs[:-1])
        op.setup_context(ctx, inputs, outputs)
        ctx.mark_non_differentiable(*[outputs[i] for i in op.non_differentiable_outputs])
        # outputs saved for backward (hidden MSE's [P, N, H_t] projection, softmax stats) get no gradient: without
        # this, autograd would allocate and zero-fill one of their size (15 ms per hidden-MSE step on this CPU)
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        if grads[0] is None:  # only the loss is differentiable: nothing flows back
            return (None,) * (len(ctx.needs_input_grad))
        # The saved tensors are unpacked once: non-reentrant activation checkpointing (torch.utils.checkpoint)
        # refuses a second unpack in the same backward.
        saved = _Unpacked(ctx, ctx.saved_tensors)
        bwd = getattr(ctx.kernels, f"{ctx.op.name}_bwd")
        if not torch.is_grad_enabled():  # the usual backward (no create_graph): nothing to record, nothing to anchor
            return (*ctx.op.backward(saved, bwd, *grads), None)
        with torch.no_grad():  # the kernels are not differentiable (create_graph=True is handled below)
            result = ctx.op.backward(saved, bwd, *grads)
        anchors = [t for t in (*saved.saved_tensors, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
        if anchors:  # create_graph=True: the gradients refuse a second differentiation
            result = tuple(None if g is None else NoDoubleBackward.apply(g, ctx.op.name, *anchors) for g in result)
        return (*result, None)


class _Unpacked:
    """An autograd ctx whose ``saved_tensors`` were unpacked once (every other attribute is the ctx's)."""

    def __init__(self, ctx, saved_tensors: tuple) -> None:
        self._ctx, self.saved_tensors = ctx, saved_tensors

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)


class NoDoubleBackward(torch.autograd.Function):
    """Identity on a gradient, attached to the differentiable inputs (``anchors``); differentiating it raises."""

    @staticmethod
    def forward(ctx, grad, name, *anchors):
        ctx.name = name
        return grad.clone()

    @staticmethod
    def backward(ctx, *grads):
        no_double_backward(ctx.name)(ctx, *grads)


class GradInForward(torch.autograd.Function):
    """A reduced loss whose fused forward also writes the gradients (``<op>_fwd_grad``), so forward + backward
    read each logit from memory once (Liger-Kernel computes its gradients in forward too).

    ``forward(a, b, row_weight, spec)`` with ``spec = (op, loss_args, weight, reduce, backend)``: the kernels of
    ``op`` ("kd_kl_div" or "kd_jsd") on ``[N, V]`` logits a, b with the op's arguments ``loss_args`` (T, and beta
    for the JSD), the loss sum_r weight * row_weight[r] * loss[r] (row_weight None: all 1) for the gradients, and
    ``reduce(row_losses)`` for the value returned (``reduce`` None: ``sum_r loss[r] * weight``).  The non-tensor
    arguments travel as one tuple: each argument of an autograd.Function costs the C++ ``apply`` a little.
    Backward hands the gradients out, scaled in place only when the incoming gradient is
    not 1 (which costs one host sync, as in Liger); a second backward through the same graph (``retain_graph=True``)
    runs the same forward+gradient kernel again and scales alike, so it returns bitwise the first backward's
    gradients (as ``torch.autograd.gradcheck``'s reentrancy check demands; the op's backward kernel gives values
    that differ in the last bits).  The precomputed gradients hold one [N, V] buffer per differentiable input
    between forward and backward."""

    @staticmethod
    def forward(ctx, a, b, row_weight, spec):
        op, loss_args, weight, reduce, backend = spec
        row_loss, stats, grad_a, grad_b = getattr(fused_kernels(backend, op), f"{op}_fwd_grad")(
            a, b, *loss_args, row_weight, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(a, b, row_weight)
        ctx.precomputed, ctx.spec = (grad_a, grad_b), spec
        # (the sum is a fresh tensor: scaling it in place is the product reduce_rows computes, without a new one)
        return row_loss.sum().mul_(weight) if reduce is None else reduce(row_loss)

    @staticmethod
    def backward(ctx, grad_loss):
        a, b, row_weight = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.precomputed is None:  # a second backward: the forward's kernel again, for bitwise its gradients
            op, loss_args, weight, _, backend = ctx.spec
            _, _, grad_a, grad_b = getattr(fused_kernels(backend, op), f"{op}_fwd_grad")(
                a, b, *loss_args, row_weight, weight, need_a, need_b)
        else:
            (grad_a, grad_b), ctx.precomputed = ctx.precomputed, None
        if grad_loss.item() != 1.0:
            for grad in (grad_a, grad_b):
                if grad.numel():
                    grad.mul_(grad_loss.detach().to(grad.dtype))
        grads = [grad_a if need_a else None, grad_b if need_b else None]
        if torch.is_grad_enabled():  # create_graph=True: these gradients refuse a second differentiation
            anchors = [t for t in (a, b, grad_loss) if t.requires_grad]
            if anchors:
                grads = [None if g is None else NoDoubleBackward.apply(g, ctx.spec[0], *anchors) for g in grads]
        return (*grads, None, None)
