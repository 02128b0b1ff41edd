"""runtime.kind deepspeed: config checks, the data-parallel batch split, and real two-rank MPDistil runs (torchrun,
gloo on CPU) that must match the one-process run step for step and resume exactly from a checkpoint inside any of
its four stages."""
from __future__ import annotations

import base64
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

from mpdistil_fast.distributed import LocalRuntime
from mpdistil_fast.distributed.deepspeed_runtime import DeepSpeedRuntime, load_deepspeed_config
from mpdistil_fast.models import default_teacher_path, load_tokenizer, tiny_backbone
from mpdistil_fast.pipeline.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from mpdistil_fast.pipeline.config import ConfigError, load_config
from mpdistil_fast.pipeline.evaluation import evaluate_checkpoint
from pipeline_helpers import make_tiny_teacher, restore_torch_threads, write_config  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("teacher", "student", "meta_teacher", "curriculum")


# ----------------------------------------------------------------------------------------------- config checks

@pytest.mark.parametrize("config, message", [
    ({"optimizer": {"type": "AdamW"}}, "optimizer and its schedule come from the YAML"),
    ({"scheduler": {"type": "WarmupLR"}}, "optimizer and its schedule come from the YAML"),
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3; the student runs stages 0-2"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4"),
    # the first rank of each node would write the engine's module file into the shared output_dir at once
    ({"checkpoint": {"use_node_local_storage": True}}, "checkpoint.use_node_local_storage: checkpoints go into"),
])
def test_deepspeed_config_refusals(config, message):
    with pytest.raises(ValueError, match=message):
        load_deepspeed_config(config, name="student")


def test_deepspeed_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="runtime.deepspeed_teacher names"):
        load_deepspeed_config(str(tmp_path / "missing.json"), name="teacher")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_deepspeed_config(str(tmp_path / "list.json"), name="teacher")
    shipped = ROOT / "configs" / "deepspeed"
    assert load_deepspeed_config(str(shipped / "zero2.json"), name="student")["zero_optimization"]["stage"] == 2
    assert load_deepspeed_config(str(shipped / "zero3.json"), name="teacher")["zero_optimization"]["stage"] == 3


def test_config_validation_for_deepspeed(tmp_path, data_dir):
    teacher = make_tiny_teacher(tmp_path / "teacher")  # (a missing teacher folder is a config error of its own)
    path = write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "run", "mpdistil")
    assert load_config(path, ["runtime.kind=deepspeed"]).runtime.kind == "deepspeed"
    (tmp_path / "z0-bf16.json").write_text(json.dumps({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}))
    (tmp_path / "z2-fp16.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}))
    fp16_student = f"runtime.deepspeed_student={tmp_path / 'z2-fp16.json'}"
    for overrides, message in ((["method=metadistil", fp16_student],
                                "deepspeed_student trains in fp16, which needs loss scaling"),
                               (["meta_teacher.bilevel=true", fp16_student], "bi-level passes of meta_teacher"),
                               (["method=metadistil", "metadistil.hypergradient=exact"],
                                "metadistil.hypergradient 'exact' differentiates through the inner gradient"),
                               (["meta_teacher.bilevel=true", "meta_teacher.hypergradient=exact"],
                                "meta_teacher.hypergradient 'exact'"),
                               (["reference_compat=true"], "does not run reference_compat")):
        with pytest.raises(ConfigError, match=message):
            load_config(path, ["runtime.kind=deepspeed", *overrides])
    # the first-order hypergradients run under DeepSpeed (every student stage exposes its AdamW state)
    assert load_config(path, ["runtime.kind=deepspeed", "method=metadistil"]).method == "metadistil"
    assert load_config(path, ["runtime.kind=deepspeed", "method=metadistil",
                              f"runtime.deepspeed_student={tmp_path / 'z0-bf16.json'}"]).method == "metadistil"
    assert load_config(path, ["runtime.kind=deepspeed", "meta_teacher.bilevel=true"]).meta_teacher.bilevel
    assert load_config(path, ["runtime.kind=deepspeed", fp16_student]).runtime.deepspeed_student  # no bi-level pass
    path = write_config(tmp_path / "k.yaml", teacher, data_dir, tmp_path / "run", "kd")
    with pytest.raises(ConfigError, match="runtime.deepspeed_student names"):
        load_config(path, ["runtime.kind=deepspeed", f"runtime.deepspeed_student={tmp_path / 'none.json'}"])
    (tmp_path / "z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="ZeRO stage 3; the student"):
        load_config(path, ["runtime.kind=deepspeed", f"runtime.deepspeed_student={tmp_path / 'z3.json'}"])
    config = load_config(path, ["runtime.kind=deepspeed", f"runtime.deepspeed_teacher={tmp_path / 'z3.json'}",
                                "runtime.teacher_cache=disk"])  # the ranks share the cache's folder
    assert config.runtime.deepspeed_teacher.endswith("z3.json")


def test_the_batch_must_split_evenly_over_the_ranks(tmp_path, data_dir):
    """Every rank steps on an equal share of each batch (no row repeated to fill a share, where it would count
    twice in the step's mean gradient): a batch size the ranks do not divide is refused before anything loads."""
    from mpdistil_fast.pipeline.trainer import Run

    class TwoRanks:
        world_size, rank, is_main = 2, 0, True

    config = load_config(write_config(tmp_path / "c.yaml", tmp_path / "no-teacher", data_dir, tmp_path / "run", "kd",
                                      data={"batch_size": 7}), check_data=False)  # (no teacher folder needed)
    with pytest.raises(ConfigError, match="data.batch_size 7 is not a multiple of the 2 ranks"):
        Run(config, runtime=TwoRanks())



def test_a_split_smaller_than_the_ranks_is_refused_by_name(tmp_path, data_dir):
    """A training or quiz stream must give each rank a row of every batch: a split with fewer rows than ranks is
    refused when the data loads, naming the task and split (not deep inside a stage)."""
    from mpdistil_fast.pipeline.trainer import Run

    class SixtyFourRanks(LocalRuntime):
        world_size = 64

    teacher = make_tiny_teacher(tmp_path / "teacher")
    config = load_config(write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "run", "kd",
                                      data={"batch_size": 64, "max_train": 100, "max_eval": 16}))
    with pytest.raises(ConfigError, match="task 'cb': its quiz split has 16 rows, fewer than the 64 ranks"):
        Run(config, runtime=SixtyFourRanks("cpu"))


def test_resume_warnings_come_from_rank_0_alone(tmp_path, data_dir, caplog):
    """--resume's warnings (a changed key, no checkpoint to continue from) hold on every rank alike: rank 0 says them,
    once (every rank of a launch printed them before)."""
    from mpdistil_fast.pipeline.trainer import Run

    class SecondRank(LocalRuntime):
        rank = 1

        @property
        def is_main(self) -> bool:
            return False

    teacher = make_tiny_teacher(tmp_path / "teacher")
    done = write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "run", "finetune",
                        data={"tasks": ["cb"]}, student_training={"max_steps": 1})
    Run(load_config(done)).run()
    empty = write_config(tmp_path / "e.yaml", teacher, data_dir, tmp_path / "empty", "finetune", data={"tasks": ["cb"]})
    for runtime, warns in ((SecondRank("cpu"), False), (LocalRuntime("cpu"), True)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            Run(load_config(done, ["runtime.log_every=5"]), resume=True, runtime=runtime)
            Run(load_config(empty), resume=True, runtime=runtime)
        assert ("--resume: continuing with runtime.log_every changed" in caplog.text) is warns, caplog.text
        assert ("--resume: no checkpoint in" in caplog.text) is warns, caplog.text


def test_an_mpi_launch_without_torch_s_variables_is_refused(monkeypatch):
    """DeepSpeed's MPI/Slurm runners set no RANK/WORLD_SIZE: each process would otherwise run alone as rank 0."""
    pytest.importorskip("deepspeed")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="one of several started by MPI or Slurm"):
        DeepSpeedRuntime({"teacher": {}, "student": {}})


def test_cli_accepts_the_deepspeed_launcher_s_local_rank():
    from mpdistil_fast.cli import _parser

    for flag in ("--local_rank=1", "--local-rank=1"):  # where `deepspeed --module` puts it: before the command
        args = _parser().parse_args([flag, "distill", "--config", "c.yaml"])
        assert (args.local_rank, args.command, args.config) == (1, "distill", "c.yaml")


# ----------------------------------------------------------------------------------------------- unused task heads

class Heads(torch.nn.Module):
    """A trunk (nested in a ModuleDict, like the student inside its objective) and one head per task."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.parts = torch.nn.ModuleDict({"trunk": torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6)),
                                          "heads": torch.nn.ModuleDict({"a": torch.nn.Linear(6, 3),
                                                                        "b": torch.nn.Linear(6, 2)})})

    def forward(self, x, task):
        return self.parts["heads"][task](self.parts["trunk"](x))


def test_parameter_groups_give_each_module_dict_entry_its_own():
    from mpdistil_fast.distributed.runtime import parameter_groups

    model = Heads()
    groups = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [([names[id(p)] for p in g["params"]], g["weight_decay"]) for g in groups] == [
        (["parts.trunk.0.weight"], 0.1), (["parts.trunk.0.bias", "parts.trunk.1.weight", "parts.trunk.1.bias"], 0.0),
        (["parts.heads.a.weight"], 0.1), (["parts.heads.a.bias"], 0.0),
        (["parts.heads.b.weight"], 0.1), (["parts.heads.b.bias"], 0.0)]
    model.parts["trunk"][0].requires_grad_(False)  # frozen parameters are left out, and so are empty groups
    assert [len(g["params"]) for g in parameter_groups(model, 0.1)] == [2, 1, 1, 1, 1]


def _zero_filled_step(optimizer: torch.optim.Optimizer) -> None:
    """A step the way a DeepSpeed engine takes it: every parameter gets a gradient, zeros where none arrived."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_unused_group_guard_keeps_torch_s_rule_under_zero_gradients():
    """Steps on a, a, b, a (then a checkpoint round trip and two more): with the guard, an optimizer handed zero
    gradients for the idle head ends bit-identical to torch's AdamW that skips it; without, the idle head moves."""
    from mpdistil_fast.distributed.runtime import OptimizerSpec, build_optimizer
    from mpdistil_fast.distributed.unused_groups import UnusedGroupGuard

    spec = OptimizerSpec(lr=1e-2, total_steps=10, weight_decay=0.1)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    reference, guarded, unguarded = Heads(), Heads(), Heads()
    optimizers = [build_optimizer(m, spec) for m in (reference, guarded, unguarded)]
    guard = UnusedGroupGuard(optimizers[1], [g["params"] for g in optimizers[1].param_groups])
    for task in "aaba":
        for model in (reference, guarded, unguarded):
            model(x, task).pow(2).sum().backward()
        optimizers[0].step()
        optimizers[0].zero_grad(set_to_none=True)
        with guard.step() as skipped:
            _zero_filled_step(optimizers[1])
        assert skipped == ([4, 5] if task == "a" else [2, 3])
        _zero_filled_step(optimizers[2])
    for (name, ours), theirs in zip(guarded.named_parameters(), reference.parameters()):
        assert torch.equal(ours, theirs), name
    assert not torch.equal(unguarded.parts["heads"]["b"].weight, reference.parts["heads"]["b"].weight)
    # a head that no step used yet keeps AdamW's fresh state (zeros, step 0), so checkpoints hold every group
    fresh = Heads()
    fresh_optimizer = build_optimizer(fresh, spec)
    fresh_guard = UnusedGroupGuard(fresh_optimizer, [g["params"] for g in fresh_optimizer.param_groups])
    fresh(x, "a").sum().backward()
    with fresh_guard.step():
        _zero_filled_step(fresh_optimizer)
    idle = fresh_optimizer.state[fresh.parts["heads"]["b"].weight]
    assert int(idle["step"]) == 0 and not idle["exp_avg"].any() and not idle["exp_avg_sq"].any()
    # untouched(): a step taken inside (DeepSpeed's ZeRO-0 bf16 wrapper takes one while it is built) is undone
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    with fresh_guard.untouched():
        _zero_filled_step(fresh_optimizer)
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())
    assert int(fresh_optimizer.state[fresh.parts["trunk"][0].weight]["step"]) == 1  # as after its one real step
    restored = Heads()
    restored_optimizer = build_optimizer(restored, spec)
    restored.load_state_dict(guarded.state_dict())
    restored_optimizer.load_state_dict(optimizers[1].state_dict())
    restored_guard = UnusedGroupGuard(restored_optimizer, [g["params"] for g in restored_optimizer.param_groups])
    for task in "bb":
        for model in (reference, restored):
            model(x, task).pow(2).sum().backward()
        optimizers[0].step()
        optimizers[0].zero_grad(set_to_none=True)
        with restored_guard.step():
            _zero_filled_step(restored_optimizer)
    for (name, ours), theirs in zip(restored.named_parameters(), reference.parameters()):
        assert torch.equal(ours, theirs), name
    guard.remove()
    guarded(x, "a").sum().backward()  # removed: nothing is recorded any more
    with guard.step() as skipped:
        assert skipped == list(range(6))
    with pytest.raises(ValueError, match="groups has 1 entries for an optimizer with 6"):
        UnusedGroupGuard(optimizers[0], [list(reference.parameters())])


def test_unused_group_guard_warns_once_about_a_group_used_in_part():
    from mpdistil_fast.distributed.runtime import OptimizerSpec, build_optimizer
    from mpdistil_fast.distributed.unused_groups import UnusedGroupGuard

    model = Heads()
    model.parts["trunk"].append(torch.nn.Linear(6, 6))  # in the trunk's groups, but the forward below skips it
    optimizer = build_optimizer(model, OptimizerSpec(lr=1e-2, total_steps=4))
    guard = UnusedGroupGuard(optimizer, [g["params"] for g in optimizer.param_groups],
                             names={id(p): n for n, p in model.named_parameters()})
    x = torch.randn(3, 4)
    for first in (True, False):
        model.parts["heads"]["a"](model.parts["trunk"][1](model.parts["trunk"][0](x))).sum().backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with guard.step() as skipped:
                _zero_filled_step(optimizer)
        assert skipped == [4, 5]
        assert [str(w.message).split(" in a step")[0] for w in caught] == ([
            "no gradient reached ['parts.trunk.2.weight']", "no gradient reached ['parts.trunk.2.bias']"]
            if first else [])
        assert all("give them a group of their own" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------------------------- the batch split

def _ranks(world_size: int) -> list[DeepSpeedRuntime]:
    """Runtimes of every rank, without a process group (local_rows reads only rank and world_size)."""
    runtimes = []
    for rank in range(world_size):
        runtime = object.__new__(DeepSpeedRuntime)
        runtime.rank, runtime.world_size = rank, world_size
        runtimes.append(runtime)
    return runtimes


@pytest.mark.parametrize("rows, world_size", [(8, 2), (12, 4), (3, 3), (16, 8), (6, 1)])
def test_local_rows_split_a_batch_over_the_ranks(rows, world_size):
    batch = {"input_ids": torch.arange(rows * 5).reshape(rows, 5), "labels": torch.arange(rows), "task": "cb"}
    slices = [runtime.local_rows(batch) for runtime in _ranks(world_size)]
    assert [len(s["labels"]) for s in slices] == [rows // world_size] * world_size
    assert all(s["task"] == "cb" for s in slices)
    labels = torch.cat([s["labels"] for s in slices])
    ids = torch.cat([s["input_ids"] for s in slices])
    assert torch.equal(ids, batch["input_ids"][labels])  # rows stay aligned across keys
    assert torch.equal(labels, torch.arange(rows))  # contiguous, in order, each row once


@pytest.mark.parametrize("rows, world_size", [(7, 2), (2, 4), (9, 4)])
def test_local_rows_refuse_a_batch_that_does_not_divide(rows, world_size):
    """Padding a rank's share with repeated rows would count them twice in the step's mean gradient: the training
    streams drop an epoch's remainder instead (row_multiple), and anything else is refused."""
    batch = {"input_ids": torch.zeros(rows, 5), "labels": torch.arange(rows)}
    with pytest.raises(ValueError, match=f"{rows} rows does not split over {world_size} ranks"):
        _ranks(world_size)[0].local_rows(batch)


class HalvingRuntime(LocalRuntime):
    """A one-process runtime that plays rank 0 of two: it keeps the first half of every training batch."""

    def __init__(self):
        super().__init__("cpu")
        self.seen: list[tuple[int, int]] = []

    def local_rows(self, batch):
        kept = _ranks(2)[0].local_rows(batch)
        self.seen.append((len(batch["labels"]), len(kept["labels"])))
        return kept


def test_training_steps_take_the_rank_s_rows(tmp_path, data_dir):
    from mpdistil_fast.pipeline.trainer import Run

    teacher = make_tiny_teacher(tmp_path / "teacher")
    path = write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "run", "finetune",
                        student_training={"max_steps": 3})
    runtime = HalvingRuntime()
    Run(load_config(path), runtime=runtime).run()
    assert runtime.seen == [(8, 4)] * 3  # every training step, on the global batch; evaluation is not split


@pytest.mark.slow
def test_collectives_on_two_ranks():
    """rank_rows/gather_rows give back every row in order (odd counts padded), from_main is rank 0's, average and
    average_tensors mean, and a ZeRO-1/2 engine's partitioned AdamW state comes back whole
    (tests/distributed_worker.py)."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "tests" / "distributed_worker.py")],
                            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("collectives ok") == 2


def test_a_failed_close_waits_for_no_other_rank(monkeypatch):
    """``close(failed=True)`` (the run raised, maybe on this rank alone) retires the engines and ends the process
    group without the barrier of a finished run's ``close``, which ranks still running would never reach."""
    from mpdistil_fast.distributed import deepspeed_runtime

    calls: list[str] = []
    runtime = object.__new__(DeepSpeedRuntime)  # without a process group: every call it makes is recorded
    runtime._engines, runtime._training_roles = {1: "teacher engine", 2: "student engine"}, {1: "teacher"}
    runtime._launcher_variables = {}
    runtime._guards = {1: type("Guard", (), {"remove": lambda self: calls.append("guard removed")})()}
    monkeypatch.setattr(deepspeed_runtime, "retire", lambda engine: calls.append(f"{engine} retired"))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("process group ended"))
    runtime.close(failed=True)
    assert calls == ["guard removed", "teacher engine retired", "student engine retired", "process group ended"]
    assert not (runtime._engines or runtime._guards or runtime._training_roles)
    calls.clear()
    runtime.close()  # a finished run: every rank is there
    assert calls == ["barrier", "process group ended"]


def test_a_runtime_that_fails_to_start_ends_the_process_group_it_started(monkeypatch):
    """``DeepSpeedRuntime(...)`` raising after it started the process group (here: a ``device`` that is not
    DeepSpeed's accelerator's) leaves no runtime whose ``close`` would end it: the constructor ends it itself, and
    leaves alone a group that was there before it.  The group stayed up until interpreter exit before."""
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    from mpdistil_fast.distributed.deepspeed_runtime import free_port

    if torch.distributed.is_initialized():
        pytest.skip("this process already has a process group")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)
    other = "cuda" if get_accelerator().device_name(0).startswith("cpu") else "cpu"
    try:
        with pytest.raises(ValueError, match="runtime.device"):
            DeepSpeedRuntime({"teacher": {}, "student": {}}, device=other)
        assert not torch.distributed.is_initialized()
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)  # the caller's own group
        with pytest.raises(ValueError, match="runtime.device"):
            DeepSpeedRuntime({"teacher": {}, "student": {}}, device=other)
        assert torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_report_failed_start_joins_a_start_and_leaves_a_caller_s_group_alone(monkeypatch, tmp_path):
    """A failed rank's report joins the process group of a launch's start and ends it (here a one-rank launch); in
    a process whose caller has a process group up already it does nothing (it ended that group before)."""
    pytest.importorskip("deepspeed")
    from mpdistil_fast.distributed.deepspeed_runtime import report_failed_start

    if torch.distributed.is_initialized():
        pytest.skip("this process already has a process group")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    report_failed_start()
    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        report_failed_start()
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()


def test_a_rank_s_device_is_its_node_s_local_rank(monkeypatch):
    """On several nodes RANK counts over all of them and LOCAL_RANK within one: a rank's device is its node's device
    number LOCAL_RANK (RANK 3, the second rank of node 1 on two nodes of two GPUs: cuda:1), made current."""
    from mpdistil_fast.distributed.deepspeed_runtime import _node_device

    class Accelerator:
        def device_name(self, index: int) -> str:
            return f"cuda:{index}"

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _node_device(Accelerator()) == torch.device("cuda:1") and chosen == [torch.device("cuda:1")]


def test_a_runtime_without_a_launcher_removes_the_variables_it_set(monkeypatch):
    """Without a launcher the runtime sets RANK, WORLD_SIZE, MASTER_PORT, ... for its one rank; closing it (or
    failing to start) removes them, and puts back the values of those the caller had set, so that a second runtime
    in the same process is not taken for a launcher's rank on a used port.  They stayed set before, and the caller's
    MASTER_ADDR was left as 127.0.0.1.  A MASTER_PORT left in the environment is not needed for one rank: the runtime
    starts on a free port also when that one is in use (it failed with EADDRINUSE)."""
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    if torch.distributed.is_initialized():
        pytest.skip("this process already has a process group")
    variables = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for name in variables:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")  # the caller's (a cluster's, say): put back
    with socket.socket() as busy:  # another run's port, in use
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        runtime = DeepSpeedRuntime({"teacher": {}, "student": {}})
        assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_ADDR"] == "127.0.0.1"
        assert os.environ["MASTER_PORT"].isdigit() and os.environ["MASTER_PORT"] != str(busy.getsockname()[1])
        runtime.close()
        assert not torch.distributed.is_initialized()
        caller = {"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": str(busy.getsockname()[1])}
        assert {name: os.environ[name] for name in variables if name in os.environ} == caller
        other = "cuda" if get_accelerator().device_name(0).startswith("cpu") else "cpu"
        with pytest.raises(ValueError, match="runtime.device"):
            DeepSpeedRuntime({"teacher": {}, "student": {}}, device=other)
        assert {name: os.environ[name] for name in variables if name in os.environ} == caller


# ----------------------------------------------------------------------------------------------- two ranks

def _teacher_without_dropout(folder: Path) -> Path:
    """A tiny random BERT with dropout off: one-process and two-rank runs then differ only by reduction order."""
    model = tiny_backbone("bert", hidden_size=32, num_layers=4, seed=0)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(folder)
    load_tokenizer(str(default_teacher_path())).save_pretrained(folder)
    return folder


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _plain_zero_runtime(tmp_path: Path, teacher_stage: int = 3, **settings) -> dict:
    """``runtime`` settings of a DeepSpeed run with an fp32 ZeRO-``teacher_stage`` teacher and a ZeRO-2 student,
    their JSONs written to ``tmp_path`` (no bf16: a two-rank run matches a one-process run), plus ``settings``."""
    for stage in (2, 3):
        (tmp_path / f"zero{stage}.json").write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return {**settings, "kind": "deepspeed", "deepspeed_teacher": str(tmp_path / f"zero{teacher_stage}.json"),
            "deepspeed_student": str(tmp_path / "zero2.json")}


def _two_ranks(*command: str, env: dict[str, str] | None = None, timeout: int = 180
               ) -> subprocess.CompletedProcess:
    """``command`` (a script and its arguments, or ``-m module ...``) on two CPU ranks under torchrun."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *command], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _torchrun(config: Path, *extra: str) -> subprocess.CompletedProcess:
    """``mpdistil-fast distill`` on two CPU ranks, from the repository root (where the default JSON paths point)."""
    result = _two_ranks("-m", "mpdistil_fast.cli", "distill", "--config", str(config), "--quiet", *extra, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2-teacher", "zero3-teacher"])
def two_rank_run(request, tmp_path_factory, data_dir):
    """The same two-task MPDistil run (teacher, PKD student, bi-level meta-teacher, curriculum) on one process and on
    two ranks (a ZeRO-2 student and meta-teacher; a ZeRO-2 or ZeRO-3 teacher; fp32; the teacher's outputs cached
    in memory in one process and on disk on two ranks).  Each step trains one task, so the other task's head (and
    meta-teacher) must be left alone as torch's AdamW leaves it."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")  # transformers' HfDeepSpeedConfig needs it
    tmp = tmp_path_factory.mktemp(f"ds{request.param}")
    teacher = _teacher_without_dropout(tmp / "teacher")
    common = {"teacher_training": {"max_steps": 3}, "student_training": {"max_steps": 3},
              "meta_teacher": {"bilevel": True, "training": {"max_steps": 3}},
              "runtime": {"checkpoint_every": 2, "keep_checkpoints": 20}}
    local = write_config(tmp / "local.yaml", teacher, data_dir, tmp / "local", "mpdistil", **common)
    # the disk cache: computed shared out, written by rank 0, read back by a resumed run
    runtime = _plain_zero_runtime(tmp, request.param, **common["runtime"], teacher_cache="disk")
    distributed = write_config(tmp / "ds.yaml", teacher, data_dir, tmp / "ds", "mpdistil",
                               **{**common, "runtime": runtime})
    from mpdistil_fast.pipeline.trainer import Run

    Run(load_config(local)).run()
    result = _torchrun(distributed)
    return tmp, result


def _assert_same_run(local_dir: Path, distributed_dir: Path, models: tuple[str, ...]) -> None:
    """Every logged metric of the two runs agrees to 1e-5 relative or 1e-6 absolute (the KD loss of a student close
    to its teacher is small, and moves relatively more with the teacher logits' rounding), MetaDistil's
    finite-difference teacher gradient norm to 1e-3 (a difference of two gradients, divided by a small step: at the
    stage's first step, where the pilot takes the student's fresh-AdamW step at its scheduled rate, the fp32
    finite difference is itself 1e-4 to 4e-4 off forward mode's value, so the reduction order moves it by as much),
    the meta-teacher's finite-difference hypergradient norm to 1e-4 (its SGD pilot's fp32 difference is ~1e-5 off
    the exact value, and the reduction order moved it by 1.3e-5 on the stratified quiz split), and the final weights
    to 1e-3 (reduction order)."""
    finite_difference = {"teacher_grad_norm": 1e-3, "meta_hypergradient_norm": 1e-4}
    local, distributed = _records(local_dir), _records(distributed_dir)
    assert [(r["stage"], r["step"]) for r in local] == [(r["stage"], r["step"]) for r in distributed]
    for one, two in zip(local, distributed):
        assert set(one) - {"time"} == set(two) - {"time"}
        for key in set(one) - {"stage", "step", "time"}:
            rel = finite_difference.get(key, 1e-5)
            assert two[key] == pytest.approx(one[key], rel=rel, abs=1e-6), (key, one, two)
    ours = load_checkpoint(latest_checkpoint(local_dir))[0]
    theirs = load_checkpoint(latest_checkpoint(distributed_dir))[0]
    for model in models:
        for name, tensor in ours[model].items():
            # Adam turns reduction-order noise in near-zero gradients into ~1e-5 weight differences
            torch.testing.assert_close(theirs[model][name], tensor, rtol=1e-3, atol=1e-4)


def _resume_inside(run_dir: Path, config: Path, stage: str, models: tuple[str, ...], launch=None,
                   name: str = "resumed") -> None:
    """A copy of the two-rank run ``run_dir``, cut back to its last checkpoint inside ``stage`` and resumed on two
    ranks (``launch(config, *flags)``, default :func:`_torchrun`: one node), ends bit-identical to the uninterrupted
    run."""
    resumed = run_dir.parent / f"{run_dir.name}-{name}-{stage}"
    shutil.copytree(run_dir, resumed)
    checkpoints = list_checkpoints(resumed)
    mid_stage = [c for c in checkpoints if json.loads((c / "state.json").read_text())["stage"] == stage]
    assert mid_stage, [c.name for c in checkpoints]
    for later in checkpoints[checkpoints.index(mid_stage[-1]) + 1:]:
        shutil.rmtree(later)
    (resumed / "report.json").unlink()
    resumed_config = config.parent / f"{resumed.name}.yaml"
    resumed_config.write_text(config.read_text().replace(str(run_dir), str(resumed)))
    (launch or _torchrun)(resumed_config, "--resume")
    final, reference = load_checkpoint(latest_checkpoint(resumed)), load_checkpoint(latest_checkpoint(run_dir))
    assert final[1]["global_step"] == reference[1]["global_step"]
    for model in models:
        for name, tensor in reference[0][model].items():
            assert torch.equal(final[0][model][name], tensor), (model, name)


@pytest.mark.slow
def test_two_ranks_match_one_process_step_for_step(two_rank_run):
    tmp, result = two_rank_run
    local = _records(tmp / "local")
    assert {r["stage"] for r in local} == set(STAGES)
    assert any("meta_hypergradient_norm" in r for r in local)
    _assert_same_run(tmp / "local", tmp / "ds", ("teacher", "student", "meta_teachers"))
    # rank 0 alone prints the report; every rank wrote its optimizer partition into the checkpoint
    assert result.stdout.count("outputs in") == 1
    mid_stage = [c for c in list_checkpoints(tmp / "ds") if json.loads((c / "state.json").read_text())["stage"]]
    assert mid_stage
    shards = mid_stage[-1] / "shards" / "trained"
    assert sorted(p.name for p in shards.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not (tmp / "ds" / ".checkpoint-shards").exists()
    # one teacher cache for both ranks, complete (meta.json is written last)
    cached = sorted(p.parent.parent.name for p in (tmp / "ds" / "teacher_cache").glob("*/*/meta.json"))
    assert cached and "rte-train" in cached and not list((tmp / "ds" / "teacher_cache").glob("rank-*"))
    # `mpdistil-fast evaluate` reads a DeepSpeed run's checkpoint in one process, with the run's final numbers
    evaluated = evaluate_checkpoint(tmp / "ds")
    reported = json.loads((tmp / "ds" / "report.json").read_text())["tasks"]
    for task, roles in evaluated["tasks"].items():
        assert roles["student_final"] == reported[task]["student_final"]
    assert not torch.distributed.is_initialized()  # it did not start a DeepSpeed runtime in this process


@pytest.mark.slow
@pytest.mark.parametrize("two_rank_run", [3], ids=["zero3-teacher"], indirect=True)  # it runs ZeRO-2 engines too
@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_resume_from_a_mid_stage_checkpoint(two_rank_run, stage):
    """Resumed inside the teacher's fine-tuning (its engine state, ZeRO-3 partitions included, comes back) or inside
    a later stage (the teacher's weights are loaded into its partitions; the student's engine of that stage and the
    meta-teachers' or the policy's state come back)."""
    tmp, _ = two_rank_run
    _resume_inside(tmp / "ds", tmp / "ds.yaml", stage, ("teacher", "student", "meta_teachers"))


@pytest.mark.slow
@pytest.mark.parametrize("hypergradient", ["finite_difference", "forward_mode"])
def test_two_ranks_run_metadistil_like_one_process(tmp_path, data_dir, hypergradient):
    """MetaDistil's pilot update data parallel: the ZeRO-3 teacher learns through its engine's backward (the
    hypergradient as a surrogate loss), the ZeRO-2 student's partitioned AdamW state preconditions the experimental
    step, the inner and quiz gradients are averaged over the ranks. Every logged number (losses, both gradient
    norms) matches the one-process run step for step, and a resume inside the stage is exact (finite_difference;
    forward_mode: the forward-mode pass through the student engine's module and the KD loss's torch backend)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    teacher = _teacher_without_dropout(tmp_path / "teacher")
    common = {"data": {"tasks": ["rte"]}, "teacher_training": {"max_steps": 2}, "student_training": {"max_steps": 4},
              "metadistil": {"hypergradient": hypergradient},
              "runtime": {"checkpoint_every": 2, "keep_checkpoints": 20}}
    local = write_config(tmp_path / "local.yaml", teacher, data_dir, tmp_path / "local", "metadistil", **common)
    runtime = _plain_zero_runtime(tmp_path, **common["runtime"])
    distributed = write_config(tmp_path / "ds.yaml", teacher, data_dir, tmp_path / "ds", "metadistil",
                               **{**common, "runtime": runtime})
    from mpdistil_fast.pipeline.trainer import Run

    Run(load_config(local)).run()
    _torchrun(distributed)
    records = [r for r in _records(tmp_path / "local") if r["stage"] == "metadistil"]
    assert records and all({"quiz_loss", "teacher_grad_norm", "student_grad_norm"} <= set(r) for r in records)
    _assert_same_run(tmp_path / "local", tmp_path / "ds", ("teacher", "student"))
    if hypergradient == "finite_difference":
        _resume_inside(tmp_path / "ds", distributed, "metadistil", ("teacher", "student"))


@pytest.mark.slow
@pytest.mark.parametrize("method, stages, student_json", [
    ("mpdistil", {"teacher", "student", "meta_teacher", "curriculum"}, None),
    ("metadistil", {"teacher", "metadistil"}, None),
    ("metadistil", {"teacher", "metadistil"}, {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}})],
    ids=["mpdistil", "metadistil", "metadistil-zero0-bf16-student"])
def test_two_ranks_run_with_the_shipped_configs(tmp_path, data_dir, method, stages, student_json):
    """The README's launch: the default JSONs (ZeRO-3 bf16 teacher, ZeRO-2 bf16 student and meta-teachers) on two
    tasks: all four MPDistil stages with the bi-level meta-teacher (a step leaves a head unused; PKD reads live
    teacher hidden states through the ZeRO-3 hooks; the curriculum's actions come from rank 0), or MetaDistil (the
    bf16 ZeRO-3 teacher learns from the hypergradient through its engine), also with a ZeRO-0 bf16 student (its
    pilot step reads the AdamW state of the fp32 master copies)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    teacher = make_tiny_teacher(tmp_path / "teacher")
    # MPDistil with the disk cache: its fp32 pooled states meet bf16 meta-teachers (MetaDistil: the memory cache)
    runtime = {"kind": "deepspeed", "device": "auto", "teacher_cache": "disk" if method == "mpdistil" else "memory"}
    if student_json is not None:
        (tmp_path / "student.json").write_text(json.dumps(student_json))
        runtime["deepspeed_student"] = str(tmp_path / "student.json")
    config = write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "run", method,
                          meta_teacher={"bilevel": True}, runtime=runtime)
    result = _torchrun(config)
    assert "| rte |" in result.stdout and result.stdout.count("outputs in") == 1
    records = _records(tmp_path / "run")
    assert {r["stage"] for r in records} == stages
    assert all(math.isfinite(value) for r in records for key, value in r.items() if key.endswith(("loss", "norm")))
    if method == "metadistil":
        assert all(r["teacher_grad_norm"] > 0 for r in records if r["stage"] == "metadistil")
    else:
        assert any(r.get("meta_hypergradient_norm", 0) > 0 for r in records)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["tasks"]) == {"cb", "rte"}
    assert ("meta_teacher" if method == "mpdistil" else "teacher_final") in report["tasks"]["rte"]
    assert report["environment"]["world_size"] == 2 and report["environment"]["runtime"] == "deepspeed"


@pytest.mark.slow
def test_without_a_launcher_the_runtime_is_one_rank(tmp_path, data_dir):
    """``mpdistil-fast distill`` with runtime.kind deepspeed and no torchrun: one rank (e.g. ZeRO-3 on one GPU)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    teacher = make_tiny_teacher(tmp_path / "teacher")
    config = write_config(tmp_path / "c.yaml", teacher, data_dir, tmp_path / "run", "kd",
                          runtime={"kind": "deepspeed", "device": "auto"})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, "-m", "mpdistil_fast.cli", "distill", "--config", str(config), "--quiet"],
                            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("outputs in") == 1
    assert {r["stage"] for r in _records(tmp_path / "run")} == {"teacher", "student"}


@pytest.mark.slow
def test_a_rank_that_fails_alone_closes_its_runtime_without_waiting(tmp_path, data_dir):
    """Rank 1 raises alone at the end of the teacher's stage (tests/failing_rank_worker.py) while rank 0 goes on into
    collectives that rank 1 never joins: rank 1 retires its engine (the ZeRO-3 teacher's training engine) and ends
    its process group without a barrier, then exits, so torchrun stops rank 0 and the launch ends, failed.  Before,
    ``distill`` closed nothing on a failure (the process group was left to interpreter exit)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    config = write_config(tmp_path / "c.yaml", make_tiny_teacher(tmp_path / "teacher"), data_dir, tmp_path / "run",
                          "kd", teacher_training={"max_steps": 1}, runtime=_plain_zero_runtime(tmp_path))
    result = _two_ranks(str(ROOT / "tests" / "failing_rank_worker.py"), "distill", "--config", str(config), "--quiet",
                        timeout=300)
    assert result.returncode != 0 and "rank 1 fails alone" in result.stderr, result.stderr[-4000:]
    assert "rank 1 closed (failed=True): 1 engine(s) retired, 0 left, process group up: False" in result.stdout, (
        result.stdout[-2000:], result.stderr[-4000:])


@pytest.mark.slow
def test_an_error_every_rank_raises_is_printed_once(tmp_path, data_dir):
    """A config error or a bad flag is every rank's: the first rank prints it, the others exit with the same status
    in silence (each rank printed the same line before)."""
    pytest.importorskip("deepspeed")
    config = write_config(tmp_path / "c.yaml", tmp_path / "teacher", data_dir, tmp_path / "run", "kd",
                          runtime={"kind": "deepspeed"})
    for extra, message in ((["--set", "data.bogus=1"], "mpdistil-fast: config error: unknown key 'data.bogus'"),
                           (["--bogus"], "error: unrecognized arguments: --bogus")):
        result = _two_ranks("-m", "mpdistil_fast.cli", "distill", "--config", str(config), *extra)
        assert result.returncode != 0 and result.stderr.count(message) == 1, result.stderr[-4000:]
        assert "exitcode  : 2" in result.stderr  # (the rank that failed first, in torchrun's summary)


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path, data_dir):
    """Rank 1's first teacher loss is NaN (tests/failing_rank_worker.py), at a step that neither logs nor
    checkpoints: the engine averages its NaN gradient into every rank's, and DeepSpeed's ZeRO optimizers skip such
    a step, on every rank, so the run went on, a step and a schedule step short, and finished (exit status 0) where
    one process gets NaN weights and stops at its next logged loss.  The skipped step now stops every rank at that
    step, together (the skip is decided on the all-reduced gradient): one line naming the stage and step, printed
    once, exit status 1, no checkpoint of the step."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    config = write_config(tmp_path / "c.yaml", make_tiny_teacher(tmp_path / "teacher"), data_dir, tmp_path / "run",
                          "kd", teacher_training={"max_steps": 4},
                          runtime=_plain_zero_runtime(tmp_path, log_every=4, checkpoint_every=10))
    result = _two_ranks(str(ROOT / "tests" / "failing_rank_worker.py"), "distill", "--config", str(config),
                        "--quiet", env={"FAILING_RANK_MODE": "nan"})
    message = "mpdistil-fast: the teacher stage's training loss or gradient is not finite at its step 1 ("
    assert result.returncode != 0 and result.stderr.count(message) == 1, (result.stdout[-2000:],
                                                                         result.stderr[-4000:])
    assert "DeepSpeed skipped the step" in result.stderr and "exitcode  : 1" in result.stderr
    assert "closed (failed=True)" in result.stdout  # (a rank's close, without the barrier)
    assert not list_checkpoints(tmp_path / "run") and not (tmp_path / "run" / "report.json").exists()


@pytest.mark.slow
def test_ranks_left_waiting_by_a_hanging_rank_end_after_the_collective_timeout(tmp_path, data_dir):
    """Rank 1 hangs (not dies) at the end of the teacher's stage: rank 0 waited in its next collective for
    DeepSpeed's fixed 10 minutes.  runtime.collective_timeout_minutes sets that wait; at 0.25 the launch ends, failed,
    within a minute or so."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    config = write_config(tmp_path / "c.yaml", make_tiny_teacher(tmp_path / "teacher"), data_dir, tmp_path / "run",
                          "kd", teacher_training={"max_steps": 1},
                          runtime=_plain_zero_runtime(tmp_path, collective_timeout_minutes=0.25))
    started = time.monotonic()
    result = _two_ranks(str(ROOT / "tests" / "failing_rank_worker.py"), "distill", "--config", str(config), "--quiet",
                        env={"FAILING_RANK_MODE": "hang"}, timeout=240)
    assert result.returncode != 0, (result.stdout[-2000:], result.stderr[-4000:])
    assert time.monotonic() - started < 180
    assert "rank 0 closed (failed=True)" in result.stdout, (result.stdout[-2000:], result.stderr[-4000:])


def test_a_failing_close_after_a_failed_run_leaves_the_runs_error(caplog):
    """The run's own error is the one ``closed_after`` raises (the CLI's exit status follows its type) when
    ``close(failed=True)`` raises too; that second error is logged."""
    from mpdistil_fast.distributed.runtime import closed_after

    class BrokenClose(LocalRuntime):
        def close(self, failed: bool = False) -> None:
            raise RuntimeError("close broke")

    with pytest.raises(ValueError, match="the run's error"), closed_after(BrokenClose("cpu")):
        raise ValueError("the run's error")
    assert "close broke" in caplog.text


# ------------------------------------------------------------------ several nodes, simulated on this one host

def _two_nodes(program: str, *args: str, nproc: int = 1, launcher: str = "torchrun",
               node_args: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()), env: dict[str, str] | None = None,
               timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """``program`` (a module, or a ``.py`` script) with ``args`` (then ``node_args[node]``) launched as on two
    nodes of ``nproc`` ranks each, both on this host and its filesystem (as nodes that share an NFS
    ``output_dir``): two ``torchrun --nnodes=2 --node_rank=N`` started together, or, for ``launcher="deepspeed"``,
    the two commands the deepspeed launcher's runner starts on the hosts of its hostfile (over pdsh or ssh):
    ``deepspeed.launcher.launch --world_info=... --node_rank=N``.  Each node's ``LOCAL_RANK`` counts from 0, and
    ``RANK`` over both.  Returns each node's launcher process, finished (both are killed at ``timeout``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = program.endswith(".py")
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={nproc}"]
        target = [program] if script else ["-m", program]
    else:
        hosts = {"node-a": list(range(nproc)), "node-b": list(range(nproc))}
        head = [sys.executable, "-u", "-m", "deepspeed.launcher.launch",
                "--world_info=" + base64.urlsafe_b64encode(json.dumps(hosts).encode()).decode()]
        target = [program] if script else ["--module", program]
    outputs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(2)]
    processes = [subprocess.Popen([*head, f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
                                   *target, *args, *node_args[node]], env=env, stdout=stdout, stderr=stderr,
                                  text=True, cwd=ROOT, start_new_session=True)
                 for node, (stdout, stderr) in enumerate(outputs)]
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    results = []
    for process, (stdout, stderr) in zip(processes, outputs):
        stdout.seek(0)
        stderr.seek(0)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout.read(), stderr.read()))
        stdout.close()
        stderr.close()
    return results


def _distill_on_two_nodes(config: Path, *extra: str, launcher: str = "torchrun") -> list[subprocess.CompletedProcess]:
    """``mpdistil-fast distill`` on two simulated nodes of one rank each; both must succeed."""
    nodes = _two_nodes("mpdistil_fast.cli", "distill", "--config", str(config), "--quiet", *extra, launcher=launcher,
                       timeout=600)
    for node, result in enumerate(nodes):
        assert result.returncode == 0, (node, result.stderr[-4000:])
    return nodes


@pytest.mark.slow
@pytest.mark.parametrize("two_rank_run", [3], ids=["zero3-teacher"], indirect=True)
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_run_like_one_node(two_rank_run, launcher):
    """The two-rank MPDistil run (ZeRO-3 teacher, ZeRO-2 student and meta-teachers, disk teacher cache) on two nodes
    of one rank each, sharing output_dir (RANK 1 is node 1's LOCAL_RANK 0): every logged number and the final
    weights equal the one-node run's exactly (same ranks, same reductions), and global rank 0 alone wrote the
    outputs: one report printed, one teacher cache, both ranks' optimizer partitions in the checkpoints."""
    tmp, _ = two_rank_run
    config = tmp / f"nodes-{launcher}.yaml"
    config.write_text((tmp / "ds.yaml").read_text().replace(str(tmp / "ds"), str(tmp / f"nodes-{launcher}")))
    run_dir = tmp / f"nodes-{launcher}"
    nodes = _distill_on_two_nodes(config, launcher=launcher)
    assert nodes[0].stdout.count("outputs in") == 1 and "outputs in" not in nodes[1].stdout
    assert [{k: v for k, v in r.items() if k != "time"} for r in _records(run_dir)] == [
        {k: v for k, v in r.items() if k != "time"} for r in _records(tmp / "ds")]
    ours, theirs = load_checkpoint(latest_checkpoint(run_dir))[0], load_checkpoint(latest_checkpoint(tmp / "ds"))[0]
    for model in ("teacher", "student", "meta_teachers"):
        for name, tensor in theirs[model].items():
            assert torch.equal(ours[model][name], tensor), (model, name)
    assert json.loads((run_dir / "report.json").read_text())["tasks"] == json.loads(
        (tmp / "ds" / "report.json").read_text())["tasks"]
    assert [c.name for c in list_checkpoints(run_dir)] == [c.name for c in list_checkpoints(tmp / "ds")]
    mid_stage = [c for c in list_checkpoints(run_dir) if json.loads((c / "state.json").read_text())["stage"]]
    assert sorted(p.name for p in (mid_stage[-1] / "shards" / "trained").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert sorted(p.relative_to(run_dir) for p in (run_dir / "teacher_cache").rglob("*")) == sorted(
        p.relative_to(tmp / "ds") for p in (tmp / "ds" / "teacher_cache").rglob("*"))
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in (tmp / "ds").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("two_rank_run", [3], ids=["zero3-teacher"], indirect=True)
def test_two_nodes_resume_from_a_mid_stage_checkpoint(two_rank_run):
    """A run cut back to a checkpoint inside the student's stage (as when both nodes are killed there) resumes on
    two nodes and ends bit-identical to the uninterrupted run."""
    tmp, _ = two_rank_run
    _resume_inside(tmp / "ds", tmp / "ds.yaml", "student", ("teacher", "student", "meta_teachers"),
                   launch=_distill_on_two_nodes, name="two-nodes")


@pytest.mark.slow
def test_a_rank_that_cannot_start_on_one_node_stops_every_node(tmp_path, data_dir):
    """Two nodes of two ranks each.  A config error every rank raises is printed once per node (by its LOCAL_RANK 0;
    RANK 2 is node 1's).  A data folder missing on node 1 alone: node 1's ranks fail before the process group
    exists, and node 0's ranks waited for them in its start until the collective timeout (10 minutes by default);
    now node 1's ranks tell them through the runtime's start agreement, and both nodes end at once, each with one
    line and exit status 2."""
    pytest.importorskip("deepspeed")
    config = write_config(tmp_path / "c.yaml", make_tiny_teacher(tmp_path / "teacher"), data_dir, tmp_path / "run",
                          "kd", runtime=_plain_zero_runtime(tmp_path))
    distill = ("mpdistil_fast.cli", "distill", "--config", str(config), "--quiet")
    for node in _two_nodes(*distill, "--set", "data.bogus=1", nproc=2, timeout=180):
        assert node.stderr.count("mpdistil-fast: config error: unknown key 'data.bogus'") == 1, node.stderr[-4000:]
        assert node.returncode != 0 and "exitcode  : 2" in node.stderr
    started = time.monotonic()
    nodes = _two_nodes(*distill, nproc=2, node_args=((), ("--data-dir", str(tmp_path / "not-here"))), timeout=180)
    assert time.monotonic() - started < 150
    assert nodes[0].stderr.count("mpdistil-fast:") == 1, nodes[0].stderr[-4000:]
    assert "mpdistil-fast: ranks 2, 3 could not start the run" in nodes[0].stderr
    assert nodes[1].stderr.count("mpdistil-fast:") == 1, nodes[1].stderr[-4000:]
    assert "mpdistil-fast: config error: data.data_dir" in nodes[1].stderr
    for node in nodes:
        assert node.returncode != 0 and "exitcode  : 2" in node.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_rank_killed_on_one_node_ends_both_nodes_with_a_line_each(tmp_path, data_dir):
    """Node 1's rank is killed (SIGKILL) at the end of the teacher's stage: node 0's rank, in its next collective,
    loses the connection, closes without waiting and exits with status 1 and one line (a traceback of the
    collective before); node 1's torchrun reports the signal."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    config = write_config(tmp_path / "c.yaml", make_tiny_teacher(tmp_path / "teacher"), data_dir, tmp_path / "run",
                          "kd", teacher_training={"max_steps": 1}, runtime=_plain_zero_runtime(tmp_path))
    nodes = _two_nodes(str(ROOT / "tests" / "failing_rank_worker.py"), "distill", "--config", str(config), "--quiet",
                       env={"FAILING_RANK_MODE": "kill"}, timeout=240)
    first, second = nodes
    assert first.returncode != 0 and second.returncode != 0
    assert first.stderr.count("mpdistil-fast: another rank stopped or stopped answering") == 1, first.stderr[-4000:]
    assert "[rank0]: Traceback" not in first.stderr and "exitcode  : 1" in first.stderr, first.stderr[-4000:]
    assert "rank 0 closed (failed=True)" in first.stdout
    assert "Signal 9 (SIGKILL)" in second.stderr, second.stderr[-4000:]


@pytest.mark.slow
def test_an_output_dir_that_the_nodes_do_not_share_is_refused(tmp_path, data_dir):
    """Each node's own folder at the output_dir path (simulated with another --output-dir on node 1): the run went
    through, with checkpoints lacking node 1's optimizer partitions and snapshot shards (left in its own folder), found
    missing only at --resume.  Now every rank looks for a file rank 0 wrote there before anything loads: both nodes
    stop with one config error line each (exit status 2)."""
    pytest.importorskip("deepspeed")
    config = write_config(tmp_path / "c.yaml", make_tiny_teacher(tmp_path / "teacher"), data_dir, tmp_path / "run",
                          "kd", runtime=_plain_zero_runtime(tmp_path))
    nodes = _two_nodes("mpdistil_fast.cli", "distill", "--config", str(config), "--quiet",
                       node_args=((), ("--output-dir", str(tmp_path / "node-1-run"))), timeout=180)
    for node in nodes:
        assert node.stderr.count("mpdistil-fast:") == 1, node.stderr[-4000:]
        assert "rank 1 does not see the file rank 0 wrote there" in node.stderr
        assert node.returncode != 0 and "exitcode  : 2" in node.stderr
    assert not list((tmp_path / "run").iterdir())  # (the marker is gone)
