"""The metrics logger (JSON lines + TensorBoard, rank-aware, exact resume) and the report writer."""
from __future__ import annotations

import json

import pytest
import torch

from mpdistil_fast.pipeline.metrics_log import MetricsLogger, read_metrics
from mpdistil_fast.pipeline.report import format_results_table, write_report

REPORT = {
    "tasks": {
        "cb": {"teacher": {"accuracy": 0.875, "macro_f1": 0.8125, "accuracy_macro_f1_mean": 0.84375, "main": 0.84375},
               "meta_teacher": {"accuracy": 0.75, "macro_f1": 0.5, "accuracy_macro_f1_mean": 0.625, "main": 0.625},
               "student_stage2": {"accuracy": 0.5, "macro_f1": 0.25, "accuracy_macro_f1_mean": 0.375, "main": 0.375},
               "student_final": {"accuracy": 0.625, "macro_f1": 0.5, "accuracy_macro_f1_mean": 0.5625,
                                 "main": 0.5625}},
        "rte": {"teacher": {"accuracy": 0.625, "main": 0.625}, "student_final": {"accuracy": 0.5625, "main": 0.5625}},
    },
    "timings": {"stage1_teacher": 12.5, "stage4_curriculum": 3.25},
    "curves": {"quiz": [(0, "cb", 0.5), (10, "cb", 0.6), (0, "rte", 0.55)], "reward": [(0, 1.0), (1, 0.0), (2, 1.0)],
               "actions": [(0, {"cb": 3, "rte": 1}), (1, {"cb": 1, "rte": 3}), (2, {"rte": 4})]},
    "config": {"method": "mpdistil"},
    "data_source": {"cb": "local ../shared/data"},
    "environment": {"torch": "2.13.0+cpu", "machine": "AMD EPYC (2 threads)", "device": "cpu", "runtime": "local",
                    "world_size": 1, "fused_kernels": {"kd_kl_div": "cpp (avx512 build, torch CPU capability AVX512)",
                                                       "hidden_mse": "torch"}},
}


def test_write_report_outputs(tmp_path):
    write_report(tmp_path / "out", REPORT)
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["tasks"] == REPORT["tasks"] and written["curves"]["quiz"][1] == [10, "cb", 0.6]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| cb | acc 87.5 / F1 81.2 | acc 75.0 / F1 50.0 | acc 50.0 / F1 25.0 | acc 62.5 / F1 50.0 |" in markdown
    assert "| rte | acc 62.5 | - | - | acc 56.2 |" in markdown
    assert "| average (main) | 73.4 | - | - | 56.2 |" in markdown
    assert "| stage1_teacher | 12.5 |" in markdown and "local ../shared/data" in markdown
    assert markdown.startswith("# mpdistil run report")
    assert markdown.endswith("## Environment\n\n- torch 2.13.0+cpu on AMD EPYC (2 threads), device cpu, 1 process "
                             "(local runtime)\n- kd_kl_div kernels: cpp (avx512 build, torch CPU capability AVX512)\n"
                             "- hidden_mse kernels: torch\n")
    png = (tmp_path / "out" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["curves.png", "report.json", "report.md"]


def test_report_with_missing_parts_still_writes(tmp_path):
    write_report(tmp_path, {"tasks": {"rte": {"student_final": {"accuracy": 0.5, "main": 0.5}}}})
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert format_results_table({"tasks": {}}).splitlines() == ["| task |", "|---|", "| average (main) |"]
    # a column per model the run reports: MetaDistil's meta-learned teacher, no meta-teacher or stage-2 student
    metadistil = {"tasks": {"rte": {"teacher": {"accuracy": 0.5, "main": 0.5},
                                    "teacher_final": {"accuracy": 0.75, "main": 0.75},
                                    "student_final": {"accuracy": 0.625, "main": 0.625}}}}
    assert format_results_table(metadistil).splitlines() == [
        "| task | Teacher | Teacher (final) | Student (final) |", "|---|---|---|---|",
        "| rte | acc 50.0 | acc 75.0 | acc 62.5 |", "| average (main) | 50.0 | 75.0 | 62.5 |"]
    with pytest.raises(TypeError, match="report"):
        write_report(tmp_path, [("tasks", {})])


def tensorboard_events(output_dir):
    """The TensorBoard event files that MetricsLogger wrote under ``output_dir``, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    return events


def tensorboard_scalars(output_dir) -> dict[str, list[tuple[int, float]]]:
    events = tensorboard_events(output_dir)
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log("stage2", 1, {"loss": 0.5, "quiz_accuracy": torch.tensor(0.75)})
        logger.log("stage4", 3, {"reward": 1})
    records = read_metrics(tmp_path)
    assert [(r["stage"], r["step"]) for r in records] == [("stage2", 1), ("stage4", 3)]
    assert records[0]["quiz_accuracy"] == 0.75 and records[1]["reward"] == 1.0
    events = tensorboard_events(tmp_path)
    assert set(events.Tags()["scalars"]) == {"stage2/loss", "stage2/quiz_accuracy", "stage4/reward"}
    assert events.Scalars("stage2/quiz_accuracy")[0].value == pytest.approx(0.75)


def test_a_file_that_does_not_close_leaves_the_other_closed_and_is_raised(tmp_path, monkeypatch):
    """A successful run's close raises a file's error, after closing the other file too (the TensorBoard writer's
    thread and unwritten events were left behind when metrics.jsonl did not close)."""
    logger = MetricsLogger(tmp_path)
    logger.log("stage2", 1, {"loss": 0.5})
    writer, metrics_file = logger._writer, logger._file
    close_file = metrics_file.close

    def unwritable() -> None:
        close_file()
        raise OSError("No space left on device")

    monkeypatch.setattr(metrics_file, "close", unwritable)
    with pytest.raises(OSError, match="No space left on device"):
        logger.close()
    assert metrics_file.closed and writer.all_writers is None  # SummaryWriter.close empties all_writers
    assert logger._file is None and logger._writer is None
    assert tensorboard_events(tmp_path).Scalars("stage2/loss")[0].value == pytest.approx(0.5)


def test_only_the_main_process_writes(tmp_path):
    logger = MetricsLogger(tmp_path / "rank1", is_main=False)
    logger.log("stage2", 0, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(TypeError, match="loss"):
        logger.log("stage2", 0, {"loss": "high"})


def test_resume_drops_records_written_after_the_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log("stage2", 0, {"loss": 1.0})
    logger.log("stage2", 1, {"loss": 0.9})
    at_checkpoint = logger.records_written
    logger.log("stage2", 2, {"loss": 0.8})  # logged, then the run is killed before the next checkpoint
    logger.close()
    resumed = MetricsLogger(tmp_path, tensorboard=False, keep_records=at_checkpoint)
    resumed.log("stage2", 2, {"loss": 0.7})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(0, 1.0), (1, 0.9), (2, 0.7)]
    assert MetricsLogger(tmp_path, tensorboard=False).records_written == 3


def test_resume_rewrites_tensorboard_without_the_dropped_records(tmp_path):
    """TensorBoard after a resume shows the kept records and the new ones, each step once, at its logged time."""
    logger = MetricsLogger(tmp_path)
    logger.log("stage1", 0, {"loss": 1.0, "acc": 0.5})
    logger.log("stage2", 0, {"loss": 0.9, "diverged": float("nan")})
    at_checkpoint = logger.records_written
    logger.log("stage2", 1, {"loss": 0.8})  # dropped by the resume
    logger.close()
    resumed = MetricsLogger(tmp_path, keep_records=at_checkpoint)
    resumed.log("stage2", 1, {"loss": 0.7})
    resumed.close()
    assert tensorboard_scalars(tmp_path) == {"stage1/loss": [(0, 1.0)], "stage1/acc": [(0, 0.5)],
                                             "stage2/loss": [(0, pytest.approx(0.9)), (1, pytest.approx(0.7))]}
    events = tensorboard_events(tmp_path)
    assert events.Scalars("stage1/loss")[0].wall_time == pytest.approx(read_metrics(tmp_path)[0]["time"])
    MetricsLogger(tmp_path).close()  # a fresh (not resumed) logger appends: nothing is rewritten
    assert tensorboard_scalars(tmp_path)["stage2/loss"] == [(0, pytest.approx(0.9)), (1, pytest.approx(0.7))]


def test_logger_errors_name_the_argument(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match="stage"):
        logger.log("", 0, {"loss": 1.0})
    with pytest.raises(TypeError, match="step"):
        logger.log("stage2", 1.5, {"loss": 1.0})
    with pytest.raises(ValueError, match="acc"):
        logger.log("stage2", 1, {"acc": torch.ones(2)})
    with pytest.raises(ValueError, match="keep_records"):
        MetricsLogger(tmp_path, tensorboard=False, keep_records=-1)
    logger.close()


def test_an_interrupted_resume_rewrite_keeps_metrics_jsonl(tmp_path, monkeypatch):
    """The resume rewrites metrics.jsonl without the dropped records; killed inside that rewrite, the file must still
    hold every record (the next resume keeps them), not a truncated or emptied file."""
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(3):
        logger.log("stage2", step, {"loss": 1.0 - step / 10})
    logger.close()
    before = (tmp_path / "metrics.jsonl").read_text()
    real_write_text = type(tmp_path).write_text

    def killed_mid_write(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt  # the kill lands after half the text was written

    monkeypatch.setattr(type(tmp_path), "write_text", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        MetricsLogger(tmp_path, tensorboard=False, keep_records=2)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary left behind


def test_a_resume_without_tensorboard_still_drops_the_killed_run_s_events(tmp_path):
    """The run had TensorBoard on, its resume turns it off (``runtime.tensorboard`` may change on resume): the events
    the killed run wrote after the checkpoint must not stay behind (they disagree with metrics.jsonl)."""
    logger = MetricsLogger(tmp_path)
    logger.log("stage2", 0, {"loss": 0.9})
    at_checkpoint = logger.records_written
    logger.log("stage2", 1, {"loss": 0.8})  # dropped by the resume
    logger.close()
    resumed = MetricsLogger(tmp_path, tensorboard=False, keep_records=at_checkpoint)
    resumed.log("stage2", 1, {"loss": 0.7})
    resumed.close()
    assert tensorboard_scalars(tmp_path) == {"stage2/loss": [(0, pytest.approx(0.9))]}
