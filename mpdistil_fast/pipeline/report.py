"""The run report: ``report.json`` (everything), ``report.md`` (the results table) and ``curves.png``.

``report`` layout (missing parts are allowed and shown as "-" / an empty panel)::

    {"tasks":   {task: {"teacher": metrics, "meta_teacher": metrics, "student_stage2": metrics,
                        "student_final": metrics}},          # metrics as returned by compute_metrics
     "timings": {name: seconds},                           # summed over the run's processes (--resume)
     "timings_earlier_processes": {name: seconds},         # the part of each that processes before the last measured
     "curves":  {"quiz":    [(step, task, value), ...],      # quiz metric over curriculum / training steps
                 "reward":  [(episode, value), ...],         # MPDistil's episode reward
                 "actions": [(episode, {task: count}), ...]},  # the policy's action distribution per episode
     "config":  {...}, "data_source": {task: str},
     "environment": {"torch", "machine", "device", "runtime", "world_size",
                     "fused_kernels": {op: backend "auto" chose}}}    # further keys are kept in report.json
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from mpdistil_fast.files import written_atomically

#: Every model a run can report, in table order (MetaDistil's meta-learned teacher is ``teacher_final``).
MODEL_COLUMNS = (("teacher", "Teacher"), ("teacher_final", "Teacher (final)"), ("meta_teacher", "Meta-teacher"),
                 ("student_stage2", "Student (stage 2)"), ("student_final", "Student (final)"),
                 ("student", "Student (run unfinished)"))  # (evaluate's, of an unfinished run's checkpoint)
METRIC_LABELS = {"accuracy": "acc", "macro_f1": "F1"}


def _atomic_write(path: Path, data: bytes) -> None:
    with written_atomically(path) as temporary:
        temporary.write_bytes(data)


def _cell(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "-"
    shown = [(METRIC_LABELS[name], metrics[name]) for name in METRIC_LABELS if name in metrics]
    if not shown:
        shown = [("main", metrics["main"])] if "main" in metrics else []
    return " / ".join(f"{label} {100 * value:.1f}" for label, value in shown) or "-"


def format_results_table(report: dict[str, Any]) -> str:
    """The Markdown table of per-task metrics (percent) of every model the run reports (a column per model that some
    task has), with an average row of the main metric."""
    tasks = report.get("tasks", {})
    columns = [(key, title) for key, title in MODEL_COLUMNS if any(key in models for models in tasks.values())]
    lines = ["| task |" + "".join(f" {title} |" for _, title in columns), "|---|" + "---|" * len(columns)]
    for task, models in tasks.items():
        lines.append(f"| {task} |" + "".join(f" {_cell(models.get(key))} |" for key, _ in columns))
    averages = []
    for key, _ in columns:
        mains = [models[key]["main"] for models in tasks.values() if models.get(key) and "main" in models[key]]
        averages.append(f"{100 * sum(mains) / len(mains):.1f}" if len(mains) == len(tasks) and mains else "-")
    lines.append("| average (main) |" + "".join(f" {average} |" for average in averages))
    return "\n".join(lines)


def format_report_markdown(report: dict[str, Any]) -> str:
    """``report.md``: results table, timings, data provenance and the environment."""
    method = (report.get("config") or {}).get("method")
    parts = [f"# {method} run report" if method else "# Run report", "",
             "Metrics on each task's validation split (the reported split; never used for model selection), "
             "in percent. CB shows accuracy / macro-F1.", "", format_results_table(report)]
    timings = report.get("timings") or {}
    earlier = report.get("timings_earlier_processes") or {}
    if timings:
        parts += ["", "## Timings", ""]
        if earlier:
            parts += ["A resumed run: each phase's seconds add up every process of the run, the killed or stopped "
                      "ones up to the checkpoint the next one resumed from (what they computed after it was "
                      "redone and counts once); the last column is the part measured by those earlier processes.",
                      ""]
        columns = ["phase", "seconds"] + (["earlier processes"] if earlier else [])
        parts += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for name, seconds in timings.items():
            cells = [name, f"{float(seconds):.1f}"] + ([f"{float(earlier.get(name, 0.0)):.1f}"] if earlier else [])
            parts.append("| " + " | ".join(cells) + " |")
    sources = report.get("data_source") or {}
    if sources:
        parts += ["", "## Data", ""] + [f"- {task}: {source}" for task, source in sources.items()]
    environment = report.get("environment") or {}
    if environment:
        processes = environment.get("world_size", 1)
        parts += ["", "## Environment", "",
                  f"- torch {environment.get('torch', '?')} on {environment.get('machine', '?')}, device "
                  f"{environment.get('device', '?')}, {processes} process{'es' if processes != 1 else ''} "
                  f"({environment.get('runtime', '?')} runtime)"]
        parts += [f"- {op} kernels: {backend}" for op, backend in (environment.get("fused_kernels") or {}).items()]
    return "\n".join(parts) + "\n"


def plot_curves(curves: dict[str, Any], path: Path) -> None:
    """``curves.png``: quiz metric per task over steps; reward over episodes; action distribution over episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (quiz_axis, reward_axis, action_axis) = plt.subplots(1, 3, figsize=(15, 4))
    by_task: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for step, task, value in curves.get("quiz", []):
        by_task[task].append((step, value))
    for task, points in sorted(by_task.items()):
        quiz_axis.plot(*zip(*sorted(points)), marker=".", label=task)
    quiz_axis.set(title="Quiz metric", xlabel="step", ylabel="main metric")
    if by_task:
        quiz_axis.legend()
    rewards = sorted(curves.get("reward", []))
    if rewards:
        reward_axis.plot(*zip(*rewards), marker=".")
    reward_axis.set(title="Curriculum reward", xlabel="episode", ylabel="reward")
    actions = sorted(curves.get("actions", []), key=lambda item: item[0])
    names = sorted({task for _, counts in actions for task in counts})
    if actions:
        episodes = [episode for episode, _ in actions]
        totals = [max(sum(counts.values()), 1) for _, counts in actions]
        shares = [[counts.get(task, 0) / total for (_, counts), total in zip(actions, totals)] for task in names]
        action_axis.stackplot(episodes, shares, labels=names)
        action_axis.legend(loc="upper right")
    action_axis.set(title="Policy action distribution", xlabel="episode", ylabel="share of actions", ylim=(0, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)


#: The files :func:`write_report` writes into a run's output_dir.
REPORT_FILES = ("report.json", "report.md", "curves.png")


def write_report(output_dir: Path | str, report: dict[str, Any]) -> None:
    """Write ``report.json``, ``report.md`` and ``curves.png`` into ``output_dir`` (each replaced atomically)."""
    if not isinstance(report, dict):
        raise TypeError(f"report must be a dict, got {type(report).__name__}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(output_dir / "report.json", json.dumps(report, indent=2, default=str).encode())
    _atomic_write(output_dir / "report.md", format_report_markdown(report).encode())
    with written_atomically(output_dir / "curves.png") as temporary:
        plot_curves(report.get("curves") or {}, temporary)
