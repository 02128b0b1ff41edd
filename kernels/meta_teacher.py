"""Triton kernels of the MPDistil meta-teacher loss (same contract as ``torch.ops.mpdistil_C.meta_teacher_loss_*``).

One launch computes the forward of every row, one launch the backward (for float32 tensors: nothing else runs).
Both kernels are persistent: at most one program per multiprocessor walks the (row block, side) tiles, side 0
reading teacher rows and side 1 student rows, and a grid barrier (:mod:`.grid_sync`) separates the phases that need
each other: forward tiles -> the deterministic sum of the per-tile losses; zeroing the parameter-gradient buffer ->
backward tiles.  Each program runs its rows through the optional student projection, the
discriminator (Linear, or Linear -> GELU -> Linear) and the softmax / CE / gold-probability terms, and already
writes dL/dz (the loss is a scalar).  Backward recomputes GELU from the saved pre-activations; parameter gradients
are accumulated with fp32 (fp64) atomics, row gradients are written directly.  Row-local scratch (projected rows,
dL/d(pre-activation), dL/dh_S') is written and re-read by the same program after a barrier.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mpdistil_fast.ops.common import accumulation_dtype

from .device import on_input_device
from .grid_sync import barrier_counters, grid_barrier, persistent_programs

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


@triton.jit
def _tile(ptr, rows, cols, n_rows, n_cols, stride):
    """A [len(rows), len(cols)] tile of a row-major matrix, zero outside it (loaded in the pointer's dtype)."""
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=inside, other=0.0)


@triton.jit
def _store_tile(ptr, value, rows, cols, n_rows, n_cols, stride):
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * stride + cols[None, :], value, mask=inside)


@triton.jit
def _add_tile(ptr, value, rows, cols, n_rows, n_cols, stride):
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.atomic_add(ptr + rows[:, None] * stride + cols[None, :], value, mask=inside)


@triton.jit
def _linear_tile(x_ptr, x_stride, rows, n_rows, w_ptr, out_cols, n_out, width, BLOCK_K: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr):
    """x[rows] @ W[out_cols]^T, reduced over ``width`` in BLOCK_K chunks ([BM, BN], accumulated in ACC)."""
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, width, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = _tile(x_ptr, rows, ks, n_rows, width, x_stride)
        w = _tile(w_ptr, out_cols, ks, n_out, width, width)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    return acc


@triton.jit
def _forward_tile(block, side, row_blocks, h_t_ptr, h_s_ptr, proj_w_ptr, proj_b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                  labels_ptr, projected_ptr, hidden_pre_ptr, z_t_ptr, z_s_ptr, dz_ptr, partial_ptr, B, H, H_S, N1, K,
                  ce_t, gold_t, ce_s, gold_s, HAS_PROJ: tl.constexpr, HAS_PROJ_BIAS: tl.constexpr,
                  HAS_HIDDEN: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, KP: tl.constexpr):
    """Rows ``block`` of one side (0: teacher, 1: student): logits, dL/dz and the rows' loss sum."""
    rows = block * BM + tl.arange(0, BM)
    src_ptr = h_t_ptr
    if side == 1:
        src_ptr = h_s_ptr
        if HAS_PROJ:  # h_S' = h_S P^T + c for these rows, kept in the saved `projected` buffer
            for n0 in range(0, H, BN):
                cols = n0 + tl.arange(0, BN)
                out = _linear_tile(h_s_ptr, H_S, rows, B, proj_w_ptr, cols, H, H_S, BK, BM, BN, ACC)
                if HAS_PROJ_BIAS:
                    out += tl.load(proj_b_ptr + cols, mask=cols < H, other=0.0)[None, :]
                _store_tile(projected_ptr, out, rows, cols, B, H, H)
            tl.debug_barrier()
            src_ptr = projected_ptr
    classes = tl.arange(0, KP)
    if HAS_HIDDEN:  # z = GELU(x W1^T + b1) W2^T + b2, hidden chunk by chunk
        z = tl.zeros((BM, KP), dtype=ACC)
        for n0 in range(0, N1, BN):
            cols = n0 + tl.arange(0, BN)
            pre = _linear_tile(src_ptr, H, rows, B, w1_ptr, cols, N1, H, BK, BM, BN, ACC)
            pre += tl.load(b1_ptr + cols, mask=cols < N1, other=0.0)[None, :]
            _store_tile(hidden_pre_ptr + side * B * N1, pre, rows, cols, B, N1, N1)
            act = pre * 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476))
            w2 = _tile(w2_ptr, classes, cols, K, N1, N1)
            z += tl.dot(act, tl.trans(w2), input_precision="ieee")
        z += tl.load(b2_ptr + classes, mask=classes < K, other=0.0)[None, :]
    else:
        z = _linear_tile(src_ptr, H, rows, B, w1_ptr, classes, K, H, BK, BM, KP, ACC)
        z += tl.load(b1_ptr + classes, mask=classes < K, other=0.0)[None, :]
    # Softmax cross-entropy and gold probability; row loss a_ce CE + a_p p_y, d/dz = a_ce (p - e_y) + a_p p_y (e_y - p)
    a_ce = tl.where(side == 1, ce_s, ce_t).to(ACC) / B
    a_p = tl.where(side == 1, gold_s, gold_t).to(ACC) / B
    valid_class = classes[None, :] < K
    valid_row = rows < B
    labels = tl.load(labels_ptr + rows, mask=valid_row, other=0)
    logits = tl.where(valid_class, z, float("-inf"))
    row_max = tl.max(logits, axis=1)
    exps = tl.exp(logits - row_max[:, None])
    total = tl.sum(exps, axis=1)
    lse = row_max + tl.log(total)
    onehot = (classes[None, :] == labels[:, None]).to(ACC)
    z_gold = tl.sum(tl.where(valid_class, z, 0.0) * onehot, axis=1)
    p = exps / total[:, None]
    p_gold = tl.exp(z_gold - lse)
    dz = a_ce * (p - onehot) + a_p * p_gold[:, None] * (onehot - p)
    row_loss = tl.where(valid_row, a_ce * (lse - z_gold) + a_p * p_gold, 0.0)
    z_out_ptr = z_t_ptr
    if side == 1:
        z_out_ptr = z_s_ptr
    _store_tile(z_out_ptr, z, rows, classes, B, K, K)
    _store_tile(dz_ptr, dz, side * B + rows, classes, B + side * B, K, K)
    tl.store(partial_ptr + side * row_blocks + block, tl.sum(row_loss, axis=0))


@triton.jit
def meta_teacher_fwd_kernel(h_t_ptr, h_s_ptr, proj_w_ptr, proj_b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, labels_ptr,
                            projected_ptr, hidden_pre_ptr, z_t_ptr, z_s_ptr, dz_ptr, partial_ptr, loss_ptr,
                            counters_ptr, row_blocks, B, H, H_S, N1, K, ce_t, gold_t, ce_s, gold_s,
                            HAS_PROJ: tl.constexpr, HAS_PROJ_BIAS: tl.constexpr, HAS_HIDDEN: tl.constexpr,
                            ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            KP: tl.constexpr, SUM_BLOCK: tl.constexpr):
    """Persistent forward: the programs share the (row block, side) tiles, meet at a grid barrier, and program 0
    sums the per-tile losses in a fixed order (deterministic).  One launch, nothing to zero beforehand."""
    programs = tl.num_programs(0)
    for tile in range(tl.program_id(0), 2 * row_blocks, programs):
        _forward_tile(tile % row_blocks, tile // row_blocks, row_blocks, h_t_ptr, h_s_ptr, proj_w_ptr, proj_b_ptr,
                      w1_ptr, b1_ptr, w2_ptr, b2_ptr, labels_ptr, projected_ptr, hidden_pre_ptr, z_t_ptr, z_s_ptr,
                      dz_ptr, partial_ptr, B, H, H_S, N1, K, ce_t, gold_t, ce_s, gold_s, HAS_PROJ, HAS_PROJ_BIAS,
                      HAS_HIDDEN, ACC, BM, BN, BK, KP)
    grid_barrier(counters_ptr, programs)
    if tl.program_id(0) == 0:
        total = tl.zeros((SUM_BLOCK,), dtype=ACC)
        for start in range(0, 2 * row_blocks, SUM_BLOCK):
            offsets = start + tl.arange(0, SUM_BLOCK)
            total += tl.load(partial_ptr + offsets, mask=offsets < 2 * row_blocks, other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, tl.sum(total, axis=0))


@triton.jit
def _backward_tile(block, side, grad_loss_ptr, dz_ptr, h_t_ptr, h_s_ptr, proj_w_ptr, w1_ptr, w2_ptr, hidden_pre_ptr,
                   projected_ptr, grad_pre_ptr, grad_hs_proj_ptr, grad_h_t_ptr, grad_h_s_ptr, grad_proj_w_ptr,
                   grad_proj_b_ptr, grad_w1_ptr, grad_b1_ptr, grad_w2_ptr, grad_b2_ptr, B, H, H_S, N1, K,
                   HAS_PROJ: tl.constexpr, HAS_HIDDEN: tl.constexpr, NEED_H_T: tl.constexpr,
                   NEED_H_S: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   KP: tl.constexpr):
    """Rows ``block`` of one side: their row gradients (written) and parameter gradients (atomically added)."""
    rows = block * BM + tl.arange(0, BM)
    classes = tl.arange(0, KP)
    scale = tl.load(grad_loss_ptr).to(ACC)
    dz = _tile(dz_ptr + side * B * K, rows, classes, B, K, K) * scale
    src_ptr = h_t_ptr
    if side == 1:
        src_ptr = h_s_ptr
        if HAS_PROJ:
            src_ptr = projected_ptr
    if HAS_HIDDEN:  # dL/d(pre) = (dz W2) * GELU'(pre); parameter gradients of both layers
        for n0 in range(0, N1, BN):
            cols = n0 + tl.arange(0, BN)
            pre = _tile(hidden_pre_ptr + side * B * N1, rows, cols, B, N1, N1)
            cdf = 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476))
            act = pre * cdf
            w2 = _tile(w2_ptr, classes, cols, K, N1, N1)
            grad_act = tl.dot(dz, w2, input_precision="ieee")
            grad_pre = grad_act * (cdf + pre * 0.3989422804014327 * tl.exp(-0.5 * pre * pre))
            grad_pre = tl.where(rows[:, None] < B, grad_pre, 0.0)
            _add_tile(grad_w2_ptr, tl.dot(tl.trans(dz), act, input_precision="ieee"), classes, cols, K, N1, N1)
            tl.atomic_add(grad_b1_ptr + cols, tl.sum(grad_pre, axis=0), mask=cols < N1)
            _store_tile(grad_pre_ptr + side * B * N1, grad_pre, rows, cols, B, N1, N1)
            for k0 in range(0, H, BK):
                ks = k0 + tl.arange(0, BK)
                x = _tile(src_ptr, rows, ks, B, H, H)
                _add_tile(grad_w1_ptr, tl.dot(tl.trans(grad_pre), x, input_precision="ieee"), cols, ks, N1, H, H)
        tl.atomic_add(grad_b2_ptr + classes, tl.sum(dz, axis=0), mask=classes < K)
        tl.debug_barrier()
        grad_rows_ptr = grad_pre_ptr + side * B * N1
    else:
        tl.atomic_add(grad_b1_ptr + classes, tl.sum(dz, axis=0), mask=classes < K)
        for k0 in range(0, H, BK):
            ks = k0 + tl.arange(0, BK)
            x = _tile(src_ptr, rows, ks, B, H, H)
            _add_tile(grad_w1_ptr, tl.dot(tl.trans(dz), x, input_precision="ieee"), classes, ks, K, H, H)
    # dL/dh = dL/d(first-layer output) @ W1, written for the teacher rows or the (projected) student rows
    need_rows = (side == 0) & NEED_H_T
    out_ptr = grad_h_t_ptr
    if side == 1:
        need_rows = NEED_H_S | HAS_PROJ
        out_ptr = grad_h_s_ptr
        if HAS_PROJ:
            out_ptr = grad_hs_proj_ptr
    if need_rows:
        for k0 in range(0, H, BK):
            ks = k0 + tl.arange(0, BK)
            if HAS_HIDDEN:
                grad_x = tl.zeros((BM, BK), dtype=ACC)
                for n0 in range(0, N1, BN):
                    cols = n0 + tl.arange(0, BN)
                    grad_pre = _tile(grad_rows_ptr, rows, cols, B, N1, N1)
                    grad_x += tl.dot(grad_pre, _tile(w1_ptr, cols, ks, N1, H, H), input_precision="ieee")
            else:
                grad_x = tl.dot(dz, _tile(w1_ptr, classes, ks, K, H, H), input_precision="ieee")
            _store_tile(out_ptr, grad_x, rows, ks, B, H, H)
    if HAS_PROJ:
        if side == 1:  # h_S' = h_S P^T + c:  dP += dh_S'^T h_S,  dc += sum dh_S',  dh_S = dh_S' P
            tl.debug_barrier()
            for n0 in range(0, H, BN):
                cols = n0 + tl.arange(0, BN)
                grad_proj = _tile(grad_hs_proj_ptr, rows, cols, B, H, H)
                tl.atomic_add(grad_proj_b_ptr + cols, tl.sum(grad_proj, axis=0), mask=cols < H)
                for k0 in range(0, H_S, BK):
                    ks = k0 + tl.arange(0, BK)
                    x = _tile(h_s_ptr, rows, ks, B, H_S, H_S)
                    _add_tile(grad_proj_w_ptr, tl.dot(tl.trans(grad_proj), x, input_precision="ieee"), cols, ks,
                              H, H_S, H_S)
            if NEED_H_S:
                for k0 in range(0, H_S, BK):
                    ks = k0 + tl.arange(0, BK)
                    grad_x = tl.zeros((BM, BK), dtype=ACC)
                    for n0 in range(0, H, BN):
                        cols = n0 + tl.arange(0, BN)
                        grad_proj = _tile(grad_hs_proj_ptr, rows, cols, B, H, H)
                        grad_x += tl.dot(grad_proj, _tile(proj_w_ptr, cols, ks, H, H_S, H_S), input_precision="ieee")
                    _store_tile(grad_h_s_ptr, grad_x, rows, ks, B, H_S, H_S)



@triton.jit
def meta_teacher_bwd_kernel(grad_loss_ptr, dz_ptr, h_t_ptr, h_s_ptr, proj_w_ptr, w1_ptr, w2_ptr, hidden_pre_ptr,
                            projected_ptr, grad_pre_ptr, grad_hs_proj_ptr, grad_h_t_ptr, grad_h_s_ptr,
                            grad_params_ptr, n_grad_params, grad_proj_w_ptr, grad_proj_b_ptr, grad_w1_ptr,
                            grad_b1_ptr, grad_w2_ptr, grad_b2_ptr, counters_ptr, row_blocks, B, H, H_S, N1, K,
                            HAS_PROJ: tl.constexpr, HAS_HIDDEN: tl.constexpr, NEED_H_T: tl.constexpr,
                            NEED_H_S: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr, KP: tl.constexpr, ZERO_BLOCK: tl.constexpr):
    """Persistent backward: the programs zero the parameter-gradient buffer (``grad_params``, which the
    ``grad_*`` parameter pointers view), meet at a grid barrier, then share the (row block, side) tiles.
    One launch, no separate zero-fill."""
    programs = tl.num_programs(0)
    for start in range(tl.program_id(0) * ZERO_BLOCK, n_grad_params, programs * ZERO_BLOCK):
        offsets = start + tl.arange(0, ZERO_BLOCK)
        tl.store(grad_params_ptr + offsets, tl.zeros((ZERO_BLOCK,), dtype=ACC), mask=offsets < n_grad_params)
    grid_barrier(counters_ptr, programs)
    for tile in range(tl.program_id(0), 2 * row_blocks, programs):
        _backward_tile(tile % row_blocks, tile // row_blocks, grad_loss_ptr, dz_ptr, h_t_ptr, h_s_ptr, proj_w_ptr,
                       w1_ptr, w2_ptr, hidden_pre_ptr, projected_ptr, grad_pre_ptr, grad_hs_proj_ptr, grad_h_t_ptr,
                       grad_h_s_ptr, grad_proj_w_ptr, grad_proj_b_ptr, grad_w1_ptr, grad_b1_ptr, grad_w2_ptr,
                       grad_b2_ptr, B, H, H_S, N1, K, HAS_PROJ, HAS_HIDDEN, NEED_H_T, NEED_H_S, ACC, BM, BN, BK, KP)

def _mode_coefficients(competitive: bool) -> tuple[float, float, float, float]:
    """(a_ce, a_p) for the teacher rows, then the student rows (see mpdistil_fast.ops.meta_teacher_loss)."""
    return (1.0, -1.0, 0.0, 1.0) if competitive else (0.5, 0.0, 0.5, 0.0)


def _common(h_teacher: Tensor, w1: Tensor, w2: Optional[Tensor]):
    """(accumulation dtype, classes, compile-time constants, row blocks, persistent grid) of a launch."""
    acc = accumulation_dtype(h_teacher.dtype)
    classes = (w2 if w2 is not None else w1).shape[0]
    meta = dict(HAS_HIDDEN=w2 is not None, ACC=tl.float64 if acc == torch.float64 else tl.float32, BM=BLOCK_M,
                BN=BLOCK_N, BK=BLOCK_K, KP=max(16, triton.next_power_of_2(classes)))
    row_blocks = triton.cdiv(h_teacher.shape[0], BLOCK_M)
    return acc, classes, meta, row_blocks, (persistent_programs(2 * row_blocks, h_teacher.device),)


def _as(acc: torch.dtype, tensor: Tensor) -> Tensor:
    """``tensor`` in the accumulation dtype, contiguous (no copy when it already is)."""
    return tensor.to(acc).contiguous()


@on_input_device
def meta_teacher_loss_fwd(h_teacher: Tensor, h_student: Tensor, proj_weight: Optional[Tensor],
                          proj_bias: Optional[Tensor], w1: Tensor, b1: Tensor, w2: Optional[Tensor],
                          b2: Optional[Tensor], labels: Tensor, competitive: bool):
    """(loss, z_T, z_S, dL/dz [2B, K], hidden pre-activations or empty, projected h_S or empty).

    One kernel launch for float32 (float64) inputs; 16-bit inputs are first converted to float32."""
    acc, classes, meta, row_blocks, grid = _common(h_teacher, w1, w2)
    batch, width = h_teacher.shape
    new = lambda *shape, dtype=acc: h_teacher.new_empty(shape, dtype=dtype)  # noqa: E731
    has_proj = proj_weight is not None
    projected = new(batch, width) if has_proj else new(0)
    hidden_pre = new(2 * batch, w1.shape[0]) if w2 is not None else new(0)
    z_t, z_s = new(batch, classes, dtype=h_teacher.dtype), new(batch, classes, dtype=h_teacher.dtype)
    dz, partial, loss = new(2 * batch, classes), new(2 * row_blocks), new()
    h_t, h_s = _as(acc, h_teacher), _as(acc, h_student)
    proj_w = _as(acc, proj_weight) if has_proj else h_t
    proj_b = _as(acc, proj_bias) if has_proj and proj_bias is not None else h_t
    w1c, b1c = _as(acc, w1), _as(acc, b1)
    w2c, b2c = (_as(acc, w2), _as(acc, b2)) if w2 is not None else (w1c, b1c)
    meta_teacher_fwd_kernel[grid](h_t, h_s, proj_w, proj_b, w1c, b1c, w2c, b2c, labels.contiguous(), projected,
                                  hidden_pre, z_t, z_s, dz, partial, loss, barrier_counters(h_t.device), row_blocks,
                                  batch, width, h_student.shape[1], w1.shape[0], classes,
                                  *_mode_coefficients(competitive), HAS_PROJ=has_proj,
                                  HAS_PROJ_BIAS=has_proj and proj_bias is not None, SUM_BLOCK=256, **meta)
    return loss, z_t, z_s, dz, hidden_pre, projected


@on_input_device
def meta_teacher_loss_bwd(grad_loss: Tensor, dlogits: Tensor, h_teacher: Tensor, h_student: Tensor,
                          proj_weight: Optional[Tensor], proj_bias: Optional[Tensor], w1: Tensor,
                          w2: Optional[Tensor], hidden_pre: Tensor, projected: Tensor, need_h_teacher: bool,
                          need_h_student: bool) -> list[Tensor]:
    """Gradients of (h_T, h_S, P, c, W1, b1, W2, b2); empty tensors where absent or not wanted.

    One kernel launch for float32 (float64) inputs and parameters: the parameter gradients are views of one
    buffer that the kernel zeroes itself; 16-bit tensors are converted on the way in and out."""
    acc, classes, meta, row_blocks, grid = _common(h_teacher, w1, w2)
    new = lambda *shape: h_teacher.new_empty(shape, dtype=acc)  # noqa: E731
    batch, width = h_teacher.shape
    width_s, first = h_student.shape[1], w1.shape[0]
    has_proj, has_hidden = proj_weight is not None, w2 is not None
    h_t, h_s, w1c = _as(acc, h_teacher), _as(acc, h_student), _as(acc, w1)
    w2c = _as(acc, w2) if has_hidden else w1c
    proj_w = _as(acc, proj_weight) if has_proj else h_t
    grad_h_t = new(batch, width) if need_h_teacher else new(0)
    grad_h_s = new(batch, width_s) if need_h_student else new(0)
    grad_pre = new(2 * batch, first) if has_hidden else new(0)  # row-local scratch, written before it is read
    grad_hs_proj = new(batch, width) if has_proj else new(0)
    shapes = [(width, width_s), (width,)] if has_proj else [(0,), (0,)]
    shapes += [(first, width), (first,)] + ([(classes, first), (classes,)] if has_hidden else [(0,), (0,)])
    grad_params = new(sum(torch.Size(shape).numel() for shape in shapes))
    grad_proj_w, grad_proj_b, grad_w1, grad_b1, grad_w2, grad_b2 = (
        chunk.view(shape) for chunk, shape in
        zip(grad_params.split([torch.Size(shape).numel() for shape in shapes]), shapes))
    meta_teacher_bwd_kernel[grid](_as(acc, grad_loss), dlogits, h_t, h_s, proj_w, w1c, w2c, hidden_pre, projected,
                                  grad_pre, grad_hs_proj, grad_h_t, grad_h_s, grad_params, grad_params.numel(),
                                  grad_proj_w, grad_proj_b, grad_w1, grad_b1, grad_w2, grad_b2,
                                  barrier_counters(h_t.device), row_blocks, batch, width, width_s, first, classes,
                                  HAS_PROJ=has_proj, NEED_H_T=need_h_teacher, NEED_H_S=need_h_student,
                                  ZERO_BLOCK=1024, **meta)
    cast_like = lambda g, like: g if like is None or g.numel() == 0 else g.to(like.dtype)  # noqa: E731
    return [cast_like(grad_h_t, h_teacher), cast_like(grad_h_s, h_student), cast_like(grad_proj_w, proj_weight),
            cast_like(grad_proj_b, proj_bias) if proj_bias is not None else new(0), cast_like(grad_w1, w1),
            cast_like(grad_b1, w1), cast_like(grad_w2, w2), cast_like(grad_b2, w2)]
