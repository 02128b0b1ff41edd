"""Shared pieces of the pipeline tests: a tiny local teacher (random BERT + the packaged tokenizer) and configs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mpdistil_fast.models import default_teacher_path, load_tokenizer, tiny_backbone

#: Steps and sizes small enough for a whole method to run in seconds on 2 CPU cores.
TINY_RUN: dict[str, Any] = {
    "data": {"tasks": ["cb", "rte"], "max_train": 24, "max_eval": 16, "max_length": 32, "batch_size": 8,
             "eval_batch_size": 16},
    "student": {"num_layers": 2},
    "teacher_training": {"epochs": 1, "max_steps": 3, "lr": 1e-3},
    "student_training": {"epochs": 1, "max_steps": 3, "lr": 1e-3},
    "meta_teacher": {"training": {"epochs": 1, "max_steps": 3, "lr": 1e-3}},
    "curriculum": {"episodes": 2, "steps_per_episode": 2, "actions": ["cb", "rte"]},
    # one thread: tiny matmuls gain nothing from two, and the run stays fast on a shared, loaded machine
    "runtime": {"device": "cpu", "num_threads": 1, "progress": False, "tensorboard": False, "checkpoint_every": 2,
                "log_every": 1},
}


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Runs set torch's thread count (runtime.num_threads); give the next test the count it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_tiny_teacher(folder: Path) -> Path:
    """A random 4-layer, 32-wide BERT saved with the packaged MiniLM tokenizer (a loadable local model)."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_backbone("bert", hidden_size=32, num_layers=4, seed=0).save_pretrained(folder)
    load_tokenizer(str(default_teacher_path())).save_pretrained(folder)
    return folder


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_config(path: Path, teacher: Path, data_dir: Path, output_dir: Path, method: str, **extra: Any) -> Path:
    raw = merge(TINY_RUN, {"method": method, "output_dir": str(output_dir), "teacher": {"model": str(teacher)},
                           "data": {"data_dir": str(data_dir)}})
    raw = merge(raw, extra)
    path.write_text(yaml.safe_dump(raw))
    return path
