"""MPDistil (Sengupta et al., ICLR 2024, "A Good Learner can Teach Better: Teacher-Student Collaborative Knowledge
Distillation"), stages 3 and 4.

Stage 3, meta-teacher learning: per task a small discriminator :class:`mpdistil_fast.MetaTeacher` reads the frozen
teacher's pooled representation ``h_t`` and the student's ``h_s`` and is trained with the collaborative or the
competitive loss; the student is then distilled from the meta-teacher's logits ``MT(h_t)`` (CE + KD).  Optionally the
meta-teacher also follows the bi-level meta-gradient of the student's quiz loss after a pilot student step
(:func:`mpdistil_fast.bilevel.hypergradient`), i.e. it learns to teach.

Stage 4, curriculum: see :mod:`.curriculum`; the reward compares the student with the meta-teacher on quiz data:

    binary: r = 1[acc_quiz(student) > acc_quiz(meta-teacher)],     real: r = acc_quiz(student) - acc_quiz(meta-teacher)

where acc_quiz is the mean of the per-batch accuracies on ``curriculum.quiz_batches`` quiz batches of every reported
task (the student in eval mode, after its step on the chosen task); a tie gives the binary reward 0.

Multiple-choice tasks (COPA) get a meta-teacher that scores each choice's pooled representation
(``MetaTeacher(multiple_choice=True)``); its logits over the choices play the role of the class logits.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

import mpdistil_fast
from mpdistil_fast.data import task_spec

if TYPE_CHECKING:
    from mpdistil_fast.pipeline.config import Config


def build_meta_teachers(config: "Config", tasks: Iterable[str], teacher_width: int,
                        student_width: int) -> nn.ModuleDict:
    """One :class:`mpdistil_fast.MetaTeacher` per task (a choice scorer for multiple-choice tasks), reading pooled
    representations ``teacher_width`` and ``student_width`` wide (``TaskModel.pooled_size``), with
    ``config.meta_teacher.hidden`` hidden units; keyed by task name."""
    project = student_width != teacher_width
    return nn.ModuleDict({
        task: mpdistil_fast.MetaTeacher(teacher_width, task_spec(task).num_labels, hidden=config.meta_teacher.hidden,
                                        student_features=student_width if project else None,
                                        multiple_choice=task_spec(task).multiple_choice)
        for task in tasks})


def reward(student_accuracy: float, meta_teacher_accuracy: float, kind: str) -> float:
    """The curriculum reward (module docstring) for quiz accuracies in [0, 1]: ``kind`` ``"binary"`` gives 1.0 when
    the student's is higher, else 0.0; ``"real"`` the difference, in [-1, 1].  ValueError for another kind."""
    margin = student_accuracy - meta_teacher_accuracy
    if kind == "binary":
        return 1.0 if margin > 0 else 0.0
    if kind == "real":
        return margin
    raise ValueError(f"kind must be 'binary' or 'real', got {kind!r}")


def performance_state(summary: dict[str, list[float]], tasks: list[str], progress: float) -> torch.Tensor:
    """The policy's detached state: per target task the student's and the meta-teacher's recent quiz accuracy
    and their difference, plus the position in the episode (``progress`` in [0, 1))."""
    values = []
    for task in tasks:
        student, meta = summary[task]
        values += [student, meta, student - meta]
    return torch.tensor(values + [progress], dtype=torch.float32)


def state_size(num_tasks: int) -> int:
    """Width of :func:`performance_state` for ``num_tasks`` target tasks: three values per task plus the progress."""
    return 3 * num_tasks + 1


def update_summary(summary: dict[str, list[float]], task: str, student: float, meta: float,
                   decay: float = 0.7) -> None:
    """Exponential moving average of the quiz accuracies that :func:`performance_state` reads."""
    old_student, old_meta = summary[task]
    summary[task] = [decay * old_student + (1 - decay) * student, decay * old_meta + (1 - decay) * meta]
