"""kd_kl_div: every backend against an independent float64 formula (loss, student and teacher gradients), for
forward / reverse KL and the generalized JSD (``direction="jsd"``)."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import mpdistil_fast
from mpdistil_fast import KDLoss, available_backends, kd_kl_div
from mpdistil_fast.ops.kd_kl_div import GRAD_IN_FORWARD_BACKENDS
from benchmarks.harness import cuda_kernels
from tests.helpers import (REL_TOL, assert_checkpointed_grads_match_torch, assert_rel_close, assert_traced_like_eager,
                           backend_params,
                           cpu_and_gpu_backend_params, gpu_test)

BACKENDS = backend_params("kd_kl_div")
REDUCTIONS = ("batchmean", "sum", "mean", "none")
TEMPERATURES = (0.5, 1.0, 2.0, 5.0)
DIRECTIONS = ("forward", "reverse", "jsd")


def reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str = "batchmean",
              scale_by_t2: bool = True, mask: torch.Tensor | None = None, direction: str = "forward",
              beta: float | None = None) -> torch.Tensor:
    """KD loss in float64 written out from the definitions: sum_v p (log p - log q), p the weighting softmax; for
    ``"jsd"`` beta KL(p_t || m) + (1 - beta) KL(p_s || m) with the mixture m = beta p_t + (1 - beta) p_s formed
    explicitly (beta 0 / 1 mean forward / reverse KL).

    Masked rows are not read and rows whose weighting logits (for the JSD: teacher or student logits) are all -inf
    count as 0 (they are replaced by zeros before use, so they contribute neither loss nor gradient).
    """
    s, t = student.double() / temperature, teacher.double() / temperature
    if direction == "jsd" and beta in (0.0, 1.0):
        direction = "forward" if beta == 0.0 else "reverse"
    if direction == "jsd":
        keep = torch.isfinite(t.amax(-1, keepdim=True)) & torch.isfinite(s.amax(-1, keepdim=True))
    else:
        keep = torch.isfinite((t if direction == "forward" else s).amax(-1, keepdim=True))
    if mask is not None:
        keep = keep & mask.unsqueeze(-1)
    s, t = torch.where(keep, s, 0.0), torch.where(keep, t, 0.0)
    log_t, log_s = t.log_softmax(-1), s.log_softmax(-1)

    def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:  # sum_v p log(p / q); p = 0 gives 0
        positive = log_p.exp() > 0  # (entries below float64's range, p < 1e-308, count as 0 too)
        zero = torch.zeros_like(log_p)
        return torch.where(positive, log_p.exp() * (torch.where(positive, log_p, zero) - torch.where(positive, log_q,
                                                                                                       zero)),
                           zero).sum(-1)

    if direction == "jsd":
        beta = 0.5 if beta is None else beta
        mixture = beta * log_t.exp() + (1 - beta) * log_s.exp()
        log_mixture = torch.where(mixture > 0, mixture, 1.0).log()  # m = 0 only where both are (then unused)
        rows = beta * kl_rows(log_t, log_mixture) + (1 - beta) * kl_rows(log_s, log_mixture)
    else:
        rows = kl_rows(log_t, log_s) if direction == "forward" else kl_rows(log_s, log_t)
    rows = torch.where(keep.squeeze(-1), rows, 0.0)
    if scale_by_t2:
        rows = rows * temperature ** 2
    valid = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    count = max(int(valid.sum()), 1)
    return {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / count,
            "mean": rows.sum() / (count * student.shape[-1])}[reduction]


def loss_and_grads(fn, student: torch.Tensor, teacher: torch.Tensor, upstream: torch.Tensor | None = None,
                   leaf_dtype: torch.dtype | None = None):
    """(loss, d/dstudent, d/dteacher) of ``fn(student, teacher)`` (upstream weights the loss elements)."""
    s = student.detach().to(leaf_dtype or student.dtype).requires_grad_()
    t = teacher.detach().to(leaf_dtype or teacher.dtype).requires_grad_()
    loss = fn(s, t)
    weight = torch.ones_like(loss, dtype=torch.float64) if upstream is None else upstream
    grad_s, grad_t = torch.autograd.grad((loss.double() * weight).sum(), (s, t))
    return loss.detach(), grad_s, grad_t


def check_against_reference(backend: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                            factor: float = 1.0, **kwargs) -> None:
    dtype = student.dtype
    upstream = (torch.randn(student.shape[:-1], dtype=torch.float64, device=student.device)
                if kwargs.get("reduction") == "none" else None)
    got = loss_and_grads(lambda s, t: kd_kl_div(s, t, temperature, backend=backend, **kwargs), student, teacher,
                         upstream)
    want = loss_and_grads(lambda s, t: reference(s, t, temperature, **kwargs), student, teacher, upstream,
                          torch.float64)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, actual, expected in zip(("loss", "grad_student", "grad_teacher"), got, want):
        assert_rel_close(actual, expected, dtype, factor, what=f"{backend} {kwargs} T={temperature} {name}")


def logits(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 2.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def small_shape(backend: str) -> tuple[int, ...]:
    """Triton runs through the (slow) interpreter on CPU: keep its shapes tiny."""
    return (3, 5, 37) if backend == "triton" else (4, 9, 301)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_every_reduction_matches_float64(backend, direction, temperature):
    shape = small_shape(backend)
    student, teacher = logits(*shape), logits(*shape)
    for reduction in REDUCTIONS:
        check_against_reference(backend, student, teacher, temperature, reduction=reduction, direction=direction)
    check_against_reference(backend, student, teacher, temperature, scale_by_t2=False, direction=direction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_jsd_every_reduction_matches_float64(backend, beta, temperature):
    shape = small_shape(backend)
    student, teacher = logits(*shape), logits(*shape)
    for reduction in REDUCTIONS:
        check_against_reference(backend, student, teacher, temperature, reduction=reduction, direction="jsd",
                                beta=beta)
    check_against_reference(backend, student, teacher, temperature, scale_by_t2=False, direction="jsd", beta=beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_large_temperatures_lose_digits_as_documented(backend, direction):
    """The README's precision note: the KD losses shrink like 1/T^2 while the fp32 numbers they are computed from do
    not, so the loss (and the student/teacher gradients, less so) lose digits as T grows; at T <= 100 every backend
    stays within T/2 times the usual fp32 tolerance of float64 (measured: 1e-7 to 2e-4 relative at T = 100)."""
    vocab = 400 if backend == "triton" else 4000
    student, teacher = logits(4, vocab, scale=3.0), logits(4, vocab, scale=3.0)
    for temperature in (20.0, 100.0):
        check_against_reference(backend, student, teacher, temperature, factor=temperature / 2, direction=direction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    """Per-row losses (forward kernel, then backward kernel) and a reduced loss (the gradient-in-forward kernels
    where a backend has them) in every dtype."""
    shape = small_shape(backend)
    student, teacher = logits(*shape, dtype=dtype), logits(*shape, dtype=dtype)
    for direction in DIRECTIONS:
        for reduction in ("none", "batchmean"):
            check_against_reference(backend, student, teacher, 2.0, direction=direction, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 1), (2, 3, 1), (1, 1), (5, 4097), (3, 2, 31)], ids=str)
def test_odd_shapes(backend, shape):
    if backend == "triton" and shape[-1] > 64:
        shape = (2, 130)  # not a power of two (one block here: test_rows_of_several_blocks crosses blocks)
    student, teacher = logits(*shape), logits(*shape)
    for direction in DIRECTIONS:
        check_against_reference(backend, student, teacher, 1.0, reduction="sum", direction=direction)
        if shape[-1] == 1:  # one class: both distributions are 1, the loss and gradients are exactly 0
            loss, grad_s, grad_t = loss_and_grads(lambda s, t: kd_kl_div(s, t, direction=direction, backend=backend),
                                                  student, teacher)
            assert loss.item() == 0 and not grad_s.any() and not grad_t.any()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id in ("torch", "cpp")])
def test_liger_odd_shape_and_llm_vocabulary(backend):
    """Liger's (41, 401, 1271) and a 262,144-entry vocabulary (many chunks with rising maxima)."""
    check_against_reference(backend, logits(41, 401, 1271), logits(41, 401, 1271), 2.0, direction="reverse")
    vocab = 262_144
    teacher = logits(2, vocab) + torch.linspace(0, 30, vocab)  # the row max keeps moving to later chunks
    check_against_reference(backend, logits(2, vocab), teacher, 1.0)
    check_against_reference(backend, logits(2, vocab), teacher, 1.0, direction="jsd", beta=0.3)
    teacher[:, :5000] = float("-inf")  # whole leading chunks without mass, then the max arrives
    check_against_reference(backend, logits(2, vocab), teacher, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks(backend):
    shape = small_shape(backend)
    student, teacher = logits(*shape), logits(*shape)
    mask = torch.rand(shape[:-1]) > 0.4
    student[~mask] = float("nan")  # garbage in masked rows must not leak
    none = torch.zeros(shape[:-1], dtype=torch.bool)
    for direction in ("forward", "jsd"):
        for reduction in REDUCTIONS:
            check_against_reference(backend, student, teacher, 2.0, reduction=reduction, mask=mask,
                                    direction=direction)
            loss, grad_s, grad_t = loss_and_grads(
                lambda s, t: kd_kl_div(s, t, 2.0, reduction=reduction, mask=none, direction=direction,
                                       backend=backend), student, teacher)
            assert (loss == 0).all() and (grad_s == 0).all() and (grad_t == 0).all(), (direction, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_minus_inf_logits(backend, direction):
    """-inf in the weighting distribution (teacher for forward KL and the JSD) contributes 0; an all -inf row
    contributes 0.  The other distribution has -inf entries among the weighting one's (one vocabulary mask on both
    models: no 0 * inf, in the value or the gradients).  For the JSD the student also has -inf entries where the
    teacher has finite ones."""
    shape = small_shape(backend)
    student, teacher = logits(*shape), logits(*shape)
    weighting, other = (student, teacher) if direction == "reverse" else (teacher, student)
    weighting[..., ::3] = float("-inf")  # a masked vocabulary
    weighting[0, 0] = float("-inf")  # a row without any entry
    other[..., ::6] = float("-inf")  # the same mask, on part of it
    if direction == "jsd":
        student[..., 1::4] = float("-inf")  # where the teacher has mass
        student[1, 1] = float("-inf")  # a row where only the student has no entry
    check_against_reference(backend, student, teacher, 2.0, direction=direction, reduction="none")
    loss, grad_s, grad_t = loss_and_grads(
        lambda s, t: kd_kl_div(s, t, 2.0, direction=direction, reduction="none", backend=backend), student, teacher)
    assert loss[0, 0] == 0 and not grad_s[0, 0].any() and not grad_t[0, 0].any()
    if direction == "jsd":
        assert loss[1, 1] == 0 and not grad_s[1, 1].any() and not grad_t[1, 1].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_mass_where_the_other_distribution_has_none_is_infinite(backend, direction):
    """KL(P || Q) = +inf where P has mass and Q has none: one entry, or a whole row of Q logits at -inf (which
    log_softmax alone would turn into NaN); the other rows are unaffected."""
    student, teacher = logits(3, 37), logits(3, 37)
    other = student if direction == "forward" else teacher
    other[0] = float("-inf")
    other[1, 4] = float("-inf")
    (teacher if direction == "forward" else student)[0, 3] = float("-inf")  # P = 0 there: NaN all the same
    loss = kd_kl_div(student, teacher, 2.0, direction=direction, reduction="none", backend=backend)
    assert loss[0] == math.inf and loss[1] == math.inf, loss
    assert_rel_close(loss[2], reference(student[2:], teacher[2:], 2.0, direction=direction, reduction="sum"),
                     torch.float32, what="loss")
    # the whole-row case has no gradient: NaN in both inputs, through the separate backward (reduction "none")
    # and the gradient written in forward (a reduced loss), as torch's composite gives (an optimizer of either
    # model must not take a finite step from an infinite loss)
    for reduction in ("none", "batchmean"):
        _, grad_s, grad_t = loss_and_grads(
            lambda s, t: kd_kl_div(s, t, 2.0, direction=direction, reduction=reduction, backend=backend),
            student, teacher)
        assert grad_s[0].isnan().all() and grad_t[0].isnan().all(), (reduction, grad_s[0], grad_t[0])
        assert grad_s[2].isfinite().all() and grad_t[2].isfinite().all(), reduction


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_fully_masked_rows_and_underflowing_probabilities_are_finite(backend, direction):
    """Two rows every backend must agree on (the torch backend gave NaN in both; found by differential fuzzing):
    a row whose weighting and other logits are all -inf (a fully masked position) is 0 with zero gradients, and a
    weighting probability that underflows to 0 (a finite logit 800 T below the row's max) next to a -inf logit of
    the other model contributes 0, not 0 * inf = NaN, to the loss and the gradients."""
    student, teacher = logits(3, 37), logits(3, 37)
    weighting, other = (student, teacher) if direction == "reverse" else (teacher, student)
    weighting[0] = other[0] = float("-inf")
    weighting[1, 0] = 400.0  # every other P of the row is about exp(-800) = 0 at T = 0.5, also in float64
    other[1, 5] = float("-inf")
    check_against_reference(backend, student, teacher, 0.5, direction=direction, reduction="none")
    check_against_reference(backend, student, teacher, 0.5, direction=direction, reduction="batchmean")
    loss, grad_s, grad_t = loss_and_grads(
        lambda s, t: kd_kl_div(s, t, 0.5, direction=direction, reduction="none", backend=backend), student, teacher)
    assert loss[0] == 0 and not grad_s[0].any() and not grad_t[0].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_a_nan_logit_gives_a_nan_loss_and_nan_gradients_wherever_it_sits(backend, direction):
    """A NaN among the weighting logits (the JSD's: either) makes its row's loss NaN and its gradients non-finite,
    at every position of the row (the fused KL max kept it only in the last full vector, and the backward then wrote
    zero gradients; the JSD counted the row as one without distributions, 0: a NaN check on the gradients, such as
    AMP's GradScaler, would have passed), and leaves other rows alone."""
    vocab = 37 if backend == "triton" else 301
    for position in (0, vocab // 2, vocab - 20, vocab - 1):
        student, teacher = logits(3, vocab), logits(3, vocab)
        (student if direction == "reverse" else teacher)[1, position] = float("nan")
        for reduction in ("none", "batchmean"):
            loss, grad_s, grad_t = loss_and_grads(
                lambda s, t: kd_kl_div(s, t, 2.0, reduction=reduction, direction=direction, backend=backend),
                student, teacher)
            assert loss.isnan().any(), (position, reduction)
            assert not grad_s.isfinite().all() and not grad_t.isfinite().all(), (position, reduction)
            if reduction == "none":
                assert loss[[0, 2]].isfinite().all() and grad_s[[0, 2]].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_stay_finite(backend):
    """|logits| ~ 1e4 (wide spread, or a large common offset): max subtraction keeps everything finite and exact.

    With a wide spread both distributions are one-hot and the exact teacher gradient is ~1e-66: gradients are
    compared elementwise with an absolute tolerance there, since a relative norm is meaningless around 0."""
    shape = small_shape(backend)
    spread = logits(*shape, scale=1e4), logits(*shape, scale=1e4)
    offset = 1e4 + logits(*shape), 1e4 + logits(*shape)
    for temperature, direction in ((0.5, "forward"), (2.0, "forward"), (0.5, "jsd"), (2.0, "jsd")):
        check_against_reference(backend, *offset, temperature, factor=3.0, direction=direction)
        for student, teacher in (spread, (spread[0].bfloat16(), spread[1].bfloat16())):
            got = loss_and_grads(lambda s, t: kd_kl_div(s, t, temperature, direction=direction, backend=backend),
                                 student, teacher)
            want = loss_and_grads(lambda s, t: reference(s, t, temperature, direction=direction), student, teacher,
                                  leaf_dtype=torch.float64)
            assert_rel_close(got[0], want[0], student.dtype, what="loss")
            for actual, expected in zip(got[1:], want[1:]):
                torch.testing.assert_close(actual.double(), expected, rtol=REL_TOL[student.dtype], atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_one_hot_weighting_rows_get_exactly_zero_gradient(backend, direction):
    """A one-hot P (one logit 1e4 above the rest) makes dKL/da = g/T P (a - b - E_P[a - b])/T exactly 0 at any T,
    through the backward kernel ("none") and the gradient-in-forward one ("batchmean").  With 1/T not a power of two
    the old form (a - b)/T - E_P[(a - b)/T], contracted by the compiler into an unrounded FMA, left the product's
    rounding error: 1e-4 at T = 3, 0.02-0.08 at T = 1e-3."""
    rows, vocab = (3, 37) if backend == "triton" else (6, 301)
    hot = logits(rows, vocab, scale=1e3)
    hot[torch.arange(rows), torch.randint(vocab, (rows,))] += 1e4
    other = logits(rows, vocab, scale=1e3)
    student, teacher = (other, hot) if direction == "forward" else (hot, other)
    for temperature in (3.0, 0.7, 5.0, 1e-3):
        for reduction in ("none", "batchmean"):
            _, grad_s, grad_t = loss_and_grads(
                lambda s, t: kd_kl_div(s, t, temperature, reduction=reduction, direction=direction, backend=backend),
                student, teacher)
            grad_hot = grad_t if direction == "forward" else grad_s
            assert (grad_hot == 0).all(), (temperature, reduction, grad_hot.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    rows, vocab = (4, 37) if backend == "triton" else (6, 301)
    wide_student, wide_teacher = logits(rows, vocab + 5), logits(rows, vocab + 5)
    sliced = wide_student[:, 2:vocab + 2], wide_teacher[:, 1:vocab + 1]  # strided rows
    transposed = logits(vocab, rows).t(), logits(vocab, rows).t()  # strided vocabulary
    for student, teacher in (sliced, transposed):
        assert not student.is_contiguous()
        check_against_reference(backend, student, teacher, 2.0)
        check_against_reference(backend, student, teacher, 2.0, direction="jsd")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradcheck_reduced_loss_and_identical_second_backward(backend, direction):
    """gradcheck of the reduced losses users write (batchmean, a masked sum): on the fused backends they compute
    their gradients in forward, and a second backward through the retained graph must give bitwise the same ones
    (gradcheck's reentrancy check, nondet_tol=0; it recomputed them with the backward kernel, which differs in the
    last bits, and gradcheck failed with 'Backward is not reentrant'), also when the upstream gradient is not 1."""
    student = logits(3, 11, dtype=torch.float64).requires_grad_()
    teacher = logits(3, 11, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([True, False, True])
    for options in ({}, {"reduction": "sum", "mask": mask}):
        def loss(s, t):
            return kd_kl_div(s, t, 1.7, direction=direction, backend=backend, **options)

        assert torch.autograd.gradcheck(loss, (student, teacher))
        for upstream in (1.0, 0.375):
            value = loss(student, teacher) * upstream
            first = torch.autograd.grad(value, (student, teacher), retain_graph=True)
            second = torch.autograd.grad(value, (student, teacher))
            for a, b in zip(first, second):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradcheck_float64(backend, direction):
    student = logits(3, 11, dtype=torch.float64).requires_grad_()
    teacher = logits(3, 11, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(
        lambda s, t: kd_kl_div(s, t, 1.7, reduction="none", mask=mask, direction=direction, backend=backend),
        (student, teacher))


@pytest.mark.parametrize("direction", ["forward", "jsd"])
def test_double_backward_torch_is_correct_and_fused_refuses(direction):
    student = logits(2, 7, dtype=torch.float64).requires_grad_()
    teacher = logits(2, 7, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda s, t: kd_kl_div(s, t, 2.0, direction=direction, backend="torch"),
                                        (student, teacher))
    loss = kd_kl_div(student, teacher, 2.0, direction=direction, backend="cpp")
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='torch'"):
        grad.sum().backward()


def test_teacher_gradient_only_when_needed():
    student, teacher = logits(3, 50).requires_grad_(), logits(3, 50)
    kd_kl_div(student, teacher, 2.0, backend="cpp").backward()
    assert student.grad is not None and teacher.grad is None
    student, teacher = logits(3, 50), logits(3, 50).requires_grad_()
    kd_kl_div(student, teacher, 2.0, backend="cpp").backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0


def test_returned_gradients_are_never_overwritten():
    """The C++ backward reuses its previous gradient buffer only once nobody holds it (views included)."""
    student, teacher = logits(4, 64).requires_grad_(), logits(4, 64)
    first = torch.autograd.grad(kd_kl_div(student, teacher, 2.0, backend="cpp"), student)[0]
    view = first[1:]
    kept, kept_view = first.clone(), view.clone()
    del first
    other = logits(4, 64).requires_grad_()
    second = torch.autograd.grad(kd_kl_div(other, teacher, 2.0, backend="cpp"), other)[0]
    assert torch.equal(view, kept_view) and second.data_ptr() != view.data_ptr()
    del view
    third = torch.autograd.grad(kd_kl_div(student, teacher, 2.0, backend="cpp"), student)[0]
    assert torch.equal(third, kept) and third.data_ptr() != second.data_ptr()


@pytest.mark.parametrize("backend, device", cpu_and_gpu_backend_params("kd_kl_div"))
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_activation_checkpointing(backend, device, reduction):
    dtype = torch.float64 if device == "cpu" else torch.float32
    rows, vocab = (3, 17) if backend == "triton" and device == "cpu" else (6, 40)
    layer = torch.nn.Linear(8, vocab).to(device, dtype)
    x, teacher = torch.randn(rows, 8, dtype=dtype, device=device), logits(rows, vocab, dtype=dtype).to(device)
    upstream = torch.randn(rows, dtype=dtype, device=device) if reduction == "none" else \
        torch.tensor(1.0, dtype=dtype, device=device)

    def loss(x, backend):
        return (kd_kl_div(layer(x), teacher, 2.0, reduction=reduction, backend=backend) * upstream).sum()

    assert_checkpointed_grads_match_torch(loss, x, [layer.weight], backend)


def test_matches_torch_kl_div_convention():
    """forward KL with batchmean and T^2 equals the usual F.kl_div formulation on 2-D logits."""
    student, teacher, temperature = logits(8, 100), logits(8, 100), 3.0
    expected = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                        reduction="batchmean", log_target=True) * temperature ** 2
    for backend in ("torch", "cpp"):
        assert_rel_close(kd_kl_div(student, teacher, temperature, backend=backend), expected, torch.float32,
                         what=backend)


@pytest.mark.parametrize("direction", ["forward", "jsd"])
def test_torch_compile_fullgraph(direction):
    student, teacher = logits(4, 33).requires_grad_(), logits(4, 33).requires_grad_()
    mask = torch.tensor([True, True, False, True])
    compiled = torch.compile(lambda s, t: kd_kl_div(s, t, 2.0, mask=mask, direction=direction, backend="cpp"),
                             fullgraph=True, backend="aot_eager")
    got = loss_and_grads(compiled, student, teacher)
    want = loss_and_grads(lambda s, t: reference(s, t, 2.0, mask=mask, direction=direction), student, teacher,
                          leaf_dtype=torch.float64)
    for actual, expected in zip(got, want):
        assert_rel_close(actual, expected, torch.float32)


@pytest.mark.parametrize("direction", ["forward", "jsd"])
def test_torch_compile_fullgraph_temperature_schedule_and_dynamic_shapes(direction):
    """A temperature that changes between calls (a schedule) becomes a symbolic float under torch.compile, as every
    float does with dynamic=True; the temperature check used math.isfinite, which Dynamo cannot trace on one, so
    fullgraph=True failed ('torch.* op returned non-Tensor') from the second temperature on."""
    torch._dynamo.reset()  # (the parametrizations share the lambda's code object, and so Dynamo's cache of it)
    fn = lambda s, t, m, temperature: kd_kl_div(s, t, temperature, mask=m, direction=direction)  # noqa: E731
    scheduled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    dynamic = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for temperature, (batch, length) in zip((1.0, 2.0, 3.5), ((2, 5), (3, 7), (1, 4))):
        student, teacher = logits(batch, length, 11), logits(batch, length, 11)
        mask = torch.rand(batch, length) > 0.3
        want = loss_and_grads(lambda s, t: fn(s, t, mask, temperature), student, teacher)
        for compiled in (scheduled, dynamic):
            got = loss_and_grads(lambda s, t: compiled(s, t, mask, temperature), student, teacher)
            for actual, expected in zip(got, want):
                torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("direction", ["forward", "jsd"])
def test_torch_jit_trace_records_the_fused_op_and_script_refuses_clearly(tmp_path, direction):
    """torch.jit.trace of a model whose loss is KDLoss on the fused backend: it failed with a bare
    'RuntimeError: unordered_map::at' (with grad) or recorded a Python call that torch.jit.save refused (without);
    now it records the custom op, trains like eager and saves.  torch.jit.script cannot compile KDLoss: its error
    says so and names trace / export / compile instead of a TorchScript complaint about the functional op."""
    class StudentLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.kd = torch.nn.Sequential(torch.nn.Linear(6, 13)), KDLoss(2.0, direction=direction,
                                                                                       backend="cpp")

        def forward(self, x, teacher, mask):
            return self.kd(self.model(x), teacher, mask)

    torch.manual_seed(0)
    holder = StudentLoss()
    x, teacher = torch.randn(2, 3, 6), logits(2, 3, 13)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert_traced_like_eager(holder, (x, teacher, mask), (torch.randn(2, 3, 6), teacher, mask),
                             [holder.model[0].weight], f"{'kd_jsd' if direction == 'jsd' else 'kd_kl_div'}_fwd",
                             tmp_path)
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile KDLoss.*torch.jit.trace"):
        torch.jit.script(torch.nn.Sequential(KDLoss(2.0)))


def test_kd_loss_module_and_env_override(monkeypatch):
    student, teacher = logits(2, 3, 40), logits(2, 3, 40)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    module = KDLoss(2.0, reduction="sum", direction="reverse")
    expected = reference(student, teacher, 2.0, reduction="sum", mask=mask, direction="reverse")
    assert_rel_close(module(student, teacher, mask), expected, torch.float32)
    assert "reverse" in repr(module)
    monkeypatch.setenv("MPDISTIL_BACKEND", "torch")
    assert_rel_close(module(student, teacher, mask), expected, torch.float32)
    monkeypatch.setenv("MPDISTIL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MPDISTIL_BACKEND"):
        module(student, teacher, mask)
    monkeypatch.delenv("MPDISTIL_BACKEND")
    jsd = KDLoss(2.0, direction="jsd", beta=0.3)
    assert_rel_close(jsd(student, teacher), reference(student, teacher, 2.0, direction="jsd", beta=0.3),
                     torch.float32)
    assert "beta=0.3" in repr(jsd)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id in ("torch", "cpp")])
def test_jsd_end_points_symmetry_and_disjoint_supports(backend):
    """beta = 0 / 1 are forward / reverse KL (the GKD, TRL and Liger convention); beta = 1/2 is symmetric in the two
    distributions; distributions with disjoint supports give exactly the binary entropy H(beta) (times T^2)."""
    student, teacher = logits(5, 40), logits(5, 40)
    for beta, direction in ((0.0, "forward"), (1, "reverse")):
        assert torch.equal(kd_kl_div(student, teacher, 2.0, direction="jsd", beta=beta, backend=backend),
                           kd_kl_div(student, teacher, 2.0, direction=direction, backend=backend))
    assert_rel_close(kd_kl_div(student, teacher, 2.0, direction="jsd", backend=backend),
                     kd_kl_div(teacher, student, 2.0, direction="jsd", backend=backend), torch.float32)
    inf = float("-inf")
    teacher = torch.tensor([[0.0, inf, inf, inf], [inf, 3.0, 1.0, inf]])
    student = torch.tensor([[inf, 0.0, 0.0, 5.0], [2.0, inf, inf, 0.0]])
    for beta in (0.1, 0.5, 0.8):
        entropy = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
        loss = kd_kl_div(student, teacher, 3.0, direction="jsd", beta=beta, reduction="none", backend=backend)
        torch.testing.assert_close(loss, torch.full((2,), 9.0 * entropy), rtol=1e-6, atol=0)


def test_fused_jsd_op_rejects_beta_outside_the_open_interval():
    """The kernels' own check (the public API maps beta 0 / 1 to the KLs before calling them)."""
    assert not mpdistil_fast.backends.cpu_kernel_build().error
    with pytest.raises(RuntimeError, match="beta"):
        torch.ops.mpdistil_C.kd_jsd_fwd(logits(2, 5), logits(2, 5), 1.0, 1.0)


def test_mixed_dtypes_are_promoted():
    student, teacher = logits(3, 20, dtype=torch.bfloat16), logits(3, 20)
    expected = reference(student, teacher, 2.0)
    assert_rel_close(kd_kl_div(student, teacher, 2.0), expected, torch.float32)


def test_available_backends_explains():
    for op in ("kd_kl_div", "kd_jsd"):
        status = mpdistil_fast.available_backends(op, "cpu")
        assert status["torch"].available and status["cpp"].available
        assert not status["cuda"].available and "cuda" in status["cuda"].reason


def test_available_backends_refuses_unknown_ops_and_absent_devices():
    """An op name the registry does not know (``"meta_teacher"`` for ``"meta_teacher_loss"``) is an error naming the
    ops, not 'no CPU kernel' (a build problem) beside 'triton available'; without a CUDA device no GPU backend is
    said to run on one."""
    with pytest.raises(ValueError, match="meta_teacher_loss"):
        mpdistil_fast.available_backends("meta_teacher", "cpu")
    with pytest.raises(ValueError, match="kd_kl_div"):
        mpdistil_fast.backends.resolve_backend("auto", "kl_div", torch.device("cpu"))
    if not torch.cuda.is_available():
        status = mpdistil_fast.available_backends("kd_kl_div", "cuda")
        assert status["torch"].available
        for name in ("triton", "cuda"):
            assert not status[name].available and "no CUDA device" in status[name].reason, status[name]


def _meta_teacher_call(backend: str):
    generator = torch.Generator().manual_seed(0)  # the same discriminator for every backend
    weight = torch.randn(3, 6, dtype=torch.float64, generator=generator)
    bias = torch.randn(3, dtype=torch.float64, generator=generator)
    labels = torch.tensor([0, 2, 1, 1])
    return lambda teacher, student: mpdistil_fast.meta_teacher_loss(teacher, student, weight, bias, labels,
                                                                     backend=backend)


def _op_call(op: str, backend: str):
    """``f(a, b)`` running the fused op ``op`` (a name of the registry) on two float64 inputs with ``backend``."""
    if op == "kd_kl_div":
        return lambda a, b: kd_kl_div(a, b, 2.0, backend=backend)
    if op == "kd_jsd":
        return lambda a, b: kd_kl_div(a, b, 2.0, direction="jsd", beta=0.3, backend=backend)
    if op == "hidden_mse":
        return lambda a, b: mpdistil_fast.hidden_mse(a, b, backend=backend)
    return _meta_teacher_call(backend)


@pytest.mark.parametrize("op", ["kd_kl_div", "kd_jsd", "hidden_mse", "meta_teacher_loss"])
def test_torch_func_transforms_take_the_torch_backend(op):
    """Inside torch.func.grad / vmap / jvp, 'auto' takes the torch backend (the fused kernels have no batching or
    forward-mode rules: torch's own error named setup_context, not the way out) and gives its values and
    gradients; a fused backend asked for by name is refused with a message naming backend='torch'."""
    call = functools.partial(_op_call, op)
    shape = (2, 4, 6) if op == "hidden_mse" else (4, 6)
    a, b = (torch.randn(shape, dtype=torch.float64) for _ in range(2))
    expected = torch.func.grad(call("torch"), argnums=(0, 1))(a, b)
    got = torch.func.grad(call("auto"), argnums=(0, 1))(a, b)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    tangent = torch.randn_like(a)
    assert torch.func.jvp(lambda x: call("auto")(x, b), (a,), (tangent,))[1] == pytest.approx(
        float((expected[0] * tangent).sum()), rel=1e-10, abs=1e-12)
    batched = torch.func.vmap(call("auto"))(torch.stack([a, b]), torch.stack([b, a]))
    torch.testing.assert_close(batched, torch.stack([call("torch")(a, b), call("torch")(b, a)]))
    with pytest.raises(ValueError, match="inside a torch.func transform .* use backend='torch'"):
        torch.func.grad(call("cpp"))(a, b)
    assert torch.equal(call("auto")(a, b), call("cpp")(a, b))  # outside a transform 'auto' is still the fused kernel


@pytest.mark.parametrize("op", ["kd_kl_div", "kd_jsd", "hidden_mse", "meta_teacher_loss"])
def test_forward_ad_dual_tensors_take_the_torch_backend(op):
    """torch.autograd.forward_ad (dual tensors, outside torch.func) is forward-mode AD too: 'auto' takes the torch
    backend there and gives its directional derivative (the fused backend failed with torch's 'You must implement
    the jvp function for custom autograd.Function'); a fused backend named there is refused naming
    backend='torch'; once the dual level is closed 'auto' is the fused kernel again."""
    shape = (2, 4, 6) if op == "hidden_mse" else (4, 6)
    a, b = (torch.randn(shape, dtype=torch.float64) for _ in range(2))
    tangent = torch.randn_like(a)
    expected = torch.func.jvp(lambda x: _op_call(op, "torch")(x, b), (a,), (tangent,))[1]
    with fwAD.dual_level():
        value = _op_call(op, "auto")(fwAD.make_dual(a, tangent), b)
        torch.testing.assert_close(fwAD.unpack_dual(value).tangent, expected, rtol=1e-10, atol=1e-12)
        with pytest.raises(ValueError, match="forward_ad.dual_level.* use backend='torch'"):
            _op_call(op, "cpp")(fwAD.make_dual(a, tangent), b)
    assert torch.equal(_op_call(op, "auto")(a, b), _op_call(op, "cpp")(a, b))


def test_an_unusable_backend_from_the_environment_says_where_it_came_from(monkeypatch):
    """backend='auto' with MPDISTIL_BACKEND naming a backend that cannot run these tensors: the error names the
    variable (the caller asked for no backend)."""
    monkeypatch.setenv("MPDISTIL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MPDISTIL_BACKEND=cuda"):
        kd_kl_div(logits(2, 5), logits(2, 5))


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda s, t: kd_kl_div(s, t[:, :-1]), ValueError, "teacher_logits"),
        (lambda s, t: kd_kl_div(s, t, mask=torch.ones(5, dtype=torch.bool)), ValueError, "mask"),
        (lambda s, t: kd_kl_div(s, t, mask=torch.ones(4)), TypeError, "mask"),
        (lambda s, t: kd_kl_div(s, t, mask=torch.ones(4, dtype=torch.bool, device="meta")), ValueError, "mask"),
        (lambda s, t: kd_kl_div(s, t, 0.0), ValueError, "temperature"),
        (lambda s, t: kd_kl_div(s, t, -1.0), ValueError, "temperature"),
        (lambda s, t: kd_kl_div(s, t, math.inf), ValueError, "temperature"),
        (lambda s, t: kd_kl_div(s, t, math.nan), ValueError, "temperature"),
        (lambda s, t: kd_kl_div(s, t, "2"), TypeError, "temperature"),
        (lambda s, t: kd_kl_div(s, t, True), TypeError, "temperature"),
        (lambda s, t: kd_kl_div(s, t, torch.tensor(2.0)), TypeError, "temperature"),
        (lambda s, t: kd_kl_div(s, t, np.bool_(True)), TypeError, "temperature"),
        (lambda s, t: kd_kl_div(s, t, reduction="avg"), ValueError, "reduction"),
        (lambda s, t: kd_kl_div(s, t, direction="both"), ValueError, "direction"),
        (lambda s, t: kd_kl_div(s, t, direction="jsd", beta=1.5), ValueError, "beta"),
        (lambda s, t: kd_kl_div(s, t, direction="jsd", beta=-0.1), ValueError, "beta"),
        (lambda s, t: kd_kl_div(s, t, direction="jsd", beta=math.nan), ValueError, "beta"),
        (lambda s, t: kd_kl_div(s, t, direction="jsd", beta="0.5"), TypeError, "beta"),
        (lambda s, t: kd_kl_div(s, t, direction="jsd", beta=True), TypeError, "beta"),
        (lambda s, t: kd_kl_div(s, t, beta=0.5), ValueError, "beta"),
        (lambda s, t: kd_kl_div(s, t, backend="fast"), ValueError, "backend"),
        (lambda s, t: kd_kl_div(s, t, backend="cuda"), ValueError, "backend 'cuda'"),
        (lambda s, t: kd_kl_div(s, t, scale_by_t2=1), TypeError, "scale_by_t2"),
        (lambda s, t: kd_kl_div(s.long(), t), TypeError, "student_logits"),
        (lambda s, t: kd_kl_div(s, t.int()), TypeError, "teacher_logits"),
        (lambda s, t: kd_kl_div(s.numpy(), t), TypeError, "student_logits"),
        (lambda s, t: kd_kl_div(s[:, :0], t[:, :0]), ValueError, "student_logits"),
        (lambda s, t: kd_kl_div(s, t.to("meta")), ValueError, "teacher_logits"),
    ],
)
def test_bad_inputs(call, error, name):
    with pytest.raises(error, match=name):
        call(logits(4, 10), logits(4, 10))


def test_numpy_scalars_are_real_numbers():
    """A temperature or beta read from NumPy (np.float32, np.int64) means what the same Python number does (they
    were a TypeError)."""
    student, teacher = logits(4, 10), logits(4, 10)
    for direction in DIRECTIONS:
        jsd = direction == "jsd"
        expected = kd_kl_div(student, teacher, 2.0, direction=direction, **({"beta": 0.25} if jsd else {}))
        for temperature in (np.float32(2.0), np.float64(2.0), np.int64(2)):
            got = kd_kl_div(student, teacher, temperature, direction=direction,
                            **({"beta": np.float32(0.25)} if jsd else {}))
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend, direction", [
    pytest.param(*b.values, direction, marks=b.marks, id=f"{b.values[0]}-{direction}")
    for direction, op in (("forward", "kd_kl_div"), ("reverse", "kd_kl_div"), ("jsd", "kd_jsd"))
    for b in backend_params(op) if b.values[0] in GRAD_IN_FORWARD_BACKENDS[op]])
def test_gradient_computed_in_forward(backend, direction):
    """Backends that write the gradients in forward (one read of the logits for forward + backward): the path is
    taken for reduced losses, an upstream gradient other than 1 scales them, a second backward through a retained
    graph recomputes the same values, and create_graph gradients refuse a second differentiation.  Masked rows hold
    NaN (they must get zero gradients), and the weighting distribution (both for the JSD, which is finite whatever
    the supports) has zeros in part of the vocabulary."""
    student, teacher = logits(5, 37), logits(5, 37)
    if direction != "reverse":
        teacher[2, ::3] = float("-inf")
    if direction != "forward":
        student[3, 1::4] = float("-inf")
    mask = torch.tensor([True, False, True, True, False])
    student[1], teacher[4] = float("nan"), float("nan")
    options = {"beta": 0.3} if direction == "jsd" else {}
    loss_fn = lambda s, t: 0.25 * kd_kl_div(s, t, 2.0, mask=mask, reduction="mean", direction=direction,  # noqa: E731
                                            backend=backend, **options)
    want = loss_and_grads(lambda s, t: 0.25 * reference(s, t, 2.0, mask=mask, reduction="mean", direction=direction,
                                                        **options), student, teacher, leaf_dtype=torch.float64)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss = loss_fn(s, t)
    assert type(loss.grad_fn.next_functions[0][0]).__name__ == "GradInForwardBackward"
    assert_rel_close(loss, want[0], torch.float32, what="loss")
    first = torch.autograd.grad(loss, (s, t), retain_graph=True)
    second = torch.autograd.grad(loss, (s, t))
    for got in (first, second):
        assert_rel_close(got[0], want[1], torch.float32, what="grad_student")
        assert_rel_close(got[1], want[2], torch.float32, what="grad_teacher")
    (grad,) = torch.autograd.grad(loss_fn(s, t), s, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grad.square().sum(), s)


@gpu_test
@pytest.mark.parametrize("backend", backend_params("kd_kl_div", "cuda"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 1), (37, 1271), (4, 32000), (2, 131_073)], ids=str)
def test_gpu_backends(backend, dtype, shape):
    student, teacher = logits(*shape, dtype=dtype).cuda(), logits(*shape, dtype=dtype).cuda()
    factor = 1.0 if dtype == torch.float32 else 2.0
    check_against_reference(backend, student, teacher, 2.0, direction="reverse", reduction="none", factor=factor)
    teacher[:, ::7] = float("-inf")  # a masked vocabulary in the teacher
    check_against_reference(backend, student, teacher, 2.0, direction="forward", reduction="none", factor=factor)


@gpu_test
@pytest.mark.parametrize("packs", ["1", "2", "4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(5, 8), (3, 4104), (3, 4101), (4, 32000), (2, 128256)], ids=str)
def test_gpu_row_resident_kernel(monkeypatch, packs, dtype, shape):
    """MPDISTIL_KL_ROW_RESIDENT: the cluster kernel that holds each row in registers (sm_90+) against the float64
    reference, on slices that end inside a CTA (4104 = 4096 + 8), full clusters (128256 bf16: 8 CTAs) and rows it
    cannot take (4101: no 16-byte packs; 128256 fp32 would need 16 CTAs: the two-sweep kernel runs); a masked row,
    -inf teacher entries, a row without a distribution, both directions, the teacher's gradient.  On sm_90+ the
    profiler must show the resident kernel exactly where it fits."""
    if not available_backends("kd_kl_div", "cuda")["cuda"].available:
        pytest.skip("the cuda backend is not built")
    monkeypatch.setenv("MPDISTIL_KL_ROW_RESIDENT", packs)
    rows, vocab = shape
    student, teacher = logits(*shape, dtype=dtype).cuda(), logits(*shape, dtype=dtype).cuda()
    mask = torch.arange(rows, device="cuda") != 0
    factor = 1.0 if dtype == torch.float32 else 2.0
    check_against_reference("cuda", student, teacher, 2.0, mask=mask, factor=factor, direction="reverse")
    teacher[:, ::7] = float("-inf")
    teacher[-1] = float("-inf")  # forward KL: no distribution in this row
    check_against_reference("cuda", student, teacher, 2.0, mask=mask, factor=factor, direction="forward")
    slice_per_cta = 512 * 4 * 16 // student.element_size()  # the largest variant's slice
    fits = (math.ceil(vocab / slice_per_cta) <= 8 and vocab % (16 // student.element_size()) == 0
            and torch.cuda.get_device_capability()[0] >= 9)
    _, kernels = cuda_kernels(lambda: kd_kl_div(student.requires_grad_(), teacher, backend="cuda").backward())
    assert any("resident" in k.name for k in kernels) == fits, [k.name for k in kernels]


@gpu_test
def test_gpu_row_resident_setting_is_checked(monkeypatch):
    """A bad MPDISTIL_KL_ROW_RESIDENT fails loudly (the CPU kernels do not read it)."""
    if not available_backends("kd_kl_div", "cuda")["cuda"].available:
        pytest.skip("the cuda backend is not built")
    monkeypatch.setenv("MPDISTIL_KL_ROW_RESIDENT", "3")
    student = logits(2, 64).cuda().requires_grad_()
    with pytest.raises(RuntimeError, match="MPDISTIL_KL_ROW_RESIDENT must be 0, 1, 2 or 4"):
        kd_kl_div(student, logits(2, 64).cuda(), backend="cuda")


@gpu_test
@pytest.mark.parametrize("backend", backend_params("kd_jsd", "cuda"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 1), (37, 1271), (2, 131_073)], ids=str)
def test_gpu_backends_jsd(backend, dtype, shape):
    student, teacher = logits(*shape, dtype=dtype).cuda(), logits(*shape, dtype=dtype).cuda()
    factor = 1.0 if dtype == torch.float32 else 2.0
    teacher[:, ::7] = float("-inf")
    check_against_reference(backend, student, teacher, 2.0, direction="jsd", beta=0.3, reduction="none",
                            factor=factor)


@gpu_test
@pytest.mark.parametrize("backend", backend_params("kd_kl_div", "cuda"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("direction", ["forward", "jsd"])
def test_gpu_backends_reduced(backend, dtype, reduction, direction):
    """Reduced losses on CUDA tensors (the backends that compute the gradient in forward take that path here)."""
    student, teacher = logits(67, 32001, dtype=dtype).cuda(), logits(67, 32001, dtype=dtype).cuda()
    mask = torch.rand(67, device="cuda") > 0.3
    teacher[:, ::5] = float("-inf")
    options = {"beta": 0.3} if direction == "jsd" else {}
    check_against_reference(backend, student, teacher, 2.0, reduction=reduction, mask=mask, direction=direction,
                            factor=1.0 if dtype == torch.float32 else 2.0, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_rows_of_several_blocks(backend, direction, monkeypatch):
    """Rows longer than one block of the kernels: the online softmax rescales its running sums when a later block
    raises the row max (rising, falling and leading -inf rows), through the forward, backward and gradient-in-forward
    kernels.  The Triton kernels take blocks of up to MAX_BLOCK = 4096 entries, more than the interpreter's shapes
    reach elsewhere: the block is shrunk to 16 here, so a row of 37 is two full blocks and a partial one."""
    if backend == "triton":
        import mpdistil_fast.kernels.kd_kl_div as triton_kl  # (also the JSD kernels' block size)

        monkeypatch.setattr(triton_kl, "MAX_BLOCK", 16)
    ramp = torch.linspace(0, 30, 37)
    student, teacher = logits(3, 37) + ramp, logits(3, 37) + ramp.flip(0)
    teacher[1], student[2] = teacher[1] + 2 * ramp, student[2].flip(0)
    student[2, :20] = teacher[2, :20] = float("-inf")  # a first block (and part of the second) without mass
    for reduction in ("none", "batchmean"):
        check_against_reference(backend, student, teacher, 2.0, reduction=reduction, direction=direction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows_is_zero(backend):
    """An empty batch ([0, V] logits, with or without a [0] mask) gives exactly 0 for every reduction (an empty [0]
    for "none") and empty gradients, as an all-False mask does (not 0 / 0), with and without autograd."""
    student, teacher = logits(0, 7), logits(0, 7)
    for direction in DIRECTIONS:
        for reduction in REDUCTIONS:
            for mask in (None, torch.zeros(0, dtype=torch.bool)):
                call = lambda s, t: kd_kl_div(s, t, 2.0, reduction=reduction, mask=mask,  # noqa: E731
                                              direction=direction, backend=backend)
                loss, grad_s, grad_t = loss_and_grads(call, student, teacher)
                assert loss.shape == ((0,) if reduction == "none" else ()), (direction, reduction)
                assert torch.equal(loss, torch.zeros_like(loss)), (direction, reduction, mask)
                assert grad_s.shape == grad_t.shape == (0, 7)
                assert torch.equal(call(student, teacher), torch.zeros_like(loss)), (direction, reduction, mask)


def test_auto_in_the_environment_and_triton_on_cpu_without_the_interpreter(monkeypatch):
    """MPDISTIL_BACKEND=auto (or empty, or padded) means what leaving it unset means, not an unknown backend; Triton
    on CPU tensors runs only under TRITON_INTERPRET=1, and without it the registry says so (named or from the
    environment)."""
    student, teacher = logits(2, 5), logits(2, 5)
    expected = kd_kl_div(student, teacher, 2.0, backend="cpp")
    for value in ("auto", " auto ", ""):
        monkeypatch.setenv("MPDISTIL_BACKEND", value)
        assert mpdistil_fast.backends.resolve_backend("auto", "kd_kl_div", torch.device("cpu")) == "cpp", value
        assert torch.equal(kd_kl_div(student, teacher, 2.0), expected), value
    monkeypatch.delenv("MPDISTIL_BACKEND")
    if mpdistil_fast.backends.triton_import_error() is not None:  # (imported now, under the conftest's setting)
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    status = mpdistil_fast.backends.backend_status("triton", "kd_kl_div", "cpu")
    assert not status.available and "TRITON_INTERPRET=1" in status.reason, status
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kd_kl_div(student, teacher, backend="triton")
    monkeypatch.setenv("MPDISTIL_BACKEND", "triton")
    with pytest.raises(ValueError, match="MPDISTIL_BACKEND=triton.*TRITON_INTERPRET"):
        kd_kl_div(student, teacher)


def test_kd_loss_module_passes_every_setting():
    """KDLoss hands each of its settings to kd_kl_div (scale_by_t2=False and the reduction included)."""
    student, teacher = logits(4, 30), logits(4, 30)
    for options in (dict(reduction="mean", scale_by_t2=False, direction="jsd", beta=0.2),
                    dict(reduction="none", scale_by_t2=False, direction="reverse")):
        module = KDLoss(3.0, backend="torch", **options)
        assert_rel_close(module(student, teacher), reference(student, teacher, 3.0, **options), torch.float32,
                         what=str(options))
        assert "scale_by_t2=False" in repr(module)
