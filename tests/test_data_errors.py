"""Bad data is refused with an error that names the task, the file and line or the field, and `evaluate` scores on
the data its run read (or refuses) -- never silently on other rows."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from mpdistil_fast.cli import main
from mpdistil_fast.data import check_task_data, load_examples, load_task_splits
from mpdistil_fast.data.tasks import format_row
from mpdistil_fast.pipeline.config import ConfigError
from mpdistil_fast.pipeline.evaluation import evaluate_checkpoint
from pipeline_helpers import make_tiny_teacher, restore_torch_threads, write_config  # noqa: F401 (fixture)

CB_ROW = {"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0}


def _write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_malformed_jsonl_line_names_the_file_and_its_line(tmp_path):
    # line 3 is blank: the bad row is on line 4 of the file (json.loads alone said "line 1")
    rows = [json.dumps({**CB_ROW, "idx": i}) for i in range(2)]
    path = _write(tmp_path, "superglue/CB/val.jsonl", "\n".join([*rows, "", '{"premise": "x", "idx": 3']) + "\n")
    with pytest.raises(ValueError, match=r"CB/val\.jsonl, line 4: not valid JSON") as error:
        load_examples("cb", "validation", tmp_path)
    assert str(path) in str(error.value)
    _write(tmp_path, "superglue/CB/val.jsonl", rows[0] + "\n[1, 2]\n")
    with pytest.raises(ValueError, match="line 2: expected a JSON object"):
        load_examples("cb", "validation", tmp_path)
    _write(tmp_path, "superglue/CB/train.jsonl", '{"premise": \n')
    with pytest.raises(ValueError, match=r"CB/train\.jsonl, line 1: not valid JSON"):
        check_task_data("cb", tmp_path)


@pytest.mark.parametrize("line, fields", [("0\tA man runs.\tentailment", 3),
                                          ("0\tA man\truns.\tA person moves.\tentailment", 5)])
def test_tsv_line_with_a_wrong_number_of_fields_names_the_file_and_line(tmp_path, line, fields):
    header, good = "index\tsentence1\tsentence2\tlabel", "1\tA man runs.\tA person moves.\tentailment"
    _write(tmp_path, "glue/RTE/dev.tsv", "\n".join([header, good, line]) + "\n")
    with pytest.raises(ValueError, match=rf"RTE/dev\.tsv, line 3: expected 4 tab-separated fields .* got {fields}"):
        load_examples("glue_rte", "validation", tmp_path)


def test_bool_labels_only_for_boolean_tasks(tmp_path):
    with pytest.raises(ValueError, match="boolean True"):
        format_row("cb", {**CB_ROW, "label": True}, 0)
    with pytest.raises(ValueError, match="boolean False"):
        format_row("copa", {"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": False}, 0)
    with pytest.raises(ValueError, match="boolean True"):
        format_row("rte", {"premise": "p", "hypothesis": "h", "label": True}, 0)
    assert format_row("wic", {"word": "w", "sentence1": "a", "sentence2": "b", "label": True}, 0).label == 1
    assert format_row("boolq", {"question": "q", "passage": "p", "label": False}, 0).label == 0
    _write(tmp_path, "superglue/CB/val.jsonl", json.dumps({**CB_ROW, "label": True}) + "\n")
    with pytest.raises(ValueError, match=r"CB/val\.jsonl, line 1: label of a cb row .*boolean True"):
        load_examples("cb", "validation", tmp_path)


@pytest.mark.parametrize("task, row, field", [
    ("cb", {**CB_ROW, "premise": None, "idx": 7}, "premise"),
    ("copa", {"premise": None, "choice1": "a", "choice2": "b", "question": "cause", "label": 0, "idx": 7},
     "premise"),  # was read as the text "None What was the cause of this?"
    ("wic", {"word": "w", "sentence1": "a", "sentence2": 3, "label": True, "idx": 7}, "sentence2"),
    ("wsc", {"text": "He ran .", "target": {"span1_index": 0, "span1_text": None, "span2_index": 0,
                                            "span2_text": "He"}, "label": True, "idx": 7}, "span1_text"),
    ("glue_sst2", {"sentence": 5, "label": 1, "idx": 7}, "sentence"),
])
def test_text_fields_must_be_strings(task, row, field):
    with pytest.raises(ValueError, match=rf"field '{field}' of a {task} row \(idx 7\) must be a string"):
        format_row(task, row, 0)


@pytest.mark.parametrize("field, value", [("span1_index", None), ("span2_index", 3), ("span2_index", -1),
                                          ("span1_index", True), ("span1_index", "0")])
def test_wsc_span_indices_must_be_word_indices_of_the_text(field, value):
    """A null span index raised a bare TypeError and one past the text an IndexError, neither naming the row."""
    target = {"span1_index": 0, "span1_text": "He", "span2_index": 1, "span2_text": "ran"}
    assert format_row("wsc", {"text": "He ran .", "target": target, "label": True, "idx": 7}, 0).texts == (
        "*He* #ran# .",)
    row = {"text": "He ran .", "target": {**target, field: value}, "label": True, "idx": 7}
    with pytest.raises(ValueError, match=rf"field '{field}' of a wsc row \(idx 7\) must be a word index of the "
                                         r"text's 3 words"):
        format_row("wsc", row, 0)


@pytest.mark.parametrize("task, row, field, expected", [
    ("cb", {**CB_ROW, "idx": None}, "idx", "a row number"),  # was a bare TypeError from int(None)
    ("cb", {**CB_ROW, "idx": 2.5}, "idx", "a row number"),  # was read as row 2
    ("cb", {**CB_ROW, "idx": True}, "idx", "a row number"),  # was read as row 1
    ("glue_rte", {"index": "x", "sentence1": "a", "sentence2": "b", "label": "entailment"}, "index", "a row number"),
    ("copa", {"premise": "p", "choice1": "a", "choice2": "b", "question": ["cause"], "label": 0, "idx": 7},
     "question", "a string"),  # was "unhashable type: 'list'"
    ("copa", {"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0, "idx": 7},
     "question", "one of"),
    ("wsc", {"text": "He ran .", "target": None, "label": True, "idx": 7}, "target", "an object"),  # TypeError
    ("wsc", {"text": "He ran .", "target": [0, 1], "label": True, "idx": 7}, "target", "an object"),  # TypeError
    # an empty span was marked around the wrong words, no error: '*Bob said #he# ran .*'
    ("wsc", {"text": "Bob said he ran .", "target": {"span1_index": 0, "span1_text": "", "span2_index": 2,
                                                     "span2_text": "he"}, "label": True, "idx": 7},
     "span1_text", "a span of at least one word"),
    ("wsc", {"text": "Bob said he ran .", "target": {"span1_index": 0, "span1_text": "Bob", "span2_index": 2,
                                                     "span2_text": " "}, "label": True, "idx": 7},
     "span2_text", "a span of at least one word"),
])
def test_a_bad_row_field_is_a_value_error_naming_the_field_file_and_line(tmp_path, task, row, field, expected):
    with pytest.raises(ValueError, match=rf"field '{field}' of a {task} row .* must be {expected}"):
        format_row(task, row, 0)
    if task == "glue_rte":
        relative = "glue/RTE/dev.tsv"
        text = "index\tsentence1\tsentence2\tlabel\n1\ta\tb\tentailment\nx\ta\tb\tentailment\n"
    else:
        relative = f"superglue/{dict(cb='CB', copa='COPA', wsc='WSC')[task]}/val.jsonl"
        text = "\n\n" + json.dumps(row) + "\n"  # blank lines are skipped but counted
    _write(tmp_path, relative, text)
    with pytest.raises(ValueError, match=rf"{relative}, line 3: field '{field}'"):
        load_examples(task, "validation", tmp_path)


def test_glue_tsv_index_and_jsonl_idx_are_the_example_index():
    assert format_row("glue_rte", {"index": "12", "sentence1": "a", "sentence2": "b", "label": "entailment"},
                      0).index == 12
    assert format_row("cb", {**CB_ROW, "idx": 5}, 0).index == 5
    assert format_row("glue_sst2", {"sentence": "s", "label": "1"}, 9).index == 9  # no index column: the position


def test_quiz_fraction_leaving_no_train_rows_names_the_task_and_numbers(data_dir):
    with pytest.raises(ValueError, match=r"task 'cb': quiz_fraction 0\.999 puts 250 of its 250 train rows in the "
                                         r"quiz split and leaves no train rows"):
        load_task_splits("cb", data_dir, quiz_fraction=0.999)


# ----------------------------------------------------------------------------------------- evaluate's data source

@pytest.fixture(scope="module")
def env_data_run(tmp_path_factory, data_dir):
    """A tiny finetune run whose data came through $MPDISTIL_DATA_DIR (data.data_dir unset)."""
    root = tmp_path_factory.mktemp("env_data_run")
    teacher = make_tiny_teacher(root / "teacher")
    config = write_config(root / "c.yaml", teacher, data_dir, root / "run", "finetune",
                          data={"data_dir": None, "tasks": ["cb"]}, student_training={"max_steps": 2})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MPDISTIL_DATA_DIR", str(data_dir))
        assert main(["distill", "--config", str(config), "--quiet"]) == 0
    return root / "run"


def test_evaluate_reads_the_folder_the_run_read_without_the_variable(env_data_run, data_dir, monkeypatch, capsys):
    report = json.loads((env_data_run / "report.json").read_text())
    source = f"local {data_dir}; train capped to 24 of 225 rows, quiz capped to 16 of 25 rows, validation capped to " \
             "16 of 56 rows (fixed seed 1)"
    assert report["config"]["data"]["data_dir"] is None and report["data_source"]["cb"] == source
    monkeypatch.delenv("MPDISTIL_DATA_DIR", raising=False)  # before the fix: the hub (offline here: an error)
    evaluated = evaluate_checkpoint(env_data_run)
    assert evaluated["data_source"] == {"cb": source}
    assert evaluated["tasks"]["cb"]["student_final"] == pytest.approx(report["tasks"]["cb"]["student_final"])
    assert main(["evaluate", "--checkpoint", str(env_data_run)]) == 0
    assert f"data cb: {source}" in capsys.readouterr().out


def _checkpoint_with(run: Path, tmp_path: Path, **changes) -> Path:
    """A copy of ``run``'s newest checkpoint with ``changes`` to its state.json (its weights files too: a checkpoint
    missing one is refused as damaged before its data is looked at)."""
    newest = max((run / "checkpoints").iterdir())
    state = json.loads((newest / "state.json").read_text())
    state.update(changes)
    folder = tmp_path / newest.name
    shutil.copytree(newest, folder)
    (folder / "state.json").write_text(json.dumps(state))
    return folder


def test_evaluate_refuses_when_the_runs_data_is_not_here(env_data_run, data_dir, tmp_path, monkeypatch):
    state = json.loads((max((env_data_run / "checkpoints").iterdir()) / "state.json").read_text())
    assert state["data_dir"] == str(data_dir)
    moved = _checkpoint_with(env_data_run, tmp_path / "a", data_dir=str(tmp_path / "gone"))
    monkeypatch.setenv("MPDISTIL_DATA_DIR", str(data_dir))  # another folder is at hand: still refused
    with pytest.raises(ConfigError, match="read its data from the folder .*gone, which is not on this machine"):
        evaluate_checkpoint(moved)
    hub = _checkpoint_with(env_data_run, tmp_path / "b", data_dir=None, data_source={"cb": "hub aps/super_glue"})
    with pytest.raises(ConfigError, match=r"read its data from the hub .*\$MPDISTIL_DATA_DIR is set"):
        evaluate_checkpoint(hub)
    # the folder is here but the rows found differ from the run's (e.g. another $MPDISTIL_SUPERGLUE_HUB): refused
    newest = max((env_data_run / "checkpoints").iterdir())
    other = tmp_path / "c" / newest.name
    shutil.copytree(newest, other)
    state["data_source"] = {"cb": "hub some/other_superglue"}
    (other / "state.json").write_text(json.dumps(state))
    from mpdistil_fast.pipeline.trainer import Run

    def models_built(run):
        raise AssertionError("the data is refused before the models load")

    monkeypatch.setattr(Run, "_build_models", models_built)
    with pytest.raises(ConfigError, match="differs from the run's"):
        evaluate_checkpoint(other)


def test_evaluate_of_a_checkpoint_without_a_data_record_needs_data_here(env_data_run, tmp_path, monkeypatch,
                                                                       capsys):
    """A checkpoint written before runs recorded their data falls back to the stored config: with no folder given
    and the hub ruled out (HF_DATASETS_OFFLINE, as in these tests) evaluate exits with status 2 and says why."""
    newest = max((env_data_run / "checkpoints").iterdir())
    state = json.loads((newest / "state.json").read_text())
    del state["data_dir"], state["data_source"]
    old = tmp_path / newest.name
    shutil.copytree(newest, old)
    (old / "state.json").write_text(json.dumps(state))
    monkeypatch.delenv("MPDISTIL_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["evaluate", "--checkpoint", str(old)]) == 2
    assert "HF_DATASETS_OFFLINE=1 rules out the hub" in capsys.readouterr().err


def test_an_unreachable_hub_is_an_error_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("MPDISTIL_DATA_DIR", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    teacher = make_tiny_teacher(tmp_path / "teacher")
    config = write_config(tmp_path / "c.yaml", teacher, tmp_path, tmp_path / "run", "finetune",
                          data={"data_dir": None, "tasks": ["cb"]})
    assert main(["distill", "--config", str(config), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "could not load 'cb'" in error and "no route to huggingface.co" in error and "Traceback" not in error


# ------------------------------------------------------------------------------------------- whole files refused

@pytest.mark.parametrize("relative, text", [("superglue/CB/train.jsonl", ""), ("superglue/CB/train.jsonl", "\n \n"),
                                            ("glue/RTE/train.tsv", ""),
                                            ("glue/RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n")])
def test_an_empty_file_is_an_error_naming_it(tmp_path, relative, text):
    """An empty train file loaded as no rows: load_examples returned [] and load_task_splits said to lower
    quiz_fraction (its 0 train rows left none for training); an empty validation file said 'no validation rows'."""
    task = "cb" if relative.startswith("superglue") else "glue_rte"
    good = json.dumps(CB_ROW) + "\n" if task == "cb" else \
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tnot_entailment\n"
    other = relative.replace("train", "val" if task == "cb" else "dev")
    path = _write(tmp_path, relative, text)
    _write(tmp_path, other, good)
    message = rf"{re.escape(str(path))} holds no {task} rows \(the file is empty"
    with pytest.raises(ValueError, match=message):
        load_examples(task, "train", tmp_path)
    with pytest.raises(ValueError, match=message):
        load_task_splits(task, tmp_path)
    with pytest.raises(ValueError, match=message):
        check_task_data(task, tmp_path)
    _write(tmp_path, relative, good)
    _write(tmp_path, other, text)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / other))} holds no {task} rows"):
        load_task_splits(task, tmp_path)


@pytest.mark.parametrize("suffix", ["jsonl", "tsv"])
def test_a_line_that_is_not_utf8_names_the_file_and_line(tmp_path, suffix):
    """A Latin-1 byte raised a UnicodeDecodeError naming neither the file nor the line."""
    if suffix == "jsonl":
        task, path = "cb", tmp_path / "superglue/CB/val.jsonl"
        lines = [json.dumps(CB_ROW).encode(), b"", json.dumps({**CB_ROW, "idx": 1, "premise": "caf\u00e9"},
                                                             ensure_ascii=False).encode("latin-1")]
    else:
        task, path = "glue_rte", tmp_path / "glue/RTE/dev.tsv"
        lines = [b"index\tsentence1\tsentence2\tlabel", b"0\ta\tb\tentailment", b"1\tcaf\xe9\tb\tentailment"]
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 3: not UTF-8 text"):
        load_examples(task, "validation", tmp_path)


def test_a_byte_order_mark_is_read_past(tmp_path):
    """A file saved with a UTF-8 byte-order mark: the tsv's first column was read as '\\ufeffindex' (so each row's
    index silently became its position) and the jsonl's first line was refused as invalid JSON."""
    _write(tmp_path, "superglue/CB/val.jsonl", "\ufeff" + json.dumps({**CB_ROW, "idx": 4}) + "\n")
    _write(tmp_path, "glue/RTE/dev.tsv", "\ufeffindex\tsentence1\tsentence2\tlabel\n7\ta\tb\tentailment\n")
    assert [e.index for e in load_examples("cb", "validation", tmp_path)] == [4]
    assert [e.index for e in load_examples("glue_rte", "validation", tmp_path)] == [7]


def test_a_repeated_idx_is_refused_naming_both_lines(tmp_path):
    """A row repeated in a file (e.g. two files concatenated) was loaded twice: trained on twice, or in both the train
    and the quiz split."""
    rows = [json.dumps({**CB_ROW, "idx": i}) for i in (0, 1, 2, 1)]
    path = _write(tmp_path, "superglue/CB/train.jsonl", "\n".join(rows) + "\n")
    _write(tmp_path, "superglue/CB/val.jsonl", rows[0] + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 4: a cb row with idx 1, as on line 2"):
        load_task_splits("cb", tmp_path)


def test_local_boolq_val_too_short_for_its_500_validation_rows_says_so(tmp_path):
    """A BoolQ val.jsonl of 501 rows or fewer (a truncated copy) left train/quiz 0 or 1 rows, and the error said to
    lower quiz_fraction."""
    rows = [json.dumps({"question": "q", "passage": f"p{i}", "label": i % 2 == 0, "idx": i}) for i in range(501)]
    path = _write(tmp_path, "superglue/BoolQ/val.jsonl", "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} holds 501 boolq rows: local BoolQ keeps 500 of "
                                         "them for validation and needs at least 2 more"):
        load_task_splits("boolq", tmp_path)
    rows.append(json.dumps({"question": "q", "passage": "p", "label": True, "idx": 501}))
    _write(tmp_path, "superglue/BoolQ/val.jsonl", "\n".join(rows) + "\n")
    splits = load_task_splits("boolq", tmp_path)
    assert (len(splits.train), len(splits.quiz), len(splits.validation)) == (1, 1, 500)
