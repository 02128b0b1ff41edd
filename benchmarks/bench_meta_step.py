"""Meta-step benchmark: time and peak extra memory of a plain KD student step versus MetaDistil's pilot update
(:class:`mpdistil_fast.bilevel.PilotUpdate`) with each hypergradient method.

Teacher: BERT 6 x 384 (12 heads, FFN 1536), student: BERT 3 x 384, random init from config, sequence
classification with 3 labels, CPU, float32, eager attention and the plain-torch KD loss in every configuration
(so the methods are compared on equal terms), plus ``finite_difference+fused``: SDPA attention and the fused C++
``kd_kl_div`` (neither supports double backward, so only the first-order methods can run it).

Measurements run in fresh worker processes (``--worker``), after one warm-up step per configuration that
allocates the persistent state (gradients, optimizer moments):

* time: one process per shape holds every configuration (each on its own models, same initial weights) and
  steps them in turn, ``--steps`` rounds, so machine drift and neighbours hit every configuration alike; the
  default allocator (as users run); medians;
* memory: one process per configuration, so that its peak is its own; large allocations are returned to the OS at
  once (``MALLOC_MMAP_THRESHOLD_``, which makes every large allocation page-fault afresh, so this process is not
  timed), the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and the peak RSS of one step minus the
  RSS before it is the step's *extra* memory.

    python benchmarks/bench_meta_step.py            # the full table (about 8 minutes on 2 cores)
    python benchmarks/bench_meta_step.py --quick    # B=8, L=128 only
    python benchmarks/bench_meta_step.py --quick --steps 16 --configs exact finite_difference --tag timing
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

CONFIGS = ("plain_kd", "exact", "finite_difference", "forward_mode", "first_order", "finite_difference+fused",
           "finite_difference+reuse")
#: (batch, sequence length) points; the growth sweep runs the configurations named in GROWTH_CONFIGS.
MAIN_SHAPE = (8, 128)
GROWTH_SHAPES = ((4, 128), (8, 64))
GROWTH_CONFIGS = ("plain_kd", "exact", "finite_difference")
NAME = "meta_step"


def _vm_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def build_step(config: str, batch_size: int, seq_len: int) -> Callable[[], None]:
    """A configuration's step on its own models (same seed, so every configuration starts from the same weights),
    already warmed up (optimizer state exists; gradients are per-step memory)."""
    import torch
    import torch.nn.functional as F
    from transformers import BertConfig, BertForSequenceClassification

    import mpdistil_fast
    from mpdistil_fast.bilevel import PilotUpdate
    from mpdistil_fast.bilevel.functional import without_parameter_grads

    torch.manual_seed(0)
    method, _, variant = config.partition("+")
    fused = variant == "fused"

    def bert(layers: int) -> BertForSequenceClassification:
        cfg = BertConfig(hidden_size=384, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=1536,
                         num_labels=3)
        cfg._attn_implementation = "sdpa" if fused else "eager"
        return BertForSequenceClassification(cfg)

    teacher, student = bert(6), bert(3)
    temperature = 2.0

    def batch() -> dict:
        return {"input_ids": torch.randint(0, 30522, (batch_size, seq_len)),
                "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
                "labels": torch.randint(0, 3, (batch_size,))}

    def inputs(b: dict) -> dict:
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

    def inner_loss(s, t, b) -> torch.Tensor:
        student_logits, teacher_logits = s(**inputs(b)).logits, t(**inputs(b)).logits
        kd = mpdistil_fast.kd_kl_div(student_logits, teacher_logits, temperature,
                                     backend="cpp" if fused else "torch")
        return kd + F.cross_entropy(student_logits, b["labels"])

    def quiz_loss(s, b) -> torch.Tensor:
        return F.cross_entropy(s(**inputs(b)).logits, b["labels"])

    train, quiz = batch(), batch()
    student_optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5)
    if method == "plain_kd":
        teacher.requires_grad_(False)

        def step() -> None:
            student_optimizer.zero_grad(set_to_none=True)
            inner_loss(student, without_parameter_grads(teacher), train).backward()
            student_optimizer.step()
    else:
        pilot = PilotUpdate(student, teacher, student_optimizer, torch.optim.AdamW(teacher.parameters(), lr=1e-5),
                            inner_loss, quiz_loss, method=method, reuse_student_forward=variant == "reuse")

        def step() -> None:
            pilot.step(train, quiz)

    step()
    for module in (student, teacher):
        module.zero_grad(set_to_none=True)
    return step


def memory_worker(config: str, batch_size: int, seq_len: int) -> dict:
    """Peak extra MiB of one step of one configuration, alone in this (fresh) process."""
    step = build_step(config, batch_size, seq_len)
    baseline = _vm_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    step()
    return {"config": config, "extra_mib": (_vm_kib("VmHWM") - baseline) / 1024, "baseline_mib": baseline / 1024}


def timing_worker(configs: list[str], batch_size: int, seq_len: int, steps: int) -> dict:
    """Per-step milliseconds of every configuration, all in this process, interleaved step by step (round-robin),
    so that machine drift and neighbours hit every configuration alike."""
    import torch

    steppers = {config: build_step(config, batch_size, seq_len) for config in configs}
    times: dict[str, list[float]] = {config: [] for config in configs}
    for _ in range(steps):
        for config, step in steppers.items():
            start = time.perf_counter()
            step()
            times[config].append((time.perf_counter() - start) * 1e3)
    return {"times_ms": times, "threads": torch.get_num_threads()}


def run_worker(arguments: list[str], *, memory: bool) -> dict:
    """One worker process; ``memory=True`` switches the allocator to return large blocks at once (see above)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    if memory:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, __file__, *arguments], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.harness import bar_plot, make_row, print_table, threads_note, write_csv

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=("timing", "memory"))
    parser.add_argument("--batch", type=int, default=MAIN_SHAPE[0])
    parser.add_argument("--seq", type=int, default=MAIN_SHAPE[1])
    parser.add_argument("--steps", type=int, default=8, help="timed steps of every configuration (interleaved)")
    parser.add_argument("--quick", action="store_true", help="only the main shape")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--tag", default="", help="suffix of the CSV/PNG names (keeps the main results)")
    args = parser.parse_args()
    if args.worker == "timing":
        print(json.dumps(timing_worker(args.configs, args.batch, args.seq, args.steps)))
        return
    if args.worker == "memory":
        print(json.dumps(memory_worker(args.configs[0], args.batch, args.seq)))
        return

    shapes = {MAIN_SHAPE: list(args.configs)}
    if not args.quick:
        shapes.update({shape: [c for c in GROWTH_CONFIGS if c in args.configs] for shape in GROWTH_SHAPES})
    name = NAME + (f"_{args.tag}" if args.tag else "")
    rows, table = [], []
    for (batch_size, seq_len), configs in shapes.items():
        shape_args = ["--batch", str(batch_size), "--seq", str(seq_len)]
        x = f"B={batch_size},L={seq_len}"
        timed = run_worker(["--worker", "timing", "--configs", *configs, "--steps", str(args.steps), *shape_args],
                           memory=False)["times_ms"]
        for config in configs:
            extra_mib = run_worker(["--worker", "memory", "--configs", config, *shape_args], memory=True)["extra_mib"]
            speed = make_row(name, config, "step", "speed", x, timed[config], "ms")
            extra = make_row(name, config, "step", "memory", x, [extra_mib], "MiB")
            rows += [speed, extra]
            table.append({"config": config, "shape": x, "ms_p50": speed["p50"], "ms_p20": speed["p20"],
                          "ms_p80": speed["p80"], "extra_MiB": round(float(extra_mib), 1)})
            print(f"  {config:<24} {x:<10} {speed['p50']:>9.0f} ms  {extra_mib:>8.1f} MiB", flush=True)
    for row in table:  # ratios against the exact meta step of the same shape
        exact = next((r for r in table if r["config"] == "exact" and r["shape"] == row["shape"]), None)
        if exact:
            row["time/exact"] = round(row["ms_p50"] / exact["ms_p50"], 2)
            row["mem/exact"] = round(row["extra_MiB"] / exact["extra_MiB"], 2)
    print(f"\nMeta step, teacher BERT 6x384, student 3x384, float32, {rows[0]['device']}; {threads_note()}; "
          f"{args.steps} interleaved steps per configuration")
    print_table(table, ["config", "shape", "ms_p50", "ms_p20", "ms_p80", "extra_MiB", "time/exact", "mem/exact"])
    print(f"CSV: {write_csv(rows, name)}")
    main_rows = [r for r in rows if r["x"] == f"B={MAIN_SHAPE[0]},L={MAIN_SHAPE[1]}"]
    print(f"PNG: {bar_plot(main_rows, name + '_speed', 'Meta step time (CPU)', metric='speed')}")
    print(f"PNG: {bar_plot(rows, name + '_memory', 'Meta step peak extra memory (CPU)', metric='memory')}")


if __name__ == "__main__":
    main()
