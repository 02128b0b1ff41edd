"""Run by ``torchrun`` from tests/test_distributed.py: ``mpdistil-fast distill`` (the arguments after this file's
name) on two ranks, where rank 1 alone goes wrong while rank 0 goes on into the collectives that follow.  Each rank
prints how its runtime was closed.  ``FAILING_RANK_MODE``:

- ``raise`` (default): rank 1 raises at the end of the teacher's stage, holding the teacher's training engine;
- ``nan``: rank 1's first training loss (the teacher's first step) is NaN, so its gradient is too;
- ``hang``: rank 1 hangs (sleeps for ten minutes) at the end of the teacher's stage;
- ``kill``: rank 1 is killed (SIGKILL: no handler, no close) at the end of the teacher's stage.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import torch

from mpdistil_fast.cli import main
from mpdistil_fast.distributed.deepspeed_runtime import DeepSpeedRuntime
from mpdistil_fast.pipeline import stages
from mpdistil_fast.pipeline.trainer import Run


def report_close() -> None:
    """Print the engines a rank's ``close`` retired and whether its process group is left."""
    close = DeepSpeedRuntime.close

    def reporting(self: DeepSpeedRuntime, *, failed: bool = False) -> None:
        engines = len(self._engines)
        close(self, failed=failed)
        print(f"rank {self.rank} closed (failed={failed}): {engines} engine(s) retired, {len(self._engines)} left, "
              f"process group up: {torch.distributed.is_initialized()}", flush=True)

    DeepSpeedRuntime.close = reporting


def at_the_teacher_stage_end(go_wrong) -> None:
    """Call ``go_wrong(run)`` on this rank when its teacher stage ends, before the stage's end goes on."""
    end_stage = Run.end_stage

    def wrong(self: Run, stage: str) -> None:
        if stage == "teacher":
            go_wrong(self)
        end_stage(self, stage)

    Run.end_stage = wrong


def fail_alone(run: Run) -> None:
    raise RuntimeError(f"rank {run.runtime.rank} fails alone")


def hang(run: Run) -> None:
    time.sleep(600)


def be_killed(run: Run) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def nan_first_loss() -> None:
    cross_entropy, calls = stages.cross_entropy, []

    def nan_once(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(None)
        loss = cross_entropy(logits, labels)
        return loss * float("nan") if len(calls) == 1 else loss

    stages.cross_entropy = nan_once


if __name__ == "__main__":
    report_close()
    if os.environ["RANK"] == "1":
        mode = os.environ.get("FAILING_RANK_MODE", "raise")
        if mode == "nan":
            nan_first_loss()
        else:
            at_the_teacher_stage_end({"raise": fail_alone, "hang": hang, "kill": be_killed}[mode])
    sys.exit(main(sys.argv[1:]))
