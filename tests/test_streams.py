"""The pipeline's batch streams: every epoch covers the data once, epochs and streams reshuffle, and a position
(step counter or cursor) alone recomputes the exact batches that follow."""
from __future__ import annotations

import torch

from mpdistil_fast.data import EncodedSplit
from mpdistil_fast.pipeline.streams import MultiTaskSchedule, TaskCursor


def _split(task: str, rows: int) -> EncodedSplit:
    ids = torch.arange(rows * 4).reshape(rows, 4)
    return EncodedSplit(task, ids, torch.ones_like(ids), torch.zeros_like(ids), torch.arange(rows) % 2)


def _rows(batches) -> list[list[int]]:
    return [batch["example_index"].tolist() for batch in batches]


def test_a_task_cursor_reshuffles_each_epoch_and_resumes_from_its_position():
    split = _split("cb", 10)
    cursor = TaskCursor(split, 4, seed=3, salt=17)
    epochs = [_rows(cursor.next() for _ in range(3)) for _ in range(3)]
    for epoch in epochs:  # batches of 4, 4, 2: every row once per epoch
        assert [len(rows) for rows in epoch] == [4, 4, 2] and sorted(sum(epoch, [])) == list(range(10))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # a new order every epoch
    assert cursor.position() == [2, 3]
    # a cursor rebuilt from a saved position continues with the same batches
    cursor = TaskCursor(split, 4, seed=3, salt=17)
    for _ in range(4):
        cursor.next()
    resumed = TaskCursor(split, 4, seed=3, salt=17, epoch=cursor.position()[0], batch=cursor.position()[1])
    assert _rows(resumed.next() for _ in range(5)) == _rows(cursor.next() for _ in range(5))


def test_streams_of_other_salts_are_shuffled_independently():
    """The salt tells the stages' streams of one split apart (MetaDistil's quiz 17, the curriculum's quiz 202):
    another salt, another order; the same seed and salt, the same order."""
    split = _split("cb", 12)

    def first_epoch(salt: int) -> list[list[int]]:
        cursor = TaskCursor(split, 4, seed=3, salt=salt)
        return _rows(cursor.next() for _ in range(3))

    assert first_epoch(17) == first_epoch(17)
    assert first_epoch(17) != first_epoch(202)


def test_a_multi_task_schedule_interleaves_every_batch_once_per_epoch():
    splits = {"cb": _split("cb", 10), "rte": _split("rte", 7)}
    schedule = MultiTaskSchedule(splits, 4, seed=3, salt=5)
    assert schedule.counts == {"cb": 3, "rte": 2} and schedule.batches_per_epoch == 5
    orders = [schedule.order(epoch) for epoch in range(4)]
    assert all(sorted(order) == ["cb"] * 3 + ["rte"] * 2 for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # the tasks' interleaving changes with the epoch
    for epoch in range(2):
        batches = list(schedule.batches(epoch))
        assert [task for task, _ in batches] == orders[epoch]
        for task in splits:
            rows = sum(_rows(batch for name, batch in batches if name == task), [])
            assert sorted(rows) == list(range(len(splits[task])))
        for start in range(6):  # a resumed stage starts mid-epoch on exactly the remaining batches
            tail = list(schedule.batches(epoch, start))
            assert [(t, b["example_index"].tolist()) for t, b in tail] == \
                   [(t, b["example_index"].tolist()) for t, b in batches[start:]]
