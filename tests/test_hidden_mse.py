"""hidden_mse / HiddenMSELoss: every backend against an independent float64 formula, gradients, masks, bad inputs."""
from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mpdistil_fast
from mpdistil_fast.functional.hidden_mse import layer_pairs
from tests.helpers import (assert_checkpointed_grads_match_torch, assert_rel_close, assert_traced_like_eager,
                           backend_params, cpu_and_gpu_backend_params, gpu_backend_params, gpu_test)

BACKENDS = backend_params("hidden_mse")


def reference(student, teacher, pairs, mask, weight, bias, normalize, reduction):
    """Float64 loss written out per layer pair: mean / sum / per-pair mean of ||f(W s + b) - f(t)||^2."""
    stacked = student.dim() == 4
    s_all = student.double() if stacked else student.double()[None]
    t_all = teacher.double() if stacked else teacher.double()[None]
    keep = torch.ones(s_all.shape[1:-1], dtype=torch.float64, device=s_all.device) if mask is None else mask.double()
    per_pair = []
    for s_index, t_index in pairs:
        y, t = s_all[s_index], t_all[t_index]
        if weight is not None:
            y = y @ weight.double().T + (0 if bias is None else bias.double())
        if normalize:
            y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        per_pair.append((((y - t) ** 2).sum(-1) * keep).sum())
    sse = torch.stack(per_pair)
    per_element = sse / (keep.sum().clamp_min(1) * t_all.shape[-1])
    if reduction == "sum":
        return sse.sum()
    if reduction == "mean":
        return per_element.mean()
    return per_element if stacked else per_element[0]


def make_case(shape_s, shape_t, *, projection=False, bias=True, mask=True, dtype=torch.float32, teacher_grad=True,
              device="cpu"):
    student = torch.randn(shape_s, dtype=dtype, device=device, requires_grad=True)
    teacher = torch.randn(shape_t, dtype=dtype, device=device, requires_grad=teacher_grad)
    weight = b = None
    if projection:
        weight = (torch.randn(shape_t[-1], shape_s[-1], dtype=dtype, device=device) / shape_s[-1] ** 0.5)
        weight.requires_grad_()
        b = torch.randn(shape_t[-1], dtype=dtype, device=device, requires_grad=True) if bias else None
    row_shape = shape_s[1:-1] if len(shape_s) == 4 else shape_s[:-1]
    m = (torch.rand(row_shape, device=device) > 0.35) if mask else None
    return student, teacher, weight, b, m


def check_against_reference(backend, student, teacher, weight, bias, mask, *, layer_map=None, normalize=False,
                            reduction="mean", factor=1.0):
    dtype = student.dtype
    projection = None if weight is None else (weight, bias)
    loss = mpdistil_fast.hidden_mse(student, teacher, mask=mask, normalize=normalize, projection=projection,
                                    layer_map=layer_map, reduction=reduction, backend=backend)
    stacked = student.dim() == 4
    pairs = layer_pairs(layer_map, student.shape[0] if stacked else 1, teacher.shape[0] if stacked else 1)
    leaves = [x for x in (student, teacher, weight, bias) if x is not None and x.requires_grad]
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    by_id = dict(zip(map(id, leaves), ref_leaves))
    pick = lambda x: by_id.get(id(x), x)  # noqa: E731
    expected = reference(pick(student), pick(teacher), pairs, mask, pick(weight), pick(bias), normalize, reduction)
    assert loss.shape == expected.shape
    assert_rel_close(loss, expected, dtype, factor, "loss")
    # non-uniform upstream gradient for "none"
    grad_out = torch.rand(loss.shape, dtype=torch.float64, device=loss.device) + 0.5
    grads = torch.autograd.grad(loss, leaves, grad_out.to(loss.dtype))
    expected_grads = torch.autograd.grad(expected, ref_leaves, grad_out)
    for name, got, want in zip(("student", "teacher", "weight", "bias"), grads, expected_grads):
        assert got.dtype == dtype
        assert_rel_close(got, want, dtype, factor, f"grad {name}")


CASES = {
    "stack-map-proj-mask": dict(shape_s=(3, 2, 5, 12), shape_t=(4, 2, 5, 8), projection=True, layer_map=[0, 2, 3]),
    "stack-skip-normalize": dict(shape_s=(3, 2, 7, 9), shape_t=(6, 2, 7, 9), layer_map="skip", normalize=True),
    "tokens-proj-nobias-normalize": dict(shape_s=(3, 5, 6), shape_t=(3, 5, 10), projection=True, bias=False,
                                         normalize=True),
    "pooled-nomask": dict(shape_s=(5, 33), shape_t=(5, 33), mask=False),
    "stack-shared-layers-proj-normalize": dict(shape_s=(2, 3, 4, 6), shape_t=(3, 3, 4, 5), projection=True,
                                               normalize=True, layer_map=[(0, 1), (1, 1), (0, 2)]),
}
#: Only in the GPU test (a BERT-base-sized teacher, several blocks per row in the kernels).
GPU_CASES = {
    "bert-last-proj-normalize": dict(shape_s=(4, 4, 64, 384), shape_t=(6, 4, 64, 768), projection=True,
                                     layer_map="last", normalize=True),
}


def check_case(backend, case, reduction, factor=1.0, **make_case_kwargs):
    """check_against_reference on the inputs of case ``case`` (``make_case_kwargs``: dtype, device)."""
    spec = dict((CASES | GPU_CASES)[case])
    layer_map, normalize = spec.pop("layer_map", None), spec.pop("normalize", False)
    student, teacher, weight, bias, mask = make_case(**spec, **make_case_kwargs)
    check_against_reference(backend, student, teacher, weight, bias, mask, layer_map=layer_map, normalize=normalize,
                            reduction=reduction, factor=factor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(backend, case, reduction):
    check_case(backend, case, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
def test_dtypes(backend, dtype, normalize):
    student, teacher, weight, bias, mask = make_case((2, 2, 3, 16), (2, 2, 3, 8), projection=True, dtype=dtype)
    check_against_reference(backend, student, teacher, weight, bias, mask, normalize=normalize)


@pytest.mark.parametrize("backend", BACKENDS)
def test_states_of_different_dtypes_are_promoted(backend):
    """A bf16 student beside an fp32 teacher (autocast student, fp32 teacher or cache) is computed in fp32, as
    F.mse_loss does: the same loss and gradients as with the student cast first, the student's gradient in bf16
    (it was a TypeError)."""
    student, teacher, weight, bias, mask = make_case((2, 2, 3, 16), (2, 2, 3, 8), projection=True)
    student = student.detach().bfloat16().requires_grad_()
    widened = student.detach().float().requires_grad_()
    run = lambda s, t: mpdistil_fast.hidden_mse(s, t, mask=mask, projection=(weight, bias), normalize=True,  # noqa
                                                backend=backend)
    got, want = run(student, teacher), run(widened, teacher)
    got_grads = torch.autograd.grad(got, (student, teacher, weight))
    want_grads = torch.autograd.grad(want, (widened, teacher, weight))
    assert got.dtype == torch.float32 and got_grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads[0], want_grads[0].bfloat16())
    for got_grad, want_grad in zip(got_grads[1:], want_grads[1:]):
        torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_float64(backend, normalize):
    student, teacher, weight, bias, mask = make_case((2, 2, 3, 4), (3, 2, 3, 5), projection=True,
                                                     dtype=torch.float64)
    fn = lambda s, t, w, b: mpdistil_fast.hidden_mse(s, t, mask=mask, projection=(w, b), layer_map=[2, 0],  # noqa
                                                     normalize=normalize, backend=backend)
    assert torch.autograd.gradcheck(fn, (student, teacher, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_is_zero(backend, reduction):
    student, teacher, weight, bias, _ = make_case((2, 2, 3, 4), (2, 2, 3, 4), projection=True)
    teacher.data[0, 0, 0] = float("nan")  # masked positions must not leak into the loss or the gradients
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = mpdistil_fast.hidden_mse(student, teacher, mask=mask, projection=(weight, bias), reduction=reduction,
                                    normalize=True, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    for grad in torch.autograd.grad(loss.sum(), [student, teacher, weight, bias]):
        assert torch.equal(grad, torch.zeros_like(grad))


def check_non_finite_padding(backend: str, normalize: bool, device: str) -> None:
    """NaN / inf in masked student and teacher rows, with a projection: the loss and every gradient (the
    projection's included, whose GEMM runs over all rows on the GPU backends) are those of zeroed padding."""
    student, teacher, weight, bias, _ = make_case((2, 2, 5, 6), (2, 2, 5, 8), projection=True, device=device)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]], device=device)
    clean = [x.detach().clone().requires_grad_() for x in (student, teacher, weight, bias)]
    student.data[:, ~mask] = float("nan")
    student.data[0, 0, 1, 0] = float("inf")
    teacher.data[:, ~mask] = float("-inf")
    grads = [torch.autograd.grad(mpdistil_fast.hidden_mse(s, t, mask=mask, projection=(w, b), normalize=normalize,
                                                           backend=backend), (s, t, w, b))
             for s, t, w, b in ((student, teacher, weight, bias), clean)]
    for got, expected in zip(*grads):
        assert torch.isfinite(got).all()
        assert_rel_close(got, expected, torch.float32, what="gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_non_finite_padding_never_reaches_a_gradient(backend, normalize):
    check_non_finite_padding(backend, normalize, "cpu")


@gpu_test
@pytest.mark.parametrize("backend", gpu_backend_params("hidden_mse"))
@pytest.mark.parametrize("normalize", [False, True])
def test_gpu_non_finite_padding_never_reaches_a_gradient(backend, normalize):
    check_non_finite_padding(backend, normalize, "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_after_an_inference_mode_call(backend):
    """An evaluation call under torch.inference_mode() must not leave a reused buffer that training then saves for
    backward (inference tensors cannot be): every later step raised."""
    hint = mpdistil_fast.HiddenMSELoss(16, 32, backend=backend)
    student, teacher = torch.randn(2, 4, 8, 16, requires_grad=True), torch.randn(2, 4, 8, 32)
    with torch.inference_mode():
        hint(student, teacher)
    for _ in range(2):
        hint(student, teacher).backward()
    assert student.grad.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows_is_zero(backend, reduction):
    """An empty batch (no mask) gives 0 and empty gradients, as an all-False mask does (not 0 / 0)."""
    student = torch.randn(2, 0, 3, 4, requires_grad=True)
    teacher = torch.randn(2, 0, 3, 4)
    loss = mpdistil_fast.hidden_mse(student, teacher, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.autograd.grad(loss.sum(), student)[0].shape == student.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_map, read", [("last", [0, 1, 2]), ([(0, 1), (2, 1), (0, 2)], [0, 2])])
def test_unread_layers_and_padding_get_exact_zeros(backend, layer_map, read):
    """Student layers no pair reads and padding rows get exactly zero gradient, also when the allocator hands out
    memory that held NaN and when the CPU kernel reuses the buffer of its previous gradient."""
    student, teacher, weight, bias, mask = make_case((4, 2, 3, 5), (6, 2, 3, 8), projection=True)
    unread = [k for k in range(4) if k not in read]
    for _ in range(3):
        poison = torch.full(student.shape, float("nan"))  # freed right away: its block is likely reused below
        del poison
        loss = mpdistil_fast.hidden_mse(student, teacher, mask=mask, projection=(weight, bias), layer_map=layer_map,
                                        backend=backend)
        grad, = torch.autograd.grad(loss, [student])
        assert torch.equal(grad[unread], torch.zeros_like(grad[unread]))
        padding = grad[read][:, ~mask]
        assert torch.equal(padding, torch.zeros_like(padding)) and grad[read][:, mask].abs().amin() > 0
    check_against_reference(backend, student, teacher, weight, bias, mask, layer_map=layer_map)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reused_buffers_never_leak_between_calls(backend):
    """The CPU kernel reuses its saved-projection, gradient and workspace buffers once nothing holds them: a
    gradient the caller keeps is never overwritten, two graphs alive at once each keep their own saved rows, and
    masks whose valid-row count grows or shrinks between calls still match the float64 reference."""
    student, teacher, weight, bias, _ = make_case((3, 4, 6, 5), (3, 4, 6, 8), projection=True, teacher_grad=False)
    leaves = [student, weight, bias]

    def run(mask):
        loss = mpdistil_fast.hidden_mse(student, teacher, mask=mask, projection=(weight, bias), backend=backend)
        return loss, torch.autograd.grad(loss, leaves, retain_graph=True)

    masks = [torch.rand(4, 6) > p for p in (0.8, 0.1, 0.5)]  # few, most, then some valid rows
    first_loss, first_grads = run(masks[0])
    kept = [g.clone() for g in first_grads]
    second_loss, _ = run(masks[1])  # the first graph (and its saved rows) is still alive
    for mask, loss in ((masks[0], first_loss), (masks[1], second_loss)):
        check_against_reference(backend, student, teacher, weight, bias, mask)
        expected = reference(student.detach().double(), teacher.double(), [(k, k) for k in range(3)], mask,
                             weight.detach().double(), bias.detach().double(), False, "mean")
        assert_rel_close(loss, expected, torch.float32, what="loss of a live graph")
    assert all(torch.equal(g, k) for g, k in zip(first_grads, kept))
    grads_again = torch.autograd.grad(first_loss, leaves)  # backward of the older graph after newer calls
    assert all(torch.equal(g, k) for g, k in zip(grads_again, kept))
    check_against_reference(backend, student, teacher, weight, bias, masks[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_values(backend):
    """Large magnitudes, and all-zero rows under normalisation (the norm clamp must give finite gradients)."""
    student, teacher, _, _, mask = make_case((2, 3, 4, 8), (2, 3, 4, 8))
    with torch.no_grad():
        student.mul_(1e4)
        teacher[0, 1].zero_()
        student[1, 2, 0].zero_()
    for normalize in (False, True):
        check_against_reference(backend, student, teacher, None, None, mask, normalize=normalize)


@gpu_test
@pytest.mark.parametrize("backend", gpu_backend_params("hidden_mse"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case,reduction", [("stack-map-proj-mask", "none"), ("pooled-nomask", "none"),
                                            ("bert-last-proj-normalize", "sum")])
def test_gpu_backends(backend, dtype, case, reduction):
    """The fused GPU kernels on CUDA tensors: loss and every gradient (student, teacher, weight, bias).

    The large case uses "sum": its "mean"/"none" gradients (~1e-8) would be float16 subnormals."""
    check_case(backend, case, reduction, factor=1.0 if dtype == torch.float32 else 2.0, dtype=dtype, device="cuda")


def test_layer_presets_follow_patient_kd():
    assert [t + 1 for _, t in layer_pairs("skip", 6, 12)] == [2, 4, 6, 8, 10]
    assert [t + 1 for _, t in layer_pairs("last", 6, 12)] == [7, 8, 9, 10, 11]
    assert [s for s, _ in layer_pairs("skip", 6, 12)] == [0, 1, 2, 3, 4]
    assert layer_pairs([3, 1], 2, 4) == [(0, 3), (1, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_without_grad_and_module(backend):
    module = mpdistil_fast.HiddenMSELoss(6, 4, normalize=True, layer_map="last", backend=backend)
    student, teacher, _, _, mask = make_case((3, 2, 3, 6), (4, 2, 3, 4), teacher_grad=False)
    loss = module(student, teacher, mask)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    assert module.projection.weight.grad is not None and module.projection.bias.grad is not None
    expected = reference(student, teacher, layer_pairs("last", 3, 4), mask, module.projection.weight,
                         module.projection.bias, True, "mean")
    assert_rel_close(loss, expected, torch.float32, what="module loss")


def test_double_backward_torch_works_fused_raises():
    student, teacher, weight, bias, mask = make_case((2, 2, 3, 4), (2, 2, 3, 4), projection=True,
                                                     dtype=torch.float64)
    for backend in ("torch", "cpp"):
        loss = mpdistil_fast.hidden_mse(student, teacher, mask=mask, projection=(weight, bias), backend=backend)
        (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
        if backend == "torch":
            torch.autograd.grad(grad.square().sum(), student)
        else:
            with pytest.raises(RuntimeError, match="backend='torch'"):
                torch.autograd.grad(grad.square().sum(), student)


def test_torch_compile_fullgraph():
    student, teacher, weight, bias, mask = make_case((2, 2, 3, 8), (3, 2, 3, 4), projection=True)
    fn = lambda s, t, w, b, m: mpdistil_fast.hidden_mse(s, t, mask=m, projection=(w, b), layer_map=[2, 1],  # noqa
                                                        normalize=True, backend="cpp")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    expected = fn(student, teacher, weight, bias, mask)
    got = compiled(student, teacher, weight, bias, mask)
    assert_rel_close(got, expected, torch.float32, what="compiled loss")
    grads = torch.autograd.grad(got, [student, weight])
    expected_grads = torch.autograd.grad(expected, [student, weight])
    for g, e in zip(grads, expected_grads):
        assert_rel_close(g, e, torch.float32, what="compiled grad")


def test_module_repr_names_the_backend_and_copies_keep_the_configuration():
    """repr(HiddenMSELoss) names its backend (as KDLoss's does; it did not), and pickle / deepcopy keep the
    configuration and the projection's weights."""
    loss = mpdistil_fast.HiddenMSELoss(4, 6, layer_map="skip", normalize=True, backend="torch")
    assert "backend='torch'" in repr(loss) and "layer_map='skip'" in repr(loss)
    student, teacher = torch.randn(3, 2, 5, 4), torch.randn(6, 2, 5, 6)
    for copied in (pickle.loads(pickle.dumps(loss)), copy.deepcopy(loss)):
        assert repr(copied) == repr(loss)
        torch.testing.assert_close(copied(student, teacher), loss(student, teacher), rtol=0, atol=0)


def test_torch_jit_trace_records_the_fused_op_and_script_refuses_clearly(tmp_path):
    """torch.jit.trace of HiddenMSELoss on the fused backend records its custom op (the eager autograd.Function made
    the trace fail, and the cached layer indices made trace's check run see another graph), trains like eager and
    saves; torch.jit.script says it cannot compile the module and names what can."""
    torch.manual_seed(0)
    loss = mpdistil_fast.HiddenMSELoss(4, 6, layer_map=[2, 0], normalize=True, backend="cpp")
    student, teacher, _, _, mask = make_case((2, 2, 3, 4), (3, 2, 3, 6), teacher_grad=False)
    student2 = torch.randn_like(student, requires_grad=True)
    assert_traced_like_eager(loss, (student, teacher, mask), (student2, teacher, mask),
                             [student2, loss.projection.weight, loss.projection.bias], "hidden_mse_fwd", tmp_path)
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile HiddenMSELoss.*torch.jit.trace"):
        torch.jit.script(loss)


@pytest.mark.parametrize("backend, device", cpu_and_gpu_backend_params("hidden_mse"))
def test_activation_checkpointing(backend, device):
    student, teacher, weight, bias, mask = make_case((2, 2, 3, 8), (3, 2, 3, 4), projection=True, device=device,
                                                     dtype=torch.float64 if device == "cpu" else torch.float32)

    def loss(s, backend):
        return mpdistil_fast.hidden_mse(s * 1.5, teacher, mask=mask, projection=(weight, bias), layer_map=[2, 1],
                                        normalize=True, backend=backend)

    assert_checkpointed_grads_match_torch(loss, student, [student, teacher, weight, bias], backend)


def test_torch_compile_warns_nothing(monkeypatch):
    """Compiling the public function gives no warning of Dynamo's: the layer-index cache (functools.lru_cache) made
    it warn 'Silent incorrectness is only a potential risk' on every first compile."""
    import warnings

    import torch._dynamo.utils

    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())  # warned earlier in this process or not
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, t: mpdistil_fast.hidden_mse(s, t, layer_map="skip"), fullgraph=True,
                             backend="aot_eager")
    student, teacher = torch.randn(2, 2, 3, 4), torch.randn(4, 2, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled(student, teacher)
    assert [str(w.message) for w in caught if "dynamo" in w.filename.lower() or "lru_cache" in str(w.message)] == []
    assert_rel_close(got, mpdistil_fast.hidden_mse(student, teacher, layer_map="skip"), torch.float32)


S, T = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
BAD_INPUTS = [
    (dict(student_hidden=[1.0]), TypeError, "student_hidden"),
    (dict(teacher_hidden=T.long()), TypeError, "teacher_hidden"),
    (dict(teacher_hidden=torch.randn(2, 3, 3, 4)), ValueError, "batch dimensions"),
    (dict(teacher_hidden=torch.randn(2, 3, 4)), ValueError, "teacher_hidden"),
    (dict(teacher_hidden=torch.randn(2, 2, 3, 5)), ValueError, "projection"),
    (dict(projection=torch.randn(4, 3)), ValueError, "projection weight"),
    (dict(projection=(torch.randn(4, 4), torch.randn(3))), ValueError, "projection bias"),
    (dict(projection="linear"), TypeError, "projection"),
    (dict(projection=(None, torch.randn(4))), ValueError, "projection has a bias but no weight"),  # not dropped
    (dict(mask=torch.ones(2, 3)), TypeError, "mask"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(normalize=1), TypeError, "normalize"),
    (dict(layer_map="every"), ValueError, "layer_map"),
    (dict(layer_map=[0, 5]), ValueError, "layer_map"),
    (dict(layer_map=[0, 2]), ValueError, "layer_map"),  # one past the teacher stack
    (dict(layer_map=[-1, 0]), ValueError, "layer_map"),
    (dict(layer_map=[(0, 0), (-2, 1)]), ValueError, "layer_map"),
    (dict(student_hidden=torch.randn(1, 2, 3, 4), layer_map="skip"), ValueError, "layer_map"),  # no pair to match
    (dict(mask=torch.ones(2, 3, dtype=torch.bool, device="meta")), ValueError, "mask"),
    (dict(layer_map=[0]), ValueError, "layer_map"),
    (dict(layer_map=[0.5, 1]), TypeError, "layer_map"),
    (dict(layer_map=[(True, 1), (1, 1)]), TypeError, "layer_map"),
    (dict(student_hidden=torch.randn(2, 2, 3, 0), teacher_hidden=torch.randn(2, 2, 3, 0)), ValueError, "hidden"),
    (dict(student_hidden=torch.randn(0, 2, 3, 4), teacher_hidden=torch.randn(0, 2, 3, 4)), ValueError, "one layer"),
    (dict(teacher_hidden=torch.randn(3, 2, 3, 4)), ValueError, "layer_map"),
    (dict(backend="fortran"), ValueError, "backend"),
]


@pytest.mark.parametrize("kwargs,error,needle", BAD_INPUTS, ids=[n + str(i) for i, (_, _, n) in enumerate(BAD_INPUTS)])
def test_bad_inputs(kwargs, error, needle):
    args = dict(student_hidden=S, teacher_hidden=T) | kwargs
    with pytest.raises(error, match=needle):
        mpdistil_fast.hidden_mse(args.pop("student_hidden"), args.pop("teacher_hidden"), **args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_pairs_sharing_layers_without_projection(backend, normalize):
    """Pairs that read the same student layer (and the same teacher layer) with no projection: the kernels read the
    stacks in place, so the gradients of a shared layer add up over its pairs (with a projection each pair has its
    own projected rows, which the other cases cover)."""
    student, teacher, _, _, mask = make_case((3, 2, 5, 8), (4, 2, 5, 8))
    for reduction in ("none", "mean"):
        check_against_reference(backend, student, teacher, None, None, mask, layer_map=[(0, 1), (2, 3), (0, 3), (0, 0)],
                                normalize=normalize, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_of_several_forward_tiles(backend, monkeypatch):
    """More rows than one program's tile: the Triton forward takes FORWARD_TILE / H rows per program (1024 for H = 8),
    more than the interpreter's shapes reach elsewhere; the tile is shrunk to 4 rows here, so 2 x 7 rows are three
    full tiles and a partial one per pair."""
    if backend == "triton":
        import mpdistil_fast.kernels.hidden_mse as triton_hidden

        monkeypatch.setattr(triton_hidden, "FORWARD_TILE", 32)
    for projection, mask in ((True, True), (False, False)):
        student, teacher, weight, bias, row_mask = make_case((2, 2, 7, 8), (3, 2, 7, 8), projection=projection,
                                                             mask=mask)
        check_against_reference(backend, student, teacher, weight, bias, row_mask, layer_map=[2, 0], reduction="none")


def test_module_without_projection_bias():
    """HiddenMSELoss(bias=False): the projection has no bias, and the loss is that of W s alone."""
    module = mpdistil_fast.HiddenMSELoss(6, 4, bias=False, layer_map=[0, 2])
    assert module.projection.bias is None
    student, teacher, _, _, mask = make_case((2, 2, 3, 6), (3, 2, 3, 4), teacher_grad=False)
    expected = reference(student, teacher, [(0, 0), (1, 2)], mask, module.projection.weight, None, False, "mean")
    assert_rel_close(module(student, teacher, mask), expected, torch.float32, what="module loss")


def test_layer_indices_made_once_and_usable_after_inference_mode():
    """The layer index tensors are made once per (pairs, device) (a fresh one per call is a host-to-device copy
    that waits for the GPU), also when the first call runs under inference mode and a training step follows."""
    from mpdistil_fast.functional.hidden_mse import layer_index_tensors

    layer_index_tensors.cache_clear()
    student, teacher = torch.randn(3, 2, 4, 6), torch.randn(5, 2, 4, 6)
    with torch.inference_mode():
        mpdistil_fast.hidden_mse(student, teacher, layer_map=[1, 3, 4], backend="torch")
    first = layer_index_tensors(((0, 1), (1, 3), (2, 4)), student.device)
    assert not first[0].is_inference() and layer_index_tensors.cache_info().misses == 1
    for backend in ("torch", "cpp"):
        trainable = student.clone().requires_grad_()
        mpdistil_fast.hidden_mse(trainable, teacher, layer_map=[1, 3, 4], backend=backend).backward()
        assert trainable.grad is not None
    assert layer_index_tensors.cache_info().misses == 1


@pytest.mark.skipif(not mpdistil_fast.available_backends("hidden_mse")["cpp"].available, reason="no CPU kernels")
def test_direct_op_calls_check_the_layer_indices():
    """The C++ op reads layers through the index tensors: a direct torch.ops call with an index outside the stack
    gets an error, not a read past the tensor (the public function checks layer maps before)."""
    from mpdistil_fast.backends import cpu_kernel_build

    cpu_kernel_build()
    with pytest.raises(RuntimeError, match="layer index 5 outside a stack of 2"):
        torch.ops.mpdistil_C.hidden_mse_fwd(torch.randn(2, 4, 8), torch.randn(3, 4, 8), torch.tensor([0, 5]),
                                            torch.tensor([0, 1]), None, None, None, False)


ROOT = Path(__file__).resolve().parents[1]
#: A direct op call in a child process; CALL is filled with the arguments after (student [2, 4, 8], teacher [3, 4, 8]).
DIRECT_CUDA_CALL = """
import torch, mpdistil_fast
index = lambda *layers: torch.tensor(layers, device="cuda")
student, teacher = torch.randn(2, 4, 8, device="cuda"), torch.randn(3, 4, 8, device="cuda")
weight = torch.randn(8, 8, device="cuda")
torch.ops.mpdistil_C.hidden_mse_fwd(student, teacher, CALL, False)
torch.cuda.synchronize()
print("no assert")
"""


@gpu_test
@pytest.mark.parametrize("call", ["index(0, 5), index(0, 1), None, None, None",    # student layer, read in place
                                  "index(0, 1), index(0, 3), None, weight, None"])  # teacher layer, projected
def test_gpu_direct_op_calls_check_the_layer_indices(call):
    """The CUDA op's kernels read layers through the index tensors: a direct torch.ops call with an index outside
    its stack is a device-side assert, as in torch's own indexing kernels (a host check would copy the indices to the
    host, a stream sync on every call), not a read past the tensor.  It ends the CUDA context, so it runs in a child
    process (two cases: each costs a process and a CUDA context on the GPU machine's short lease).  The projected
    path gathers student layers with index_select, which asserts the same way."""
    from mpdistil_fast.backends import backend_status

    status = backend_status("cuda", "hidden_mse", "cuda")
    if not status.available:
        pytest.skip(status.reason)
    result = subprocess.run([sys.executable, "-c", DIRECT_CUDA_CALL.replace("CALL", call)], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0 and "device-side assert triggered" in result.stderr, result.stdout + result.stderr


@gpu_test
def test_gpu_direct_op_calls_check_the_index_devices():
    """An index tensor on another device than the stacks is an error that names it (the kernels read raw device
    pointers)."""
    from mpdistil_fast.backends import backend_status

    status = backend_status("cuda", "hidden_mse", "cuda")
    if not status.available:
        pytest.skip(status.reason)
    student, teacher = torch.randn(2, 4, 8, device="cuda"), torch.randn(3, 4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="must be on the stacks' device"):
        torch.ops.mpdistil_C.hidden_mse_fwd(student, teacher, torch.tensor([0, 1]),
                                            torch.tensor([0, 1], device="cuda"), None, None, None, False)
