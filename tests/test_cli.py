"""End-to-end smoke runs of the CLI (every method, a few steps), evaluate, and config errors at the CLI."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpdistil_fast.cli import main
from pipeline_helpers import make_tiny_teacher, restore_torch_threads, write_config  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
STAGE_ROLES = {"finetune": {"student_final"}, "kd": {"teacher", "student_stage2", "student_final"},
               "pkd": {"teacher", "student_stage2", "student_final"},
               "metadistil": {"teacher", "teacher_final", "student_final"},
               "mpdistil": {"teacher", "student_stage2", "meta_teacher", "student_final"}}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny") / "teacher")


@pytest.mark.parametrize("method", sorted(STAGE_ROLES))
def test_distill_smoke_every_method(method, tmp_path, teacher_dir, data_dir, capsys):
    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", method,
                          runtime={"tensorboard": True})
    # --set takes several overrides at once, and repeats
    assert main(["distill", "--config", str(config), "--set", "teacher_training.max_steps=2",
                 "student_training.max_steps=2", "--set", "meta_teacher.training.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "| cb |" in out and "| rte |" in out  # the final table is printed
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert set(report["tasks"]) == {"cb", "rte"}
    assert set(report["tasks"]["cb"]) == STAGE_ROLES[method]
    used = report["config"]
    assert used["teacher_training"]["max_steps"] == used["student_training"]["max_steps"] == \
        used["meta_teacher"]["training"]["max_steps"] == 2
    assert {"accuracy", "macro_f1", "main"} <= set(report["tasks"]["cb"]["student_final"])
    for name in ("report.md", "curves.png", "metrics.jsonl"):
        assert (run / name).is_file(), name
    # what ran where: one CPU process, the fused C++ kernels for every op ("auto" on CPU)
    environment = report["environment"]
    assert environment["device"] == "cpu" and environment["world_size"] == 1 and environment["runtime"] == "local"
    assert all(backend.startswith("cpp (") for backend in environment["fused_kernels"].values())
    assert "## Environment" in (run / "report.md").read_text()
    assert list((run / "checkpoints").iterdir())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines and all("stage" in line for line in lines)
    if method == "mpdistil":
        assert len(report["curves"]["reward"]) == 2 and len(report["curves"]["actions"]) == 2
    if method == "kd":  # evaluate the run's newest checkpoint: the same numbers as the report
        assert main(["evaluate", "--checkpoint", str(run)]) == 0
        table = capsys.readouterr().out
        row = next(line for line in table.splitlines() if line.startswith("| rte |"))
        assert f"acc {100 * report['tasks']['rte']['student_final']['accuracy']:.1f} |" in row
        assert f"acc {100 * report['tasks']['rte']['teacher']['accuracy']:.1f} |" in row
        newest = max((run / "checkpoints").iterdir()) / "state.json"  # as if written on a GPU machine
        state = json.loads(newest.read_text())
        state["config"]["runtime"]["device"] = "cuda"
        newest.write_text(json.dumps(state))
        assert main(["evaluate", "--checkpoint", str(run)]) == 0
        assert row in capsys.readouterr().out
        # a new run into this output_dir would mix its checkpoints and metrics with these: refused, or replaced
        assert main(["distill", "--config", str(config)]) == 2
        assert "holds an earlier run (checkpoints, metrics.jsonl" in capsys.readouterr().err
        (run / "checkpoints" / "left-over").touch()
        assert main(["distill", "--config", str(config), "--overwrite", "--quiet", "--set",
                     "teacher_training.max_steps=1", "student_training.max_steps=1"]) == 0
        assert not (run / "checkpoints" / "left-over").exists()
        assert len((run / "metrics.jsonl").read_text().splitlines()) < len(lines)
        with pytest.raises(SystemExit):
            main(["distill", "--config", str(config), "--overwrite", "--resume"])


def test_config_errors_exit_before_loading_models(tmp_path, data_dir, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: kd\nteacher: {model: /nonexistent/model}\ndata: {tasks: [cb]}\n")
    assert main(["distill", "--config", str(config), "--data-dir", str(data_dir), "--set", "student.layers=3"]) == 2
    assert "unknown key 'student.layers' (did you mean 'student.num_layers'?)" in capsys.readouterr().err
    assert main(["distill", "--config", str(config), "--set", "data.data_dir=/nonexistent"]) == 2
    assert "data.data_dir" in capsys.readouterr().err
    assert main(["distill", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_an_output_dir_that_cannot_be_written_is_a_config_error(tmp_path, teacher_dir, data_dir, monkeypatch,
                                                                capsys):
    """An output_dir under a file, or a file itself (a read-only one alike): exit 2 naming output_dir, before the
    data and models load (it was a NotADirectoryError / FileExistsError traceback when the metrics were first
    written, after loading), for a new run and for --resume."""
    import mpdistil_fast.pipeline.trainer as trainer

    def no_loading(*args, **kwargs):
        raise AssertionError("the models loaded before output_dir was checked")

    monkeypatch.setattr(trainer, "load_backbone", no_loading)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "kd")
    for output_dir, extra, reason in ((blocker / "run", [], "Not a directory"), (blocker, [], "a file, not a folder"),
                                      (blocker / "run", ["--resume"], "Not a directory")):
        assert main(["distill", "--config", str(config), "--quiet", "--output-dir", str(output_dir), *extra]) == 2
        err = capsys.readouterr().err
        assert f"config error: output_dir {output_dir}: cannot write there ({reason})" in err, err


def test_an_interrupted_run_says_how_to_continue(tmp_path, teacher_dir, data_dir, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) mid-run: one line that says --resume continues, exit status 130 (as a shell's
    for SIGINT), not a traceback from wherever the interrupt landed (inside torch, a checkpoint's fsync)."""
    from mpdistil_fast.pipeline.trainer import Run

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "run", interrupted)
    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "kd")
    try:
        status = main(["distill", "--config", str(config), "--quiet"])
    except KeyboardInterrupt:  # (escaping, it would stop the whole pytest session)
        pytest.fail("the KeyboardInterrupt escaped main")
    assert status == 130
    err = capsys.readouterr().err
    assert "mpdistil-fast: interrupted; `distill ... --resume` continues the run" in err and "Traceback" not in err


def test_a_damaged_checkpoint_is_an_error_message(tmp_path, teacher_dir, data_dir, capsys, monkeypatch):
    """A checkpoint whose state.json is cut short, or whose weights file is missing or truncated (a disk fault, a
    copy cut short: saves are atomic): evaluate and --resume exit 2 naming the checkpoint and what is wrong (they
    raised a JSONDecodeError, KeyError or SafetensorError traceback); a missing file is found before the models
    load (it was found after, minutes into a large teacher's run)."""
    from mpdistil_fast.pipeline.checkpoint import latest_checkpoint
    from mpdistil_fast.pipeline.trainer import Run

    models_built = []
    build_models = Run._build_models
    monkeypatch.setattr(Run, "_build_models", lambda run: models_built.append(1) or build_models(run))

    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "finetune",
                          data={"tasks": ["cb"]})
    assert main(["distill", "--config", str(config), "--quiet"]) == 0
    capsys.readouterr()
    newest = latest_checkpoint(tmp_path / "run")
    state, student = (newest / "state.json").read_text(), (newest / "student.safetensors").read_bytes()
    for damage, what in (((newest / "state.json"), "state.json is not valid JSON"),
                         ((newest / "student.safetensors"), "student.safetensors cannot be read"),
                         (None, "no file for student.safetensors")):
        if damage is None:
            (newest / "student.safetensors").unlink()
        else:
            damage.write_bytes(damage.read_bytes()[:60])
        for command in (["evaluate", "--checkpoint", str(tmp_path / "run")],
                        ["distill", "--config", str(config), "--quiet", "--resume"]):
            models_built.clear()
            assert main(command) == 2, (what, command)
            err = capsys.readouterr().err
            assert f"checkpoint {newest} is damaged ({what}" in err, err
            assert not models_built or damage is not None, command
        (newest / "state.json").write_text(state)
        (newest / "student.safetensors").write_bytes(student)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run")]) == 0


def test_console_script_is_installed():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "mpdistil_fast.cli", "distill", "--help"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--resume" in result.stdout and "--set" in result.stdout


def test_top_level_help_lists_every_flag_without_markup(capsys):
    """`mpdistil-fast --help` summarises each command with all of its flags, as plain text (no reST ``)."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out
    for flag in ("--data-dir DIR", "--output-dir DIR", "--quiet", "--checkpoint DIR", "--device cpu|cuda"):
        assert flag in out


def test_env_says_what_runs_here_and_why_not(capsys):
    from mpdistil_fast import backends

    assert main(["env", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    build = backends.cpu_kernel_build()
    assert f"loaded {build.isa} (torch CPU capability {build.capability})" in out
    for op in backends.FUSED_OPS:
        assert f"{op}: auto -> cpp\n  torch: available\n  cpp: available ({build.isa} build" in out
    assert "  cuda: unavailable: cuda runs on cuda tensors" in out
    if not torch.cuda.is_available():
        assert main(["env", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_env_reports_a_backend_override_that_cannot_run(capsys, monkeypatch):
    """MPDISTIL_BACKEND naming a backend that cannot run here: `env` (the tool to find out why) says so per op and
    still lists every backend's status, instead of ending in a traceback."""
    monkeypatch.setenv("MPDISTIL_BACKEND", "cuda")
    assert main(["env", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert ("kd_kl_div: auto -> refused: backend 'cuda' (from MPDISTIL_BACKEND=cuda) cannot run kd_kl_div here: "
            "cuda runs on cuda tensors") in out
    assert "  torch: available" in out


def test_a_missing_model_folder_is_a_config_error(tmp_path, teacher_dir, data_dir, capsys):
    """A teacher.model / student.model that can only be a folder (absolute, ./ or ../, ~) and is not there: exit 2
    naming the key, before anything loads -- also for evaluate, whose checkpoint came from a machine or folder where
    the run's teacher folder was (transformers took the path for a hub id and raised a traceback)."""
    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "kd")
    for override in ("teacher.model=/nonexistent/teacher", "student.model=../nonexistent-student",
                     "teacher.model=''"):
        assert main(["distill", "--config", str(config), "--quiet", "--set", override]) == 2, override
        err = capsys.readouterr().err
        assert "config error: " + override.split("=")[0] in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
    moved = tmp_path / "teacher-copy"
    shutil.copytree(teacher_dir, moved)
    assert main(["distill", "--config", str(config), "--quiet", "--set", "teacher_training.max_steps=1",
                 "student_training.max_steps=1", f"teacher.model={moved}"]) == 0
    capsys.readouterr()
    shutil.rmtree(moved)  # the checkpoint on a machine without the run's teacher folder
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "teacher.model" in err and str(moved) in err, err


def test_evaluate_names_metadistil_s_teacher_as_the_report_does(tmp_path, teacher_dir, data_dir, capsys, caplog):
    """After MetaDistil's stage the checkpoint's teacher is the meta-learned one, which the run's report calls
    ``teacher_final`` ("Teacher (final)"); evaluate gave its scores the fine-tuned teacher's column ("Teacher")."""
    from mpdistil_fast.pipeline.evaluation import evaluate_checkpoint

    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "metadistil")
    assert main(["distill", "--config", str(config), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    with caplog.at_level("WARNING"):
        evaluated = evaluate_checkpoint(tmp_path / "run")
    assert "--resume" not in caplog.text  # evaluate resumes nothing (it warned of a changed config)
    for task, models in evaluated["tasks"].items():
        assert set(models) == {"teacher_final", "student_final"}
        assert models == {role: report["tasks"][task][role] for role in models}


def test_evaluate_does_not_call_an_unfinished_run_s_student_final(tmp_path, teacher_dir, data_dir, capsys):
    """A checkpoint written before the run's last stage ended holds a student that is not the final one (here still
    the teacher's untrained layers): evaluate labelled it "Student (final)" all the same."""
    from mpdistil_fast.pipeline.checkpoint import checkpoint_dir
    from mpdistil_fast.pipeline.evaluation import evaluate_checkpoint

    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "kd",
                          data={"tasks": ["cb"]}, runtime={"keep_checkpoints": 10})
    assert main(["distill", "--config", str(config), "--quiet"]) == 0
    capsys.readouterr()
    mid_teacher = checkpoint_dir(tmp_path / "run", 2)  # inside the teacher's stage (3 steps, a checkpoint every 2)
    evaluated = evaluate_checkpoint(mid_teacher)
    assert set(evaluated["tasks"]["cb"]) == {"teacher", "student"} and not evaluated["finished"]
    assert evaluated["stage"] == "teacher" and evaluated["completed"] == []
    assert main(["evaluate", "--checkpoint", str(mid_teacher)]) == 0
    out = capsys.readouterr().out
    assert "an unfinished run's checkpoint (in stage teacher, stages done: none)" in out
    assert "Student (run unfinished)" in out and "Student (final)" not in out
    finished = evaluate_checkpoint(tmp_path / "run")
    assert set(finished["tasks"]["cb"]) == {"teacher", "student_final"} and finished["finished"]


def test_output_and_data_dirs_are_taken_verbatim(tmp_path, teacher_dir, data_dir):
    """--output-dir / --data-dir are folder names, not YAML: a name with ' #' (a YAML comment) was cut short, so the
    run wrote elsewhere, and a numeric one (2024) or one with ': ' was refused as not a string."""
    (tmp_path / "data #1").symlink_to(data_dir)
    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "unused", "finetune",
                          student_training={"max_steps": 1})
    for name in ("run #1", "2024", "exp: 2"):
        assert main(["distill", "--config", str(config), "--quiet", "--output-dir", str(tmp_path / name),
                     "--data-dir", str(tmp_path / "data #1")]) == 0, name
        assert (tmp_path / name / "report.json").is_file(), name
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["config"]["data"]["data_dir"] == str(tmp_path / "data #1")
    assert not (tmp_path / "run").exists() and not (tmp_path / "unused").exists()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "2024"), "--data-dir", str(tmp_path / "data #1")]) == 0


def test_resume_and_evaluate_refuse_data_that_changed_since_the_run(tmp_path, teacher_dir, data_dir, capsys,
                                                                    monkeypatch):
    """data.data_dir may change on --resume (the data moved), and evaluate reads the folder the run read: both went on
    with whatever rows they found there.  A run now records a fingerprint of each task's encoded splits; other rows
    under the same names are a config error (exit 2) before the models load, and --data-dir still scores on other
    data on purpose."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_dir / "superglue" / "CB", copy / "superglue" / "CB")
    config = write_config(tmp_path / "c.yaml", teacher_dir, copy, tmp_path / "run", "kd", data={"tasks": ["cb"]},
                          student_training={"max_steps": 1})
    assert main(["distill", "--config", str(config), "--quiet"]) == 0
    capsys.readouterr()
    validation = copy / "superglue" / "CB" / "val.jsonl"
    original = validation.read_text()
    rows = [json.loads(line) for line in original.splitlines()]
    relabel = {"entailment": "contradiction", "contradiction": "neutral", "neutral": "entailment"}
    validation.write_text("".join(json.dumps({**row, "label": relabel[row["label"]]}) + "\n" for row in rows))
    assert main(["distill", "--config", str(config), "--quiet", "--resume"]) == 2
    assert "--resume: the data differs from what the run read (cb validation: other files" in capsys.readouterr().err
    from mpdistil_fast.pipeline.trainer import Run

    built = []
    build_models = Run._build_models
    monkeypatch.setattr(Run, "_build_models", lambda run: built.append(1) or build_models(run))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run")]) == 2
    assert "the validation rows of cb found here differ from those the run read" in capsys.readouterr().err
    assert not built  # refused before the models load (a large teacher takes minutes to)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--data-dir", str(copy)]) == 0
    assert built
    validation.write_text(original)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run")]) == 0
    assert main(["distill", "--config", str(config), "--quiet", "--resume"]) == 0


def test_a_diverged_loss_stops_the_run_before_its_checkpoint(tmp_path, teacher_dir, data_dir, capsys, monkeypatch):
    """A NaN loss (a learning rate too high, fp16 overflow) made every weight NaN and the run went on to the end,
    checkpointing and scoring the broken model (argmax of NaN logits: a plausible-looking accuracy).  The run now
    stops at the step that logs it, with one line (exit 1), the NaN logged and no checkpoint of that step."""
    from mpdistil_fast.pipeline import stages
    from mpdistil_fast.pipeline.checkpoint import checkpoints_by_step
    from mpdistil_fast.pipeline.metrics_log import read_metrics

    calls = []
    cross_entropy = stages.cross_entropy

    def diverging(logits, labels):  # the teacher stage's loss, NaN from its second step on
        calls.append(1)
        return cross_entropy(logits, labels) * (math.nan if len(calls) >= 2 else 1.0)

    monkeypatch.setattr(stages, "cross_entropy", diverging)
    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "kd", data={"tasks": ["cb"]})
    assert main(["distill", "--config", str(config), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "mpdistil-fast: the teacher stage's training loss is not finite at its step 2 (loss = nan)" in err, err
    assert "Traceback" not in err
    records = read_metrics(tmp_path / "run")
    assert [(r["stage"], r["step"]) for r in records] == [("teacher", 1), ("teacher", 2)]
    assert math.isfinite(records[0]["loss"]) and math.isnan(records[1]["loss"])
    assert not checkpoints_by_step(tmp_path / "run")  # the step-2 checkpoint (checkpoint_every 2) is not written
    assert not (tmp_path / "run" / "report.json").exists()


def test_nan_logits_are_refused_not_scored(tmp_path, teacher_dir, data_dir, capsys):
    """Accuracy took the argmax of NaN logits (torch calls NaN the maximum): a model with NaN weights, say from a
    run that diverged before runs stopped on NaN losses, got a plausible-looking score.  A NaN logit row now
    stops the evaluation with one line (exit 1) naming the rows, task and split."""
    from safetensors.torch import load_file, save_file

    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "finetune",
                          data={"tasks": ["cb"]}, student_training={"max_steps": 1})
    assert main(["distill", "--config", str(config), "--quiet"]) == 0
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    newest = max((tmp_path / "run" / "checkpoints").iterdir())
    weights = load_file(newest / "student.safetensors")
    head = next(name for name in weights if "heads.cb" in name and name.endswith("bias"))
    weights[head][0] = math.nan
    save_file(weights, newest / "student.safetensors")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert re.search(r"the model's logits are NaN on (\d+) of \1 rows of cb's validation split", err), err
    assert "Traceback" not in err


def test_a_non_finite_hypergradient_stops_the_run_with_one_line(tmp_path, teacher_dir, data_dir, capsys,
                                                                 monkeypatch):
    """The bi-level engine's own checks (a NaN quiz loss here, in MetaDistil's pilot update) raised a bare
    FloatingPointError: a traceback on every rank, naming neither stage nor step.  The loop now stops the run with
    the divergence's one line (exit 1), as for a NaN loss it logs."""
    from mpdistil_fast.pipeline import stages

    cross_entropy, metadistil = stages.cross_entropy, stages.STAGE_FUNCTIONS["metadistil"]
    inside: list[bool] = []

    def nan_quiz_loss(logits, labels):  # the teacher's stage trains as usual
        return cross_entropy(logits, labels) * (math.nan if inside else 1.0)

    monkeypatch.setattr(stages, "cross_entropy", nan_quiz_loss)
    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "metadistil", lambda run: inside.append(True) or metadistil(run))
    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "metadistil",
                          data={"tasks": ["cb"]}, teacher_training={"max_steps": 1})
    assert main(["distill", "--config", str(config), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert ("mpdistil-fast: the metadistil stage's training loss or gradient is not finite at its step 1 "
            "(outer_loss is not finite (nan)") in err, err
    assert "Traceback" not in err


def test_errors_of_several_ranks_print_once_per_node(tmp_path, data_dir, monkeypatch, capsys):
    """Under a launcher every rank raises a config error alike: the first rank of each node prints it (a node that
    lacks a file says so), the others only exit with its status; an error that may be one rank's own (a file it
    reads alone) is printed by every rank, naming it."""
    import mpdistil_fast.cli as cli

    config = write_config(tmp_path / "c.yaml", tmp_path / "teacher", data_dir, tmp_path / "run", "kd")
    command = ["distill", "--config", str(config), "--set", "data.bogus=1"]
    for rank, local_rank, printed in (("1", "1", False), ("2", "0", True)):
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(command) == 2
        err = capsys.readouterr().err
        assert ("config error: unknown key 'data.bogus'" in err) is printed, err
        with pytest.raises(SystemExit):
            main([*command, "--bogus"])
        assert ("unrecognized arguments: --bogus" in capsys.readouterr().err) is printed

    def missing_shard(args):
        raise FileNotFoundError("checkpoint has no snapshot for rank 2")

    monkeypatch.setattr(cli, "distill", missing_shard)
    assert main(["distill", "--config", str(config)]) == 2
    assert capsys.readouterr().err == "mpdistil-fast: rank 2: checkpoint has no snapshot for rank 2\n"


def test_resume_without_a_checkpoint_says_so_also_when_quiet(tmp_path, teacher_dir, data_dir, caplog):
    """--resume that finds no checkpoint (e.g. a relative output_dir from another folder) starts from the beginning:
    --quiet (warnings only) hid that line, so a run the user believed resumed silently redid everything."""
    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "finetune",
                          student_training={"max_steps": 1})
    with caplog.at_level("WARNING"):  # what --quiet shows
        assert main(["distill", "--config", str(config), "--quiet", "--resume"]) == 0
    assert "--resume: no checkpoint in" in caplog.text


def test_a_hub_model_the_hub_cannot_serve_is_an_error_message(tmp_path, data_dir, monkeypatch, capsys):
    """A teacher named by a hub id, offline: one line and exit status 2 saying what to use instead (transformers'
    OSError was a traceback); a local folder's own OSError is not relabelled."""
    import transformers

    from mpdistil_fast.hub import HubUnavailableError
    from mpdistil_fast.models import load_backbone

    def offline(name, *args, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", offline)
    with pytest.raises(HubUnavailableError, match="could not load the model 'some-org/teacher' from the hub"):
        load_backbone("some-org/teacher")
    with pytest.raises(OSError, match="couldn't connect") as raised:
        load_backbone(tmp_path)  # a folder: its loading error stays transformers' own
    assert not isinstance(raised.value, HubUnavailableError)
    config = write_config(tmp_path / "c.yaml", tmp_path / "unused", data_dir, tmp_path / "run", "kd")
    text = config.read_text().replace(str(tmp_path / "unused"), "some-org/teacher")
    config.write_text(text)
    assert main(["distill", "--config", str(config), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "could not load the model 'some-org/teacher' from the hub" in error and "Offline, name a local" in error
    assert "Traceback" not in error


def test_distill_closes_its_runtime_also_when_the_run_fails(tmp_path, teacher_dir, data_dir, monkeypatch, capsys):
    """``distill`` closes the runtime when its run raises, in ``Run(...)`` (a refused output_dir: exit status 2) or
    in a stage (the error propagates), with ``failed=True``: a DeepSpeed rank then ends its process group without
    a barrier that ranks still running, or waiting in a collective, would never reach.  Nothing closed it before."""
    from mpdistil_fast.distributed import LocalRuntime
    from mpdistil_fast.pipeline.stages import STAGE_FUNCTIONS

    closed: list[bool] = []
    monkeypatch.setattr(LocalRuntime, "close", lambda self, *, failed=False: closed.append(failed))
    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "finetune",
                          student_training={"max_steps": 1})
    command = ["distill", "--config", str(config), "--quiet"]
    assert main(command) == 0
    assert closed == [False]
    assert main(command) == 2  # the output_dir holds that run
    assert "holds an earlier run" in capsys.readouterr().err
    assert closed == [False, True]

    def failing_stage(run) -> None:
        raise RuntimeError("the student stage failed")

    monkeypatch.setitem(STAGE_FUNCTIONS, "student", failing_stage)
    with pytest.raises(RuntimeError, match="the student stage failed"):
        main([*command, "--overwrite"])
    assert closed == [False, True, True]


def test_a_failed_run_closes_its_metrics_logger(tmp_path, teacher_dir, data_dir, monkeypatch, caplog):
    """A run that raises closes its metrics logger: metrics.jsonl's handle and the TensorBoard writer (its thread, and
    the events it has not written yet, flushed), which were left open to interpreter exit before; the run's own
    error propagates, also when a file does not close (that is logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from mpdistil_fast.pipeline.stages import STAGE_FUNCTIONS

    runs = []

    def failing_stage(run) -> None:
        runs.append(run)
        run.metrics.log("student", 1, {"loss": 0.5})
        raise RuntimeError("the student stage failed")

    monkeypatch.setitem(STAGE_FUNCTIONS, "student", failing_stage)
    config = write_config(tmp_path / "c.yaml", teacher_dir, data_dir, tmp_path / "run", "finetune",
                          runtime={"tensorboard": True})
    with pytest.raises(RuntimeError, match="the student stage failed"):
        main(["distill", "--config", str(config), "--quiet"])
    assert runs[-1]._metrics._file is None and runs[-1]._metrics._writer is None
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [scalar.value for scalar in events.Scalars("student/loss")] == [0.5]

    close = SummaryWriter.close

    def unwritable(self) -> None:
        close(self)
        raise OSError("No space left on device")

    monkeypatch.setattr(SummaryWriter, "close", unwritable)
    with caplog.at_level("ERROR"), pytest.raises(RuntimeError, match="the student stage failed"):
        main(["distill", "--config", str(config), "--quiet", "--overwrite"])
    assert "closing the TensorBoard writer" in caplog.text and "No space left on device" in caplog.text
    assert runs[-1]._metrics._file is None


def test_a_run_s_relative_model_folder_is_found_from_any_directory(tmp_path, teacher_dir, data_dir, monkeypatch):
    """A relative teacher.model (``models/teacher``, a name a hub id could have too) is read from the current
    directory, as data.data_dir and output_dir are, and the run's config names it absolute: ``evaluate`` from another
    directory scores the run (it took the name for a hub id: offline, exit status 2), and ``--resume`` continues the
    run, also from a checkpoint that names the folder relative (as runs saved it before): that is no config change."""
    base = tmp_path.resolve()
    shutil.copytree(teacher_dir, base / "models" / "teacher")
    write_config(base / "c.yaml", Path("models/teacher"), data_dir, Path("run"), "kd",
                 teacher_training={"max_steps": 1}, student_training={"max_steps": 1})
    monkeypatch.chdir(base)
    assert main(["distill", "--config", "c.yaml", "--quiet"]) == 0
    (base / "elsewhere").mkdir()
    monkeypatch.chdir(base / "elsewhere")
    assert main(["evaluate", "--checkpoint", str(base / "run")]) == 0
    report = json.loads((base / "run" / "report.json").read_text())
    assert report["config"]["teacher"]["model"] == str(base / "models" / "teacher")
    monkeypatch.chdir(base)
    assert main(["distill", "--config", "c.yaml", "--quiet", "--resume"]) == 0
    state_file = base / "run" / "checkpoints" / sorted(os.listdir(base / "run" / "checkpoints"))[-1] / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["teacher"]["model"] = "models/teacher"
    state_file.write_text(json.dumps(state))
    assert main(["distill", "--config", "c.yaml", "--quiet", "--resume"]) == 0
