"""Resume after kill: a run SIGKILLed mid-stage and resumed ends in exactly the state of an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mpdistil_fast.pipeline.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from mpdistil_fast.pipeline.config import ConfigError, load_config
from mpdistil_fast.pipeline.trainer import Run, take_floating_dtype
from pipeline_helpers import make_tiny_teacher, restore_torch_threads, write_config  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
LONGER = {"teacher_training": {"max_steps": 2}, "student_training": {"max_steps": 5},
          "meta_teacher": {"training": {"max_steps": 4}}, "curriculum": {"episodes": 2, "steps_per_episode": 3},
          "runtime": {"checkpoint_every": 2, "keep_checkpoints": 2}}


def _final_state(run_dir: Path) -> tuple[dict, dict]:
    tensors, state = load_checkpoint(latest_checkpoint(run_dir))
    return tensors, state


def _wait_for_mid_stage_checkpoint(run_dir: Path, process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for checkpoint in list_checkpoints(run_dir):
            stage = json.loads((checkpoint / "state.json").read_text())["stage"]
            if stage in ("student", "meta_teacher"):
                return stage
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed:\n{process.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no mid-stage checkpoint appeared")


def test_killed_run_resumes_to_the_uninterrupted_state(tmp_path, data_dir):
    teacher = make_tiny_teacher(tmp_path / "teacher")
    reference_cfg = write_config(tmp_path / "ref.yaml", teacher, data_dir, tmp_path / "reference", "mpdistil",
                                 **LONGER)
    killed_cfg = write_config(tmp_path / "killed.yaml", teacher, data_dir, tmp_path / "killed", "mpdistil", **LONGER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "mpdistil_fast.cli", "distill", "--config", str(killed_cfg), "--quiet"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stage = _wait_for_mid_stage_checkpoint(tmp_path / "killed", process, timeout=180)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "report.json").exists()
    killed_at = json.loads((latest_checkpoint(tmp_path / "killed") / "state.json").read_text())
    assert killed_at["stage"] is not None or stage  # it died inside the run, after a mid-stage checkpoint

    resumed = subprocess.run(command[:-1] + ["--set", "runtime.progress=false", "--resume"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "loaded checkpoint" in resumed.stderr

    Run(load_config(reference_cfg)).run()  # uninterrupted, in this process (same runtime.num_threads)

    ref_tensors, ref_state = _final_state(tmp_path / "reference")
    got_tensors, got_state = _final_state(tmp_path / "killed")
    assert ref_state["completed"] == got_state["completed"] == ["teacher", "student", "meta_teacher", "curriculum"]
    assert ref_state["global_step"] == got_state["global_step"]
    assert ref_tensors.keys() == got_tensors.keys()
    for component in ref_tensors:
        assert ref_tensors[component].keys() == got_tensors[component].keys(), component
        for name, value in ref_tensors[component].items():
            assert torch.equal(value, got_tensors[component][name]), f"{component}/{name} differs after resume"
    ref_report = json.loads((tmp_path / "reference" / "report.json").read_text())
    got_report = json.loads((tmp_path / "killed" / "report.json").read_text())
    assert ref_report["tasks"] == got_report["tasks"]
    assert ref_report["curves"] == got_report["curves"]
    assert _metric_records(tmp_path / "killed") == _metric_records(tmp_path / "reference")


def test_resume_without_checkpoint_starts_fresh(tmp_path, data_dir, caplog):
    teacher = make_tiny_teacher(tmp_path / "teacher")
    config = load_config(write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "run", "finetune"))
    with caplog.at_level("INFO", logger="mpdistil_fast"):
        report = Run(config, resume=True).run()
    assert "no checkpoint" in caplog.text
    assert set(report["tasks"]) == {"cb", "rte"}
    # resuming a finished run redoes nothing and gives the same report
    again = Run(config, resume=True).run()
    assert again["tasks"] == report["tasks"]


def _metric_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def test_a_resumed_run_reports_the_time_of_every_process(tmp_path, data_dir):
    """After --resume each timing of the report adds what the earlier processes measured up to the checkpoint
    (recorded in it) to this process's: the data and models it loaded too, the stage resumed in and the teacher
    cache's counts (only the last process's before), and the report says how much came from earlier processes.  A
    checkpoint written before the cache's counts were recorded resumes too."""
    teacher = make_tiny_teacher(tmp_path / "teacher")
    settings = {**LONGER, "runtime": {"checkpoint_every": 2, "keep_checkpoints": 100}}
    run_dir = tmp_path / "run"
    config = load_config(write_config(tmp_path / "c.yaml", teacher, data_dir, run_dir, "kd", **settings))
    Run(config).run()
    mid = next(c for c in list_checkpoints(run_dir) if json.loads((c / "state.json").read_text())["stage"] == "student")
    # a slow earlier process, killed inside the student's stage
    earlier = {"data": 1000.0, "models": 2000.0, "teacher": 3000.0, "student": 4000.0, "teacher_cache_spent": 500.0,
               "teacher_cache_saved": 600.0}

    def resume_from_mid(timings: dict[str, float]) -> dict:
        state = json.loads((mid / "state.json").read_text())
        for later in list_checkpoints(run_dir)[list_checkpoints(run_dir).index(mid) + 1:]:
            shutil.rmtree(later)
        (mid / "state.json").write_text(json.dumps({**state, "timings": timings}))
        (run_dir / "report.json").unlink()
        return Run(config, resume=True).run()

    report = resume_from_mid(earlier)
    timings = report["timings"]
    for phase in ("data", "models", "student", "teacher_cache_spent"):
        assert earlier[phase] < timings[phase] < earlier[phase] + 60, (phase, timings)
    assert abs(timings["teacher_cache_saved"] - earlier["teacher_cache_saved"]) < 60
    assert timings["teacher"] == earlier["teacher"]  # finished before the checkpoint
    assert report["timings_earlier_processes"] == earlier
    assert "final_evaluation" in timings and "final_evaluation" not in report["timings_earlier_processes"]
    assert _final_state(run_dir)[1]["timings"]["data"] == pytest.approx(timings["data"], abs=1e-3)  # for a next resume
    markdown = (run_dir / "report.md").read_text()
    assert "A resumed run:" in markdown and "| phase | seconds | earlier processes |" in markdown
    assert "| teacher | 3000.0 | 3000.0 |" in markdown and "| final_evaluation |" in markdown

    older = {k: v for k, v in earlier.items() if not k.startswith("teacher_cache")}  # predates the cache's counts
    report = resume_from_mid(older)
    assert report["timings_earlier_processes"] == older
    assert 0 < report["timings"]["teacher_cache_spent"] < 60 and report["timings"]["data"] > earlier["data"]


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, data_dir):
    """A run killed after logging past its last checkpoint redoes those steps: each record must appear once."""
    teacher = make_tiny_teacher(tmp_path / "teacher")
    settings = {**LONGER, "runtime": {"checkpoint_every": 2, "keep_checkpoints": 100, "log_every": 1}}
    config = load_config(write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "run", "kd", **settings))
    Run(config).run()
    reference = _metric_records(tmp_path / "run")
    checkpoints = list_checkpoints(tmp_path / "run")
    mid = next(i for i, c in enumerate(checkpoints) if json.loads((c / "state.json").read_text())["stage"] == "student")
    for later in checkpoints[mid + 1:]:  # as if the kill came right after the records of the later steps
        shutil.rmtree(later)
    (tmp_path / "run" / "report.json").unlink()
    assert len(_metric_records(tmp_path / "run")) == len(reference)

    Run(config, resume=True).run()
    assert _metric_records(tmp_path / "run") == reference


def test_resume_restores_each_module_s_train_or_eval_mode(tmp_path, data_dir):
    """``reference_compat`` keeps dropout off after the first evaluation, so the run's modules are in modes a fresh
    build does not give (``from_pretrained`` eval, new heads train): resumed inside the meta-teacher stage, the
    run must still end in the uninterrupted run's state (43 tensors differed when the modes were not saved)."""
    teacher = make_tiny_teacher(tmp_path / "teacher")
    settings = {**LONGER, "runtime": {"checkpoint_every": 1, "keep_checkpoints": 100}}
    config = load_config(write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "reference", "mpdistil",
                                      reference_compat=True, **settings))
    Run(config).run()
    reference, _ = _final_state(tmp_path / "reference")
    mid = next(c for c in list_checkpoints(tmp_path / "reference")
               if json.loads((c / "state.json").read_text())["stage"] == "meta_teacher")
    shutil.copytree(mid, tmp_path / "resumed" / "checkpoints" / mid.name)
    shutil.copy(tmp_path / "reference" / "metrics.jsonl", tmp_path / "resumed" / "metrics.jsonl")
    config.output_dir = str(tmp_path / "resumed")
    Run(config, resume=True).run()
    resumed, _ = _final_state(tmp_path / "resumed")
    differing = [f"{component}/{name}" for component, values in reference.items() for name, value in values.items()
                 if not torch.equal(value, resumed[component][name])]
    assert not differing, differing
    assert _metric_records(tmp_path / "resumed") == _metric_records(tmp_path / "reference")


def test_a_rebuilt_model_takes_its_checkpoint_s_dtype():
    """A DeepSpeed engine casts its module to bf16; resumed after its stage (the curriculum's meta-teachers get no
    engine again) the rebuilt fp32 model is cast back, so it computes as it did; mixed dtypes are left alone."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    take_floating_dtype(model, {name: value.bfloat16() for name, value in model.state_dict().items()})
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    take_floating_dtype(model, {"0.weight": torch.zeros(2, 3), "1.weight": torch.zeros(2, dtype=torch.float64)})
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


def test_resume_before_the_first_checkpoint_drops_the_killed_run_s_metrics(tmp_path, data_dir):
    """Killed after logging but before its first checkpoint, ``--resume`` starts from the beginning: the records the
    killed run logged (metrics.jsonl and TensorBoard) are redone, so they must not stay beside the new ones."""
    teacher = make_tiny_teacher(tmp_path / "teacher")
    config = load_config(write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "run", "finetune",
                                      runtime={"tensorboard": True}))
    Run(config).run()
    reference = _metric_records(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if killed after logging, before any checkpoint
    for name in ("report.json", "report.md", "curves.png"):
        (tmp_path / "run" / name).unlink()
    Run(config, resume=True).run()
    assert _metric_records(tmp_path / "run") == reference
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # the killed run's events were replaced, not kept beside the new ones


def test_resume_refuses_a_config_that_changes_what_the_run_computes(tmp_path, data_dir, capsys):
    """``--resume`` with other tasks, layers or method cannot continue the checkpoint's run: exit 2 naming the keys,
    before anything loads (a state dict mismatch traceback, or a report under the new method's name over the old
    method's models); keys that only say how the run logs, checkpoints or where it finds its data are accepted."""
    from mpdistil_fast.cli import main

    teacher = make_tiny_teacher(tmp_path / "teacher")
    config = write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "run", "kd",
                          teacher_training={"max_steps": 1}, student_training={"max_steps": 1})
    assert main(["distill", "--config", str(config), "--quiet"]) == 0
    report = (tmp_path / "run" / "report.json").read_text()
    for overrides, keys in ((["data.tasks=[cb]"], "data.tasks"), (["method=pkd"], "method"),
                            (["student.num_layers=3", "seed=1"], "seed, student.num_layers")):
        capsys.readouterr()
        assert main(["distill", "--config", str(config), "--quiet", "--resume", "--set", *overrides]) == 2, overrides
        err = capsys.readouterr().err
        assert f"config error: --resume: the config differs from the checkpoint's in {keys} " in err, err
        assert "Traceback" not in err
    assert (tmp_path / "run" / "report.json").read_text() == report
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run", moved)
    assert main(["distill", "--config", str(config), "--quiet", "--resume", "--output-dir", str(moved),
                 "--set", "runtime.log_every=5", "runtime.checkpoint_every=7", "runtime.keep_checkpoints=1",
                 "runtime.tensorboard=true", "data.eval_batch_size=4", f"data.data_dir={data_dir}/."]) == 0


def test_resume_leaves_the_ranks_shards_to_their_ranks(tmp_path, data_dir, monkeypatch):
    """``shards/`` holds every rank's part (a ZeRO-3 best snapshot: one file per rank), which each rank reads for
    itself (``load_sharded``); loading the checkpoint's components read all of them on every rank as well, so each
    rank held the whole snapshot (W files of 1/W) until the stage restored it."""
    import safetensors.torch

    teacher = make_tiny_teacher(tmp_path / "teacher")
    config = load_config(write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "run", "finetune"))
    Run(config).run()
    newest = latest_checkpoint(tmp_path / "run")
    (newest / "shards" / "best").mkdir(parents=True)
    for rank in range(2):
        safetensors.torch.save_file({"w": torch.zeros(3)},
                                    str(newest / "shards" / "best" / f"rank{rank:05d}.safetensors"))
    read = []
    real_load_file = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file",
                        lambda path, *a, **k: read.append(path) or real_load_file(path, *a, **k))
    Run(config, resume=True)
    assert read and not [path for path in read if "shards" in Path(path).parts], read


def test_resume_refuses_another_number_of_ranks(tmp_path, data_dir):
    """A checkpoint continues exactly only with the ranks that wrote it (each epoch leaves out len % ranks rows, the
    partitioned optimizer and snapshot files are per rank): another count is refused before anything loads, instead
    of resuming on other batches (or failing inside DeepSpeed's loader)."""
    teacher = make_tiny_teacher(tmp_path / "teacher")
    config = load_config(write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "run", "finetune"))
    Run(config).run()
    newest = latest_checkpoint(tmp_path / "run")
    state = json.loads((newest / "state.json").read_text())
    assert state["world_size"] == 1
    state["world_size"] = 2  # as written by a two-rank run
    (newest / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"--resume: the checkpoint .* was written by 2 ranks, this run has 1"):
        Run(config, resume=True)
    del state["world_size"]  # a checkpoint that predates the record resumes as before
    (newest / "state.json").write_text(json.dumps(state))
    Run(config, resume=True)


def test_a_curriculum_resumes_mid_episode_and_from_the_stage_boundary(tmp_path, data_dir):
    """Resumed inside an episode (its actions and rewards so far, the policy and its optimizer come from the
    checkpoint) or from the checkpoint between the meta-teacher's stage and the curriculum (whose RNG state draws
    the policy's initial weights and first actions), the run ends in the uninterrupted run's state: the same
    weights, rewards and actions.  The kill tests above resume inside the student or meta-teacher stage only."""
    teacher = make_tiny_teacher(tmp_path / "teacher")
    settings = {**LONGER, "runtime": {"checkpoint_every": 1, "keep_checkpoints": 100}}
    config = load_config(write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "reference", "mpdistil",
                                      **settings))
    Run(config).run()
    reference, _ = _final_state(tmp_path / "reference")
    reference_report = json.loads((tmp_path / "reference" / "report.json").read_text())
    states = {c: json.loads((c / "state.json").read_text()) for c in list_checkpoints(tmp_path / "reference")}
    resume_points = {
        "mid_episode": next(c for c, s in states.items() if s["stage"] == "curriculum" and s["step"] == 2),
        "stage_boundary": next(c for c, s in states.items() if s["stage"] is None and s["completed"] == [
            "teacher", "student", "meta_teacher"])}
    saved = json.loads((resume_points["mid_episode"] / "state.json").read_text())["meta"]
    assert saved.get("policy", {}).get("episode"), "the mid-episode checkpoint holds no curriculum episode"
    for name, checkpoint in resume_points.items():
        shutil.copytree(checkpoint, tmp_path / name / "checkpoints" / checkpoint.name)
        shutil.copy(tmp_path / "reference" / "metrics.jsonl", tmp_path / name / "metrics.jsonl")
        config.output_dir = str(tmp_path / name)
        Run(config, resume=True).run()
        resumed, _ = _final_state(tmp_path / name)
        differing = [f"{component}/{key}" for component, values in reference.items() for key, value in values.items()
                     if not torch.equal(value, resumed[component][key])]
        assert not differing, (name, differing)
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["curves"] == reference_report["curves"], name
        assert report["tasks"] == reference_report["tasks"], name
