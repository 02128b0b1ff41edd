"""Metrics logging: one JSON line per record in ``metrics.jsonl`` and the same scalars in TensorBoard.

Rank-aware: only the main process (``is_main``) opens files; other ranks' loggers accept calls and do nothing, so
callers never branch on the rank.  Each JSON line is ``{"stage", "step", "time", <metric>: value, ...}`` and is
flushed as written, so a killed run keeps every record logged before the kill.  For an exact resume, store
:attr:`MetricsLogger.records_written` in the checkpoint and pass it back as ``keep_records``: the records a killed run
wrote after its last checkpoint are dropped, so the resumed run does not log them twice.  TensorBoard event files are
append-only, so a resume rewrites them from the kept records (metrics.jsonl holds every scalar TensorBoard shows, with
its wall time): the resumed run's curves have no repeated steps either.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from mpdistil_fast.files import written_atomically

LOG = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
EVENTS_PATTERN = "events.out.tfevents.*"
#: Fields of a metrics.jsonl record that are not metrics.
RECORD_FIELDS = ("stage", "step", "time")


class TrainingDivergedError(RuntimeError):
    """A stage's training loss became NaN or infinite: every later step, checkpoint and score would be of a broken
    model (one NaN gradient makes every weight NaN)."""


def diverged(stage: str, step: int, what: str, detail: str) -> TrainingDivergedError:
    """The error of a ``stage`` whose training ``what`` ("loss", a gradient) went NaN or infinite at ``step``."""
    return TrainingDivergedError(
        f"the {stage} stage's training {what} is not finite at its step {step} ({detail}): the model diverged (a "
        "learning rate too high for it, or fp16 overflow); lower that stage's lr or max_grad_norm and start again "
        "(--overwrite): --resume would repeat the same steps")


def check_finite_losses(stage: str, step: int, metrics: dict[str, float]) -> None:
    """Raise :class:`TrainingDivergedError` when a loss of ``metrics`` (``loss``, ``*_loss``) is NaN or infinite."""
    if bad := {name: value for name, value in metrics.items()
               if (name == "loss" or name.endswith("_loss")) and not math.isfinite(value)}:
        raise diverged(stage, step, "loss", ", ".join(f"{name} = {value}" for name, value in bad.items()))


def _record_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The metrics of a metrics.jsonl record (JSON writes non-finite floats as NaN/Infinity and reads them back)."""
    return {name: float(value) for name, value in record.items() if name not in RECORD_FIELDS}


def _scalar(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} must be a real number, got {type(value).__name__}")
    return float(value)


class MetricsLogger:
    """Append metrics of ``stage`` at ``step`` to ``OUTPUT_DIR/metrics.jsonl`` and ``OUTPUT_DIR/tensorboard``."""

    def __init__(self, output_dir: Path | str, *, is_main: bool = True, tensorboard: bool = True,
                 keep_records: int | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.records_written = 0
        self._file = None
        self._writer = None
        if not is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / METRICS_FILE
        if keep_records is not None:
            if isinstance(keep_records, bool) or not isinstance(keep_records, int) or keep_records < 0:
                raise ValueError(f"keep_records must be a non-negative int or None, got {keep_records!r}")
            kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep_records] if path.is_file() else []
            with written_atomically(path) as temporary:  # killed mid-rewrite, the file keeps every record
                temporary.write_text("".join(kept), encoding="utf-8")
            self.records_written = len(kept)
        elif path.is_file():
            self.records_written = len(read_metrics(self.output_dir))
        self._file = path.open("a", encoding="utf-8")
        log_dir = self.output_dir / TENSORBOARD_SUBDIR
        earlier_events = list(log_dir.glob(EVENTS_PATTERN)) if keep_records is not None else []
        # (a resume that turns TensorBoard off still rewrites the killed run's events, so none stay past the kept)
        if tensorboard or earlier_events:
            from torch.utils.tensorboard import SummaryWriter

            for events_file in earlier_events:  # drop the killed run's events; the kept records are replayed below
                events_file.unlink()
            self._writer = SummaryWriter(log_dir=str(log_dir))
            if keep_records is not None:
                for record in read_metrics(self.output_dir):
                    self._add_scalars(record["stage"], record["step"], _record_metrics(record), record["time"])
            if not tensorboard:
                self._writer.close()
                self._writer = None

    def _add_scalars(self, stage: str, step: int, values: dict[str, float], wall_time: float) -> None:
        for name, value in values.items():
            if math.isfinite(value):
                self._writer.add_scalar(f"{stage}/{name}", value, step, walltime=wall_time)

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` (name -> real number or 1-element tensor) of ``stage`` at ``step``."""
        if not isinstance(stage, str) or not stage:
            raise ValueError(f"stage must be a non-empty str, got {stage!r}")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        values = {name: _scalar(name, value) for name, value in metrics.items()}
        if self._file is None:
            return
        record = {"stage": stage, "step": step, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.records_written += 1
        if self._writer is not None:
            self._add_scalars(stage, step, values, record["time"])

    def close(self, *, failed: bool = False) -> None:
        """Flush and close the files (idempotent); each is closed even when another does not close.  The first
        error is raised after all were tried, unless ``failed``: the run raised, and its error is the one to
        propagate, so a file that does not close is logged instead."""
        handles = {METRICS_FILE: self._file, "the TensorBoard writer": self._writer}
        self._file = self._writer = None
        first_error: Exception | None = None
        for name, handle in handles.items():
            try:
                if handle is not None:
                    handle.close()
            except Exception as exc:
                if not failed:
                    first_error = first_error or exc
                    continue
                LOG.exception("closing %s in %s after the run failed", name, self.output_dir)
        if first_error is not None:
            raise first_error

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.close(failed=exc_type is not None)


def read_metrics(output_dir: Path | str) -> list[dict[str, Any]]:
    """The records of ``OUTPUT_DIR/metrics.jsonl`` (an empty list when absent)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
