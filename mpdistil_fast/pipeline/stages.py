"""The stages of every method, run by :class:`~mpdistil_fast.pipeline.trainer.Run`.

=============  =====================================================================================================
``teacher``    stage 1: fine-tune the teacher (CE) on every task
``student``    stage 2: the student with the method's objective (finetune: CE; kd; pkd and mpdistil: patient KD)
``metadistil`` MetaDistil's Algorithm 1: pilot update, teacher step on the quiz hypergradient, real student step
``meta_teacher`` MPDistil stage 3: meta-teacher learning, student distilled from the meta-teacher
``curriculum`` MPDistil stage 4: REINFORCE curriculum over tasks, one student step per action
=============  =====================================================================================================
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mpdistil_fast.data import compute_metrics, trim_padding
from mpdistil_fast.methods.curriculum import CurriculumPolicy, Reinforce
from mpdistil_fast.methods.mpdistil import performance_state, reward, state_size, update_summary
from mpdistil_fast.methods.objectives import StudentObjective
from mpdistil_fast.pipeline.config import Config, bilevel_hypergradient
from mpdistil_fast.pipeline.streams import Batch, TaskCursor
from mpdistil_fast.pipeline.trainer import LOG, BestSnapshot, model_inputs

if TYPE_CHECKING:
    from mpdistil_fast.pipeline.trainer import Run

STAGES: dict[str, tuple[str, ...]] = {
    "finetune": ("student",),
    "kd": ("teacher", "student"),
    "pkd": ("teacher", "student"),
    "metadistil": ("teacher", "metadistil"),
    "mpdistil": ("teacher", "student", "meta_teacher", "curriculum"),
}


def stages_of(config: Config) -> tuple[str, ...]:
    stages = STAGES[config.method]
    if config.method == "mpdistil" and not config.curriculum.enabled:
        stages = stages[:-1]
    return stages


def objective_for(run: "Run", method: str, *, bilevel: bool = False) -> StudentObjective:
    """The stage's student objective; ``bilevel``: the run's hypergradient differentiates it (``exact`` needs its
    double backward, ``forward_mode`` its forward-mode derivative: the plain-torch KD loss has both, the fused
    kernels neither)."""
    d = run.config.distill
    _, hypergradient = bilevel_hypergradient(run.config) if bilevel else (None, None)
    teacher_hidden = run.teacher.hidden_size if run.teacher is not None else None
    return StudentObjective(method, alpha=d.alpha, temperature=d.temperature, direction=d.direction,
                            jsd_beta=d.jsd_beta, beta=d.beta, layer_map=d.layer_map,
                            student_hidden=run.student.hidden_size, teacher_hidden=teacher_hidden,
                            backend="torch" if hypergradient in ("exact", "forward_mode") else "auto",
                            ).to(run.runtime.device)


def with_objective(student: nn.Module, objective: StudentObjective) -> nn.Module:
    """The module a stage optimises: the student, plus the objective's projection when it has one."""
    if any(True for _ in objective.parameters()):
        return nn.ModuleDict({"student": student, "objective": objective})
    return student


def data_parallel_average(run: "Run") -> Callable[[list[torch.Tensor]], None] | None:
    """The bi-level engine's ``average`` when several ranks share each batch (None in one process)."""
    return run.runtime.average_tensors if run.runtime.world_size > 1 else None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


# ----------------------------------------------------------------------------------------------- stage 1

def teacher_stage(run: "Run") -> None:
    teacher = run.teacher
    teacher.requires_grad_(True)

    def step(trained, task: str, batch: Batch, _) -> dict[str, float]:
        loss = cross_entropy(teacher(**model_inputs(batch), task=task).logits, batch["labels"])
        trained.backward(loss)
        trained.step()
        return {"loss": loss.item()}

    run.supervised_stage("teacher", teacher, teacher, run.config.teacher_training, step)
    teacher.eval().requires_grad_(False)
    run.record("teacher", teacher)


# ----------------------------------------------------------------------------------------------- stage 2

def student_stage(run: "Run") -> None:
    method = {"mpdistil": "pkd"}.get(run.config.method, run.config.method)
    objective = objective_for(run, method)
    student = run.student

    with run.frozen_teacher_outputs() as teacher_outputs:
        def step(trained, task: str, batch: Batch, _) -> dict[str, float]:
            out = student(**model_inputs(batch), task=task, output_layer_states=objective.needs_hidden)
            targets = {}
            if objective.needs_teacher:
                t = teacher_outputs(task, "train", batch, objective.needs_hidden)
                targets["teacher_logits"] = t.logits
                if objective.needs_hidden:
                    targets["student_hidden"], targets["teacher_hidden"] = out.layer_states, t.layer_states
            result = objective(out.logits, batch["labels"], **targets)
            trained.backward(result.loss)
            trained.step()
            return result.parts

        # the objective's projection (student width != teacher width) is checkpointed with the stage
        run.supervised_stage("student", student, with_objective(student, objective), run.config.student_training,
                             step, companions=lambda total: {"objective": objective})
    run.record("student_stage2" if run.teacher is not None else "student_final", student)


# ----------------------------------------------------------------------------------------------- MetaDistil

def metadistil_stage(run: "Run") -> None:
    """MetaDistil (Zhou et al., ACL 2022), Algorithm 1, through :class:`mpdistil_fast.bilevel.PilotUpdate`: the
    teacher learns from the student's quiz loss after a pilot step, then the student takes its real step.  The
    pilot drives the runtime's trained models (their backward, clipping, schedule; the teacher's clipping is
    ``teacher_training.max_grad_norm``) and averages its gradients over the ranks, so it runs data parallel under
    DeepSpeed too (ZeRO-3 teacher: the hypergradient reaches it through its engine's backward)."""
    from mpdistil_fast.bilevel import PilotUpdate

    c = run.config
    objective = objective_for(run, "kd", bilevel=True)
    student, teacher = run.student, run.teacher
    teacher.requires_grad_(True)
    run.train_mode(teacher)
    state = run.state["stage_state"]

    def inner_loss(student_module, teacher_module, batch: Batch) -> torch.Tensor:
        inputs, task = model_inputs(batch), batch["task"]
        return objective(student_module(task, **inputs), batch["labels"],
                         teacher_logits=teacher_module(task, **inputs)).loss

    def quiz_loss(student_module, batch: Batch) -> torch.Tensor:
        return cross_entropy(student_module(batch["task"], **model_inputs(batch)), batch["labels"])

    def companions(total: int) -> dict:
        return {"teacher_trained": run.trainer(teacher, c.teacher_training, total, role="teacher",
                                               lr=c.metadistil.teacher_lr)}

    pilots: dict[int, PilotUpdate] = {}

    def step(trained, task: str, batch: Batch, extra: dict) -> dict[str, float]:
        if not pilots:
            # "student": the real step's AdamW rule, state and scheduled learning rate (read every step), so the
            # pilot is the step the student is about to take; "sgd": the released code's step of size inner_lr
            plain = c.metadistil.pilot_rule == "sgd"
            pilots[0] = PilotUpdate(LogitsOf(student), LogitsOf(teacher), trained, extra["teacher_trained"],
                                    inner_loss, quiz_loss, method=c.metadistil.hypergradient,
                                    inner_optimizer="sgd" if plain else None,
                                    inner_lr=c.metadistil.inner_lr if plain else None,
                                    average=data_parallel_average(run))
        quiz_batch = next_batch(run, state, "quiz", task, salt=17, local=True)
        stats = pilots[0].step({**batch, "task": task}, {**quiz_batch, "task": task})
        return {"loss": stats["student_loss"], **stats}

    run.supervised_stage("metadistil", student, student, c.student_training, step, companions=companions)
    teacher.eval().requires_grad_(False)
    run.record("teacher_final", teacher)


class LogitsOf(nn.Module):
    """``model``'s logits as a plain tensor: the bi-level engine records and replays tensor outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, task: str, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs, task=task).logits


def next_batch(run: "Run", state: dict, split: str, task: str, *, salt: int, local: bool = False) -> Batch:
    """The next batch of an endless per-task stream whose position lives in the checkpointed stage state
    (``local``: this rank's slice of it, for a training step; otherwise whole on every rank)."""
    key = f"{split}_cursors"
    epoch, position = state.setdefault(key, {}).get(task, [0, 0])
    cursor = TaskCursor(run.splits[task][split], run.config.data.batch_size, seed=run.config.seed, salt=salt,
                        epoch=epoch, batch=position, row_multiple=run.runtime.world_size)
    batch = cursor.next()
    state[key][task] = cursor.position()
    batch = trim_padding(batch)
    return run.runtime.to_device(run.runtime.local_rows(batch) if local else batch)


# ----------------------------------------------------------------------------------------------- MPDistil stage 3

def meta_teacher_stage(run: "Run") -> None:
    """Meta-teacher learning (:mod:`mpdistil_fast.methods.mpdistil`); the student distils from the meta-teacher."""
    c = run.config
    meta_teachers = run.build_meta_teachers()
    objective = objective_for(run, "kd", bilevel=c.meta_teacher.bilevel)
    student = run.student
    state = run.state["stage_state"]

    def inner_loss(student_module, meta_teacher_module, batch: Batch) -> torch.Tensor:
        student_logits = student_module(batch["task"], **model_inputs(batch))
        return objective(student_logits, batch["labels"],
                         teacher_logits=meta_teacher_module(batch["teacher_pooled"])).loss

    def quiz_loss(student_module, batch: Batch) -> torch.Tensor:
        return cross_entropy(student_module(batch["task"], **model_inputs(batch)), batch["labels"])

    def meta_hypergradient(meta_teacher: nn.Module, task: str, batch: Batch, teacher_pooled: torch.Tensor
                           ) -> tuple[torch.Tensor, float]:
        """d quiz_loss(student after a pilot step on the meta-teacher's KD loss) / d meta-teacher, averaged over
        the ranks (``meta_teacher.bilevel``: the meta-teacher learns to teach), as a loss for its backward;
        returns that loss and the hypergradient's norm."""
        from mpdistil_fast.bilevel import hypergradient, hypergradient_surrogate

        scorer = MetaTeacherScorer(meta_teacher)
        quiz_batch = next_batch(run, state, "quiz", task, salt=23, local=True)
        grads = hypergradient(LogitsOf(student), scorer, inner_loss, quiz_loss,
                              {**batch, "task": task, "teacher_pooled": teacher_pooled}, {**quiz_batch, "task": task},
                              inner_lr=c.meta_teacher.training.lr, method=c.meta_teacher.hypergradient,
                              average=data_parallel_average(run))
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
        return hypergradient_surrogate(dict(scorer.named_parameters()), grads), norm

    def companions(total: int) -> dict:
        return {"meta_trained": run.trainer(meta_teachers, c.meta_teacher.training, total, role="meta_teacher",
                                            lr=c.meta_teacher.lr)}

    with run.frozen_teacher_outputs() as teacher_outputs:
        def step(trained, task: str, batch: Batch, extra: dict) -> dict[str, float]:
            t = teacher_outputs(task, "train", batch, False)
            out = student(**model_inputs(batch), task=task)
            parts: dict[str, float] = {}
            if task in meta_teachers:
                meta_teacher, meta_trained = meta_teachers[task], extra["meta_trained"]
                meta_out = meta_teacher(t.pooled, out.pooled.detach(), batch["labels"], mode=c.meta_teacher.loss)
                meta_loss = meta_out.loss
                if c.meta_teacher.bilevel:  # its gradient joins the meta-teacher's own in one backward
                    surrogate, parts["meta_hypergradient_norm"] = meta_hypergradient(meta_teacher, task, batch,
                                                                                     t.pooled)
                    meta_loss = meta_loss + c.meta_teacher.hypergradient_weight * surrogate
                meta_trained.backward(meta_loss)
                grad_norm = meta_trained.step()
                if grad_norm is not None:
                    parts["meta_grad_norm"] = grad_norm
                parts["meta_loss"] = meta_out.loss.item()
            result = objective(out.logits, batch["labels"], teacher_logits=meta_teacher_logits(
                meta_teachers, task, t))
            trained.backward(result.loss)
            trained.step()
            return {**result.parts, **parts}

        meta_teachers.train()
        run.supervised_stage("meta_teacher", student, student, c.meta_teacher.training, step, companions=companions)
        meta_teachers.eval()
        for task in (task for task in run.targets if task in meta_teachers):
            predictions = run.predict_with(
                lambda batch, task=task: meta_teacher_logits(meta_teachers, task,
                                                             teacher_outputs(task, "validation", batch, False)),
                task, "validation")
            run.state["results"].setdefault(task, {})["meta_teacher"] = compute_metrics(
                task, predictions, run.splits[task]["validation"].labels)


class MetaTeacherScorer(nn.Module):
    """A meta-teacher as a module from the teacher's pooled features to logits (what the KD loss reads)."""

    def __init__(self, meta_teacher: nn.Module):
        super().__init__()
        self.meta_teacher = meta_teacher

    def forward(self, teacher_pooled: torch.Tensor) -> torch.Tensor:
        return self.meta_teacher.logits(teacher_pooled)


@torch.no_grad()
def meta_teacher_logits(meta_teachers: nn.ModuleDict, task: str, teacher_out) -> torch.Tensor:
    """The meta-teacher's logits on the teacher's pooled features; the teacher's own for tasks without one."""
    return meta_teachers[task].logits(teacher_out.pooled) if task in meta_teachers else teacher_out.logits


# ----------------------------------------------------------------------------------------------- MPDistil stage 4

def curriculum_stage(run: "Run") -> None:
    """REINFORCE curriculum (:mod:`mpdistil_fast.methods.curriculum`); one student step per action (paper) or one
    per episode with gamma^k, one action and an undetached state (``reference_compat``)."""
    c = run.config
    cc = c.curriculum
    compat = run.compat
    student = run.student
    meta_teachers = run.build_meta_teachers()
    meta_teachers.eval()
    objective = objective_for(run, "kd")
    targets = run.targets
    actions = [targets[0]] if compat else list(cc.actions)
    steps, episodes = cc.steps_per_episode, cc.episodes
    total = steps * episodes
    # the policy is a tiny MLP: it stays on the CPU, with its (detached) states
    policy = CurriculumPolicy(student.pooled_size if compat else state_size(len(targets)), actions,
                              cc.policy_hidden)
    reinforce = Reinforce(policy, lr=cc.policy_lr, gamma=cc.gamma, baseline_decay=cc.baseline_decay,
                          relative_discount=not compat)
    trained = run.trainer(student, c.student_training, episodes if compat else total, role="curriculum",
                          lr=cc.student_lr)
    best = BestSnapshot.for_model(run.runtime, student)
    stateful = {"trained": trained, "best": best, "policy": reinforce}
    run.restore_stage(stateful)
    state = run.state["stage_state"]
    state.setdefault("summary", {task: [0.0, 0.0] for task in targets})

    with run.frozen_teacher_outputs() as teacher_outputs:
        def quiz_accuracies(task: str, keep_graph: bool) -> tuple[float, float, torch.Tensor | None]:
            """Student and meta-teacher accuracy on the next quiz batch of ``task`` (student in eval mode)."""
            batch = next_batch(run, state, "quiz", task, salt=202)
            student.eval()
            with torch.set_grad_enabled(keep_graph):
                out = student(**model_inputs(batch), task=task)
            run.train_mode(student)
            meta_logits = meta_teacher_logits(meta_teachers, task, teacher_outputs(task, "quiz", batch, False))
            labels = batch["labels"]
            student_acc = float((out.logits.argmax(-1) == labels).float().mean())
            meta_acc = float((meta_logits.argmax(-1) == labels).float().mean())
            if not keep_graph:
                return student_acc, meta_acc, None
            # reference_compat's state: the pooled features averaged over the batch (and a multiple-choice task's
            # choices)
            return student_acc, meta_acc, out.pooled.reshape(-1, out.pooled.shape[-1]).mean(0).float().cpu()

        def step(i: int) -> dict[str, float]:
            position = i % steps
            if compat:
                _, _, pooled = quiz_accuracies(targets[0], keep_graph=True)
                action = reinforce.act(pooled, keep_graph=True)
            else:
                action = reinforce.act(performance_state(state["summary"], targets, position / steps),
                                       agree=run.runtime.from_main)
            task = actions[action]
            batch = next_batch(run, state, "train", task, salt=101, local=True)
            out = student(**model_inputs(batch), task=task)
            result = objective(out.logits, batch["labels"], teacher_logits=meta_teacher_logits(
                meta_teachers, task, teacher_outputs(task, "train", batch, False)))
            trained.backward(result.loss)
            if not compat:
                trained.step()
            student_total, meta_total = 0.0, 0.0
            for target in targets:
                for _ in range(cc.quiz_batches):
                    student_acc, meta_acc, _ = quiz_accuracies(target, keep_graph=False)
                    update_summary(state["summary"], target, student_acc, meta_acc)
                    student_total += student_acc
                    meta_total += meta_acc
            count = len(targets) * cc.quiz_batches
            value = reward(student_total / count, meta_total / count, cc.reward)
            reinforce.reward(value)
            metrics = {**result.parts, "reward": value, f"action_{task}": 1.0}
            if position == steps - 1:
                episode = i // steps
                stats = reinforce.finish_episode()
                if compat:
                    trained.step()
                run.state["curves"]["reward"].append([episode, stats["mean_reward"]])
                run.state["curves"]["actions"].append(
                    [episode, {a: stats[f"action_{a}"] for a in actions}])
                metrics.update(stats)
                metrics["quiz"] = run.select(student, best, targets)
                run.train_mode(student)
                LOG.debug("episode %d: %s", episode, stats)
            return metrics

        run.train_mode(student)
        run.loop("curriculum", total, step, stateful,
                 can_checkpoint=lambda done: not compat or done % steps == 0)
    best.restore_into(student)
    LOG.info("curriculum: final action distribution %s",
             policy.probabilities(performance_state(state["summary"], targets, 0.0)) if not compat else actions)


STAGE_FUNCTIONS: dict[str, Callable[["Run"], None]] = {
    "teacher": teacher_stage, "student": student_stage, "metadistil": metadistil_stage,
    "meta_teacher": meta_teacher_stage, "curriculum": curriculum_stage}
