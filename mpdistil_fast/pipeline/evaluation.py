"""``mpdistil-fast evaluate``: a checkpoint's models on the validation split of every task of its run."""
from __future__ import annotations

from pathlib import Path

from mpdistil_fast.pipeline.checkpoint import latest_checkpoint, load_checkpoint
from mpdistil_fast.pipeline.config import ConfigError, config_from_dict


def evaluate_checkpoint(path: Path, *, data_dir: str | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {"teacher": metrics, "student": metrics}}`` for the checkpoint at ``path`` (or a run's newest)."""
    from mpdistil_fast.pipeline.trainer import Run

    path = Path(path)
    if not (path / "state.json").is_file():
        newest = latest_checkpoint(path)
        if newest is None:
            raise ConfigError(f"--checkpoint: no checkpoint at {path} (give a checkpoint folder or a run's "
                              "output_dir)")
        path = newest
    _, state = load_checkpoint(path)
    overrides = [f"data.data_dir={data_dir}"] if data_dir else []
    config = config_from_dict(state["config"], overrides)
    run = Run(config, checkpoint=path)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for task in run.tasks:
        results[task] = {"student": run.evaluate(run.student, task, "validation")}
        if run.teacher is not None:
            results[task]["teacher"] = run.evaluate(run.teacher, task, "validation")
    return results


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A Markdown table: one row per (task, model), one column per metric."""
    metrics = sorted({name for by_model in results.values() for m in by_model.values() for name in m})
    lines = ["| task | model | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for task, by_model in results.items():
        for model, values in by_model.items():
            cells = [f"{100 * values[m]:.1f}" if m in values else "" for m in metrics]
            lines.append(f"| {task} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
