"""The frozen-teacher cache: served rows equal a live eval-mode forward pass, in memory and memory-mapped."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_on_thread_ranks
from mpdistil_fast.data import TeacherCache, encode_examples, iterate_batches, load_examples
from mpdistil_fast.models import TaskModel, default_teacher_path, load_tokenizer, tiny_backbone


@pytest.fixture(scope="module")
def splits(data_dir):
    tokenizer = load_tokenizer(default_teacher_path())
    return {task: encode_examples(load_examples(task, "validation", data_dir)[:13], tokenizer, max_length=40)
            for task in ("cb", "copa")}


def _teacher(seed: int = 0) -> TaskModel:
    backbone = tiny_backbone("bert", hidden_size=16, num_layers=2, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TaskModel(backbone, ["cb", "copa"], pooling="mean")


def _entry(directory: Path, name: str) -> Path:
    """The folder of the one teacher cached for ``name`` ("<task>-<split>") under ``directory``."""
    folders = list((directory / name).iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def _live(teacher: TaskModel, batch: dict, task: str):
    teacher.eval()
    with torch.no_grad():
        return teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], task=task,
                       output_hidden_states=True)


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "memmap"])
@pytest.mark.parametrize("task", ["cb", "copa"])
def test_cached_rows_equal_a_live_teacher(splits, tmp_path, task, on_disk):
    teacher = _teacher().train()
    cache = TeacherCache(teacher, tmp_path if on_disk else None, batch_size=5, keep_hidden=True)
    cached = cache.outputs(splits[task], "validation")
    assert teacher.training, "the cache must restore the teacher's training mode"
    assert cache.outputs(splits[task], "validation") is cached
    for batch in iterate_batches(splits[task], 4, shuffle=True, seed=1):
        served, live = cached.gather(batch["example_index"]), _live(teacher, batch, task)
        torch.testing.assert_close(served.logits, live.logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(served.pooled, live.pooled, rtol=1e-6, atol=1e-6)
        assert len(served.hidden_states) == len(live.hidden_states) == 3
        for a, b in zip(served.hidden_states, live.hidden_states):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert not served.logits.requires_grad
    assert cached.rows_served == len(splits[task])
    expected_saved = cached.compute_seconds - cached.obtain_seconds  # one epoch served
    assert cache.seconds_saved == pytest.approx(expected_saved)
    assert "rows served" in cache.summary()
    for net, says in ((-0.04, "saved 0.0 s"), (-0.3, "cost 0.3 s more than it saved"), (2.26, "saved 2.3 s")):
        cached.obtain_seconds = cached.compute_seconds - net  # (one epoch served: the saving is net)
        assert cache.summary().endswith(says), (net, cache.summary())
    if on_disk:
        assert isinstance(np.load(_entry(tmp_path, f"{task}-validation") / "logits.npy", mmap_mode="r"), np.memmap)


@pytest.mark.parametrize("task", ["cb", "copa"])
def test_layer_states_for_patient_kd(splits, tmp_path, task):
    """Only each layer's state at the pooling position is kept, served as the live teacher's ``layer_states``."""
    teacher = _teacher()
    cached = TeacherCache(teacher, tmp_path, keep_hidden="layer_states").outputs(splits[task], "train")
    assert cached.hidden.shape == ((13, 2, 2, 1, 16) if task == "copa" else (13, 2, 1, 16))
    batch = next(iterate_batches(splits[task], 5, shuffle=True, seed=0))
    served = cached.gather(batch["example_index"])
    teacher.eval()
    with torch.no_grad():
        live = teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], task=task,
                       output_layer_states=True)
    assert served.hidden_states is None and served.layer_states.shape == live.layer_states.shape
    torch.testing.assert_close(served.layer_states, live.layer_states, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="keep_hidden"):
        TeacherCache(teacher, keep_hidden="first_token")


def test_a_second_run_reuses_the_files_without_running_the_teacher(splits, tmp_path, monkeypatch):
    first = TeacherCache(_teacher(), tmp_path).outputs(splits["cb"], "train")
    teacher = _teacher()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the teacher ran although its outputs were cached on disk")

    monkeypatch.setattr(teacher, "forward", must_not_run)
    second_cache = TeacherCache(teacher, tmp_path)
    second = second_cache.outputs(splits["cb"], "train")
    assert torch.equal(first.logits, second.logits) and second.hidden is None
    assert second.compute_seconds == pytest.approx(first.compute_seconds)
    second.gather(torch.arange(13))
    second.gather(torch.arange(13))
    assert second_cache.seconds_saved == pytest.approx(2 * first.compute_seconds - second.obtain_seconds)


def test_other_weights_or_hidden_request_recompute(splits, tmp_path):
    original = TeacherCache(_teacher(0), tmp_path).outputs(splits["cb"], "train")
    changed = TeacherCache(_teacher(1), tmp_path).outputs(splits["cb"], "train")
    assert not torch.allclose(original.logits, changed.logits)
    with_hidden = TeacherCache(_teacher(1), tmp_path, keep_hidden=True).outputs(splits["cb"], "train")
    assert with_hidden.hidden is not None and with_hidden.hidden.shape[:2] == (13, 3)


def test_same_weights_other_config_recompute(splits, tmp_path):
    """The same weights under another activation give other outputs: the backbone's configuration is part of the
    fingerprint (its private keys, such as where it was loaded from, are not)."""
    original = TeacherCache(_teacher(0), tmp_path).outputs(splits["cb"], "train")
    teacher = _teacher(0)
    teacher.backbone.config._name_or_path = "elsewhere"
    assert torch.equal(TeacherCache(teacher, tmp_path).outputs(splits["cb"], "train").logits, original.logits)
    teacher.backbone.config.hidden_act = "relu"
    for layer in teacher.backbone.encoder.layer:
        layer.intermediate.intermediate_act_fn = torch.nn.ReLU()
    recomputed = TeacherCache(teacher, tmp_path).outputs(splits["cb"], "train")
    live = torch.cat([_live(teacher, batch, "cb").logits
                      for batch in iterate_batches(splits["cb"], 64, shuffle=False, seed=0)])
    assert not torch.equal(recomputed.logits, original.logits)
    torch.testing.assert_close(recomputed.logits, live)


def test_cache_errors_name_the_argument(splits):
    with pytest.raises(ValueError, match="batch_size"):
        TeacherCache(_teacher(), batch_size=0)
    cached = TeacherCache(_teacher()).outputs(splits["cb"], "train")
    with pytest.raises(ValueError, match="example_index"):
        cached.gather(torch.tensor([13]))


def test_ranks_share_the_pass_and_one_folder(splits, tmp_path, monkeypatch):
    """Two ranks (threads): each runs the teacher on its half of the rows (13 rows: 7 each, the last padded), both
    get every row, rank 0 alone writes the shared folder; a second run's ranks load it and run no teacher at all."""
    ran: dict[int, int] = {}
    teachers = [_teacher(), _teacher()]  # built here: the threads would race for the global RNG

    def rank_cache(me, _):
        teacher = teachers[me.rank]
        forward = teacher.forward

        def counted(input_ids, *args, **kwargs):
            ran[me.rank] = ran.get(me.rank, 0) + len(input_ids)
            return forward(input_ids, *args, **kwargs)

        monkeypatch.setattr(teacher, "forward", counted)
        return TeacherCache(teacher, tmp_path, batch_size=4, sharding=me).outputs(splits["cb"], "train")

    results, errors = run_on_thread_ranks(rank_cache)
    assert not any(errors), errors
    assert ran == {0: 7, 1: 7}
    expected = TeacherCache(_teacher()).outputs(splits["cb"], "train")
    for cached in results:
        torch.testing.assert_close(cached.logits, expected.logits, rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in _entry(tmp_path, "cb-train").iterdir()) == ["logits.npy", "meta.json", "pooled.npy"]
    ran.clear()
    again, errors = run_on_thread_ranks(rank_cache)
    assert not any(errors) and ran == {}, (errors, ran)
    assert all(torch.equal(cached.logits, results[0].logits) for cached in again)


def test_two_teachers_writing_one_directory_at_once_keep_their_outputs(splits, tmp_path, monkeypatch):
    """Another teacher's cache fills the same directory while this one is between its arrays and its meta.json
    (two runs sharing a folder): each later load serves its own teacher's outputs, not the other's arrays."""
    first, second = _teacher(0), _teacher(1)
    write_meta = TeacherCache._write_meta
    interleaved = []

    def other_run_first(folder, print_key, compute_seconds):
        if not interleaved:  # the other run writes all of its entry, its meta.json included
            interleaved.append(folder)
            TeacherCache(second, tmp_path).outputs(splits["cb"], "train")
        write_meta(folder, print_key, compute_seconds)

    monkeypatch.setattr(TeacherCache, "_write_meta", staticmethod(other_run_first))
    TeacherCache(first, tmp_path).outputs(splits["cb"], "train")
    monkeypatch.setattr(TeacherCache, "_write_meta", staticmethod(write_meta))
    assert interleaved
    for teacher in (first, second):
        loaded = TeacherCache(teacher, tmp_path).outputs(splits["cb"], "train")
        expected = TeacherCache(teacher).outputs(splits["cb"], "train")
        torch.testing.assert_close(loaded.logits, expected.logits, rtol=1e-6, atol=1e-6)
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_interrupted_teacher_pass_leaves_no_temporary_files(splits, tmp_path, monkeypatch):
    teacher = _teacher()
    forward, calls = teacher.forward, []

    def failing_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(teacher, "forward", failing_second_batch)
    with pytest.raises(KeyboardInterrupt):
        TeacherCache(teacher, tmp_path, batch_size=4, keep_hidden=True).outputs(splits["cb"], "train")
    assert len(calls) == 2 and not list(tmp_path.rglob("*.tmp")), list(tmp_path.rglob("*"))
    monkeypatch.setattr(teacher, "forward", forward)  # a later run completes the entry
    TeacherCache(teacher, tmp_path, batch_size=4, keep_hidden=True).outputs(splits["cb"], "train")
    assert not list(tmp_path.rglob("*.tmp")) and list(tmp_path.rglob("meta.json"))


def test_a_killed_pass_s_temporary_files_are_removed_by_the_next(splits, tmp_path):
    """SIGKILL (or the out-of-memory killer) leaves a pass's memory-mapped arrays behind, as large as the split's
    outputs; the next pass into the folder deletes those of this host's dead processes and keeps a live process's
    (another run writing there now) and another host's (a shared filesystem).  They were never deleted before."""
    import os
    import socket
    import subprocess
    import sys

    teacher = _teacher()
    TeacherCache(teacher, tmp_path).outputs(splits["cb"], "train")
    folder = next(tmp_path.rglob("meta.json")).parent
    (folder / "meta.json").unlink()  # the entry is computed again
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host, hex32 = socket.gethostname(), "0" * 32
    dead = folder / f"hidden.npy.{finished.pid}-{hex32}.{host}.tmp"
    live = folder / f"logits.npy.{os.getpid()}-{hex32}.{host}.tmp"
    elsewhere = folder / f"pooled.npy.{finished.pid}-{hex32}.node-7.cluster.tmp"
    for path in (dead, live, elsewhere):
        path.write_bytes(b"half written")
    TeacherCache(teacher, tmp_path).outputs(splits["cb"], "train")
    assert not dead.exists() and live.exists() and elsewhere.exists()
    assert (folder / "meta.json").is_file()


def _record_disk_order(monkeypatch) -> list[tuple[str, ...]]:
    """os.fsync (with the path flushed) and os.replace calls, in order."""
    import os

    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("replace", str(source), str(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_atomic_files_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    """A power loss after the rename must not leave a renamed file whose data never reached the disk: the
    temporary is flushed, then renamed, then its folder flushed (the rename)."""
    from mpdistil_fast.files import written_atomically

    events = _record_disk_order(monkeypatch)
    target = tmp_path / "report.md"
    with written_atomically(target) as temporary:
        temporary.write_text("done")
    assert events == [("fsync", str(temporary)), ("replace", str(temporary), str(target)), ("fsync", str(tmp_path))]
    assert target.read_text() == "done" and list(tmp_path.iterdir()) == [target]


def test_cached_arrays_reach_the_disk_before_meta_json_marks_them(splits, tmp_path, monkeypatch):
    """meta.json's presence marks the arrays complete: every array is flushed to the disk before meta.json is
    renamed into place."""
    events = _record_disk_order(monkeypatch)
    TeacherCache(_teacher(), tmp_path, keep_hidden=True).outputs(splits["cb"], "train")
    folder = _entry(tmp_path, "cb-train")
    meta = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(folder / "meta.json"))
    for name in ("logits", "pooled", "hidden"):
        moved = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(folder / f"{name}.npy"))
        source = events[moved][1]
        assert ("fsync", source) in events[:moved], name
        assert moved < meta
    assert events[-1] == ("fsync", str(folder))


def _live_logits(teacher: TaskModel, split) -> torch.Tensor:
    return torch.cat([_live(teacher, batch, split.task).logits
                      for batch in iterate_batches(split, 64, shuffle=False, seed=0)])


def test_same_weights_other_pooling_recompute(splits, tmp_path):
    """Mean and [CLS] pooling of the same weights give other pooled features and logits: the teacher's pooling is
    part of the fingerprint."""
    original = TeacherCache(_teacher(0), tmp_path).outputs(splits["cb"], "train")
    backbone = tiny_backbone("bert", hidden_size=16, num_layers=2, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = TaskModel(backbone, ["cb", "copa"], pooling="cls")
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), _teacher(0).state_dict().values()))
    recomputed = TeacherCache(teacher, tmp_path).outputs(splits["cb"], "train")
    assert not torch.equal(recomputed.logits, original.logits)
    torch.testing.assert_close(recomputed.logits, _live_logits(teacher, splits["cb"]))


def test_same_tokens_other_segments_recompute(splits, tmp_path):
    """The token type ids are part of the fingerprint: the same tokens all in the first segment give a BERT teacher
    other outputs."""
    teacher = _teacher(0)
    original = TeacherCache(teacher, tmp_path).outputs(splits["cb"], "train")
    split = splits["cb"]
    assert split.token_type_ids.any()
    one_segment = type(split)(split.task, split.input_ids, split.attention_mask,
                              torch.zeros_like(split.token_type_ids), split.labels)
    recomputed = TeacherCache(teacher, tmp_path).outputs(one_segment, "train")
    assert not torch.equal(recomputed.logits, original.logits)
    torch.testing.assert_close(recomputed.logits, _live_logits(teacher, one_segment))


def test_a_folder_holding_another_teacher_s_outputs_is_not_reused(splits, tmp_path, monkeypatch):
    """An entry's folder is named by a prefix of the fingerprint only; meta.json's whole fingerprint decides
    whether its files are this teacher's.  With a prefix of length 0 every teacher shares one folder."""
    import mpdistil_fast.data.teacher_cache as teacher_cache

    monkeypatch.setattr(teacher_cache, "FOLDER_KEY_LENGTH", 0)
    first = TeacherCache(_teacher(0), tmp_path).outputs(splits["cb"], "train")
    other = _teacher(1)
    second = TeacherCache(other, tmp_path).outputs(splits["cb"], "train")
    assert not torch.equal(second.logits, first.logits)
    torch.testing.assert_close(second.logits, _live_logits(other, splits["cb"]))
