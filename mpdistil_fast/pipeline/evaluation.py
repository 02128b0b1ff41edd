"""``mpdistil-fast evaluate``: a checkpoint's models on the validation split of every reported task of its run.

The scores are on the data the run itself read: a run records its resolved data folder (``None``: the hub) and the
``data_source`` line of each task in its checkpoints, and evaluate reads the same folder -- also when the run found
it through ``$MPDISTIL_DATA_DIR`` and the variable is unset now -- or refuses with a :class:`ConfigError` when that
source is not available here, or when its validation rows are no longer those the run read (their fingerprint, see
:class:`~.trainer.Run`), instead of silently scoring other rows.  ``--data-dir`` (``data_dir``) chooses another
folder on purpose.  Checkpoints written before runs recorded their data fall back to the stored config (with a
warning).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mpdistil_fast.data.loading import DATA_DIR_ENV
from mpdistil_fast.pipeline.checkpoint import STATE_FILE, latest_checkpoint, read_state
from mpdistil_fast.pipeline.config import (Config, ConfigError, check_data_available, check_models_available,
                                            config_from_dict, verbatim_override)

LOG = logging.getLogger(__name__)


def _use_run_data(config: Config, state: dict[str, Any], checkpoint: Path) -> bool:
    """Point ``config`` at the data the run read (``state["data_dir"]``), or raise a :class:`ConfigError` when it
    is not available on this machine.  False for a checkpoint that predates the record (nothing to check)."""
    if "data_dir" not in state:
        LOG.warning("checkpoint %s does not record which data its run read: evaluating on data.data_dir=%r, else "
                    "$%s, else the hub (pass --data-dir to choose)", checkpoint, config.data.data_dir, DATA_DIR_ENV)
        return False
    recorded = state["data_dir"]
    if recorded is None:
        if os.environ.get(DATA_DIR_ENV):
            raise ConfigError(f"the run of {checkpoint} read its data from the hub ({state.get('data_source')}), but "
                              f"${DATA_DIR_ENV} is set ({os.environ[DATA_DIR_ENV]}) and would replace it: unset "
                              f"${DATA_DIR_ENV} to score on the run's data, or pass --data-dir to score on a folder")
        config.data.data_dir = None
        return True
    if not Path(recorded).is_dir():
        raise ConfigError(f"the run of {checkpoint} read its data from the folder {recorded}, which is not on this "
                          "machine: pass --data-dir DIR (a copy of the same official files) to score on another copy")
    config.data.data_dir = recorded
    return True


def evaluate_checkpoint(path: Path, *, data_dir: str | None = None) -> dict:
    """A report (``{"tasks": {task: {"teacher": metrics, "student_final": metrics}}, "checkpoint": str,
    "finished": bool, "stage": str | None, "completed": [stage, ...], "data_source": {task: str}}``, the layout of
    :mod:`.report`; the teacher is ``teacher_final`` from MetaDistil's stage on, as the run's report names it, and
    the student of an unfinished run's checkpoint is ``student``, not ``student_final``) of the checkpoint at
    ``path``, or of a run's newest
    checkpoint, on the data its run read (see the module docstring), or on ``data_dir`` when given."""
    from mpdistil_fast.pipeline.trainer import SHARDS_FOLDER, Run

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        newest = latest_checkpoint(path)
        if newest is None:
            raise ConfigError(f"--checkpoint: no checkpoint at {path} (give a checkpoint folder or a run's "
                              "output_dir)")
        path = newest
    state = read_state(path, skip=(SHARDS_FOLDER,))  # only the config: Run loads the tensors once
    # one process on this machine's device: a checkpoint holds whole weights, whichever runtime (one process,
    # DeepSpeed ranks) and device wrote it
    overrides = ["runtime.kind=local", "runtime.device=auto"] + (
        [verbatim_override("data.data_dir", data_dir)] if data_dir else [])
    config = config_from_dict(state["config"], overrides)
    same_data = not data_dir and _use_run_data(config, state, path)
    check_data_available(config)
    check_models_available(config)  # the run's model folders build the models its weights load into
    recorded = state.get("data_source") or {}
    fingerprints = state.get("data_fingerprint") or {}  # (checkpoints from before runs recorded them: none)

    def refuse_other_data(run: Run) -> None:
        """Other data than the run read (hub ids, or rows under the same names), refused before the models load."""
        changed = {task: (recorded[task], run.data_source[task]) for task in run.targets
                   if task in recorded and recorded[task] != run.data_source.get(task)}
        if changed:  # e.g. the hub ids ($MPDISTIL_SUPERGLUE_HUB) differ from the run's
            raise ConfigError(f"the data found here differs from the run's (task: (run's, here)): {changed}; pass "
                              "--data-dir to score on other data on purpose")
        if edited := [task for task in run.targets if task in fingerprints and
                      fingerprints[task]["validation"] != run.data_fingerprint[task]["validation"]]:
            raise ConfigError(f"the validation rows of {', '.join(edited)} found here differ from those the run read "
                              "(the files changed since); pass --data-dir to score on other data on purpose")

    run = Run(config, checkpoint=path, check_data=refuse_other_data if same_data else None)
    results: dict[str, dict[str, dict[str, float]]] = {}
    # once MetaDistil's stage has begun, the teacher is the meta-learned one: the report's teacher_final
    teacher_role = "teacher_final" if "metadistil" in state["completed"] or state["stage"] == "metadistil" \
        else "teacher"
    from mpdistil_fast.pipeline.stages import stages_of

    # a checkpoint of an unfinished run holds a student that is not the run's final one (untrained, mid-stage)
    finished = all(stage in state["completed"] for stage in stages_of(config))
    student_role = "student_final" if finished else "student"
    for task in run.targets:
        results[task] = {student_role: run.evaluate(run.student, task, "validation")}
        if run.teacher is not None:
            results[task][teacher_role] = run.evaluate(run.teacher, task, "validation")
    return {"tasks": results, "checkpoint": str(path), "finished": finished,
            "stage": state["stage"], "completed": list(state["completed"]),
            "data_source": {task: run.data_source[task] for task in run.targets}}
