"""Every stage and student objective on tiny random models and small slices of the real data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import mpdistil_fast
from mpdistil_fast.methods import StudentObjective
from mpdistil_fast.models import default_teacher_path, load_tokenizer, tiny_backbone
from mpdistil_fast.pipeline import stages
from mpdistil_fast.pipeline.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from mpdistil_fast.pipeline.config import load_config
from mpdistil_fast.pipeline.trainer import Run
from pipeline_helpers import make_tiny_teacher, restore_torch_threads, write_config  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny") / "teacher")


def make_run(tmp_path: Path, teacher_dir: Path, data_dir: Path, method: str, **extra) -> Run:
    path = write_config(tmp_path / f"{method}.yaml", teacher_dir, data_dir, tmp_path / method, method, **extra)
    return Run(load_config(path))


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


# ----------------------------------------------------------------------------------------------- objectives

def _reference_kd(student, teacher, labels, alpha, temperature):
    s, t = student.double(), teacher.double()
    soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                    reduction="batchmean") * temperature ** 2
    return (1 - alpha) * F.cross_entropy(s, labels) + alpha * soft


class _MetricsSink:
    """Stands in for the run's MetricsLogger and keeps what the stage logs."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.records_written = 0

    def log(self, stage: str, step: int, metrics: dict) -> None:
        self.records.append(metrics)
        self.records_written += 1


def capture_metrics(run) -> list[dict]:
    """Route ``run``'s metrics into a list (returned) instead of metrics.jsonl."""
    run.metrics = sink = _MetricsSink()
    return sink.records

def test_objectives_match_float64_references():
    torch.manual_seed(0)
    student = (torch.randn(5, 3) * 3).requires_grad_(True)
    teacher, labels = torch.randn(5, 3) * 3, torch.tensor([0, 2, 1, 1, 0])
    finetune = StudentObjective("finetune")(student, labels)
    torch.testing.assert_close(finetune.loss.double(), F.cross_entropy(student.double(), labels))
    kd = StudentObjective("kd", alpha=0.3, temperature=2.5)(student, labels, teacher_logits=teacher)
    expected = _reference_kd(student, teacher, labels, 0.3, 2.5)
    torch.testing.assert_close(kd.loss.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(kd.loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-6)
    assert set(kd.parts) == {"ce", "kd", "loss"}
    jsd = StudentObjective("kd", alpha=0.3, temperature=2.5, direction="jsd", jsd_beta=0.2)(student, labels,
                                                                                           teacher_logits=teacher)
    expected_jsd = 0.7 * F.cross_entropy(student.double(), labels) + 0.3 * mpdistil_fast.kd_kl_div(
        student.double(), teacher.double(), 2.5, direction="jsd", beta=0.2, backend="torch")
    torch.testing.assert_close(jsd.loss.double(), expected_jsd, rtol=1e-5, atol=1e-6)


def test_patient_kd_hidden_term():
    torch.manual_seed(0)
    layers_s = tuple(torch.randn(4, 6, 8) for _ in range(4))   # embeddings + 3 student layers
    layers_t = tuple(torch.randn(4, 6, 8) for _ in range(7))   # embeddings + 6 teacher layers
    student, teacher, labels = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    objective = StudentObjective("pkd", alpha=0.5, temperature=2.0, beta=7.0, layer_map="skip")
    first_tokens = lambda layers: torch.stack([h[:, :1] for h in layers[1:]])  # noqa: E731  [L, B, 1, H]
    hs, ht = first_tokens(layers_s), first_tokens(layers_t)
    result = objective(student, labels, teacher_logits=teacher, student_hidden=hs, teacher_hidden=ht)
    # PKD-skip, 3 -> 6 layers: student layers 1, 2 -> teacher layers 2, 4 (1-based), normalised [CLS] states
    normalise = lambda h: F.normalize(h[:, 0].double(), dim=-1)  # noqa: E731
    pairs = [(layers_s[1], layers_t[2]), (layers_s[2], layers_t[4])]
    hidden = sum(((normalise(s) - normalise(t)) ** 2).sum() for s, t in pairs) / (4 * 8 * len(pairs))
    expected = _reference_kd(student, teacher, labels, 0.5, 2.0) + 7.0 * hidden
    torch.testing.assert_close(result.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert result.parts["hidden"] == pytest.approx(float(hidden), rel=1e-5)


def test_objective_backend_reaches_the_hidden_loss():
    """``backend="torch"`` (what a hypergradient that differentiates twice asks for) reaches the PKD hidden loss
    too: its gradient can be differentiated again, where the fused kernels refuse."""
    torch.manual_seed(0)
    hs, ht = torch.randn(3, 4, 1, 8, dtype=torch.float64, requires_grad=True), torch.randn(6, 4, 1, 8).double()
    logits, labels = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    objective = StudentObjective("pkd", beta=7.0, backend="torch")
    loss = objective(logits, labels, teacher_logits=logits.flip(0), student_hidden=hs, teacher_hidden=ht).loss
    (grad,) = torch.autograd.grad(loss, hs, create_graph=True)
    torch.autograd.grad(grad.square().sum(), hs)


def test_objective_errors_name_the_argument():
    with pytest.raises(ValueError, match="method"):
        StudentObjective("fitnets")
    logits, labels = torch.randn(2, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="teacher_logits"):
        StudentObjective("kd")(logits, labels)
    with pytest.raises(ValueError, match="student_hidden"):
        StudentObjective("pkd")(logits, labels, teacher_logits=logits)


# ----------------------------------------------------------------------------------------------- stages

def test_teacher_and_kd_student_stages(tmp_path, teacher_dir, data_dir):
    run = make_run(tmp_path, teacher_dir, data_dir, "kd")
    assert run.selection_split == "quiz"
    teacher_before = weights(run.teacher)
    selected_on = []
    evaluate = run.evaluate
    run.evaluate = lambda model, task, split: selected_on.append(split) or evaluate(model, task, split)
    run.begin_stage("teacher")
    stages.teacher_stage(run)
    assert changed(teacher_before, run.teacher) and not run.teacher.training
    assert not any(p.requires_grad for p in run.teacher.parameters())
    assert set(run.state["results"]) == {"cb", "rte"} and "teacher" in run.state["results"]["cb"]
    run.end_stage("teacher")
    frozen, student_before = weights(run.teacher), weights(run.student)
    selected_on.clear()
    run.begin_stage("student")
    stages.student_stage(run)
    assert changed(student_before, run.student) and not changed(frozen, run.teacher)
    assert selected_on.count("quiz") >= 2 and selected_on.count("validation") == 2  # selection never on validation
    assert run.cache is not None and sum(e.rows_served for e in run.cache.entries.values()) > 0
    assert "student_stage2" in run.state["results"]["rte"]


def test_the_frozen_teacher_is_written_once_then_linked(tmp_path, teacher_dir, data_dir):
    run = make_run(tmp_path, teacher_dir, data_dir, "kd", runtime={"keep_checkpoints": 5})
    run.run()
    checkpoints = list_checkpoints(tmp_path / "kd")
    stages_of = [json.loads((c / "state.json").read_text())["stage"] for c in checkpoints]
    frozen = checkpoints[stages_of.index("student") - 1:]  # from the teacher stage's end on
    assert len(frozen) >= 3 and stages_of[stages_of.index("student") - 1] is None
    assert len({(c / "teacher.safetensors").stat().st_ino for c in frozen}) == 1  # one file, linked
    assert len({(c / "student.safetensors").stat().st_ino for c in frozen}) == len(frozen)  # the student trains
    assert len({(c / "teacher.safetensors").stat().st_ino for c in checkpoints}) > 1  # written while it trained
    final = load_checkpoint(checkpoints[-1])[0]["teacher"]
    assert all(torch.equal(final[name], value) for name, value in run.teacher.state_dict().items())


def test_pkd_student_stage_uses_hidden_states(tmp_path, teacher_dir, data_dir):
    run = make_run(tmp_path, teacher_dir, data_dir, "pkd")
    run.teacher.eval().requires_grad_(False)
    logged = capture_metrics(run)
    run.begin_stage("student")
    stages.student_stage(run)
    assert logged and all("hidden" in m and "kd" in m for m in logged)


def test_metadistil_stage_teaches_the_teacher(tmp_path, teacher_dir, data_dir):
    run = make_run(tmp_path, teacher_dir, data_dir, "metadistil", student_training={"max_steps": 2})
    teacher_before, student_before = weights(run.teacher), weights(run.student)
    run.begin_stage("metadistil")
    stages.metadistil_stage(run)
    assert changed(teacher_before, run.teacher), "the teacher must follow the quiz hypergradient"
    assert changed(student_before, run.student)
    assert "teacher_final" in run.state["results"]["cb"]


def first_teacher_grad_norms(tmp_path: Path, teacher_dir: Path, data_dir: Path,
                             variants: dict[str, dict]) -> dict[str, float]:
    """The teacher's gradient norm in the first MetaDistil step of a one-step run per ``metadistil`` variant."""
    norms = {}
    for name, metadistil in variants.items():
        (tmp_path / name).mkdir()
        run = make_run(tmp_path / name, teacher_dir, data_dir, "metadistil", student_training={"max_steps": 1},
                       metadistil=metadistil)
        logged = capture_metrics(run)
        run.begin_stage("metadistil")
        stages.metadistil_stage(run)
        norms[name] = logged[0]["teacher_grad_norm"]
    return norms


def test_metadistil_runs_every_hypergradient_method(tmp_path, teacher_dir, data_dir):
    """MetaDistil's own exact hypergradient and forward mode run in the pipeline (the stage's KD loss takes its
    plain-torch backend, which the fused kernels' missing double backward and jvp would otherwise stop), and the
    first teacher gradient of every method agrees with exact's."""
    norms = first_teacher_grad_norms(tmp_path, teacher_dir, data_dir, {
        method: {"hypergradient": method} for method in ("exact", "forward_mode", "finite_difference", "first_order")})
    assert norms["exact"] > 0, norms
    for method, tolerance in (("forward_mode", 1e-5), ("finite_difference", 1e-3), ("first_order", 5e-3)):
        assert norms[method] == pytest.approx(norms["exact"], rel=tolerance), (method, norms)


def test_metadistil_pilot_rule(tmp_path, teacher_dir, data_dir):
    """``metadistil.pilot_rule: sgd`` takes the released code's plain SGD pilot step instead of the student's AdamW
    rule: another direction, so another first teacher gradient."""
    norms = first_teacher_grad_norms(tmp_path, teacher_dir, data_dir,
                                     {rule: {"pilot_rule": rule} for rule in ("student", "sgd")})
    assert norms["sgd"] > 0 and norms["sgd"] != pytest.approx(norms["student"], rel=1e-2), norms


def test_meta_teacher_and_curriculum_stages(tmp_path, teacher_dir, data_dir):
    run = make_run(tmp_path, teacher_dir, data_dir, "mpdistil", data={"tasks": ["cb", "copa"]},
                   curriculum={"actions": ["cb", "copa", "rte"], "episodes": 2, "steps_per_episode": 3})
    assert run.tasks == ["cb", "copa", "rte"]  # an action task outside the reported ones is trained as well
    run.teacher.eval().requires_grad_(False)
    run.begin_stage("meta_teacher")
    stages.meta_teacher_stage(run)
    assert set(run.meta_teachers) == {"cb", "copa", "rte"}  # COPA's scores each choice
    assert run.meta_teachers["copa"].multiple_choice and not run.meta_teachers["cb"].multiple_choice
    assert all("meta_teacher" in run.state["results"][task] for task in ("cb", "copa"))
    assert "rte" not in run.state["results"]  # trained as an action, not reported (data.tasks are)
    run.end_stage("meta_teacher")

    steps = []
    original_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        steps.append(self)
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = counting_step
    try:
        run.begin_stage("curriculum")
        stages.curriculum_stage(run)
    finally:
        torch.optim.AdamW.step = original_step
    assert len(steps) == 6  # the student steps at every curriculum step
    curves = run.state["curves"]
    assert [episode for episode, _ in curves["reward"]] == [0, 1]
    assert all(sum(counts.values()) == 3 and set(counts) == {"cb", "copa", "rte"} for _, counts in curves["actions"])
    assert all(0.0 <= value <= 1.0 for _, value in curves["reward"])  # binary rewards


def test_meta_teacher_bilevel_meta_gradient(tmp_path, teacher_dir, data_dir):
    run = make_run(tmp_path, teacher_dir, data_dir, "mpdistil", data={"tasks": ["cb"]},
                   meta_teacher={"bilevel": True, "training": {"max_steps": 2}}, curriculum={"actions": ["cb"]})
    run.teacher.eval().requires_grad_(False)
    logged = capture_metrics(run)
    run.begin_stage("meta_teacher")
    stages.meta_teacher_stage(run)
    assert len(logged) == 2 and all(m["meta_hypergradient_norm"] > 0 for m in logged)


def test_meta_teacher_hypergradient_weight_scales_the_hypergradient(tmp_path, teacher_dir, data_dir, monkeypatch):
    """The meta-teacher's first gradient is g_own + w h: two runs with weights 1 and W give h back, whose norm is
    the logged hypergradient norm; the logged step norm is |g_own + w h|."""
    first_gradients, first_logs = {}, {}
    for weight in (1.0, 1e6):
        (tmp_path / str(weight)).mkdir()
        run = make_run(tmp_path / str(weight), teacher_dir, data_dir, "mpdistil", data={"tasks": ["cb"]},
                       meta_teacher={"bilevel": True, "hypergradient_weight": weight, "training": {"max_steps": 1}},
                       curriculum={"actions": ["cb"]})
        run.teacher.eval().requires_grad_(False)
        make_trainer = run.trainer

        def recording_trainer(module, *args, role, **kwargs):
            trained = make_trainer(module, *args, role=role, **kwargs)
            if role == "meta_teacher":
                backward = trained.backward

                def recorded(loss, weight=weight, module=module):
                    backward(loss)
                    first_gradients.setdefault(weight, torch.cat(
                        [p.grad.flatten() for p in module.parameters() if p.grad is not None]).clone())
                monkeypatch.setattr(trained, "backward", recorded)
            return trained

        run.trainer = recording_trainer
        logged = capture_metrics(run)
        run.begin_stage("meta_teacher")
        stages.meta_teacher_stage(run)
        first_logs[weight] = logged[0]
        assert first_logs[weight]["meta_grad_norm"] == pytest.approx(float(first_gradients[weight].norm()), rel=1e-5)
    hypergradient = (first_gradients[1e6] - first_gradients[1.0]) / (1e6 - 1.0)
    assert first_logs[1.0]["meta_hypergradient_norm"] == first_logs[1e6]["meta_hypergradient_norm"]
    assert float(hypergradient.norm()) == pytest.approx(first_logs[1.0]["meta_hypergradient_norm"], rel=1e-3)


def test_meta_teacher_stage_scores_with_a_live_teacher(tmp_path, teacher_dir, data_dir):
    """With ``runtime.teacher_cache: off`` the meta-teacher's validation score runs the teacher on real batches
    (the cached path's index-only batch had no input_ids), and gives the cached path's predictions."""
    scores = {}
    for cache in ("off", "memory"):
        (tmp_path / cache).mkdir()
        run = make_run(tmp_path / cache, teacher_dir, data_dir, "mpdistil", data={"tasks": ["cb"]},
                       runtime={"teacher_cache": cache}, meta_teacher={"training": {"max_steps": 2}},
                       curriculum={"actions": ["cb"]})
        run.teacher.eval().requires_grad_(False)
        run.begin_stage("meta_teacher")
        stages.meta_teacher_stage(run)
        scores[cache] = run.state["results"]["cb"]["meta_teacher"]
    assert scores["off"] == pytest.approx(scores["memory"])


@pytest.mark.parametrize("tasks", [["cb", "rte"], ["copa", "cb"]])  # COPA: the state averages over choices too
def test_reference_compat_curriculum(tmp_path, teacher_dir, data_dir, tasks):
    run = make_run(tmp_path, teacher_dir, data_dir, "mpdistil", reference_compat=True, data={"tasks": tasks},
                   curriculum={"episodes": 2, "steps_per_episode": 2, "reward": "real", "actions": tasks})
    assert run.selection_split == "validation" and run.tasks == tasks
    run.teacher.eval().requires_grad_(False)
    run.build_meta_teachers()
    student_before = weights(run.student)
    run.begin_stage("curriculum")
    stages.curriculum_stage(run)
    assert changed(student_before, run.student)
    assert all(set(counts) == {tasks[0]} for _, counts in run.state["curves"]["actions"])  # one hard-coded action
    assert run.state["dropout_off"] and not run.student.training  # dropout never switched back on


def test_stage_lists(tmp_path, teacher_dir, data_dir):
    run = make_run(tmp_path, teacher_dir, data_dir, "mpdistil", curriculum={"enabled": False})
    assert stages.stages_of(run.config) == ("teacher", "student", "meta_teacher")  # the ablation without stage 4
    assert run.tasks == ["cb", "rte"]


def test_truncated_student_runs_its_own_attention(tmp_path, teacher_dir, data_dir):
    """student.attn_implementation reaches the student cut from an SDPA teacher (the config check lets exact and
    forward_mode hypergradients through for an eager student; a copy that kept the teacher's SDPA failed there)."""
    path = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "metadistil",
                        student={"attn_implementation": "eager"})
    raw = yaml.safe_load(path.read_text())
    raw["teacher"]["attn_implementation"] = "sdpa"
    path.write_text(yaml.safe_dump(raw))
    run = Run(load_config(path))
    assert run.teacher.backbone.config._attn_implementation == "sdpa"
    assert run.student.backbone.config._attn_implementation == "eager"


def test_student_from_its_own_model(tmp_path, teacher_dir, data_dir):
    run = make_run(tmp_path, teacher_dir, data_dir, "kd", student={"model": str(teacher_dir), "num_layers": 2})
    assert len(run.student.backbone.encoder.layer) == 4  # the whole model, not a truncated copy
    assert run.student.backbone is not run.teacher.backbone


def test_narrower_student_gets_projections(tmp_path, teacher_dir, data_dir):
    narrow = tmp_path / "narrow"
    tiny_backbone("bert", hidden_size=16, num_layers=2, seed=1).save_pretrained(narrow)
    load_tokenizer(str(teacher_dir)).save_pretrained(narrow)
    run = make_run(tmp_path, teacher_dir, data_dir, "mpdistil", student={"model": str(narrow)},
                   student_training={"max_steps": 3}, meta_teacher={"training": {"max_steps": 2}})
    run.teacher.eval().requires_grad_(False)
    assert (run.student.hidden_size, run.teacher.hidden_size) == (16, 32)
    run.begin_stage("student")
    stages.student_stage(run)
    tensors, _ = load_checkpoint(latest_checkpoint(run.output_dir))  # written after step 2 of 3
    assert tensors["objective"]["hidden_loss.projection.weight"].shape == (32, 16)  # the projection is saved
    assert "student_stage2" in run.state["results"]["cb"]
    run.end_stage("student")
    run.begin_stage("meta_teacher")
    stages.meta_teacher_stage(run)
    assert run.meta_teachers["cb"].student_projection is not None


def test_finetune_has_no_teacher(tmp_path, teacher_dir, data_dir):
    run = make_run(tmp_path, teacher_dir, data_dir, "finetune")
    assert run.teacher is None
    assert len(run.student.backbone.encoder.layer) == 2  # the first student.num_layers layers of the model
    assert stages.stages_of(run.config) == ("student",)


def test_metadistil_student_pilot_rule_follows_the_student_schedule(tmp_path, teacher_dir, data_dir):
    """``pilot_rule: student``: the pilot's AdamW step takes the student optimizer's *scheduled* learning rate (the
    real step's), not ``metadistil.inner_lr`` (a constant, which ignored warm-up and decay); ``sgd`` takes
    ``inner_lr``."""
    rates = {}
    for rule in ("student", "sgd"):
        (tmp_path / rule).mkdir()
        run = make_run(tmp_path / rule, teacher_dir, data_dir, "metadistil",
                       student_training={"max_steps": 3, "lr": 1e-3, "warmup_ratio": 0.5},
                       metadistil={"pilot_rule": rule, "inner_lr": 1e-4})
        logged = capture_metrics(run)
        run.begin_stage("metadistil")
        stages.metadistil_stage(run)
        rates[rule] = [m["inner_lr"] for m in logged]
    # warm-up of int(0.5 * 3) = 1 step, then linear decay to 0 over the 3 steps
    assert rates["student"] == pytest.approx([5e-4, 1e-3, 5e-4], rel=1e-12)
    assert rates["sgd"] == pytest.approx([1e-4] * 3, rel=1e-12)


#: Model families besides the tiny BERT of the other tests: (tiny_backbone kind, config overrides, pooling).
FAMILIES = {
    "deberta-v2": ("deberta-v2", {}, "mean"),
    "llama": ("llama", {}, "last"),
    # OPT-350m's shape: the final state is projected out to a narrower width (pooled 16, layers 32)
    "opt-projected": ("opt", {"word_embed_proj_dim": 16, "do_layer_norm_before": False}, "last"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mpdistil_on_other_model_families(tmp_path, data_dir, family):
    """Every MPDistil stage after the teacher's on a tiny DeBERTa-v2, Llama and OPT-350m-shaped teacher and the
    student cut from it: the meta-teachers read the pooled width, PKD the layer states at the pooling position."""
    kind, overrides, pooling = FAMILIES[family]
    teacher_dir = tmp_path / family
    tiny_backbone(kind, hidden_size=32, num_layers=4, seed=0, **overrides).save_pretrained(teacher_dir)
    load_tokenizer(str(default_teacher_path())).save_pretrained(teacher_dir)
    path = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "mpdistil",
                        student={"pooling": pooling}, student_training={"max_steps": 2},
                        meta_teacher={"training": {"max_steps": 2}})
    raw = yaml.safe_load(path.read_text())
    raw["teacher"]["pooling"] = pooling
    path.write_text(yaml.safe_dump(raw))
    run = Run(load_config(path))
    pooled = overrides.get("word_embed_proj_dim", 32)
    assert (run.teacher.pooled_size, run.teacher.hidden_size, run.student.pooled_size) == (pooled, 32, pooled)
    run.teacher.eval().requires_grad_(False)
    logged = capture_metrics(run)
    for stage in stages.stages_of(run.config)[1:]:
        run.begin_stage(stage)
        getattr(stages, f"{stage}_stage")(run)
        run.end_stage(stage)
    assert any("hidden" in m for m in logged)
    assert all(run.meta_teachers[task].student_projection is None for task in run.tasks)  # pooled widths agree
    assert set(run.state["results"]["cb"]) >= {"student_stage2", "meta_teacher"}


def test_a_student_with_another_tokenization_is_refused(tmp_path, teacher_dir, data_dir):
    """A student of its own must read the teacher's token ids: a cased tokenizer with the teacher's (uncased)
    vocabulary encodes text differently, and was accepted when only the vocabularies were compared."""
    import transformers

    cased = tmp_path / "cased"
    tiny_backbone("bert", hidden_size=16, num_layers=2, seed=1).save_pretrained(cased)
    transformers.AutoTokenizer.from_pretrained(str(teacher_dir), do_lower_case=False).save_pretrained(cased)
    with pytest.raises(ValueError, match="must share the teacher's tokenizer"):
        make_run(tmp_path, teacher_dir, data_dir, "kd", student={"model": str(cased)})
    same = tmp_path / "same"
    tiny_backbone("bert", hidden_size=16, num_layers=2, seed=1).save_pretrained(same)
    load_tokenizer(str(teacher_dir)).save_pretrained(same)
    assert make_run(tmp_path, teacher_dir, data_dir, "kd", student={"model": str(same)}).student.hidden_size == 16


# ----------------------------------------------------------------------------------------------- stage internals

def test_the_student_distils_from_the_meta_teacher_s_logits():
    """Stages 3 and 4 distil the student from the meta-teacher's logits on the teacher's pooled features, and from
    the teacher's own logits only for a task without a meta-teacher."""
    from mpdistil_fast.models.task_model import TaskModelOutput

    meta_teachers = torch.nn.ModuleDict({"cb": mpdistil_fast.MetaTeacher(8, 3)})
    cb = TaskModelOutput(logits=torch.randn(4, 3), pooled=torch.randn(4, 8))
    rte = TaskModelOutput(logits=torch.randn(4, 2), pooled=torch.randn(4, 8))
    torch.testing.assert_close(stages.meta_teacher_logits(meta_teachers, "cb", cb),
                               meta_teachers["cb"].logits(cb.pooled))
    assert not torch.allclose(stages.meta_teacher_logits(meta_teachers, "cb", cb), cb.logits)
    assert torch.equal(stages.meta_teacher_logits(meta_teachers, "rte", rte), rte.logits)


def test_a_supervised_stage_ends_with_its_best_quiz_snapshot(tmp_path, teacher_dir, data_dir):
    """Two epochs of CB (3 steps each) select at steps 3 and 6; a quiz score that falls after the first selection
    leaves the student with the first selection's weights, not the last step's."""
    run = make_run(tmp_path, teacher_dir, data_dir, "kd", data={"tasks": ["cb"]},
                   student_training={"epochs": 2, "max_steps": None})
    run.teacher.eval().requires_grad_(False)
    evaluate, selected = run.evaluate, []

    def falling_quiz_score(model, task, split):
        if split != "quiz":
            return evaluate(model, task, split)
        selected.append(weights(model))
        return {"main": 0.9 if len(selected) == 1 else 0.1}

    run.evaluate = falling_quiz_score
    run.begin_stage("student")
    stages.student_stage(run)
    assert len(selected) == 2 and any(not torch.equal(selected[0][k], v) for k, v in selected[1].items())
    assert not changed(selected[0], run.student)


def test_the_meta_teacher_trains_with_the_configured_loss(tmp_path, teacher_dir, data_dir):
    """``meta_teacher.loss: competitive`` reaches the meta-teacher: the first step's loss (same seed, weights and
    batch) differs from the collaborative one."""
    first = {}
    for loss in ("collaborative", "competitive"):
        (tmp_path / loss).mkdir()
        run = make_run(tmp_path / loss, teacher_dir, data_dir, "mpdistil", data={"tasks": ["cb"]},
                       meta_teacher={"loss": loss, "training": {"max_steps": 1}}, curriculum={"actions": ["cb"]})
        run.teacher.eval().requires_grad_(False)
        logged = capture_metrics(run)
        run.begin_stage("meta_teacher")
        stages.meta_teacher_stage(run)
        first[loss] = logged[0]["meta_loss"]
    assert first["competitive"] != pytest.approx(first["collaborative"], rel=1e-3), first


def _rows_of(split, batch) -> bool:
    """Whether ``batch``'s rows are rows ``example_index`` of ``split`` (trim_padding only cut trailing columns)."""
    index, ids = batch["example_index"].cpu(), batch["input_ids"].cpu()
    if index.max() >= len(split):
        return False
    return torch.equal(split.input_ids[index][..., :ids.shape[-1]], ids)


@pytest.mark.parametrize("rule", ["student", "sgd"])
def test_the_metadistil_pilot_steps_on_quiz_rows_with_its_rule(tmp_path, teacher_dir, data_dir, monkeypatch, rule):
    """Each pilot update gets a training batch of train rows and a quiz batch of quiz rows of the same task, and
    the experimental step's rule: the student optimizer's (AdamW, its scheduled rate) or plain SGD at
    ``metadistil.inner_lr``; the stage's stream positions do not outlive it."""
    from mpdistil_fast.bilevel import PilotUpdate

    run = make_run(tmp_path, teacher_dir, data_dir, "metadistil", student_training={"max_steps": 2},
                   metadistil={"pilot_rule": rule, "inner_lr": 1e-4})
    calls = []
    original = PilotUpdate.step

    def recording_step(self, train_batch, quiz_batch):
        calls.append((self.inner_optimizer, self.inner_lr, train_batch, quiz_batch))
        return original(self, train_batch, quiz_batch)

    monkeypatch.setattr(PilotUpdate, "step", recording_step)
    run.begin_stage("metadistil")
    stages.metadistil_stage(run)
    assert len(calls) == 2
    for inner_optimizer, inner_lr, train_batch, quiz_batch in calls:
        task = quiz_batch["task"]
        assert train_batch["task"] == task
        assert _rows_of(run.splits[task]["train"], train_batch) and _rows_of(run.splits[task]["quiz"], quiz_batch)
        if rule == "sgd":
            assert (inner_optimizer, inner_lr) == ("sgd", 1e-4)
        else:
            assert inner_optimizer.kind == "adamw" and inner_lr is None
    assert run.state["stage_state"]["quiz_cursors"]
    run.end_stage("metadistil")
    assert run.state["stage_state"] == {}


def _instrumented_curriculum(tmp_path, teacher_dir, data_dir, monkeypatch) -> tuple:
    """A 2-episode, 3-step curriculum over CB and RTE; returns the run and, in order, the events: ``("batch",
    split, local, batch)`` of every stream batch, ``("forward", grad_enabled, training, input_ids, logits)`` of every
    student forward, ``("summary", student_acc, meta_acc)``, ``("reward", args)`` and ``("act", state)``."""
    from mpdistil_fast.methods.curriculum import Reinforce

    run = make_run(tmp_path, teacher_dir, data_dir, "mpdistil",
                   curriculum={"episodes": 2, "steps_per_episode": 3, "actions": ["cb", "rte"], "reward": "real"})
    run.teacher.eval().requires_grad_(False)
    events = []
    next_batch, update_summary, reward, act = stages.next_batch, stages.update_summary, stages.reward, Reinforce.act

    def recorded_batch(run_, state, split, task, **kwargs):
        batch = next_batch(run_, state, split, task, **kwargs)
        events.append(("batch", split, kwargs.get("local", False), task, batch))
        return batch

    def recorded_summary(summary, task, student, meta, *args):
        events.append(("summary", student, meta))
        return update_summary(summary, task, student, meta, *args)

    def recorded_reward(*args):
        events.append(("reward", args))
        return reward(*args)

    def recorded_act(self, state, **kwargs):
        events.append(("act", state.clone()))
        return act(self, state, **kwargs)

    monkeypatch.setattr(stages, "next_batch", recorded_batch)
    monkeypatch.setattr(stages, "update_summary", recorded_summary)
    monkeypatch.setattr(stages, "reward", recorded_reward)
    monkeypatch.setattr(Reinforce, "act", recorded_act)
    run.student.register_forward_hook(
        lambda module, args, kwargs, output: events.append(
            ("forward", torch.is_grad_enabled(), module.training, kwargs["input_ids"], output.logits.detach())),
        with_kwargs=True)
    run.begin_stage("curriculum")
    stages.curriculum_stage(run)
    return run, events


def test_the_curriculum_trains_on_train_rows_and_scores_the_quiz_in_eval_mode(tmp_path, teacher_dir, data_dir,
                                                                              monkeypatch):
    """Each action's student step reads a batch of train rows of its task (in train mode, dropout on); each reward's
    quiz batches are quiz rows, on which the student is scored in eval mode without a graph."""
    run, events = _instrumented_curriculum(tmp_path, teacher_dir, data_dir, monkeypatch)
    batches = [e for e in events if e[0] == "batch"]
    training = [(task, batch) for _, split, local, task, batch in batches if local]
    quiz = [(task, batch) for _, split, local, task, batch in batches if not local]
    assert len(training) == 6 and len(quiz) == 6 * 2
    assert all(_rows_of(run.splits[task]["train"], batch) for task, batch in training)
    assert all(_rows_of(run.splits[task]["quiz"], batch) for task, batch in quiz)
    forwards = [e for e in events if e[0] == "forward"]
    assert sum(grad for _, grad, *_ in forwards) == 6
    assert all(training_mode == grad for _, grad, training_mode, *_ in forwards)


def test_the_curriculum_rewards_the_student_s_margin_over_the_meta_teacher(tmp_path, teacher_dir, data_dir,
                                                                           monkeypatch):
    """The reward of a step (``real``) is the student's mean quiz accuracy minus the meta-teacher's, the student's
    measured on the quiz batches it was scored on; the policy's state ends with the step's position in its
    episode."""
    _, events = _instrumented_curriculum(tmp_path, teacher_dir, data_dir, monkeypatch)
    student_accuracies, quiz_labels = [], None
    for event in events:
        if event[0] == "batch" and event[1] == "quiz":
            quiz_labels = event[4]["labels"]
        elif event[0] == "forward" and quiz_labels is not None:  # the student's forward on that quiz batch
            student_accuracies.append(float((event[4].argmax(-1) == quiz_labels).float().mean()))
            quiz_labels = None
    summaries = [e[1:] for e in events if e[0] == "summary"]
    rewards = [e[1] for e in events if e[0] == "reward"]
    assert [student for student, _ in summaries] == pytest.approx(student_accuracies)
    assert len(rewards) == 6 and len(summaries) == 12
    margins = []
    for step, args in enumerate(rewards):
        student, meta = zip(*summaries[2 * step:2 * step + 2])
        assert args == pytest.approx((sum(student) / 2, sum(meta) / 2, "real"))
        margins.append(sum(student) / 2 - sum(meta) / 2)
    assert any(abs(m) > 1e-6 for m in margins), "every margin is 0: the test cannot tell the order"
    assert [float(e[1][-1]) for e in events if e[0] == "act"] == pytest.approx([0, 1 / 3, 2 / 3] * 2)
