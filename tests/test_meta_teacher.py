"""meta_teacher_loss / MetaTeacher: every backend against an independent float64 formula, gradients, bad inputs."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

import mpdistil_fast
from benchmarks.harness import cuda_kernels
from tests.helpers import (assert_checkpointed_grads_match_torch, assert_rel_close, assert_traced_like_eager,
                           backend_params, cpu_and_gpu_backend_params, gpu_backend_params, gpu_test)

BACKENDS = backend_params("meta_teacher_loss")


def reference(h_t, h_s, params, labels, mode, projection, choices=None):
    """Float64 loss written out with explicit softmax, log-sum-exp and the erf GELU; with ``choices`` the rows are
    the choices of consecutive examples, each scored by D's single output."""
    w1, b1, w2, b2 = params
    if projection is not None:
        h_s = h_s @ projection[0].T + projection[1]

    def discriminator(h):
        a = h @ w1.T + b1
        if w2 is None:
            return a
        g = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
        return g @ w2.T + b2

    def ce_and_gold(z):
        lse = z.logsumexp(-1)
        z_y = z.gather(1, labels[:, None])[:, 0]
        return (lse - z_y).mean(), (z_y - lse).exp().mean()

    z_t, z_s = discriminator(h_t), discriminator(h_s)
    if choices is not None:
        z_t, z_s = z_t.reshape(-1, choices), z_s.reshape(-1, choices)
    (ce_t, p_t), (ce_s, p_s) = ce_and_gold(z_t), ce_and_gold(z_s)
    loss = 0.5 * ce_t + 0.5 * ce_s if mode == "collaborative" else ce_t - p_t + p_s
    return loss, z_t, z_s


def make_case(batch, width, classes, *, hidden=None, student_width=None, dtype=torch.float32, scale=1.0,
              device="cpu"):
    randn = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)  # noqa: E731
    h_t = (randn(batch, width) * scale).requires_grad_()
    h_s = (randn(batch, student_width or width) * scale).requires_grad_()
    first = hidden or classes
    params = [randn(first, width) / width ** 0.5, randn(first)]
    if hidden:
        params += [randn(classes, hidden) / hidden ** 0.5, randn(classes)]
    else:
        params += [None, None]
    projection = None
    if student_width:
        projection = (randn(width, student_width) / student_width ** 0.5, randn(width))
    labels = torch.randint(0, classes, (batch,), device=device)
    for t in [p for p in params if p is not None] + list(projection or ()):
        t.requires_grad_()
    return h_t, h_s, params, projection, labels


def run(backend, h_t, h_s, params, projection, labels, mode):
    w1, b1, w2, b2 = params
    weight, bias = (w1, b1) if w2 is None else ((w1, w2), (b1, b2))
    return mpdistil_fast.meta_teacher_loss(h_t, h_s, weight, bias, labels, mode=mode,
                                           hidden=None if w2 is None else w1.shape[0],
                                           student_projection=projection, return_logits=True, backend=backend)


def check_against_reference(backend, mode, h_t, h_s, params, projection, labels, factor=1.0):
    dtype = h_t.dtype
    leaves = [t for t in [h_t, h_s, *params, *(projection or ())] if t is not None and t.requires_grad]
    doubles = {id(t): t.detach().double().requires_grad_() for t in leaves}
    d = lambda t: None if t is None else doubles[id(t)]  # noqa: E731
    out = run(backend, h_t, h_s, params, projection, labels, mode)
    expected, z_t, z_s = reference(d(h_t), d(h_s), [d(p) for p in params], labels, mode,
                                   None if projection is None else [d(p) for p in projection])
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.teacher_logits.dtype == dtype and not out.teacher_logits.requires_grad
    assert_rel_close(out.loss, expected, dtype, factor, "loss")
    assert_rel_close(out.teacher_logits, z_t, dtype, factor, "teacher logits")
    assert_rel_close(out.student_logits, z_s, dtype, factor, "student logits")
    grads = torch.autograd.grad(out.loss * 1.7, leaves)
    expected_grads = torch.autograd.grad(expected * 1.7, [doubles[id(t)] for t in leaves])
    for i, (got, want) in enumerate(zip(grads, expected_grads)):
        assert got.dtype == leaves[i].dtype
        assert_rel_close(got, want, dtype, factor, f"grad of leaf {i} {tuple(leaves[i].shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["collaborative", "competitive"])
@pytest.mark.parametrize("hidden,student_width", [(None, None), (None, 11), (9, None), (20, 5)])
def test_matches_float64_reference(backend, mode, hidden, student_width):
    case = make_case(7, 13, 3, hidden=hidden, student_width=student_width)
    check_against_reference(backend, mode, *case)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("batch,width,hidden", [(1100, 64, None), (1030, 37, 6)])
def test_large_batch_split_over_threads(backend, batch, width, hidden):
    """Enough rows that the CPU kernel splits the head's one-pass backward over threads (per-thread partials of
    grad W summed at the end), with row counts and widths that leave remainders."""
    case = make_case(batch, width, 5, hidden=hidden)
    check_against_reference(backend, "competitive", *case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden,student_width", [(None, None), (9, 11)])
def test_batch_of_several_row_blocks(backend, hidden, student_width):
    """A batch over the Triton kernels' 16-row blocks (BLOCK_M): 37 rows are two full blocks and a partial one per
    side, tiles that the persistent programs walk in forward and backward (the other CPU cases fit one block)."""
    check_against_reference(backend, "competitive", *make_case(37, 13, 3, hidden=hidden, student_width=student_width))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    case = make_case(5, 16, 4, hidden=8, student_width=12, dtype=dtype)
    check_against_reference(backend, "competitive", *case, factor=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_and_single_row(backend):
    """Saturated softmax (huge logits) stays finite; a batch of one and many labels (K = 37) work."""
    h_t, h_s, params, projection, labels = make_case(6, 6, 2, scale=300.0)
    labels = 1 - run("torch", h_t, h_s, params, projection, labels, "collaborative").teacher_logits.argmax(-1)
    check_against_reference(backend, "collaborative", h_t, h_s, params, projection, labels)  # confidently wrong
    check_against_reference(backend, "collaborative", *make_case(1, 10, 37, hidden=6))


@gpu_test
@pytest.mark.parametrize("backend", gpu_backend_params("meta_teacher_loss"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["collaborative", "competitive"])
@pytest.mark.parametrize("batch,width,classes,hidden,student_width", [(7, 13, 3, None, 11), (64, 768, 4, 256, 384)],
                         ids=["small-linear-proj", "bert-mlp-proj"])
def test_gpu_backends(backend, dtype, mode, batch, width, classes, hidden, student_width):
    """The fused GPU kernels on CUDA tensors: loss, both logits and every gradient (h_T, h_S, D, projection)."""
    case = make_case(batch, width, classes, hidden=hidden, student_width=student_width, dtype=dtype, device="cuda")
    check_against_reference(backend, mode, *case, factor=1.0 if dtype == torch.float32 else 2.0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("mode", ["collaborative", "competitive"])
def test_gradcheck_float64(backend, mode):
    h_t, h_s, params, projection, labels = make_case(3, 4, 3, hidden=5, student_width=3, dtype=torch.float64)
    w1, b1, w2, b2 = params

    def fn(h_t, h_s, w1, b1, w2, b2, p, c):
        return mpdistil_fast.meta_teacher_loss(h_t, h_s, (w1, w2), (b1, b2), labels, mode=mode, hidden=5,
                                               student_projection=(p, c), backend=backend)

    assert torch.autograd.gradcheck(fn, (h_t, h_s, w1, b1, w2, b2, *projection))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_interface(backend):
    torch.manual_seed(1)
    mt = mpdistil_fast.MetaTeacher(in_features=12, num_labels=3, hidden=6, student_features=8, backend=backend)
    h_t, h_s, labels = torch.randn(4, 12), torch.randn(4, 8), torch.tensor([0, 2, 1, 1])
    out = mt(h_t, h_s, labels, mode="competitive")
    out.loss.backward()
    assert all(p.grad is not None for p in mt.parameters())
    assert torch.allclose(mt.logits(h_s), out.student_logits, atol=1e-5)
    assert torch.allclose(mt.logits(h_t), out.teacher_logits, atol=1e-5)
    assert mt.logits(h_t).requires_grad
    assert mpdistil_fast.MetaTeacher(8, 2, student_features=8).student_projection is None
    # representations in another dtype than the module's (an fp32 teacher cache beside a bf16 engine) are cast to it
    half = copy.deepcopy(mt).bfloat16()
    mixed = half(h_t, h_s.bfloat16(), labels, mode="competitive")
    same = half(h_t.bfloat16(), h_s.bfloat16(), labels, mode="competitive")
    assert torch.equal(mixed.loss, same.loss) and torch.equal(half.logits(h_s), half.logits(h_s.bfloat16()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["collaborative", "competitive"])
@pytest.mark.parametrize("hidden,student_width", [(None, None), (6, 8)])
def test_multiple_choice_scores_each_choice(backend, mode, hidden, student_width):
    """MetaTeacher(multiple_choice=True) on [B, C, H] (COPA): D scores every choice with its one output (block-
    diagonal copies inside the fused op); loss, logits and every parameter's gradient as the float64 per-choice
    reference."""
    torch.manual_seed(3)
    batch, choices, width = 5, 3, 12
    mt = mpdistil_fast.MetaTeacher(width, choices, hidden=hidden, student_features=student_width, backend=backend,
                                   multiple_choice=True)
    h_t, h_s = torch.randn(batch, choices, width), torch.randn(batch, choices, student_width or width)
    labels = torch.tensor([0, 2, 1, 1, 0])
    out = mt(h_t, h_s, labels, mode=mode)
    names = [name for name, _ in mt.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(out.loss, list(mt.parameters()))))
    p64 = {name: p.detach().double().requires_grad_() for name, p in mt.named_parameters()}
    no_bias = torch.zeros(1, dtype=torch.float64)  # the scorer has no output bias
    params = ([p64["hidden.weight"], p64["hidden.bias"], p64["classifier.weight"], no_bias] if hidden
              else [p64["classifier.weight"], no_bias, None, None])
    projection = (p64["student_projection.weight"], p64["student_projection.bias"]) if student_width else None
    loss, z_t, z_s = reference(h_t.double().reshape(batch * choices, -1), h_s.double().reshape(batch * choices, -1),
                               params, labels, mode, projection, choices=choices)
    want = dict(zip(names, torch.autograd.grad(loss, [p64[name] for name in names])))
    assert out.teacher_logits.shape == (batch, choices) and mt.logits(h_t).shape == (batch, choices)
    assert_rel_close(out.loss, loss, torch.float32, what="loss")
    assert_rel_close(out.teacher_logits, z_t, torch.float32, what="teacher logits")
    assert_rel_close(mt.logits(h_s), z_s, torch.float32, what="student logits")
    for name in names:
        assert_rel_close(grads[name], want[name], torch.float32, what=name)
    with pytest.raises(ValueError, match=r"h_teacher must be \[B, 3, H\]"):
        mt(h_t[:, :2], h_s[:, :2], labels)


def test_hidden_states_without_grad_get_none():
    h_t, h_s, params, projection, labels = make_case(4, 6, 3, student_width=5)
    h_t.requires_grad_(False)
    h_s.requires_grad_(False)
    out = run("cpp", h_t, h_s, params, projection, labels, "competitive")
    out.loss.backward()
    assert h_t.grad is None and h_s.grad is None and projection[0].grad is not None


def test_double_backward_torch_works_fused_raises():
    h_t, h_s, params, projection, labels = make_case(3, 4, 3, hidden=5, dtype=torch.float64)
    for backend in ("torch", "cpp"):
        loss = run(backend, h_t, h_s, params, projection, labels, "collaborative").loss
        (grad,) = torch.autograd.grad(loss, params[0], create_graph=True)
        if backend == "torch":
            torch.autograd.grad(grad.square().sum(), h_s)
        else:
            with pytest.raises(RuntimeError, match="backend='torch'"):
                torch.autograd.grad(grad.square().sum(), h_s)


def test_torch_compile_fullgraph():
    h_t, h_s, params, projection, labels = make_case(4, 6, 3, hidden=5, student_width=4)
    fn = lambda *args: run("cpp", *args, "competitive").loss  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    expected, got = fn(h_t, h_s, params, projection, labels), compiled(h_t, h_s, params, projection, labels)
    assert_rel_close(got, expected, torch.float32, what="compiled loss")
    assert_rel_close(torch.autograd.grad(got, params[0])[0], torch.autograd.grad(expected, params[0])[0],
                     torch.float32, what="compiled grad")


@pytest.mark.parametrize("backend, device", cpu_and_gpu_backend_params("meta_teacher_loss"))
@pytest.mark.parametrize("hidden,student_width", [(None, None), (5, 4)])
def test_torch_compile_forward_and_backward_every_backend(backend, device, hidden, student_width):
    """Compiled, the op's custom-op bodies run, whose outputs torch checks for aliasing: the Triton backward's
    parameter gradients are views of one buffer and must not come back as such."""
    h_t, h_s, params, projection, labels = make_case(4, 6, 3, hidden=hidden, student_width=student_width,
                                                     device=device)
    leaves = [t for t in [h_t, h_s, *params, *(projection or ())] if t is not None]
    fn = lambda *args: run(backend, *args, "competitive").loss  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    expected, got = fn(h_t, h_s, params, projection, labels), compiled(h_t, h_s, params, projection, labels)
    assert_rel_close(got, expected, torch.float32, what="compiled loss")
    for i, (g, want) in enumerate(zip(torch.autograd.grad(got, leaves), torch.autograd.grad(expected, leaves))):
        assert_rel_close(g, want, torch.float32, what=f"compiled grad of leaf {i}")


def test_module_repr_names_the_backend_and_copies_keep_the_configuration():
    """repr(MetaTeacher) names its backend, label check and multiple-choice setting (it showed only the layers),
    and pickle / deepcopy keep them and the weights."""
    teacher = mpdistil_fast.MetaTeacher(6, 3, hidden=5, student_features=4, backend="torch", validate_labels=False)
    assert "backend='torch'" in repr(teacher) and "validate_labels=False" in repr(teacher)
    assert "multiple_choice=True" in repr(mpdistil_fast.MetaTeacher(6, 2, multiple_choice=True))
    h_t, h_s, labels = torch.randn(4, 6), torch.randn(4, 4), torch.tensor([0, 2, 1, 2])
    for copied in (pickle.loads(pickle.dumps(teacher)), copy.deepcopy(teacher)):
        assert repr(copied) == repr(teacher)
        torch.testing.assert_close(copied(h_t, h_s, labels).loss, teacher(h_t, h_s, labels).loss, rtol=0, atol=0)


def test_torch_jit_trace_records_the_fused_op_and_script_refuses_clearly(tmp_path):
    """torch.jit.trace of a model around MetaTeacher on the fused backend records its custom op (the eager
    autograd.Function made the trace fail), trains like eager and saves; torch.jit.script says it cannot compile
    the module and names what can."""
    class Loss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.teacher = mpdistil_fast.MetaTeacher(6, 3, hidden=5, student_features=4, backend="cpp")

        def forward(self, h_t, h_s, labels):
            return self.teacher(h_t, h_s, labels, mode="competitive").loss

    torch.manual_seed(0)
    model = Loss()
    h_t, h_s, labels = torch.randn(4, 6), torch.randn(4, 4), torch.tensor([0, 2, 1, 2])
    h_s2 = torch.randn(4, 4, requires_grad=True)
    assert_traced_like_eager(model, (h_t, h_s, labels), (h_t, h_s2, labels), [h_s2, *model.parameters()],
                             "meta_teacher_loss_fwd", tmp_path)
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile MetaTeacher.*torch.jit.trace"):
        torch.jit.script(model)


@pytest.mark.parametrize("backend, device", cpu_and_gpu_backend_params("meta_teacher_loss"))
def test_activation_checkpointing(backend, device):
    h_t, h_s, params, projection, labels = make_case(4, 6, 3, hidden=5, student_width=4, device=device,
                                                     dtype=torch.float64 if device == "cpu" else torch.float32)

    def loss(h_t, backend):
        return run(backend, h_t * 1.5, h_s, params, projection, labels, "competitive").loss

    assert_checkpointed_grads_match_torch(loss, h_t, [h_t, h_s, *params, *projection], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_representations_of_different_dtypes_are_promoted(backend):
    """A bf16 student representation beside an fp32 teacher one is computed in fp32 (as kd_kl_div and hidden_mse
    do): the loss, logits and gradients of the student cast first, the student's gradient in bf16 (it was a
    TypeError)."""
    h_t, h_s, params, projection, labels = make_case(6, 8, 3, hidden=5, student_width=4)
    h_s = h_s.detach().bfloat16().requires_grad_()
    widened = h_s.detach().float().requires_grad_()
    got, want = (run(backend, h_t, h, params, projection, labels, "competitive") for h in (h_s, widened))
    assert got.student_logits.dtype == torch.float32
    torch.testing.assert_close((got.loss, got.teacher_logits, got.student_logits),
                               (want.loss, want.teacher_logits, want.student_logits))
    got_grads = torch.autograd.grad(got.loss, (h_s, h_t, params[0]))
    want_grads = torch.autograd.grad(want.loss, (widened, h_t, params[0]))
    assert got_grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(got_grads[0], want_grads[0].bfloat16())
    torch.testing.assert_close(got_grads[1:], want_grads[1:])


W, B_ = torch.randn(3, 4), torch.randn(3)
BAD_INPUTS = [
    (dict(labels=torch.tensor([0, 3])), ValueError, "labels"),
    (dict(labels=torch.tensor([-1, 0])), ValueError, "labels"),
    (dict(labels=torch.tensor([0.0, 1.0])), TypeError, "labels"),
    (dict(labels=torch.tensor([0, 1, 2])), ValueError, "labels"),
    (dict(h_student=torch.randn(2, 5)), ValueError, "student_projection"),
    (dict(h_student=torch.randn(3, 4)), ValueError, "h_student"),
    (dict(h_teacher=torch.randn(0, 4), h_student=torch.randn(0, 4), labels=torch.zeros(0, dtype=torch.long)),
     ValueError, "empty batch"),
    (dict(h_teacher=torch.randn(2, 4, 1)), ValueError, "h_teacher"),
    (dict(weight=torch.randn(3, 5)), ValueError, "weight"),
    (dict(weight=torch.randn(0, 4), bias=torch.randn(0)), ValueError, "weight"),  # no class
    (dict(bias=torch.randn(2)), ValueError, "bias"),
    (dict(weight=W.bfloat16()), TypeError, "bias must have the dtype of weight"),
    (dict(hidden=5, weight=(torch.randn(5, 4), torch.randn(3, 5)), bias=(torch.randn(5).double(), torch.randn(3))),
     TypeError, r"bias\[0\] must have the dtype"),
    (dict(h_student=torch.randn(2, 5), student_projection=(torch.randn(4, 5), torch.randn(4).half())), TypeError,
     "student_projection bias"),
    (dict(student_projection=(None, torch.randn(4))), ValueError, "student_projection has a bias but no weight"),
    (dict(mode="adversarial"), ValueError, "mode"),
    (dict(hidden=5), TypeError, "weight"),
    (dict(hidden=0), ValueError, "hidden"),
    (dict(h_student=torch.randn(2, 5), student_projection=torch.randn(4, 4)), ValueError, "student_projection"),
    (dict(backend="vulkan"), ValueError, "backend"),
    (dict(hidden=5, weight=(torch.randn(5, 4), torch.randn(3, 5, device="meta")),
          bias=(torch.randn(5), torch.randn(3))), ValueError, r"weight\[1\] on meta"),
    (dict(hidden=5, weight=(torch.randn(5, 4), torch.randn(3, 5)),
          bias=(torch.randn(5), torch.randn(3, device="meta"))), ValueError, r"bias\[1\] on meta"),
    (dict(h_student=torch.randn(2, 5), student_projection=(torch.randn(4, 5), torch.randn(4, device="meta"))),
     ValueError, "student_projection_bias on meta"),
]


@pytest.mark.parametrize("kwargs,error,needle", BAD_INPUTS, ids=[f"{n}{i}" for i, (_, _, n) in enumerate(BAD_INPUTS)])
def test_bad_inputs(kwargs, error, needle):
    args = dict(h_teacher=torch.randn(2, 4), h_student=torch.randn(2, 4), weight=W, bias=B_,
                labels=torch.tensor([0, 2])) | kwargs
    positional = [args.pop(k) for k in ("h_teacher", "h_student", "weight", "bias", "labels")]
    with pytest.raises(error, match=needle):
        mpdistil_fast.meta_teacher_loss(*positional, **args)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
def test_compiled_fused_op_refuses_out_of_range_labels(backend):
    """Under torch.compile the Python check is skipped; the custom op must still refuse bad labels."""
    h = torch.randn(2, 4)
    fn = torch.compile(lambda labels: mpdistil_fast.meta_teacher_loss(h, h, W, B_, labels, backend=backend),
                       fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="labels"):
        fn(torch.tensor([0, 5]))


def test_fused_kernel_checks_labels_itself():
    """The C++ kernel refuses out-of-range labels even when the Python check is bypassed (e.g. under compile)."""
    h = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="labels"):
        torch.ops.mpdistil_C.meta_teacher_loss_fwd(h, h, None, None, W, B_, None, None, torch.tensor([0, 5]), False)


def cuda_kernel_names(fn):
    """(fn's result, names of the GPU kernels it launched)."""
    result, kernels = cuda_kernels(fn)
    return result, [event.name for event in kernels]


@gpu_test
@pytest.mark.parametrize("batch,hidden,student_width", [(32, None, None), (300, 256, 384)],
                         ids=["linear", "mlp-proj-many-row-blocks"])
def test_triton_is_one_launch_each_way(batch, hidden, student_width):
    """On a GPU the fused discriminator (float32) is one kernel forward and one backward: no zero-fills, casts or
    reductions around them.  The forward's only other kernel is the label-range check (a min/max reduction) that
    turns a bad label into a clear ValueError; with validate_labels=False the forward is the one kernel."""
    h_t, h_s, params, projection, labels = make_case(batch, 768, 3, hidden=hidden, student_width=student_width,
                                                     device="cuda")
    leaves = [t for t in [h_t, h_s, *params, *(projection or ())] if t is not None]
    call = lambda: run("triton", h_t, h_s, params, projection, labels, "competitive")  # noqa: E731
    call()  # compiles
    out, forward = cuda_kernel_names(call)
    grad_output = torch.ones_like(out.loss)
    _, backward = cuda_kernel_names(lambda: torch.autograd.grad(out.loss, leaves, grad_output))
    assert len(forward) == 2 and sum("meta_teacher_fwd_kernel" in name for name in forward) == 1, forward
    assert len(backward) == 1 and "meta_teacher_bwd_kernel" in backward[0], backward
    w1, b1, w2, b2 = params
    weight, bias = (w1, b1) if w2 is None else ((w1, w2), (b1, b2))
    _, unchecked = cuda_kernel_names(lambda: mpdistil_fast.meta_teacher_loss(
        h_t, h_s, weight, bias, labels, mode="competitive", hidden=hidden, student_projection=projection,
        validate_labels=False, backend="triton"))
    assert len(unchecked) == 1 and "meta_teacher_fwd_kernel" in unchecked[0], unchecked
    check_against_reference("triton", "competitive", h_t, h_s, params, projection, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_check_can_be_skipped(backend, monkeypatch):
    """validate_labels=False skips the range check (a reduction + host sync on a GPU); the loss is unchanged for
    valid labels, and the module passes the switch through."""
    import mpdistil_fast.functional.meta_teacher_loss as functional

    h_t, h_s, params, projection, labels = make_case(5, 6, 3, hidden=4, student_width=5)
    expected = run(backend, h_t, h_s, params, projection, labels, "competitive").loss
    calls = []
    monkeypatch.setattr(functional, "check_label_range", lambda *args: calls.append(args))
    w1, b1, w2, b2 = params
    loss = mpdistil_fast.meta_teacher_loss(h_t, h_s, (w1, w2), (b1, b2), labels, mode="competitive", hidden=4,
                                           student_projection=projection, validate_labels=False, backend=backend)
    assert calls == [] and torch.equal(loss, expected)
    module = mpdistil_fast.MetaTeacher(6, 3, hidden=4, student_features=5, backend=backend, validate_labels=False)
    module(h_t, h_s, labels)
    assert calls == []
    mpdistil_fast.MetaTeacher(6, 3, backend=backend)(h_t, h_t, labels)
    assert len(calls) == 1


@pytest.mark.skipif(not mpdistil_fast.available_backends("meta_teacher_loss")["cpp"].available,
                    reason="no CPU kernels")
def test_direct_op_calls_check_the_shapes():
    """The kernels index rows, labels and layers by these shapes: a direct torch.ops call with mismatched ones gets
    an error, not a read past a tensor (the public function checks them before)."""
    from mpdistil_fast.backends import cpu_kernel_build

    cpu_kernel_build()
    h = torch.randn(4, 6)
    for w1, labels, match in ((torch.randn(3, 6), torch.tensor([0, 1]), "one entry per row"),
                              (torch.randn(3, 5), torch.tensor([0, 1, 2, 0]), "first layer must be W")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.mpdistil_C.meta_teacher_loss_fwd(h, h, None, None, w1, torch.randn(3), None, None, labels, False)
