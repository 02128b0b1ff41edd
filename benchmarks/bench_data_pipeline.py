"""What the frozen-teacher cache and padding trimming save per epoch, with the real MiniLM-L6 teacher on real data.

Providers (milliseconds per epoch over the same rows, interleaved, median of ``--reps``):

* ``teacher_live``    the teacher's eval forward pass over every batch (what KD pays each epoch without a cache);
* ``teacher_cache``   serving the same batches' logits and pooled features from :class:`TeacherCache`;
* ``student_padded``  3-layer student forward + backward, batches padded to the split's longest example;
* ``student_trimmed`` the same with ``iterate_batches(..., trim=True)``.

Run: ``MPDISTIL_DATA_DIR=../shared/data python -m benchmarks.bench_data_pipeline [--rows 64] [--reps 3]``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from benchmarks.harness import bar_plot, interleaved_timings, make_row, print_table, threads_note, write_csv
from mpdistil_fast.data import TeacherCache, encode_examples, iterate_batches, load_task_splits
from mpdistil_fast.models import TaskModel, default_teacher_path, load_backbone, load_tokenizer, truncated_copy

NAME = "data_pipeline"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["cb", "rte"])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    data_dir = os.environ.get("MPDISTIL_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    tokenizer = load_tokenizer(default_teacher_path())
    teacher = TaskModel(load_backbone("minilm"), args.tasks, pooling="pooler").eval()
    student = TaskModel(truncated_copy(teacher.backbone, 3), args.tasks, pooling="pooler").train()
    rows = []
    for task in args.tasks:
        split = encode_examples(load_task_splits(task, data_dir, max_train=args.rows).train, tokenizer,
                                args.max_length)
        cache = TeacherCache(teacher, batch_size=args.batch_size)
        cached = cache.outputs(split, "train")

        def batches(trim: bool = False):
            return iterate_batches(split, args.batch_size, shuffle=True, seed=0, trim=trim)

        @torch.no_grad()
        def teacher_live() -> None:
            for batch in batches():
                teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], task=task)

        def teacher_cache() -> None:
            for batch in batches():
                cached.gather(batch["example_index"])

        def student_epoch(trim: bool) -> None:
            for batch in batches(trim):
                out = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], task=task)
                torch.nn.functional.cross_entropy(out.logits, batch["labels"]).backward()
            student.zero_grad(set_to_none=True)

        timings = interleaved_timings({"teacher_live": teacher_live, "teacher_cache": teacher_cache,
                                       "student_padded": lambda: student_epoch(False),
                                       "student_trimmed": lambda: student_epoch(True)}, warmup=1, reps=args.reps)
        mask = split.attention_mask.reshape(-1, split.attention_mask.shape[-1])
        extra = (f"{len(split)} rows, split length {mask.shape[-1]}, mean real length "
                 f"{mask.sum(-1).float().mean():.0f}; cache built in {cached.compute_seconds * 1e3:.0f} ms")
        for provider, samples in timings.items():
            rows.append(make_row(NAME, provider, "epoch", "speed", task, samples, "ms", extra=extra))
    print(threads_note())
    print_table(rows, ("x", "provider", "p50", "p20", "p80", "unit", "extra"))
    print("results:", write_csv(rows, NAME), bar_plot(rows, NAME, "Per-epoch cost: teacher live vs cached; "
                                                          "student padded vs trimmed"))


if __name__ == "__main__":
    main()
