"""MetaDistil's pilot update (Algorithm 1): teacher updated with the hypergradient, then the real student step on
the same batch with the updated teacher; clipping, schedulers, bf16 autocast, dropout and bad losses."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import rel_error
from mpdistil_fast.bilevel import OptimizerStepper, PilotUpdate, hypergradient
from mpdistil_fast.bilevel.inner_update import TorchOptimizerState
from test_bilevel import INNER_LR, flat, inner_loss, make_batch, problem, quiz_loss, single_thread  # noqa: F401


def make_optimizers(kind: str, student, teacher):
    student_optimizer = (torch.optim.SGD(student.parameters(), lr=INNER_LR) if kind == "sgd"
                         else torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.01))
    teacher_optimizer = torch.optim.Adam([p for p in teacher.parameters() if p.requires_grad], lr=1e-2)
    return student_optimizer, teacher_optimizer


def state(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("method, kind, reuse", [
    ("finite_difference", "sgd", True), ("finite_difference", "adamw", False), ("exact", "sgd", False),
    ("forward_mode", "adamw", True),
])
def test_pilot_update_is_algorithm_1(method: str, kind: str, reuse: bool) -> None:
    student, teacher, train, quiz = problem(torch.float64)
    student_optimizer, teacher_optimizer = make_optimizers(kind, student, teacher)
    # warm the optimizers so the frozen-state preconditioner and momentum are non-trivial
    pilot = PilotUpdate(student, teacher, student_optimizer, teacher_optimizer, inner_loss, quiz_loss, method=method,
                        reuse_student_forward=reuse)
    pilot.step(make_batch(), make_batch())
    reference = copy.deepcopy((student, teacher, student_optimizer, teacher_optimizer))
    ref_student, ref_teacher, ref_student_optimizer, ref_teacher_optimizer = reference
    teacher_before = state(teacher)

    stats = pilot.step(train, quiz)

    # 1-2: the teacher takes one optimizer step along the hypergradient of the experimental step
    grads = hypergradient(ref_student, ref_teacher, inner_loss, quiz_loss, train, quiz, method=method,
                          inner_optimizer=ref_student_optimizer)
    for name, p in ref_teacher.named_parameters():
        if p.requires_grad:
            p.grad = grads[name]
    ref_teacher_optimizer.step()
    assert rel_error(state(teacher), state(ref_teacher)) <= 1e-12
    assert not torch.equal(state(teacher), teacher_before)
    # 3: the student takes one ordinary step on the same batch with the updated teacher
    ref_student_optimizer.zero_grad()
    loss = inner_loss(ref_student, ref_teacher, train)
    loss.backward()
    ref_student_optimizer.step()
    assert rel_error(state(student), state(ref_student)) <= 1e-12
    assert stats["student_loss"] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert set(stats) == {"inner_loss", "quiz_loss", "student_loss", "teacher_grad_norm", "student_grad_norm",
                          "inner_lr"}
    assert all(isinstance(v, float) for v in stats.values())


def test_pilot_clipping_schedulers_and_learning_rate() -> None:
    student, teacher, train, quiz = problem(torch.float64)
    student_optimizer, teacher_optimizer = make_optimizers("sgd", student, teacher)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
                  for o in (student_optimizer, teacher_optimizer)]
    pilot = PilotUpdate(student, teacher, student_optimizer, teacher_optimizer, inner_loss, quiz_loss,
                        max_grad_norm=1e-3, student_scheduler=schedulers[0], teacher_scheduler=schedulers[1])
    before = state(student)
    first = pilot.step(train, quiz)
    second = pilot.step(train, quiz)
    assert first["inner_lr"] == INNER_LR and second["inner_lr"] == INNER_LR / 2  # the scheduler's rate is used
    assert first["student_grad_norm"] > 1e-3  # reported before clipping ...
    # ... and clipped: the first SGD step moved the student by lr * max_grad_norm at most
    assert torch.linalg.vector_norm(state(student) - before) <= INNER_LR * 1e-3 + INNER_LR / 2 * 1e-3 + 1e-12
    assert teacher_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)


def test_bf16_autocast_hypergradient() -> None:
    """Under bf16 autocast the first-order methods stay within a few percent of the fp32 exact hypergradient."""
    student, teacher, train, quiz = problem(torch.float32)
    exact = hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR, method="exact")
    for method, tolerance in (("finite_difference", 5e-2), ("forward_mode", 2e-2)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = hypergradient(student, teacher, inner_loss, quiz_loss, train, quiz, inner_lr=INNER_LR,
                                   method=method)
        assert all(g.dtype == torch.float32 for g in result.values())
        assert rel_error(flat(result), flat(exact)) <= tolerance, method


def test_pilot_bf16_autocast_and_dropout() -> None:
    student, teacher, train, quiz = problem(torch.float32, dropout=0.1)
    student.train()
    student_optimizer, teacher_optimizer = make_optimizers("adamw", student, teacher)
    pilot = PilotUpdate(student, teacher, student_optimizer, teacher_optimizer, inner_loss, quiz_loss,
                        autocast_dtype=torch.bfloat16, max_grad_norm=1.0)
    before = (state(student), state(teacher))
    stats = [pilot.step(train, quiz) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(list(s.values()))).all() for s in stats)
    assert not torch.equal(state(student), before[0]) and not torch.equal(state(teacher), before[1])
    assert all(p.dtype == torch.float32 for p in (*student.parameters(), *teacher.parameters()))


def test_pilot_non_finite_quiz_loss_applies_no_update() -> None:
    student, teacher, train, quiz = problem(torch.float64)
    student_optimizer, teacher_optimizer = make_optimizers("adamw", student, teacher)
    pilot = PilotUpdate(student, teacher, student_optimizer, teacher_optimizer, inner_loss,
                        lambda s, b: quiz_loss(s, b) / 0.0 * 0.0)
    before = (state(student), state(teacher))
    with pytest.raises(FloatingPointError, match="outer_loss is not finite"):
        pilot.step(train, quiz)
    assert torch.equal(state(student), before[0]) and torch.equal(state(teacher), before[1])
    assert not student_optimizer.state and not teacher_optimizer.state


@pytest.mark.parametrize("kwargs, error, match", [
    ({"method": "implicit"}, ValueError, "method"),
    ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
    ({"autocast_dtype": "bf16"}, TypeError, "autocast_dtype"),
    ({"autocast_dtype": torch.float16}, ValueError, "float16 needs loss scaling"),
    ({"autocast_dtype": torch.float64}, ValueError, "autocast_dtype must be torch.bfloat16 or None"),
])
def test_pilot_bad_arguments(kwargs, error, match) -> None:
    student, teacher, _, _ = problem(torch.float64)
    student_optimizer, teacher_optimizer = make_optimizers("sgd", student, teacher)
    with pytest.raises(error, match=match):
        PilotUpdate(student, teacher, student_optimizer, teacher_optimizer, inner_loss, quiz_loss, **kwargs)
    with pytest.raises(TypeError, match="teacher_optimizer"):
        PilotUpdate(student, teacher, student_optimizer, "adam", inner_loss, quiz_loss)


def test_pilot_with_steppers() -> None:
    """Steppers (what a training runtime or a DeepSpeed engine hands over) own their clipping and schedule; the
    pilot's own are refused beside them; the experimental step follows the student stepper's optimizer and its
    clipping (the step the student then takes), so the teacher learns from that step."""
    student, teacher, train, quiz = problem(torch.float64)
    student_optimizer, teacher_optimizer = make_optimizers("adamw", student, teacher)
    steppers = OptimizerStepper(student_optimizer, max_grad_norm=0.5), OptimizerStepper(teacher_optimizer)
    with pytest.raises(ValueError, match="owns its schedule and clipping"):
        PilotUpdate(student, teacher, *steppers, inner_loss, quiz_loss, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="one process only"):
        PilotUpdate(student, teacher, *steppers, inner_loss, quiz_loss, method="exact", average=lambda tensors: None)
    reference, unclipped = (copy.deepcopy((student, teacher, student_optimizer, teacher_optimizer))
                            for _ in range(2))
    PilotUpdate(student, teacher, *steppers, inner_loss, quiz_loss).step(train, quiz)
    ref_student, ref_teacher, ref_student_optimizer, ref_teacher_optimizer = reference
    PilotUpdate(ref_student, ref_teacher, ref_student_optimizer, ref_teacher_optimizer, inner_loss, quiz_loss,
                max_grad_norm=0.5, inner_optimizer=TorchOptimizerState(ref_student_optimizer, 0.5)).step(train, quiz)
    assert rel_error(state(teacher), state(ref_teacher)) <= 1e-12
    assert rel_error(state(student), state(ref_student)) <= 1e-12
    # without clipping in either step: another experimental step, so another teacher step
    free_student, free_teacher, free_student_optimizer, free_teacher_optimizer = unclipped
    stats = PilotUpdate(free_student, free_teacher, free_student_optimizer, free_teacher_optimizer, inner_loss,
                        quiz_loss).step(train, quiz)
    assert stats["student_grad_norm"] > 0.5  # so the stepper's clipping made a difference
    assert rel_error(state(teacher), state(free_teacher)) > 1e-6
    assert rel_error(state(student), state(free_student)) > 1e-6


def test_pilot_with_a_plain_sgd_experimental_step() -> None:
    """inner_optimizer='sgd' gives MetaDistil's plain step whatever the student optimizer is."""
    student, teacher, train, quiz = problem(torch.float64)
    student_optimizer, teacher_optimizer = make_optimizers("adamw", student, teacher)
    ref_teacher = copy.deepcopy(teacher)
    pilot = PilotUpdate(student, teacher, student_optimizer, teacher_optimizer, inner_loss, quiz_loss,
                        inner_optimizer="sgd", inner_lr=0.25)
    grads = hypergradient(copy.deepcopy(student), ref_teacher, inner_loss, quiz_loss, train, quiz, inner_lr=0.25)
    ref_optimizer = torch.optim.Adam([p for p in ref_teacher.parameters() if p.requires_grad], lr=1e-2)
    for name, p in ref_teacher.named_parameters():
        if p.requires_grad:
            p.grad = grads[name]
    ref_optimizer.step()
    pilot.step(train, quiz)
    assert rel_error(state(teacher), state(ref_teacher)) <= 1e-12
    # without inner_lr the plain step takes the student optimizer's current learning rate
    default_lr = PilotUpdate(student, teacher, student_optimizer, teacher_optimizer, inner_loss, quiz_loss,
                             inner_optimizer="sgd")
    assert default_lr.step(train, quiz)["inner_lr"] == student_optimizer.param_groups[0]["lr"] == 1e-3


def test_replays_do_not_rewind_the_random_state() -> None:
    """The loss evaluations replay the first one's random draws, and must leave the generator where it was: the
    quiz loss drew step 0's quiz noise after the recording, and the next step's training forward drew the same
    numbers again once the replays had rewound the generator to the recording's end."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(5, 3), nn.Linear(5, 3)
    drawn: list[tuple[str, torch.Tensor]] = []

    def noisy(x: torch.Tensor, tag: str) -> torch.Tensor:  # random draws outside F.dropout (as SDPA kernels make)
        noise = torch.rand_like(x)
        drawn.append((tag, noise))
        return x * (noise > 0.5) * 2

    pilot = PilotUpdate(student, teacher, torch.optim.SGD(student.parameters(), 0.1),
                        torch.optim.SGD(teacher.parameters(), 0.1),
                        lambda s, t, b: F.mse_loss(noisy(s(b[0]), "train"), t(b[0])),
                        lambda s, b: F.cross_entropy(noisy(s(b[0]), "quiz"), b[1]), method="finite_difference")
    inputs, labels = torch.randn(4, 5), torch.randint(0, 3, (4,))
    pilot.step((inputs,), (inputs, labels))
    quiz = [noise for tag, noise in drawn if tag == "quiz"]
    first_train = len(drawn)
    pilot.step((inputs,), (inputs, labels))
    assert not any(torch.equal(quiz[0], noise) for tag, noise in drawn[first_train:] if tag == "train")
