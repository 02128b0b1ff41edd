"""Bad data is refused with an error that names the task, the file and line or the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpdistil_fast.data import check_task_data, load_examples, load_task_splits
from mpdistil_fast.data.tasks import format_row

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


def test_quiz_fraction_leaving_no_train_rows_names_the_task_and_numbers(data_dir):
    with pytest.raises(ValueError, match=r"task 'cb': quiz_fraction 0\.999 puts 250 of its 250 train rows in the "
                                         r"quiz split and leaves no train rows"):
        load_task_splits("cb", data_dir, quiz_fraction=0.999)
