"""Checkpoints: exact round trip of the full training state, atomic writes (also under SIGKILL), RNG capture."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from mpdistil_fast.distributed import LocalRuntime
from mpdistil_fast.pipeline.checkpoint import (capture_rng_state, checkpoint_dir, flatten_state_dict,
                                               latest_checkpoint, list_checkpoints, load_checkpoint,
                                               prune_checkpoints, restore_rng_state, save_checkpoint,
                                               unflatten_state_dict)
from mpdistil_fast.pipeline.trainer import SHARDS_FOLDER, Run
from tests.helpers import gpu_test


def _training(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=20)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler) -> None:
    inputs = torch.randn(4, 5)  # the global RNG drives data and dropout, so it must be restored too
    loss = model(inputs).logsumexp(-1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    reference = _training()
    for _ in range(8):
        _step(*reference)

    model, optimizer, scheduler = _training()
    for _ in range(3):
        _step(model, optimizer, scheduler)
    optimizer_tensors, optimizer_meta = flatten_state_dict(optimizer.state_dict())
    scheduler_tensors, scheduler_meta = flatten_state_dict(scheduler.state_dict())
    save_checkpoint(checkpoint_dir(tmp_path, 3),
                    {"student": model.state_dict(), "optimizer/student": optimizer_tensors,
                     "scheduler": scheduler_tensors},
                    {"step": 3, "optimizer": optimizer_meta, "scheduler": scheduler_meta, "rng": capture_rng_state()})
    for _ in range(2):  # work after the checkpoint that a kill would lose
        _step(model, optimizer, scheduler)

    tensors, state = load_checkpoint(latest_checkpoint(tmp_path))
    model, optimizer, scheduler = _training(seed=123)
    model.load_state_dict(tensors["student"])
    optimizer.load_state_dict(unflatten_state_dict(tensors["optimizer/student"], state["optimizer"]))
    scheduler.load_state_dict(unflatten_state_dict(tensors["scheduler"], state["scheduler"]))
    restore_rng_state(state["rng"])
    for _ in range(5):
        _step(model, optimizer, scheduler)
    for a, b in zip(model.parameters(), reference[0].parameters()):
        assert torch.equal(a, b)
    assert scheduler.get_last_lr() == reference[2].get_last_lr()


def test_rng_state_keeps_the_run_s_cuda_device_only(monkeypatch):
    """The CUDA generator saved and restored is the run's device's (a rank's own GPU), never every device's:
    restoring all of rank 0's would give rank k rank 0's untouched generator of device k."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or
                        torch.arange(4, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: calls.append(("set", device, state.tolist())))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(("set_all",)))
    assert "cuda_device" not in capture_rng_state(torch.device("cpu")) and not calls
    state = capture_rng_state(torch.device("cuda", 1))
    restore_rng_state(state, torch.device("cuda", 1))
    assert calls == [("get", torch.device("cuda", 1)), ("set", torch.device("cuda", 1), [0, 1, 2, 3])]


@gpu_test
def test_cuda_rng_state_round_trip():
    device = torch.device("cuda")
    state = capture_rng_state(device)
    drawn = torch.rand(8, device=device)
    restore_rng_state(state, device)
    assert torch.equal(torch.rand(8, device=device), drawn)


def test_flatten_round_trips_nested_python_and_tensor_state():
    state = {0: {"exp_avg": torch.randn(3), "step": torch.tensor(4.0)}, "betas": (0.9, 0.999),
             "nested": [{"a": np.arange(3)}, (1, "x", None, float("inf"))], (1, 2): True, "__tensor__": 1.5,
             "counts": np.int64(7), "mask": torch.tensor([True, False])}
    tensors, meta = flatten_state_dict(state)
    import json

    restored = unflatten_state_dict(tensors, json.loads(json.dumps(meta)))
    assert set(restored) == set(state)
    assert torch.equal(restored[0]["exp_avg"], state[0]["exp_avg"]) and restored[0]["step"].dtype == torch.float32
    assert restored["betas"] == (0.9, 0.999) and isinstance(restored["betas"], tuple)
    assert torch.equal(restored["nested"][0]["a"], torch.arange(3))
    assert restored["nested"][1] == (1, "x", None, float("inf"))
    assert restored[(1, 2)] is True and restored["__tensor__"] == 1.5 and restored["counts"] == 7
    assert restored["mask"].dtype == torch.bool
    state[0]["exp_avg"].add_(1.0)
    assert not torch.equal(restored[0]["exp_avg"], state[0]["exp_avg"]), "flattened tensors must be copies"
    owned = {"w": torch.randn(2, 3), "t": torch.randn(3, 2).t()}  # copy=False: private CPU copies taken as they are
    taken, _ = flatten_state_dict(owned, copy=False)
    assert taken["w"].data_ptr() == owned["w"].data_ptr()
    assert taken["t"].is_contiguous() and torch.equal(taken["t"], owned["t"])
    with pytest.raises(TypeError, match="opt.fn"):
        flatten_state_dict({"opt": {"fn": print}})
    with pytest.raises(KeyError, match="missing"):
        unflatten_state_dict({}, {"__tensor__": "missing"})


def test_rng_state_round_trip():
    state = capture_rng_state()
    import json

    state = json.loads(json.dumps(state))
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])
    with pytest.raises(ValueError, match="numpy"):
        restore_rng_state({"python": state["python"], "torch": state["torch"]})


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    target = checkpoint_dir(tmp_path, 1)
    save_checkpoint(target, {"student": {"w": torch.zeros(2)}}, {"step": 1})
    real_save = safetensors.torch.save_file
    calls = []

    def failing_save(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, {"student": {"w": torch.ones(2)}, "teacher": {"w": torch.ones(2)}}, {"step": 9})
    tensors, state = load_checkpoint(target)
    assert state == {"step": 1} and torch.equal(tensors["student"]["w"], torch.zeros(2))
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name], "temporary directories must be removed"
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    save_checkpoint(target, {"student": {"w": torch.ones(2)}}, {"step": 2})
    assert load_checkpoint(target)[1] == {"step": 2}


def test_folders_move_into_the_checkpoint(tmp_path):
    """What every rank wrote (a folder beside the run) becomes part of the checkpoint in the same atomic step."""
    staging = tmp_path / "staging"
    (staging / "trained").mkdir(parents=True)
    (staging / "trained" / "rank_1.pt").write_bytes(b"partition")
    target = checkpoint_dir(tmp_path / "run", 4)
    save_checkpoint(target, {"model": {"w": torch.ones(2)}}, {"step": 4}, folders={"shards": staging})
    assert (target / "shards" / "trained" / "rank_1.pt").read_bytes() == b"partition"
    assert not staging.exists()
    tensors, state = load_checkpoint(target)
    assert set(tensors) == {"model"} and state == {"step": 4}
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="component names"):
        save_checkpoint(checkpoint_dir(tmp_path / "run", 5), {}, {}, folders={"..": tmp_path / "other"})
    assert latest_checkpoint(tmp_path / "run") == target  # the refused write left no checkpoint behind


def test_checkpoint_listing_pruning_and_errors(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10, 7):
        save_checkpoint(checkpoint_dir(tmp_path, step), {}, {"step": step})
    (tmp_path / "checkpoints" / ".step-000000011.tmp-x").mkdir()
    (tmp_path / "checkpoints" / "step-000000012").mkdir()  # no state.json: incomplete
    assert [load_checkpoint(p)[1]["step"] for p in list_checkpoints(tmp_path)] == [2, 7, 10]
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000007", "step-000000010"]
    with pytest.raises(TypeError, match="state"):
        save_checkpoint(tmp_path / "x", {}, {"bad": torch.zeros(1)})
    with pytest.raises(ValueError, match="component"):
        save_checkpoint(tmp_path / "x", {"../escape": {}}, {})
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_checkpoint(tmp_path / "checkpoints" / "step-000000012")
    with pytest.raises(ValueError, match="step"):
        checkpoint_dir(tmp_path, -1)
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


def test_a_pruning_cut_short_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """A run killed while it deletes an old checkpoint: the checkpoint is out of the listing (it was one whose
    state.json was gone or whose weights were half deleted, which evaluate then called damaged), and the next save
    clears its remains away."""
    from mpdistil_fast.pipeline import checkpoint

    for step in (1, 2):
        save_checkpoint(checkpoint_dir(tmp_path, step), {"student": {"w": torch.ones(2)}}, {"step": step})
    rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        (Path(path) / "student.safetensors").unlink()  # part of the folder is gone when the kill lands
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, keep=1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000002"]
    save_checkpoint(checkpoint_dir(tmp_path, 3), {}, {"step": 3})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000002", "step-000000003"]


def test_a_kill_between_the_renames_of_a_replacement_loses_nothing(tmp_path):
    target = checkpoint_dir(tmp_path, 4)
    save_checkpoint(target, {"student": {"w": torch.ones(1)}}, {"step": 4})
    aside = target.parent / f".{target.name}.old-0123abcd"
    os.replace(target, aside)  # the state a SIGKILL right after the first rename leaves
    (target.parent / f".{target.name}.tmp-4567").mkdir()
    assert list_checkpoints(tmp_path) == [aside] and load_checkpoint(aside)[1] == {"step": 4}
    save_checkpoint(checkpoint_dir(tmp_path, 5), {}, {"step": 5})
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-000000004", "step-000000005"]
    assert load_checkpoint(target)[1] == {"step": 4}


WRITER = textwrap.dedent("""
    import sys, torch
    from mpdistil_fast.pipeline.checkpoint import checkpoint_dir, prune_checkpoints, save_checkpoint
    run, step = sys.argv[1], 0
    print("ready", flush=True)
    while True:
        step += 1
        value = torch.full((64, 1024), float(step))
        save_checkpoint(checkpoint_dir(run, step), {"student": {"w": value}, "optimizer/student": {"m": value}},
                        {"step": step})
        save_checkpoint(checkpoint_dir(run, 0), {"student": {"w": value}}, {"step": step})  # overwrite in place
        prune_checkpoints(run, keep=2)
""")


def test_sigkill_mid_write_leaves_only_complete_checkpoints(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 60
    while len(list_checkpoints(tmp_path)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 0.2))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    checkpoints = list_checkpoints(tmp_path)
    assert checkpoints, "no checkpoint survived"
    for path in checkpoints:
        tensors, state = load_checkpoint(path)
        assert torch.equal(tensors["student"]["w"], torch.full((64, 1024), float(state["step"])))
        if path.name != "step-000000000":
            assert torch.equal(tensors["optimizer/student"]["m"], tensors["student"]["w"])


def test_linked_components_share_the_earlier_file(tmp_path):
    """A component linked from an earlier checkpoint (a frozen teacher) is the same file, and survives pruning."""
    first = checkpoint_dir(tmp_path, 1)
    weights = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    save_checkpoint(first, {"teacher": weights, "student": {"w": torch.zeros(2)}}, {"step": 1})
    second = checkpoint_dir(tmp_path, 2)
    save_checkpoint(second, {"student": {"w": torch.ones(2)}}, {"step": 2},
                    linked={"teacher": first / "teacher.safetensors"})
    assert (second / "teacher.safetensors").stat().st_ino == (first / "teacher.safetensors").stat().st_ino
    prune_checkpoints(tmp_path, 1)
    assert list_checkpoints(tmp_path) == [second]
    tensors, state = load_checkpoint(second)
    assert state == {"step": 2} and torch.equal(tensors["student"]["w"], torch.ones(2))
    for name, tensor in weights.items():
        assert torch.equal(tensors["teacher"][name], tensor)


def test_resume_reads_an_object_saved_whole_before_it_was_sharded(tmp_path):
    """Run.restore_stage: an object that now saves per rank (``load_sharded``, e.g. a ZeRO-3 model's best-model
    snapshot) but that an older checkpoint holds whole among its tensors loads through ``load_state_dict``; with its
    shard folder there, through ``load_sharded``."""
    class Recorder:
        def __init__(self) -> None:
            self.calls = []

        def load_sharded(self, directory) -> None:
            self.calls.append(("sharded", directory.name))

        def load_state_dict(self, state) -> None:
            self.calls.append(("whole", state["weights"]["w"].tolist()))

    tensors, meta = flatten_state_dict({"weights": {"w": torch.ones(2)}})
    run = Run.__new__(Run)  # only what restore_stage reads
    run.runtime = LocalRuntime("cpu")
    for shards_present, expected in ((False, ("whole", [1.0, 1.0])), (True, ("sharded", "best"))):
        if shards_present:
            (tmp_path / SHARDS_FOLDER / "best").mkdir(parents=True)
        run._pending = ({"best": tensors}, {"meta": {"best": meta}, "rng": capture_rng_state()}, tmp_path)
        recorder = Recorder()
        run.restore_stage({"best": recorder})
        assert recorder.calls == [expected]


def test_the_best_snapshot_keeps_the_highest_score_and_the_earlier_of_a_tie():
    """Model selection: an offer replaces the snapshot only with a strictly higher quiz score (a tie keeps the
    earlier, shorter-trained weights); restore_into writes the kept weights back, and the state round-trips."""
    from mpdistil_fast.pipeline.trainer import BestSnapshot

    model = torch.nn.Linear(3, 2)
    best = BestSnapshot(LocalRuntime("cpu"))

    def offer(score: float, step: int, fill: float) -> bool:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(fill)
        return best.offer(score, step, model)

    assert offer(0.5, 1, 1.0)
    assert not offer(0.4, 2, 2.0)  # worse
    assert not offer(0.5, 3, 3.0)  # a tie
    assert (best.score, best.step) == (0.5, 1)
    assert offer(0.7, 4, 4.0) and not offer(0.6, 5, 5.0)
    assert (best.score, best.step) == (0.7, 4)
    best.restore_into(model)
    assert all(torch.equal(p, torch.full_like(p, 4.0)) for p in model.parameters())
    tensors, meta = flatten_state_dict(best.state_dict())
    again = BestSnapshot(LocalRuntime("cpu"))
    again.load_state_dict(unflatten_state_dict(tensors, meta))
    assert (again.score, again.step) == (0.7, 4) and not again.offer(0.7, 6, model)
    # a NaN score ranks below every number: it replaces none, and any number replaces it
    assert not offer(float("nan"), 7, 7.0) and (best.score, best.step) == (0.7, 4)
    first_nan = BestSnapshot(LocalRuntime("cpu"))
    assert first_nan.offer(float("nan"), 1, model) and first_nan.offer(0.1, 2, model)
    assert (first_nan.score, first_nan.step) == (0.1, 2) and not first_nan.offer(float("nan"), 3, model)
