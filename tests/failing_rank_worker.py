"""Run by ``torchrun`` from tests/test_distributed.py: ``mpdistil-fast distill`` (the arguments after this file's
name) on two ranks, where rank 1 alone raises at the end of the teacher's stage, holding the teacher's training
engine, while rank 0 goes on into the collectives that follow.  Each rank prints how its runtime was closed."""
from __future__ import annotations

import os
import sys

import torch

from mpdistil_fast.cli import main
from mpdistil_fast.distributed.deepspeed_runtime import DeepSpeedRuntime
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


def fail_after_the_teacher_stage() -> None:
    end_stage = Run.end_stage

    def failing(self: Run, stage: str) -> None:
        if stage == "teacher":
            raise RuntimeError(f"rank {self.runtime.rank} fails alone")
        end_stage(self, stage)

    Run.end_stage = failing


if __name__ == "__main__":
    report_close()
    if os.environ["RANK"] == "1":
        fail_after_the_teacher_stage()
    sys.exit(main(sys.argv[1:]))
