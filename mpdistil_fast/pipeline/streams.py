"""Deterministic, resumable batch streams over several tasks.

Every position in a stream is a pure function of ``(seed, salt, epoch, position)``, so a run resumed from a
checkpoint that stored only its step counter (or per-task positions) sees exactly the batches an uninterrupted run
would have seen, and the global RNG is never touched.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterator

import torch

from mpdistil_fast.data import EncodedSplit, iterate_batches, num_batches

Batch = dict[str, torch.Tensor]


def _mix(seed: int, salt: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(salt) * 10_007 + int(epoch)) % (2 ** 62)


class MultiTaskSchedule:
    """Epochs over several tasks: every batch of every task once per epoch, tasks interleaved in a seeded order
    (``row_multiple``: the data-parallel world size, see :func:`~mpdistil_fast.data.iterate_batches`)."""

    def __init__(self, splits: dict[str, EncodedSplit], batch_size: int, *, seed: int, salt: int = 0,
                 row_multiple: int = 1):
        if not splits:
            raise ValueError("splits must hold at least one task")
        self.splits = splits
        self.batch_size = batch_size
        self.seed = seed
        self.salt = salt
        self.row_multiple = row_multiple
        self.counts = {task: num_batches(split, batch_size, row_multiple) for task, split in splits.items()}
        self.batches_per_epoch = sum(self.counts.values())

    def order(self, epoch: int) -> list[str]:
        """The task of each batch of ``epoch``."""
        tasks = [task for task, count in self.counts.items() for _ in range(count)]
        generator = torch.Generator().manual_seed(_mix(self.seed, self.salt, epoch))
        return [tasks[i] for i in torch.randperm(len(tasks), generator=generator).tolist()]

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[str, Batch]]:
        """``(task, batch)`` for positions ``start, start+1, ...`` of ``epoch``."""
        order = self.order(epoch)
        consumed = Counter(order[:start])
        streams = {task: iterate_batches(split, self.batch_size, shuffle=True, seed=_mix(self.seed, self.salt, 0),
                                         epoch=epoch, start_batch=consumed[task], row_multiple=self.row_multiple)
                   for task, split in self.splits.items()}
        for task in order[start:]:
            yield task, next(streams[task])


class TaskCursor:
    """An endless stream of one task's batches, positioned by ``(epoch, batch)`` (JSON-serialisable;
    ``row_multiple`` as in :class:`MultiTaskSchedule`)."""

    def __init__(self, split: EncodedSplit, batch_size: int, *, seed: int, salt: int, epoch: int = 0,
                 batch: int = 0, row_multiple: int = 1):
        self.split = split
        self.batch_size = batch_size
        self.seed = _mix(seed, salt, 0)
        self.epoch = epoch
        self.batch = batch
        self.row_multiple = row_multiple
        self.per_epoch = num_batches(split, batch_size, row_multiple)

    def next(self) -> Batch:
        if self.batch >= self.per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        batch = next(iterate_batches(self.split, self.batch_size, shuffle=True, seed=self.seed, epoch=self.epoch,
                                     start_batch=self.batch, row_multiple=self.row_multiple))
        self.batch += 1
        return batch

    def position(self) -> list[int]:
        return [self.epoch, self.batch]
