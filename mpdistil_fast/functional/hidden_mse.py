"""Public hidden-state MSE: ``mpdistil_fast.hidden_mse`` (FitNets / patient KD / TinyBERT hint loss)."""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from mpdistil_fast._validation import check_choice, check_mask, check_same_device, check_tensor, promote_pair
from mpdistil_fast.ops.common import call_fused, graph_capture, resolve_backend_traceable
from mpdistil_fast.ops.hidden_mse import HIDDEN_MSE, hidden_mse_torch

LayerMap = Union[None, str, Sequence[int], Sequence[tuple[int, int]]]
Projection = Union[None, Tensor, tuple[Tensor, Optional[Tensor]]]
REDUCTIONS = ("mean", "sum", "none")
LAYER_PRESETS = ("skip", "last")


def layer_pairs(layer_map: LayerMap, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) index pairs, 0-based into the stacks.

    ``None``: layer k to layer k (equal depths).  A list of ints: student layer k to teacher layer ``layer_map[k]``.
    A list of (student, teacher) pairs: as given.  Presets of patient KD (Sun et al., 2019), which match every
    student layer but the last (that one is distilled through the logits), with ``step = L_t // L_s``:
    ``"skip"``: student k -> teacher (k + 1) * step - 1 (6 -> 12 layers: teacher layers 2, 4, 6, 8, 10, 1-based);
    ``"last"``: student k -> teacher L_t - L_s + k (6 -> 12 layers: teacher layers 7 .. 11).
    """
    if layer_map is None:
        if student_layers != teacher_layers:
            raise ValueError(f"layer_map is needed when student ({student_layers}) and teacher ({teacher_layers}) "
                             "stacks have different depths")
        return [(k, k) for k in range(student_layers)]
    if isinstance(layer_map, str):
        check_choice("layer_map", layer_map, LAYER_PRESETS)
        if not 2 <= student_layers <= teacher_layers:
            raise ValueError(f"layer_map={layer_map!r} needs 2 <= student layers <= teacher layers, got "
                             f"{student_layers} and {teacher_layers}")
        step = teacher_layers // student_layers
        offset = teacher_layers - student_layers
        return [(k, (k + 1) * step - 1 if layer_map == "skip" else offset + k) for k in range(student_layers - 1)]
    if not isinstance(layer_map, (list, tuple)) or len(layer_map) == 0:
        raise TypeError(f"layer_map must be None, 'skip', 'last' or a non-empty list, got {layer_map!r}")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in layer_map):
        if len(layer_map) != student_layers:
            raise ValueError(f"layer_map must name one teacher layer per student layer ({student_layers}), "
                             f"got {len(layer_map)}")
        pairs = list(enumerate(layer_map))
    elif all(isinstance(p, (list, tuple)) and len(p) == 2
             and all(isinstance(i, int) and not isinstance(i, bool) for i in p) for p in layer_map):
        pairs = [(int(s), int(t)) for s, t in layer_map]
    else:
        raise TypeError(f"layer_map must hold ints or (student, teacher) int pairs, got {layer_map!r}")
    for s, t in pairs:
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise ValueError(f"layer_map pair ({s}, {t}) is out of range for {student_layers} student and "
                             f"{teacher_layers} teacher layers")
    return pairs


def projection_parts(projection: Projection, name: str = "projection") -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(weight, bias) of a projection argument ``name``: None, a weight, or a (weight, bias) pair; a bias without a
    weight is refused (it would otherwise be dropped without a word)."""
    if projection is None or isinstance(projection, Tensor):
        return projection, None
    if isinstance(projection, (tuple, list)) and len(projection) == 2:
        if projection[0] is None and projection[1] is not None:
            raise ValueError(f"{name} has a bias but no weight: pass (weight, bias), a weight alone, or None")
        return projection[0], projection[1]
    raise TypeError(f"{name} must be None, a weight tensor or a (weight, bias) tuple, got {type(projection).__name__}")


@functools.lru_cache(maxsize=64)
def layer_index_tensors(pairs: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """The student and teacher layer indices of ``pairs`` as int64 tensors on ``device``, made once per (pairs,
    device): a fresh tensor per call is a host-to-device copy from pageable memory, which waits for the GPU's queue
    to drain.  The kernels only read them.  Made outside inference mode, so that a first call under
    ``torch.inference_mode()`` (evaluation) does not cache tensors that a later training step could not save."""
    with torch.inference_mode(False):
        return (torch.tensor([s for s, _ in pairs], dtype=torch.long, device=device),
                torch.tensor([t for _, t in pairs], dtype=torch.long, device=device))


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, *, mask: Optional[Tensor] = None,
               normalize: bool = False, projection: Projection = None, layer_map: LayerMap = None,
               reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Mean squared error between student and teacher hidden states, fused (FitNets, Romero et al., ICLR 2015; patient
    KD, Sun et al., EMNLP 2019; TinyBERT, Jiao et al., Findings of EMNLP 2020).

    ``student_hidden`` / ``teacher_hidden``: layer stacks ``[L, B, S, H]``, token states ``[B, S, H]`` or pooled
    states ``[B, H]``.  For the pairs of :func:`layer_pairs` and valid positions (``mask`` ``[B, S]`` or ``[B]``,
    True = keep), with ``y = W s + b`` when ``projection = (W [H_t, H_s], b)`` is given and ``f`` the L2
    normalisation when ``normalize`` (patient KD):

        sse_l = sum_{valid} || f(y) - f(t) ||^2
        "sum": sum_l sse_l;   "mean": sum_l sse_l / (valid * H_t * pairs);   "none": sse_l / (valid * H_t) per pair

    (``"none"`` on an unstacked input is a 0-d tensor).  No valid position (all masked, or no row) gives 0.  States
    of different dtypes are promoted to the wider one (a bf16 student beside an fp32 teacher: fp32).  The result is
    float64 for float64 inputs and float32 otherwise; gradients flow to the student states, the projection and, when
    it requires grad, the teacher states.

    Args:
        student_hidden, teacher_hidden: floating states of the same layout and batch dimensions; widths H_s, H_t.
        mask: bool ``[B, S]`` (``[B]`` for pooled states), True = keep; None keeps every position.
        normalize: L2-normalise each state (after the projection) before the difference (patient KD).
        projection: None (H_s must equal H_t), a weight ``W [H_t, H_s]`` or ``(W, b [H_t])``, in the states' device.
        layer_map: stacked inputs only: None (layer k to layer k, equal depths), ``"skip"`` / ``"last"``, a teacher
            index per student layer, or (student, teacher) index pairs (:func:`layer_pairs`).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (formulas above).
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.

    Raises:
        TypeError / ValueError naming the argument (non-floating input, shapes, depths or widths that do not match,
        a projection of the wrong shape, a bad mask, an unknown choice or a backend that cannot run here).

    Example::

        >>> import torch, mpdistil_fast
        >>> student, teacher = torch.randn(4, 2, 5, 8), torch.randn(4, 2, 5, 8)           # [L, B, S, H]
        >>> loss = mpdistil_fast.hidden_mse(student, teacher)
        >>> torch.allclose(loss, torch.nn.functional.mse_loss(student, teacher), atol=1e-6)
        True
        >>> mpdistil_fast.hidden_mse(student[:2], teacher, layer_map=[1, 3], reduction="none").shape
        torch.Size([2])
    """
    check_tensor("student_hidden", student_hidden)
    check_tensor("teacher_hidden", teacher_hidden)
    weight, bias = projection_parts(projection)
    if weight is not None:
        check_tensor("projection weight", weight)
    if bias is not None:
        check_tensor("projection bias", bias)
    device = check_same_device(student_hidden=student_hidden, teacher_hidden=teacher_hidden, projection=weight,
                               projection_bias=bias)
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    student_hidden, teacher_hidden = promote_pair(student_hidden, teacher_hidden)  # (as F.mse_loss does)
    if student_hidden.dim() not in (2, 3, 4) or teacher_hidden.dim() != student_hidden.dim():
        raise ValueError("student_hidden and teacher_hidden must both be [L, B, S, H], [B, S, H] or [B, H], got "
                         f"shapes {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    stacked = student_hidden.dim() == 4
    row_shape = student_hidden.shape[1:-1] if stacked else student_hidden.shape[:-1]
    teacher_row_shape = teacher_hidden.shape[1:-1] if stacked else teacher_hidden.shape[:-1]
    if row_shape != teacher_row_shape:
        raise ValueError(f"student_hidden and teacher_hidden must have the same batch dimensions, got "
                         f"{tuple(row_shape)} and {tuple(teacher_row_shape)}")
    width_s, width_t = student_hidden.shape[-1], teacher_hidden.shape[-1]
    if width_s == 0 or width_t == 0:
        raise ValueError(f"student_hidden and teacher_hidden must have a non-empty last (hidden) dimension, got "
                         f"shapes {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    if stacked and (student_hidden.shape[0] == 0 or teacher_hidden.shape[0] == 0):
        raise ValueError(f"student_hidden and teacher_hidden stacks must hold at least one layer, got shapes "
                         f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    if weight is None:
        if width_s != width_t:
            raise ValueError(f"student_hidden width {width_s} != teacher_hidden width {width_t}: pass a projection")
    else:
        if tuple(weight.shape) != (width_t, width_s):
            raise ValueError(f"projection weight must have shape {(width_t, width_s)}, got {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (width_t,):
            raise ValueError(f"projection bias must have shape {(width_t,)}, got {tuple(bias.shape)}")
    mask = check_mask(mask, row_shape, device)
    if not stacked and layer_map is not None:
        raise ValueError("layer_map needs layer stacks [L, B, S, H]")
    depth_s, depth_t = (student_hidden.shape[0], teacher_hidden.shape[0]) if stacked else (1, 1)
    pairs = layer_pairs(layer_map, depth_s, depth_t)
    backend = resolve_backend_traceable(backend, "hidden_mse", device)

    student = student_hidden.reshape(depth_s, -1, width_s)
    teacher = teacher_hidden.reshape(depth_t, -1, width_t)
    flat_mask = None if mask is None else mask.reshape(-1)
    # (traced, the index tensors are constants of the graph: Dynamo warns about, and ignores, the lru_cache, and
    # torch.jit.trace would record the first call's tensor creation but a cached constant in its check run)
    index_tensors = layer_index_tensors.__wrapped__ if graph_capture() else layer_index_tensors
    student_layers, teacher_layers = index_tensors(tuple(pairs), device)
    if backend == "torch":
        sse = hidden_mse_torch(student, teacher, student_layers, teacher_layers, flat_mask, weight, bias, normalize)
    else:
        sse = call_fused(HIDDEN_MSE, student, teacher, student_layers, teacher_layers, flat_mask, weight, bias,
                         normalize, backend)[0]
    if reduction == "sum":
        return sse.sum()
    valid = max(student.shape[1], 1) if flat_mask is None else flat_mask.sum().clamp_min(1)  # no row: exactly 0
    per_layer = sse / (valid * width_t)
    if reduction == "mean":
        return per_layer.mean()
    return per_layer if stacked else per_layer[0]
