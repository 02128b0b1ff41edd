"""``mpdistil-fast evaluate``: a checkpoint's models on the validation split of every reported task of its run."""
from __future__ import annotations

import json
from pathlib import Path

from mpdistil_fast.pipeline.checkpoint import STATE_FILE, latest_checkpoint
from mpdistil_fast.pipeline.config import ConfigError, config_from_dict


def evaluate_checkpoint(path: Path, *, data_dir: str | None = None) -> dict:
    """A report (``{"tasks": {task: {"teacher": metrics, "student_final": metrics}}}``, the layout of
    :mod:`.report`) of the checkpoint at ``path``, or of a run's newest checkpoint."""
    from mpdistil_fast.pipeline.trainer import Run

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        newest = latest_checkpoint(path)
        if newest is None:
            raise ConfigError(f"--checkpoint: no checkpoint at {path} (give a checkpoint folder or a run's "
                              "output_dir)")
        path = newest
    state = json.loads((path / STATE_FILE).read_text())  # only the config: Run loads the tensors once
    # one process on this machine's device: a checkpoint holds whole weights, whichever runtime (one process,
    # DeepSpeed ranks) and device wrote it
    overrides = ["runtime.kind=local", "runtime.device=auto"] + ([f"data.data_dir={data_dir}"] if data_dir else [])
    config = config_from_dict(state["config"], overrides)
    run = Run(config, checkpoint=path)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for task in run.targets:
        results[task] = {"student_final": run.evaluate(run.student, task, "validation")}
        if run.teacher is not None:
            results[task]["teacher"] = run.evaluate(run.teacher, task, "validation")
    return {"tasks": results, "checkpoint": str(path)}
