"""Triton kernels of the hidden-state MSE (same contract as ``torch.ops.mpdistil_C.hidden_mse_fwd/_bwd``).

The kernels read the selected student (or projected) and teacher layers in place through the index tensors.
Forward: one program per tile of rows of one layer pair.  Backward: one program per row n loops over the layer
pairs, so pairs sharing a layer never race.  The optional projection W s + b runs around the kernels as one
cuBLAS GEMM over all pairs' rows (forward; two in backward); the squared error, the patient-KD normalisation, the mask and all
row gradients are fused.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from mpdistil_fast.kernels.device import on_input_device
from mpdistil_fast.ops.common import accumulation_dtype

NORM_EPS = 1e-12
#: Elements of one forward program's [rows, H] tile (8 rows of H = 768 padded to 1024).
FORWARD_TILE = 8192


@triton.jit
def _normalized(x, eps: tl.constexpr):
    """x / max(||x||, eps), the inverse norm, and whether the clamp was active."""
    norm = tl.sqrt(tl.sum(x * x, axis=0))
    clamped = norm < eps
    inv = 1.0 / tl.maximum(norm, eps)
    return x * inv, inv, clamped


@triton.jit
def _pair_rows(y_ptr, y_layer_stride, t_ptr, t_layer_stride, y_layers_ptr, t_layers_ptr, p, n, H, cols, in_row,
               ACC: tl.constexpr):
    """Row n of pair p: (y, t) in ACC and their offsets, read in place through the layer indices."""
    y_offsets = tl.load(y_layers_ptr + p).to(tl.int64) * y_layer_stride + n * H + cols
    t_offsets = tl.load(t_layers_ptr + p).to(tl.int64) * t_layer_stride + n * H + cols
    y = tl.load(y_ptr + y_offsets, mask=in_row, other=0.0).to(ACC)
    t = tl.load(t_ptr + t_offsets, mask=in_row, other=0.0).to(ACC)
    return y, t, y_offsets, t_offsets


@triton.jit
def _this_row(mask_ptr, H, HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr):
    """(n, column offsets, which offsets lie in the row, whether row n takes part) of this program's row."""
    n = tl.program_id(0).to(tl.int64)  # n * H may pass 2^31
    cols = tl.arange(0, BLOCK_H)
    valid = n >= 0
    if HAS_MASK:
        valid = tl.load(mask_ptr + n) != 0
    return n, cols, cols < H, valid


@triton.jit
def hidden_mse_fwd_kernel(y_ptr, y_layer_stride, t_ptr, t_layer_stride, y_layers_ptr, t_layers_ptr, mask_ptr,
                          row_sse_ptr, N, H, HAS_MASK: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, EPS: tl.constexpr):
    """Forward: program (tile, p) takes BLOCK_ROWS rows of pair p as one [BLOCK_ROWS, BLOCK_H] tile (many loads
    in flight), and writes their squared errors (0 for masked rows)."""
    p = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_H)
    in_rows = rows < N
    valid = in_rows
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + rows, mask=in_rows, other=0) != 0)
    inside = valid[:, None] & (cols[None, :] < H)
    offsets = rows.to(tl.int64)[:, None] * H + cols[None, :]
    y = tl.load(y_ptr + tl.load(y_layers_ptr + p).to(tl.int64) * y_layer_stride + offsets, mask=inside,
                other=0.0).to(ACC)
    t = tl.load(t_ptr + tl.load(t_layers_ptr + p).to(tl.int64) * t_layer_stride + offsets, mask=inside,
                other=0.0).to(ACC)
    if NORMALIZE:
        y = y / tl.maximum(tl.sqrt(tl.sum(y * y, axis=1)), EPS)[:, None]
        t = t / tl.maximum(tl.sqrt(tl.sum(t * t, axis=1)), EPS)[:, None]
    d = y - t
    tl.store(row_sse_ptr + p * N + rows, tl.sum(d * d, axis=1), mask=in_rows)


@triton.jit
def hidden_mse_bwd_kernel(y_ptr, y_layer_stride, t_ptr, t_layer_stride, y_layers_ptr, t_layers_ptr, mask_ptr,
                          scale_ptr, grad_y_ptr, grad_t_ptr, P, H, HAS_MASK: tl.constexpr,
                          NORMALIZE: tl.constexpr, NEED_GRAD_T: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_H: tl.constexpr, EPS: tl.constexpr):
    n, cols, in_row, valid = _this_row(mask_ptr, H, HAS_MASK, BLOCK_H)
    for p in range(P):
        y, t, y_offsets, t_offsets = _pair_rows(y_ptr, y_layer_stride, t_ptr, t_layer_stride, y_layers_ptr,
                                                t_layers_ptr, p, n, H, cols, in_row, ACC)
        two_s = 2.0 * tl.load(scale_ptr + p).to(ACC)
        if NORMALIZE:
            # d/dy of ||u - v||^2 with u = y / n_y: (g_u - u (u . g_u) [not clamped]) / n_y, g_u = 2 s (u - v).
            u, inv_y, clamped_y = _normalized(y, EPS)
            v, inv_t, clamped_t = _normalized(t, EPS)
            g_u = two_s * (u - v)
            u_dot = tl.where(clamped_y, 0.0, tl.sum(u * g_u, axis=0))
            v_dot = tl.where(clamped_t, 0.0, -tl.sum(v * g_u, axis=0))
            g_y = (g_u - u * u_dot) * inv_y
            g_t = (-g_u - v * v_dot) * inv_t
        else:
            g_y = two_s * (y - t)
            g_t = -g_y
        g_y = tl.where(valid & in_row, g_y, 0.0)
        previous = tl.load(grad_y_ptr + y_offsets, mask=in_row, other=0.0)
        tl.store(grad_y_ptr + y_offsets, previous + g_y, mask=in_row)
        if NEED_GRAD_T:
            g_t = tl.where(valid & in_row, g_t, 0.0)
            previous_t = tl.load(grad_t_ptr + t_offsets, mask=in_row, other=0.0)
            tl.store(grad_t_ptr + t_offsets, previous_t + g_t, mask=in_row)


def _triton_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _mask_arg(mask: Optional[Tensor], fallback: Tensor) -> tuple[Tensor, bool]:
    return (mask.contiguous().view(torch.uint8), True) if mask is not None else (fallback, False)


def _selected_layers(student: Tensor, student_layers: Tensor, acc: torch.dtype) -> Tensor:
    """x = student[student_layers] ``[P, N, H_s]`` in ``acc``, gathered on the device (no host copy of the layer
    list, which would wait for the GPU's queue)."""
    return student.index_select(0, student_layers).to(acc)


def _rows_source(student: Tensor, student_layers: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(row stack the kernels read as y, its layer indices, projected rows or an empty tensor); the projection
    y = W x + b of every pair is one GEMM."""
    if weight is None:
        return student, student_layers, student.new_empty((0,), dtype=acc)
    x = _selected_layers(student, student_layers, acc)
    projected = F.linear(x, weight.to(acc), None if bias is None else bias.to(acc)).contiguous()
    return projected, torch.arange(x.shape[0], device=student.device), projected


@on_input_device
def hidden_mse_fwd(student: Tensor, teacher: Tensor, student_layers: Tensor, teacher_layers: Tensor,
                   mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   normalize: bool) -> tuple[Tensor, Tensor]:
    """(sse [P], projected rows [P, N, H_t] or empty): see ``mpdistil_fast.ops.hidden_mse``."""
    student, teacher = student.contiguous(), teacher.contiguous()
    acc = accumulation_dtype(student.dtype)
    pairs, rows, width = student_layers.numel(), student.shape[1], teacher.shape[2]
    y, y_layers, projected = _rows_source(student, student_layers, weight, bias, acc)
    row_sse = torch.empty((pairs, rows), dtype=acc, device=student.device)
    mask_arg, has_mask = _mask_arg(mask, row_sse)
    if rows > 0 and pairs > 0:
        block_h = triton.next_power_of_2(width)
        block_rows = max(1, min(FORWARD_TILE // block_h, triton.next_power_of_2(rows)))
        hidden_mse_fwd_kernel[(triton.cdiv(rows, block_rows), pairs)](
            y, y.stride(0), teacher, teacher.stride(0), y_layers, teacher_layers, mask_arg, row_sse, rows, width,
            HAS_MASK=has_mask, NORMALIZE=normalize, ACC=_triton_acc(student.dtype), BLOCK_ROWS=block_rows,
            BLOCK_H=block_h, EPS=NORM_EPS, num_warps=8)
    return row_sse.sum(1), projected


@on_input_device
def hidden_mse_bwd(grad_sse: Tensor, student: Tensor, teacher: Tensor, student_layers: Tensor,
                   teacher_layers: Tensor, mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   projected: Tensor, normalize: bool, need_teacher_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (student, teacher or empty, weight or empty, bias or empty)."""
    student, teacher = student.contiguous(), teacher.contiguous()
    acc = accumulation_dtype(student.dtype)
    rows, width = student.shape[1], teacher.shape[2]
    if weight is None:
        y, y_layers = student, student_layers
    else:
        y, y_layers = projected, torch.arange(student_layers.numel(), device=student.device)
    grad_y = torch.zeros(y.shape, dtype=acc, device=student.device)
    grad_t = torch.zeros(teacher.shape, dtype=acc, device=student.device) if need_teacher_grad else grad_y
    scale = grad_sse.to(acc).contiguous()
    mask_arg, has_mask = _mask_arg(mask, scale)
    if rows > 0 and student_layers.numel() > 0:
        hidden_mse_bwd_kernel[(rows,)](y, y.stride(0), teacher, teacher.stride(0), y_layers, teacher_layers, mask_arg,
                                       scale, grad_y, grad_t, student_layers.numel(), width, HAS_MASK=has_mask,
                                       NORMALIZE=normalize, NEED_GRAD_T=need_teacher_grad,
                                       ACC=_triton_acc(student.dtype), BLOCK_H=triton.next_power_of_2(width),
                                       EPS=NORM_EPS)
    empty = lambda: student.new_empty((0,))  # noqa: E731  (custom-op outputs may not alias each other)
    grad_teacher = grad_t.to(teacher.dtype) if need_teacher_grad else empty()
    if weight is None:
        return grad_y.to(student.dtype), grad_teacher, empty(), empty()
    # y_p = x_p W^T + b: dW = sum_p g_p^T x_p and dx_p = g_p W, one GEMM each over all pairs' rows; dx_p is added
    # to student layer student_layers[p] (pairs may share a layer)
    x = _selected_layers(student, student_layers, acc)
    if mask is not None:  # g is 0 on masked rows, but padding may hold NaN/inf: 0 * NaN would poison dW
        x = x.masked_fill(~mask[None, :, None], 0)
    grad_weight = grad_y.reshape(-1, width).t().mm(x.reshape(-1, x.shape[2]))
    grad_student = torch.zeros(student.shape, dtype=acc, device=student.device)
    grad_student.index_put_((student_layers,), grad_y.matmul(weight.to(acc)), accumulate=True)
    grad_bias = grad_y.sum((0, 1)).to(bias.dtype) if bias is not None else empty()
    return grad_student.to(student.dtype), grad_teacher, grad_weight.to(weight.dtype), grad_bias
