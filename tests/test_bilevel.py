"""Bi-level engine: every hypergradient method against the unrolled exact one, and exact against a numerical
derivative, on tiny BERT teachers and students (configs built in code, eager attention)."""
from __future__ import annotations

import copy
import functools
import importlib
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from helpers import rel_error, run_on_thread_ranks
from mpdistil_fast.bilevel import METHODS, hypergradient, meta_gradient
from mpdistil_fast.bilevel.functional import RandomStateReplay
from mpdistil_fast.bilevel.inner_update import TorchOptimizerState, experimental_step, make_inner_update

VOCAB, NUM_LABELS, TEMPERATURE, INNER_LR = 37, 3, 2.0, 0.5
#: Relative error of the whole hypergradient vector against "exact", per method and dtype (issue 4).
TOLERANCE = {("finite_difference", torch.float64): 1e-6, ("forward_mode", torch.float64): 1e-6,
             ("first_order", torch.float64): 1e-4,
             ("finite_difference", torch.float32): 1e-3, ("forward_mode", torch.float32): 1e-3,
             ("first_order", torch.float32): 1e-2}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tiny models are dispatch-bound: one intra-op thread is 2-4x faster than two on a shared 2-core CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert(layers: int, hidden: int, dtype: torch.dtype = torch.float64, attention: str = "eager",
              dropout: float = 0.0) -> BertForSequenceClassification:
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=hidden + 8, max_position_embeddings=16, num_labels=NUM_LABELS,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config._attn_implementation = attention
    return BertForSequenceClassification(config).to(dtype)


def make_batch(size: int = 5, length: int = 7, pad: int = 2) -> dict[str, torch.Tensor]:
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, length - pad:] = 0  # one padded row, so masking matters
    return {"input_ids": torch.randint(0, VOCAB, (size, length)), "attention_mask": mask,
            "labels": torch.randint(0, NUM_LABELS, (size,))}


def model_inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Hinton KD, KL(p_t || p_s) at temperature T, times T^2 (plain torch, double-backward capable)."""
    return F.kl_div(F.log_softmax(student_logits / TEMPERATURE, -1), F.log_softmax(teacher_logits / TEMPERATURE, -1),
                    log_target=True, reduction="batchmean") * TEMPERATURE ** 2


def inner_loss(student, teacher, batch) -> torch.Tensor:
    student_logits = student(**model_inputs(batch)).logits
    teacher_logits = teacher(**model_inputs(batch)).logits
    return kd_loss(student_logits, teacher_logits) + F.cross_entropy(student_logits, batch["labels"])


def quiz_loss(student, batch) -> torch.Tensor:
    return F.cross_entropy(student(**model_inputs(batch)).logits, batch["labels"])


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def problem(dtype: torch.dtype, dropout: float = 0.0, seed: int = 0):
    """(student, teacher, train batch, quiz batch) with an extra teacher parameter the loss never uses."""
    torch.manual_seed(seed)
    student, teacher = tiny_bert(2, 16, dtype, dropout=dropout), tiny_bert(3, 24, dtype)
    teacher.unused = nn.Parameter(torch.randn(3, dtype=dtype))
    teacher.bert.embeddings.token_type_embeddings.weight.requires_grad_(False)  # frozen: not in the result
    return student, teacher, make_batch(), make_batch(size=4, length=6, pad=1)


@functools.lru_cache(maxsize=None)
def exact_reference(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    student, teacher, train, quiz = problem(dtype)
    return hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR, method="exact")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "exact"])
def test_method_matches_exact(method: str, dtype: torch.dtype) -> None:
    student, teacher, train, quiz = problem(dtype)
    before = copy.deepcopy((student.state_dict(), teacher.state_dict()))
    result = hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR, method=method)
    expected = exact_reference(dtype)
    trainable = [n for n, p in teacher.named_parameters() if p.requires_grad]
    assert list(result) == trainable and list(expected) == trainable
    assert "bert.embeddings.token_type_embeddings.weight" not in result
    assert torch.equal(result["unused"], torch.zeros(3, dtype=dtype))
    assert all(result[n].dtype == dtype for n in result)
    error = rel_error(flat(result), flat(expected))
    assert error <= TOLERANCE[(method, dtype)], f"{method} {dtype}: relative error {error:.2e}"
    # nothing was modified in place
    for module, state in zip((student, teacher), before):
        assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())


def unrolled_quiz_loss(student, teacher, train, quiz, steps: int) -> float:
    """Q(theta_k) after ``steps`` plain SGD steps, computed without any graph to the teacher."""
    student = copy.deepcopy(student)
    for _ in range(steps):
        student.zero_grad()
        inner_loss(student, teacher, train).backward()
        with torch.no_grad():
            for p in student.parameters():
                p -= INNER_LR * p.grad
    with torch.no_grad():
        return float(quiz_loss(student, quiz))


@pytest.mark.parametrize("steps", [1, 2])
def test_exact_matches_numerical_derivative(steps: int) -> None:
    student, teacher, train, quiz = problem(torch.float64, seed=1)
    grads = hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR, method="exact",
                          inner_steps=steps)
    params = dict(teacher.named_parameters())
    probes = []  # the largest entry of a few tensors across the teacher, so no probe is trivially zero
    for name in ("classifier.weight", "bert.encoder.layer.2.output.dense.bias",
                 "bert.encoder.layer.0.attention.self.query.weight"):
        probes.append((name, tuple(int(i) for i in torch.unravel_index(grads[name].abs().argmax(),
                                                                       grads[name].shape))))
    delta = 1e-5
    for name, index in probes:
        original = params[name].data[index].item()
        values = []
        for shift in (delta, -delta):
            params[name].data[index] = original + shift
            values.append(unrolled_quiz_loss(student, teacher, train, quiz, steps))
        params[name].data[index] = original
        numerical = (values[0] - values[1]) / (2 * delta)
        analytic = grads[name][index].item()
        assert abs(analytic) > 1e-8, f"{name}{index}: probe is trivially zero"
        # the central difference of Q itself carries ~1e-11 absolute rounding error
        assert abs(analytic - numerical) <= 1e-5 * abs(analytic) + 1e-10, (name, analytic, numerical)


def optimizer_with_state(kind: str, student: nn.Module, train) -> torch.optim.Optimizer:
    """An optimizer over the student that has taken one step (so momentum / moments are non-trivial)."""
    make = {"sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, weight_decay=0.01),
            "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.8, nesterov=True),
            "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
            "adam_decoupled": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
            }[kind]
    optimizer = make(student.parameters())
    F.cross_entropy(student(**model_inputs(train)).logits, train["labels"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


@pytest.mark.parametrize("kind", ["sgd_momentum", "sgd_nesterov", "adam", "adamw"])
def test_preconditioned_inner_step(kind: str) -> None:
    """Frozen-state SGD-momentum / Adam / AdamW inner steps: finite_difference still matches exact."""
    student, teacher, train, quiz = problem(torch.float64, seed=2)
    optimizer = optimizer_with_state(kind, student, train)
    results = {method: hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, method=method,
                                     inner_optimizer=optimizer)
               for method in ("exact", "finite_difference")}
    assert rel_error(flat(results["finite_difference"]), flat(results["exact"])) <= 1e-6
    # the preconditioner matters: plain SGD at the same learning rate gives another hypergradient
    plain = hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, method="exact",
                          inner_lr=optimizer.param_groups[0]["lr"])
    assert rel_error(flat(plain), flat(results["exact"])) > 1e-3


def test_finite_difference_step_ignores_untouched_coordinates() -> None:
    """AdamW in float32: the preconditioner is ~1e8 on embedding rows of tokens absent from the training batch
    (v = 0 there), which do not move the inner loss; eps sized by ||w|| over all coordinates drowned the
    difference in rounding (relative error 1.0).  Against the float64 exact hypergradient."""
    reference_student, reference_teacher, train, quiz = problem(torch.float64, seed=2)
    student, teacher = copy.deepcopy(reference_student).float(), copy.deepcopy(reference_teacher).float()
    exact = hypergradient(reference_student, reference_teacher, inner_loss, quiz_loss, train, quiz, method="exact",
                          inner_optimizer=optimizer_with_state("adamw", reference_student, train))
    finite = hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz,
                           inner_optimizer=optimizer_with_state("adamw", student, train))
    assert rel_error(flat(finite).double(), flat(exact)) <= 2e-3


@pytest.mark.parametrize("unused", [(), ("classifier.bias", "bert.pooler.dense.weight")], ids=["all_used", "unused"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5, 1e6], ids=["unclipped", "clipped", "under_the_norm"])
@pytest.mark.parametrize("kind", ["sgd_momentum", "sgd_nesterov", "adam", "adamw", "adam_decoupled"])
def test_inner_step_is_the_optimizers_step(kind: str, max_grad_norm: float | None, unused: tuple[str, ...]) -> None:
    """Both forms of the experimental step (stored for exact, consuming for the first-order methods) equal the
    torch optimizer's own step from the same state, after ``clip_grad_norm_`` when the optimizer's owner clips (the
    step the student then takes; coupled weight decay is added after the clipping, as torch's Adam does), and
    neither changes the optimizer or the student.  Parameters that the inner gradient does not reach (``unused``;
    the engine hands them zeros) stay where they are, as the optimizer skips a parameter whose ``.grad`` is None:
    the step moved them by their momentum and weight decay."""
    student, _, train, _ = problem(torch.float64, seed=8)
    optimizer = optimizer_with_state(kind, student, train)
    theta = {n: p for n, p in student.named_parameters() if p.requires_grad}
    grads = {n: torch.zeros_like(p) if n in unused else torch.randn_like(p) for n, p in theta.items()}
    reference_student, reference_optimizer = copy.deepcopy((student, optimizer))
    for (name, p) in reference_student.named_parameters():
        p.grad = None if name in unused else grads[name].clone()
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(list(reference_student.parameters()), max_grad_norm)
        assert (norm > max_grad_norm) == (max_grad_norm == 0.5)
    reference_optimizer.step()
    expected = flat({n: p.detach() for n, p in reference_student.named_parameters() if n in theta})
    before = copy.deepcopy(optimizer.state_dict())
    view = TorchOptimizerState(optimizer, max_grad_norm)
    stored = make_inner_update(view, None, theta, grads, unused).step(theta, grads)
    consumed, scale = experimental_step(view, None, theta, dict(grads), unused)
    assert rel_error(flat(stored), expected) <= 1e-14 and rel_error(flat(consumed), expected) <= 1e-14
    assert all(torch.equal(stepped[name], theta[name]) for name in unused for stepped in (stored, consumed))
    assert not any(t.requires_grad for t in consumed.values()) and set(scale) == set(theta)
    assert str(optimizer.state_dict()) == str(before)


class WithSpareHead(nn.Module):
    """A student whose logits gain a bias ``spare`` only when asked (as a second task's head would): the inner loss
    does not reach ``spare``, the quiz loss (:func:`spare_quiz_loss`) does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.spare = nn.Parameter(torch.randn(NUM_LABELS, dtype=torch.float64))

    def forward(self, input_ids, attention_mask, with_spare: bool = False):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return SimpleNamespace(logits=logits + self.spare if with_spare else logits)


def spare_quiz_loss(student, batch) -> torch.Tensor:
    return F.cross_entropy(student(**model_inputs(batch), with_spare=True).logits, batch["labels"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["sgd_momentum", "adamw"])
def test_the_pilot_leaves_parameters_the_inner_loss_does_not_reach(kind: str, method: str) -> None:
    """The quiz loss the meta step reports is the quiz loss after the step the student takes.  A student parameter
    that the inner loss does not reach (another task's head) gets no step from a torch optimizer (its ``.grad``
    is None); the experimental step moved it by its momentum and weight decay all the same, so the teacher learned
    from a step the student never took."""
    student, teacher, train, quiz = problem(torch.float64, seed=5)
    student = WithSpareHead(student)
    optimizer = optimizer_with_state(kind, student, train)
    spare_quiz_loss(student, quiz).backward()  # a step that reached it, so that it has momentum
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    result = meta_gradient(student, teacher, inner_loss, spare_quiz_loss, train, quiz, inner_lr=None,
                           method=method, inner_optimizer=optimizer)
    stepped_student, stepped_optimizer = copy.deepcopy((student, optimizer))
    inner_loss(stepped_student, teacher, train).backward()
    assert stepped_student.spare.grad is None
    stepped_optimizer.step()
    assert torch.equal(stepped_student.spare, student.spare)
    with torch.no_grad():
        expected = spare_quiz_loss(stepped_student, quiz).item()
    assert abs(result.outer_loss - expected) <= 1e-12 * abs(expected), (result.outer_loss, expected)


def test_adam_by_name_uses_fresh_state() -> None:
    student, teacher, train, quiz = problem(torch.float64, seed=3)
    by_name = hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=1e-3,
                            method="forward_mode", inner_optimizer="adam")
    fresh = torch.optim.Adam(student.parameters(), lr=1e-3)
    by_instance = hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, method="exact",
                                inner_optimizer=fresh)
    assert rel_error(flat(by_name), flat(by_instance)) <= 1e-6


def test_dropout_masks_are_replayed() -> None:
    """With dropout on, every evaluation of the inner loss sees the same masks, so the methods still agree."""
    student, teacher, train, quiz = problem(torch.float64, dropout=0.2, seed=4)
    student.train()
    results = {}
    for method in ("exact", "finite_difference", "forward_mode"):
        torch.manual_seed(123)
        results[method] = hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR,
                                        method=method)
    for method in ("finite_difference", "forward_mode"):
        assert rel_error(flat(results[method]), flat(results["exact"])) <= 1e-6, method


def teacher_first_inner_loss(student, teacher, batch) -> torch.Tensor:
    """inner_loss that runs the teacher before the student (the shifted evaluations replay the teacher)."""
    teacher_logits = teacher(**model_inputs(batch)).logits
    return inner_loss(student, lambda **_: SimpleNamespace(logits=teacher_logits), batch)


def test_dropout_masks_follow_each_module() -> None:
    """Teacher and student both drop out and the teacher runs first: the shifted evaluations, which replay the
    teacher instead of running it, must still give the student the masks of the experimental evaluation."""
    torch.manual_seed(6)
    student, teacher = tiny_bert(2, 16, dropout=0.3), tiny_bert(3, 24, dropout=0.3)
    train, quiz = make_batch(), make_batch(size=4)
    results = {}
    for method in ("exact", "finite_difference"):
        torch.manual_seed(321)
        results[method] = hypergradient(student, teacher, teacher_first_inner_loss, quiz_loss, train, quiz,
                                        inner_lr=INNER_LR, method=method)
    assert flat(results["exact"]).norm() > 0
    assert rel_error(flat(results["finite_difference"]), flat(results["exact"])) <= 1e-6


def test_compiled_student_with_dropout() -> None:
    """A torch.compile'd student with dropout: every evaluation of the inner loss still sees the same masks, so
    finite differences with two step sizes agree as closely as in eager mode (inconsistent masks would make them
    differ by the noise over eps; checked by disabling the replay)."""
    student, teacher, train, quiz = problem(torch.float32, dropout=0.1, seed=9)
    student.train()
    compiled = torch.compile(student)
    estimates = []
    for c in (1e-2, 1e-3):
        torch.manual_seed(0)  # the same masks for both calls
        estimates.append(flat(hypergradient(compiled, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR,
                                            epsilon=c)))
    assert estimates[1].norm() > 0 and rel_error(estimates[0], estimates[1]) <= 1e-3


class NoisyBlock(nn.Module):
    """Dropout, a random draw that is not a dropout call (like SDPA's internal dropout), dropout again."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.dropout, self.p = nn.Dropout(p), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x) + torch.rand_like(x)
        return F.dropout(x, self.p, training=self.training)


def test_random_state_replay_masks() -> None:
    """Masks keyed per module, replayed bit for bit (other random draws too), as dropout in value and gradient."""
    torch.manual_seed(7)
    first, second = NoisyBlock(0.4), NoisyBlock(0.25)
    x = torch.randn(6, 33, dtype=torch.float64, requires_grad=True)
    replay = RandomStateReplay([x.device], (first, second))
    with replay.replay():
        recorded = first(x), second(x)
        state_after = torch.get_rng_state()
    keep = replay._masks[(0, 0)][0]
    assert keep.dtype == torch.uint8 and 0 < int(keep.sum()) < keep.numel()
    assert len(replay._masks) == 4  # two calls in each module
    for order in ((0, 1), (1, 0), (1,)):  # another order, or a module skipped: each gets its own masks
        torch.manual_seed(99)  # replay() restarts the generator itself
        with replay.replay():
            replayed = {i: (first, second)[i](x) for i in order}
        for i in order:
            assert torch.equal(replayed[i], recorded[i])
    with replay.replay():
        first(x), second(x)
        assert torch.equal(torch.get_rng_state(), state_after)
    # value and gradient are those of dropout: x * m / (1 - p)
    with replay.replay():
        out = first.dropout(x)
    grad, = torch.autograd.grad(out.sum(), x)
    expected = keep.double() / 0.6
    assert torch.allclose(out, x * expected, rtol=1e-15, atol=0) and torch.allclose(grad, expected, rtol=1e-15, atol=0)
    # a call of another shape draws a fresh mask instead of failing
    with replay.replay():
        assert first(x[:3]).shape == (3, 33)
    first.eval()
    with replay.replay():
        assert torch.equal(first.dropout(x), x)  # eval mode: identity, nothing drawn


class StudentProbe(nn.Module):
    """A 'teacher' that is a projection of the student's hidden states (a meta-teacher head)."""

    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.projection = nn.Linear(hidden, NUM_LABELS, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.projection(hidden)


def head_inner_loss(student, head, batch) -> torch.Tensor:
    """Match the student's logits to a projection of its own [CLS] state (a hidden-state distillation term)."""
    outputs = student(**model_inputs(batch), output_hidden_states=True)
    projected = head(torch.tanh(outputs.hidden_states[-1][:, 0]))
    return F.mse_loss(outputs.logits, projected) + F.cross_entropy(outputs.logits, batch["labels"])


def head_kd_inner_loss(student, head, batch) -> torch.Tensor:
    outputs = student(**model_inputs(batch), output_hidden_states=True)
    return kd_loss(outputs.logits, head(torch.tanh(outputs.hidden_states[-1][:, 0])))


def test_teacher_fed_by_the_student() -> None:
    """The 'teacher' input depends on theta: its calls are rerun, not replayed, and the methods still agree."""
    torch.manual_seed(5)
    student, head = tiny_bert(2, 16), StudentProbe(16, torch.float64)
    train, quiz = make_batch(), make_batch(size=3)
    results = {m: hypergradient(student, head, head_inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR, method=m)
               for m in METHODS}
    assert flat(results["exact"]).norm() > 0
    for method in ("finite_difference", "forward_mode"):
        assert rel_error(flat(results[method]), flat(results["exact"])) <= 1e-6, method
    assert rel_error(flat(results["first_order"]), flat(results["exact"])) <= 1e-4
    # softmax of a student-dependent teacher output: torch's softmax jvp cannot be reverse-differentiated
    exact = hypergradient(student, head, head_kd_inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR, method="exact")
    finite = hypergradient(student, head, head_kd_inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR)
    assert rel_error(flat(finite), flat(exact)) <= 1e-6
    with pytest.raises(RuntimeError, match="forward_mode.*finite_difference"):
        hypergradient(student, head, head_kd_inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR,
                      method="forward_mode")


def test_sdpa_attention_exact_fails_clearly_finite_difference_works() -> None:
    student, teacher, train, quiz = problem(torch.float64)
    sdpa_student, sdpa_teacher = tiny_bert(2, 16, attention="sdpa"), tiny_bert(3, 24, attention="sdpa")
    sdpa_teacher.unused = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    sdpa_student.load_state_dict(student.state_dict())
    sdpa_teacher.load_state_dict(teacher.state_dict())
    sdpa_teacher.bert.embeddings.token_type_embeddings.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="double backward.*finite_difference"):
        hypergradient(sdpa_student, sdpa_teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR,
                      method="exact")
    result = hypergradient(sdpa_student, sdpa_teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR,
                           method="finite_difference")
    assert rel_error(flat(result), flat(exact_reference(torch.float64))) <= 1e-6


class NoDoubleBackwardKD(torch.autograd.Function):
    """A fused-kernel-like KD loss: backward returns both logit gradients, double backward is refused."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits):
        ctx.save_for_backward(student_logits, teacher_logits)
        return kd_loss(student_logits, teacher_logits)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("NoDoubleBackwardKD does not support double backward")
        student_logits, teacher_logits = ctx.saved_tensors
        with torch.enable_grad():
            s, t = student_logits.detach().requires_grad_(), teacher_logits.detach().requires_grad_()
            gs, gt = torch.autograd.grad(kd_loss(s, t), (s, t))
        return grad * gs, grad * gt


def fused_like_inner_loss(student, teacher, batch) -> torch.Tensor:
    student_logits = student(**model_inputs(batch)).logits
    teacher_logits = teacher(**model_inputs(batch)).logits
    return NoDoubleBackwardKD.apply(student_logits, teacher_logits) + F.cross_entropy(student_logits, batch["labels"])


def kd_kl_div_inner_loss(student, teacher, batch) -> torch.Tensor:
    import mpdistil_fast

    student_logits = student(**model_inputs(batch)).logits
    teacher_logits = teacher(**model_inputs(batch)).logits
    kd = mpdistil_fast.kd_kl_div(student_logits, teacher_logits, TEMPERATURE, reduction="batchmean",
                                 scale_by_t2=True, backend="cpp")
    return kd + F.cross_entropy(student_logits, batch["labels"])


def _kd_kl_div_cpp_status() -> str:
    try:
        from mpdistil_fast.backends import backend_status
        import mpdistil_fast.functional.kd_kl_div  # noqa: F401  (registers the op)
    except ImportError as exc:
        return f"kd_kl_div is not built yet ({exc})"
    status = backend_status("cpp", "kd_kl_div", "cpu")
    return "" if status.available else status.reason


@pytest.mark.parametrize("loss", [
    pytest.param(fused_like_inner_loss, id="stand_in"),
    pytest.param(kd_kl_div_inner_loss, id="kd_kl_div_cpp",
                 marks=pytest.mark.skipif(bool(_kd_kl_div_cpp_status()), reason=_kd_kl_div_cpp_status() or "-")),
])
def test_finite_difference_with_fused_loss(loss) -> None:
    """A fused loss without double backward: exact fails clearly, finite_difference matches the torch exact."""
    student, teacher, train, quiz = problem(torch.float64)
    with pytest.raises(RuntimeError, match="double backward.*finite_difference"):
        hypergradient(student, teacher, loss, quiz_loss, train, quiz, inner_lr=INNER_LR, method="exact")
    result = hypergradient(student, teacher, loss, quiz_loss, train, quiz, inner_lr=INNER_LR,
                           method="finite_difference")
    assert rel_error(flat(result), flat(exact_reference(torch.float64))) <= 1e-6


# ----------------------------------------------------------------------------------------------- bad input
def test_unknown_method() -> None:
    student, teacher, train, quiz = problem(torch.float64)
    with pytest.raises(ValueError, match="method"):
        hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR, method="implicit")


def test_teacher_not_in_loss_gives_zeros_with_warning() -> None:
    student, teacher, train, quiz = problem(torch.float64)

    def student_only(student, teacher, batch):
        return F.cross_entropy(student(**model_inputs(batch)).logits, batch["labels"])

    for method in METHODS:
        with pytest.warns(UserWarning, match="no teacher parameter influences inner_loss"):
            result = hypergradient(student, teacher, student_only, quiz_loss, train, quiz, inner_lr=INNER_LR,
                                   method=method)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in result.values()), method


def test_teacher_without_trainable_parameters() -> None:
    student, teacher, train, quiz = problem(torch.float64)
    teacher.requires_grad_(False)
    with pytest.raises(ValueError, match="teacher has no parameter that requires grad"):
        hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR)
    with pytest.raises(TypeError, match="student must be a torch.nn.Module"):
        hypergradient(lambda x: x, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_quiz_loss(method: str) -> None:
    student, teacher, train, quiz = problem(torch.float64)
    with pytest.raises(FloatingPointError, match="outer_loss is not finite"):
        hypergradient(student, teacher, inner_loss, lambda s, b: quiz_loss(s, b) * float("nan"), train, quiz,
                      inner_lr=INNER_LR, method=method)
    with pytest.raises(FloatingPointError, match="inner_loss is not finite"):
        hypergradient(student, teacher, lambda s, t, b: inner_loss(s, t, b) + float("inf"), quiz_loss, train, quiz,
                      inner_lr=INNER_LR, method=method)


    def nan_gradient_quiz_loss(s, b) -> torch.Tensor:
        """Finite value, NaN gradient: sqrt'(0) = inf times 0."""
        logits = s(**model_inputs(b)).logits
        return F.cross_entropy(logits, b["labels"]) + torch.sqrt((logits - logits.detach()).abs()).sum()

    with pytest.raises(FloatingPointError, match="not finite"):
        hypergradient(student, teacher, inner_loss, nan_gradient_quiz_loss, train, quiz, inner_lr=INNER_LR,
                      method=method)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"inner_lr": -1.0}, ValueError, "inner_lr"),
    ({"inner_lr": None}, ValueError, "inner_lr"),
    ({"inner_lr": 0.1, "inner_optimizer": "lion"}, ValueError, "inner_optimizer"),
    ({"inner_lr": 0.1, "inner_optimizer": torch.optim.Adagrad([nn.Parameter(torch.ones(1))])}, ValueError,
     "inner_optimizer"),
    ({"inner_lr": 0.1, "inner_steps": 2}, ValueError, "inner_steps"),
    ({"inner_lr": 0.1, "inner_steps": 0, "method": "exact"}, ValueError, "inner_steps"),
    ({"inner_lr": 0.1, "epsilon": 0.0}, ValueError, "epsilon"),
    ({"inner_lr": 0.1, "method": "exact", "average": lambda tensors: None}, ValueError, "one process only"),
])
def test_bad_arguments(kwargs, error, match) -> None:
    student, teacher, train, quiz = problem(torch.float64)
    with pytest.raises(error, match=match):
        hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, **kwargs)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_maximizing_inner_optimizers_are_refused(optimizer) -> None:
    """The experimental step emulates descent: SGD with maximize=True went the opposite way of torch's step."""
    student, teacher, train, quiz = problem(torch.float64)
    inner = optimizer(student.parameters(), lr=0.1, maximize=True)
    with pytest.raises(ValueError, match="maximize is not supported"):
        hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_optimizer=inner)


def test_bad_losses() -> None:
    student, teacher, train, quiz = problem(torch.float64)
    with pytest.raises(TypeError, match="outer_loss must be callable"):
        hypergradient(student, teacher, inner_loss, "ce", train, quiz, inner_lr=INNER_LR)
    with pytest.raises(TypeError, match="inner_loss must return a floating scalar"):
        hypergradient(student, teacher, lambda s, t, b: s(**model_inputs(b)).logits, quiz_loss, train, quiz,
                      inner_lr=INNER_LR)


# ----------------------------------------------------------------------------------------------- data parallel

@pytest.mark.parametrize("method", METHODS)
def test_surrogate_loss_carries_the_hypergradient(method: str) -> None:
    """``surrogate=True`` leaves the teacher's backward to the caller (a DeepSpeed engine's): the gradient of the
    returned loss is the hypergradient the dictionary holds."""
    student, teacher, train, quiz = problem(torch.float64)
    expected = hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR, method=method)
    result = meta_gradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR, method=method,
                           inner_optimizer="sgd", surrogate=True)
    assert result.teacher_grads is None
    phi = {name: p for name, p in teacher.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(result.teacher_surrogate, list(phi.values()), allow_unused=True)
    delivered = {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(phi.items(), grads)}
    assert rel_error(flat(delivered), flat(expected)) <= 1e-12
    assert all(p.grad is None for p in teacher.parameters())


def test_surrogate_of_a_flat_quiz_loss_is_zero() -> None:
    """eps = 0 (the quiz loss does not move with theta'): a zero loss that still reaches the teacher, so that every
    data-parallel rank runs the same backward."""
    student, teacher, train, quiz = problem(torch.float64)
    result = meta_gradient(student, teacher, inner_loss, lambda s, b: s(**model_inputs(b)).logits.sum() * 0.0,
                           train, quiz, inner_lr=INNER_LR, method="finite_difference", inner_optimizer="sgd",
                           surrogate=True)
    assert result.teacher_surrogate.requires_grad and float(result.teacher_surrogate) == 0.0
    result.teacher_surrogate.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in teacher.parameters() if p.grad is not None)


@pytest.mark.parametrize("method", ["finite_difference", "first_order"])  # forward-mode AD levels are not per thread
@pytest.mark.parametrize("inner_optimizer", ["sgd", "adamw"])
def test_ranks_averaging_their_shares_get_the_whole_batch_hypergradient(method: str, inner_optimizer: str) -> None:
    """Two ranks, each with half of the training and quiz batches and ``average``, both obtain the hypergradient of
    the whole batches (float64; the AdamW preconditioner is a warmed optimizer's state, the same on every rank)."""
    student, teacher, _, _ = problem(torch.float64)
    train, quiz, warm_up = make_batch(size=6), make_batch(size=4, length=6, pad=1), make_batch()

    def optimizer_for(model):
        if inner_optimizer == "sgd":
            return "sgd"
        optimizer = torch.optim.AdamW(model.parameters(), lr=INNER_LR, weight_decay=0.01)
        inner_loss(model, copy.deepcopy(teacher), warm_up).backward()
        optimizer.step()
        with torch.no_grad():  # same weights as before, warmed state
            for p, original in zip(model.parameters(), student.parameters()):
                p.copy_(original)
        return optimizer

    whole_student = copy.deepcopy(student)
    expected = hypergradient(whole_student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR,
                             method=method, inner_optimizer=optimizer_for(whole_student))

    def rank_hypergradient(me, average) -> dict[str, torch.Tensor]:
        share = lambda batch: {k: v.chunk(2)[me.rank] for k, v in batch.items()}  # noqa: E731
        local_student = copy.deepcopy(student)
        return hypergradient(local_student, copy.deepcopy(teacher), inner_loss, quiz_loss, share(train), share(quiz),
                             inner_lr=INNER_LR, method=method, inner_optimizer=optimizer_for(local_student),
                             average=average)

    results, errors = run_on_thread_ranks(rank_hypergradient)
    assert not any(errors), errors
    alone_student = copy.deepcopy(student)
    alone = hypergradient(alone_student, teacher, inner_loss, quiz_loss,
                          {k: v.chunk(2)[0] for k, v in train.items()}, {k: v.chunk(2)[0] for k, v in quiz.items()},
                          inner_lr=INNER_LR, method=method, inner_optimizer=optimizer_for(alone_student))
    assert rel_error(flat(alone), flat(expected)) > 1e-2  # one share alone is not the answer
    for result in results:
        error = rel_error(flat(result), flat(expected))
        assert error <= 1e-8, error  # rounding of the two summation orders, divided by the difference step


@pytest.mark.parametrize("reaching_ranks", [(), (0,), (0, 1)])
def test_a_parameter_counts_as_reached_when_any_rank_reaches_it(reaching_ranks: tuple[int, ...],
                                                               monkeypatch) -> None:
    """Data parallel, a parameter is stepped when the inner loss of any rank reaches it (the averaged gradient the
    student's real step takes is then that rank's share) and left alone only when no rank's does; every rank takes
    the same decision, or the ranks' experimental students would differ."""
    engine = importlib.import_module("mpdistil_fast.bilevel.hypergradient")  # (the package's name is the function)

    student, teacher, train, quiz = problem(torch.float64, seed=6)
    student = WithSpareHead(student)
    decisions: dict[int, set[str]] = {}
    step = engine.experimental_step

    def recording_step(*args):
        decisions[threading.get_ident()] = set(args[-1])
        return step(*args)

    monkeypatch.setattr(engine, "experimental_step", recording_step)

    def rank_hypergradient(me, average) -> dict[str, torch.Tensor]:
        reaches = me.rank in reaching_ranks

        def rank_inner_loss(student, teacher, batch):  # the spare head on the reaching ranks
            logits = student(**model_inputs(batch), with_spare=reaches).logits
            return kd_loss(logits, teacher(**model_inputs(batch)).logits)

        return hypergradient(copy.deepcopy(student), copy.deepcopy(teacher), rank_inner_loss, spare_quiz_loss,
                             train, quiz, inner_lr=INNER_LR, average=average)

    _, errors = run_on_thread_ranks(rank_hypergradient)
    assert not any(errors), errors
    assert list(decisions.values()) == [set() if reaching_ranks else {"spare"}] * 2


@pytest.mark.parametrize("bad", ["inner", "quiz"])
def test_a_non_finite_loss_on_one_rank_stops_every_rank(bad: str) -> None:
    """With ``average`` the finiteness checks are collective: every rank raises at the same point (a rank raising
    alone would leave the others waiting in the next all-reduce until the process group times out)."""
    student, teacher, train, quiz = problem(torch.float64)

    def rank_hypergradient(me, average) -> dict[str, torch.Tensor]:
        poison = float("nan") if me.rank == 1 else 1.0
        inner = (lambda s, t, b: inner_loss(s, t, b) * poison) if bad == "inner" else inner_loss
        quiz_fn = (lambda s, b: quiz_loss(s, b) * poison) if bad == "quiz" else quiz_loss
        return hypergradient(copy.deepcopy(student), copy.deepcopy(teacher), inner, quiz_fn, train, quiz,
                             inner_lr=INNER_LR, average=average)

    _, errors = run_on_thread_ranks(rank_hypergradient)
    assert all(isinstance(error, FloatingPointError) for error in errors), errors
    assert all(f"{bad}_loss" in str(error) or (bad == "quiz" and "outer_loss" in str(error)) for error in errors)


class _NaNGradient(torch.autograd.Function):
    """Identity whose backward is NaN: a hypergradient that goes non-finite while every loss stays finite."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


@pytest.mark.parametrize("method", ["finite_difference", "first_order"])
def test_a_non_finite_hypergradient_on_one_rank_stops_every_rank(method: str) -> None:
    """The hypergradient's finiteness check is collective too: rank 1's teacher-output gradients are NaN (its
    losses and the averaged inner and quiz gradients are finite), so rank 1 refused alone and rank 0 went on into
    the next all-reduce (a hang until the process group's timeout; here the threads' barrier breaks)."""
    student, teacher, train, quiz = problem(torch.float64)

    def rank_hypergradient(me, average) -> dict[str, torch.Tensor]:
        def poisoned(s, t, b):
            student_logits = s(**model_inputs(b)).logits
            teacher_logits = t(**model_inputs(b)).logits
            if me.rank == 1:
                teacher_logits = _NaNGradient.apply(teacher_logits)
            return kd_loss(student_logits, teacher_logits) + F.cross_entropy(student_logits, b["labels"])
        return hypergradient(copy.deepcopy(student), copy.deepcopy(teacher), poisoned, quiz_loss, train, quiz,
                             inner_lr=INNER_LR, method=method, average=average)

    _, errors = run_on_thread_ranks(rank_hypergradient)
    assert all(isinstance(error, FloatingPointError) and "hypergradient is not finite" in str(error)
               for error in errors), errors


@pytest.mark.parametrize("warm", [False, True], ids=["first_step", "with_momentum_buffer"])
@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.8, nesterov=True, weight_decay=0.05),
    lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, dampening=0.3, weight_decay=0.05),
], ids=["nesterov", "dampening"])
def test_sgd_weight_decay_carries_the_momentum_coefficient(make, warm: bool) -> None:
    """torch's SGD adds ``weight_decay * theta`` to the gradient before its momentum, so the experimental step's
    decay term carries the gradient's coefficient (1 + momentum (1 - dampening) with Nesterov, 1 - dampening with a
    momentum buffer), not 1: weight decay together with Nesterov or dampening, which the optimizers above never
    combine."""
    student, _, train, _ = problem(torch.float64, seed=8)
    optimizer = make(student.parameters())
    if warm:
        F.cross_entropy(student(**model_inputs(train)).logits, train["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    theta = {n: p for n, p in student.named_parameters() if p.requires_grad}
    grads = {n: torch.randn_like(p) for n, p in theta.items()}
    reference_student, reference_optimizer = copy.deepcopy((student, optimizer))
    for name, p in reference_student.named_parameters():
        p.grad = grads[name].clone()
    reference_optimizer.step()
    expected = flat({n: p.detach() for n, p in reference_student.named_parameters() if n in theta})
    stored = make_inner_update(optimizer, None, theta, grads).step(theta, grads)
    consumed, _ = experimental_step(optimizer, None, theta, dict(grads))
    assert rel_error(flat(stored), expected) <= 1e-14 and rel_error(flat(consumed), expected) <= 1e-14
