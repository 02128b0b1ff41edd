"""Meta-step benchmark: time and peak extra memory of a plain KD student step versus MetaDistil's pilot update
(:class:`mpdistil_fast.bilevel.PilotUpdate`) with each hypergradient method.

Teacher: BERT 6 x 384 (12 heads, FFN 1536), student: BERT 3 x 384, random init from config, sequence
classification with 3 labels, CPU, float32, eager attention and the plain-torch KD loss in every configuration
(so the methods are compared on equal terms), plus ``finite_difference+fused``: SDPA attention and the fused C++
``kd_kl_div`` (neither supports double backward, so only the first-order methods can run it).

Every measurement runs in its own fresh process (``--worker``), after one warm-up step that allocates the
persistent state (gradients, optimizer moments).  Each configuration gets two processes per round:

* time: the default allocator (as users run), ``--steps`` measured steps, median;
* memory: large allocations are returned to the OS at once (``MALLOC_MMAP_THRESHOLD_``, which makes every large
  allocation page-fault afresh, so this process is not timed), the kernel's peak-RSS mark is reset
  (``/proc/self/clear_refs``) and the peak RSS of one step minus the RSS before it is the step's *extra* memory.

    python benchmarks/bench_meta_step.py            # the full table (a few minutes on 2 cores)
    python benchmarks/bench_meta_step.py --quick    # B=8, L=128 only
    python benchmarks/bench_meta_step.py --quick --rounds 3 --configs exact finite_difference   # timing focus
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("plain_kd", "exact", "finite_difference", "forward_mode", "first_order", "finite_difference+fused",
           "finite_difference+reuse")
#: (batch, sequence length) points; the growth sweep runs the configurations named in GROWTH_CONFIGS.
MAIN_SHAPE = (8, 128)
GROWTH_SHAPES = ((4, 128), (8, 64))
GROWTH_CONFIGS = ("plain_kd", "exact", "finite_difference")
NAME = "meta_step"


def _vm_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def worker(config: str, batch_size: int, seq_len: int, steps: int) -> dict:
    """One configuration in this (fresh) process: per-step milliseconds and peak extra MiB."""
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

    student_optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5)
    if method == "plain_kd":
        teacher.requires_grad_(False)

        def step(train: dict, quiz: dict) -> None:
            student_optimizer.zero_grad(set_to_none=True)
            inner_loss(student, without_parameter_grads(teacher), train).backward()
            student_optimizer.step()
    else:
        pilot = PilotUpdate(student, teacher, student_optimizer, torch.optim.AdamW(teacher.parameters(), lr=1e-5),
                            inner_loss, quiz_loss, method=method, reuse_student_forward=variant == "reuse")

        def step(train: dict, quiz: dict) -> None:
            pilot.step(train, quiz)

    train, quiz = batch(), batch()
    step(train, quiz)  # warm-up: optimizer state now exists; gradients are per-step memory
    for module in (student, teacher):
        module.zero_grad(set_to_none=True)
    baseline = _vm_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(train, quiz)
        times.append((time.perf_counter() - start) * 1e3)
    peak = _vm_kib("VmHWM")
    return {"config": config, "batch": batch_size, "seq": seq_len, "times_ms": times,
            "extra_mib": (peak - baseline) / 1024, "baseline_mib": baseline / 1024,
            "threads": torch.get_num_threads()}


def run_isolated(config: str, batch_size: int, seq_len: int, steps: int, *, memory: bool) -> dict:
    """One worker process; ``memory=True`` switches the allocator to return large blocks at once (see above)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    if memory:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, __file__, "--worker", config, "--batch", str(batch_size), "--seq",
                          str(seq_len), "--steps", str(steps)], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.harness import bar_plot, make_row, print_table, threads_note, write_csv

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=CONFIGS)
    parser.add_argument("--batch", type=int, default=MAIN_SHAPE[0])
    parser.add_argument("--seq", type=int, default=MAIN_SHAPE[1])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up step")
    parser.add_argument("--quick", action="store_true", help="only the main shape")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times, interleaved (round-robin), to even out drift")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--tag", default="", help="suffix of the CSV/PNG names (keeps the main results)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.steps)))
        return

    plan = [(c, *MAIN_SHAPE) for c in args.configs]
    if not args.quick:
        plan += [(c, b, s) for b, s in GROWTH_SHAPES for c in GROWTH_CONFIGS if c in args.configs]
    times: dict[tuple, list[float]] = {key: [] for key in plan}
    memory: dict[tuple, list[float]] = {key: [] for key in plan}
    for round_index in range(args.rounds):
        for key in plan:
            timed = run_isolated(*key, args.steps, memory=False)
            measured = run_isolated(*key, 1, memory=True)
            times[key] += timed["times_ms"]
            memory[key].append(measured["extra_mib"])
            print(f"  round {round_index + 1}: {key[0]:<24} B={key[1]},L={key[2]:<5} "
                  f"{statistics.median(timed['times_ms']):>9.0f} ms  {measured['extra_mib']:>8.1f} MiB", flush=True)
    name = NAME + (f"_{args.tag}" if args.tag else "")
    rows, table = [], []
    for config, batch_size, seq_len in plan:
        x = f"B={batch_size},L={seq_len}"
        speed = make_row(name, config, "step", "speed", x, times[(config, batch_size, seq_len)], "ms")
        extra = make_row(name, config, "step", "memory", x, memory[(config, batch_size, seq_len)], "MiB")
        rows += [speed, extra]
        table.append({"config": config, "shape": x, "ms_p50": speed["p50"], "ms_p20": speed["p20"],
                      "ms_p80": speed["p80"], "extra_MiB": round(float(extra["p50"]), 1)})
    for row in table:  # ratios against the exact meta step of the same shape
        exact = next((r for r in table if r["config"] == "exact" and r["shape"] == row["shape"]), None)
        if exact:
            row["time/exact"] = round(row["ms_p50"] / exact["ms_p50"], 2)
            row["mem/exact"] = round(row["extra_MiB"] / exact["extra_MiB"], 2)
    print(f"\nMeta step, teacher BERT 6x384, student 3x384, float32, {rows[0]['device']}; {threads_note()}")
    print_table(table, ["config", "shape", "ms_p50", "ms_p20", "ms_p80", "extra_MiB", "time/exact", "mem/exact"])
    print(f"CSV: {write_csv(rows, name)}")
    main_rows = [r for r in rows if r["x"] == f"B={MAIN_SHAPE[0]},L={MAIN_SHAPE[1]}"]
    print(f"PNG: {bar_plot(main_rows, name + '_speed', 'Meta step time (CPU)', metric='speed')}")
    print(f"PNG: {bar_plot(rows, name + '_memory', 'Meta step peak extra memory (CPU)', metric='memory')}")


if __name__ == "__main__":
    main()
