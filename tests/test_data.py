"""Tasks, loading (local files and the hub path), splits, encoding, batching and metrics, on the real data."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mpdistil_fast.data import (TASKS, check_task_data, compute_metrics, encode_examples, iterate_batches,
                                load_examples, load_task_splits, num_batches, resolve_data_dir, trim_padding)
from mpdistil_fast.data.tasks import format_row
from mpdistil_fast.data.loading import _shuffled
from mpdistil_fast.models import default_teacher_path, load_tokenizer

OFFICIAL_SIZES = {"cb": (250, 56), "copa": (400, 100), "rte": (2490, 277), "wic": (5428, 638), "wsc": (554, 104),
                  "glue_rte": (2490, 277)}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_teacher_path())


def _rows(data_dir, relative):
    with open(data_dir / relative, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("task", sorted(OFFICIAL_SIZES))
def test_local_files_load_every_row_with_valid_labels(data_dir, task):
    train, validation = (load_examples(task, split, data_dir) for split in ("train", "validation"))
    assert (len(train), len(validation)) == OFFICIAL_SIZES[task]
    labels = {example.label for example in train + validation}
    assert labels == set(range(TASKS[task].num_labels))
    assert all(example.task == task and all(isinstance(t, str) and t for t in example.texts) for example in train)


def test_cb_and_rte_string_labels_map_to_hub_class_ids(data_dir):
    raw = _rows(data_dir, "superglue/CB/val.jsonl")
    examples = load_examples("cb", "validation", data_dir)
    names = ("entailment", "contradiction", "neutral")
    assert [names[e.label] for e in examples] == [row["label"] for row in raw]
    assert [e.texts for e in examples] == [(row["premise"], row["hypothesis"]) for row in raw]


def test_glue_rte_tsv_matches_superglue_rte_jsonl(data_dir):
    glue, superglue = load_examples("glue_rte", "validation", data_dir), load_examples("rte", "validation", data_dir)
    assert [e.label for e in glue] == [e.label for e in superglue]
    unquoted = lambda texts: tuple(t.replace('"', "") for t in texts)  # noqa: E731 (the tsv keeps GLUE's quotes)
    assert [unquoted(e.texts) for e in glue] == [unquoted(e.texts) for e in superglue]


def test_wic_gives_the_word_and_both_sentences(data_dir):
    raw = _rows(data_dir, "superglue/WiC/train.jsonl")
    examples = load_examples("wic", "train", data_dir)
    assert examples[0].texts == ("place", "Do you want to come over to my place later?",
                                 "A political system with no place for the less prominent groups.")
    assert [e.label for e in examples] == [int(row["label"]) for row in raw]
    assert all(e.texts == (row["word"], row["sentence1"], row["sentence2"]) for e, row in zip(examples, raw))


def test_copa_is_two_choice_with_the_cause_or_effect_question(data_dir):
    raw = _rows(data_dir, "superglue/COPA/val.jsonl")
    examples = load_examples("copa", "validation", data_dir)
    assert TASKS["copa"].multiple_choice
    assert examples[0].texts == ("The man turned on the faucet. What happened as a result?",
                                 "The toilet filled with water.", "Water flowed from the spout.")
    assert examples[0].label == 1
    causes = [e for e, row in zip(examples, raw) if row["question"] == "cause"]
    assert causes and all(e.texts[0].endswith("What was the cause of this?") for e in causes)


def test_wsc_marks_both_spans_in_every_row(data_dir):
    examples = load_examples("wsc", "train", data_dir) + load_examples("wsc", "validation", data_dir)
    raw = _rows(data_dir, "superglue/WSC/train.jsonl") + _rows(data_dir, "superglue/WSC/val.jsonl")
    assert examples[0].texts == ("*Mark* told Pete many lies about himself, which Pete included in his book. "
                                 "#He# should have been more skeptical.",)
    for example, row in zip(examples, raw):
        (text,) = example.texts
        unmarked = " ".join(row["text"].split())
        assert text.replace("*", "").replace("#", "") == unmarked.replace("*", "").replace("#", "")
        noun = text[text.index("*") + 1:text.rindex("*")].replace("#", "")  # spans may nest ("*#their# mothers*")
        pronoun = text[text.index("#") + 1:text.rindex("#")].replace("*", "")
        span1, span2 = (" ".join(row["target"][key].split()).lower() for key in ("span1_text", "span2_text"))
        assert noun.lower() == span1 or (noun.lower(), span1) == ("emma's", "emma")  # one row's span1 is a prefix
        assert pronoun.lower() == span2


def test_wsc_index_off_by_one_row_marks_the_pronoun_named_by_its_text(data_dir):
    row = next(r for r in _rows(data_dir, "superglue/WSC/val.jsonl")
               if r["target"]["span2_text"] == "it" and r["text"].split()[r["target"]["span2_index"]] == "use")
    (text,) = format_row("wsc", row, 0).texts
    assert "#it#" in text and "#use#" not in text


def _hub_rows(data_dir, task, relative):
    """The local rows rewritten into the hub's schema (integer class labels, flat WSC spans)."""
    rows = []
    for row in _rows(data_dir, relative):
        row = dict(row)
        row["label"] = format_row(task, row, 0).label
        row.update(row.pop("target", {}))
        rows.append(row)
    return rows


def test_hub_path_formats_like_the_local_files(data_dir, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name, split, revision=None):
        calls.append((path, name, split, revision))
        if revision is None and name == "wsc.fixed":
            raise RuntimeError("Dataset scripts are no longer supported, but found super_glue.py")
        task = {"cb": "cb", "wsc.fixed": "wsc", "copa": "copa", "wic": "wic"}[name]
        folder = {"cb": "CB", "wsc": "WSC", "copa": "COPA", "wic": "WiC"}[task]
        return datasets.Dataset.from_list(_hub_rows(data_dir, task, f"superglue/{folder}/val.jsonl")[:20])

    monkeypatch.delenv("MPDISTIL_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for task in ("cb", "wsc", "copa", "wic"):
        assert load_examples(task, "validation") == load_examples(task, "validation", data_dir)[:20]
    assert calls[1:3] == [("aps/super_glue", "wsc.fixed", "validation", None),
                          ("aps/super_glue", "wsc.fixed", "validation", "refs/convert/parquet")]


def test_more_glue_tasks_from_official_tsv_and_hub(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    for folder, header, rows in (("QNLI", "index\tquestion\tsentence\tlabel",
                                  ["0\tWhat is it?\tIt is a cat.\tentailment", "1\tWho?\tNobody.\tnot_entailment"]),
                                 ("SST-2", "sentence\tlabel", ["a fine film \t1", "dull \t0"])):
        (tmp_path / "glue" / folder).mkdir(parents=True)
        for name in ("train.tsv", "dev.tsv"):
            (tmp_path / "glue" / folder / name).write_text("\n".join([header, *rows]) + "\n")
    qnli, sst2 = load_examples("glue_qnli", "train", tmp_path), load_examples("glue_sst2", "validation", tmp_path)
    assert [(e.texts, e.label) for e in qnli] == [(("What is it?", "It is a cat."), 0), (("Who?", "Nobody."), 1)]
    assert [(e.texts, e.label) for e in sst2] == [(("a fine film ",), 1), (("dull ",), 0)]
    monkeypatch.delenv("MPDISTIL_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split, **kwargs: datasets.Dataset.from_list(
        [{"question": "What is it?", "sentence": "It is a cat.", "label": 0, "idx": 0}]))
    assert load_examples("glue_qnli", "validation")[0].texts == ("What is it?", "It is a cat.")


def test_hub_failure_says_how_to_work_offline(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.delenv("MPDISTIL_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="MPDISTIL_DATA_DIR"):
        load_examples("rte", "train")


def test_resolve_data_dir_prefers_argument_then_environment(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MPDISTIL_DATA_DIR", str(data_dir))
    assert resolve_data_dir(None) == data_dir
    assert resolve_data_dir(tmp_path) == tmp_path.resolve()
    monkeypatch.delenv("MPDISTIL_DATA_DIR")
    assert resolve_data_dir(None) is None
    with pytest.raises(FileNotFoundError, match="data_dir"):
        resolve_data_dir(tmp_path / "absent")
    monkeypatch.setenv("MPDISTIL_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="MPDISTIL_DATA_DIR"):
        resolve_data_dir(None)


def test_loading_errors_name_the_problem(data_dir, tmp_path):
    with pytest.raises(ValueError, match="task"):
        load_examples("mnli_typo", "train", data_dir)
    with pytest.raises(ValueError, match="split"):
        load_examples("cb", "test", data_dir)
    with pytest.raises(FileNotFoundError, match="CB/train.jsonl"):
        load_examples("cb", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="load_task_splits"):
        load_examples("boolq", "train", data_dir)
    with pytest.raises(ValueError, match="quiz_fraction"):
        load_task_splits("cb", data_dir, quiz_fraction=1.0)
    with pytest.raises(ValueError, match="max_train"):
        load_task_splits("cb", data_dir, max_train=0)
    with pytest.raises(ValueError, match="label"):
        format_row("cb", {"premise": "p", "hypothesis": "h", "label": "maybe"}, 0)
    with pytest.raises(ValueError, match="hypothesis"):
        format_row("cb", {"premise": "p", "label": "neutral"}, 0)


def test_check_task_data_fails_early_and_names_the_file(data_dir, tmp_path):
    for task in [*OFFICIAL_SIZES, "boolq"]:
        check_task_data(task, data_dir)
    with pytest.raises(FileNotFoundError, match="QNLI"):
        check_task_data("glue_qnli", data_dir)
    with pytest.raises(FileNotFoundError, match="RTE/train.jsonl"):
        check_task_data("rte", tmp_path)
    (tmp_path / "superglue" / "CB").mkdir(parents=True)
    (tmp_path / "superglue" / "CB" / "train.jsonl").write_text('{"premise": "p", "label": "neutral"}\n')
    with pytest.raises(ValueError, match="hypothesis"):
        check_task_data("cb", tmp_path)


def test_quiz_split_is_seeded_disjoint_and_nine_to_one(data_dir):
    splits = load_task_splits("cb", data_dir, seed=3)
    again = load_task_splits("cb", data_dir, seed=3)
    other = load_task_splits("cb", data_dir, seed=4)
    assert (len(splits.train), len(splits.quiz), len(splits.validation)) == (225, 25, 56)
    assert splits.train == again.train and splits.quiz == again.quiz
    assert splits.quiz != other.quiz
    train_ids, quiz_ids = {e.index for e in splits.train}, {e.index for e in splits.quiz}
    assert not train_ids & quiz_ids and train_ids | quiz_ids == set(range(250))
    assert splits.validation == load_examples("cb", "validation", data_dir)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_quiz_split_is_stratified_by_label(data_dir, seed):
    """CB's 250 train rows hold 16 neutral ones (6.4%): a plain 25-row head of the shuffle had none at seed 0 (model
    selection and rewards then never saw the class); stratified, every label gets its share of the quiz to within a
    row, in the shuffled order, and train keeps the rest in that order."""
    from collections import Counter

    rows = load_examples("cb", "train", data_dir)
    splits = load_task_splits("cb", data_dir, seed=seed)
    counts, quiz = Counter(e.label for e in rows), Counter(e.label for e in splits.quiz)
    assert sum(quiz.values()) == 25 and set(quiz) == set(counts) == {0, 1, 2}
    assert all(abs(quiz[label] - 25 * count / 250) < 1 for label, count in counts.items())
    # one shuffled order: quiz and train keep it, and each label's quiz rows are its first rows in it
    pool = [e.index for e in _shuffled(rows, seed)]
    quiz_ids = {e.index for e in splits.quiz}
    assert [e.index for e in splits.quiz] == [i for i in pool if i in quiz_ids]
    assert [e.index for e in splits.train] == [i for i in pool if i not in quiz_ids]
    for label in sorted(quiz):
        of_label = [i for i in pool if rows[i].label == label]
        assert set(of_label[:quiz[label]]) <= quiz_ids and not set(of_label[quiz[label]:]) & quiz_ids


def test_split_caps(data_dir):
    splits = load_task_splits("rte", data_dir, seed=0, max_train=40, max_eval=16)
    full = load_task_splits("rte", data_dir, seed=0)
    assert (len(splits.train), len(splits.quiz), len(splits.validation)) == (40, 16, 16)
    assert splits.train == full.train[:40]
    # the capped quiz is stratified too: each label's first rows of the whole quiz, in its order
    kept = {e.index for e in splits.quiz}
    assert [e.index for e in splits.quiz] == [e.index for e in full.quiz if e.index in kept]
    assert sorted(e.label for e in splits.quiz) == [0] * 8 + [1] * 8
    cb = load_task_splits("cb", data_dir, seed=0, max_eval=10)  # 11 / 12 / 2 rows per label in the whole quiz
    assert sorted(e.label for e in cb.quiz) == [0] * 4 + [1] * 5 + [2]
    indices = [e.index for e in splits.validation]
    assert indices == sorted(indices) and set(indices) <= {e.index for e in full.validation}
    # the validation subset is the same for every run seed (runs of several seeds are scored on the same rows)
    assert load_task_splits("rte", data_dir, seed=5, max_eval=16).validation == splits.validation


def test_local_boolq_is_carved_from_val_without_overlap(data_dir):
    splits = load_task_splits("boolq", data_dir, seed=0)
    sizes = (len(splits.train), len(splits.quiz), len(splits.validation))
    assert sizes == (2493, 277, 500) and sum(sizes) == 3270
    texts = [{e.texts for e in part} for part in (splits.train, splits.quiz, splits.validation)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert "val.jsonl" in splits.source


def test_local_boolq_validation_is_the_same_rows_for_every_seed(data_dir):
    # the data README asks for a fixed seed: the 500 validation rows are the first 500 of a seed-0 shuffle of
    # val.jsonl's positions, whatever the run's seed, so no seed trains or selects on another seed's validation rows
    raw = _rows(data_dir, "superglue/BoolQ/val.jsonl")
    order = list(range(len(raw)))
    random.Random(0).shuffle(order)
    expected = sorted(raw[i]["idx"] for i in order[:500])
    splits = {seed: load_task_splits("boolq", data_dir, seed=seed) for seed in (0, 1, 7)}
    for seed, split in splits.items():
        assert [e.index for e in split.validation] == expected, seed
        assert not {e.index for e in split.train + split.quiz} & set(expected), seed
        assert "fixed seed 0" in split.source
    assert splits[0].quiz != splits[1].quiz  # the quiz split still follows the run's seed


def test_source_says_what_the_caps_kept(data_dir):
    splits = load_task_splits("boolq", data_dir, seed=3, max_train=100, max_eval=150)
    assert len(splits.validation) == 150 and "validation capped to 150 of 500 rows (fixed seed 1)" in splits.source
    assert "train capped to 100 of 2493 rows" in splits.source and "quiz capped to 150 of 277 rows" in splits.source
    cb = load_task_splits("cb", data_dir, seed=0, max_eval=16)
    assert cb.source == f"local {data_dir}; quiz capped to 16 of 25 rows, validation capped to 16 of 56 rows (fixed seed 1)"
    assert load_task_splits("cb", data_dir, seed=0, max_eval=100).source == f"local {data_dir}"  # nothing cut


def test_max_train_caps_train_after_the_quiz_split(data_dir):
    # as data.max_train's comment says: the quiz split is carved from all 250 CB train rows (25), then train is cut
    capped, full = load_task_splits("cb", data_dir, max_train=100), load_task_splits("cb", data_dir)
    assert (len(capped.train), len(capped.quiz)) == (100, 25)
    assert capped.quiz == full.quiz and capped.train == full.train[:100]


def test_encoding_pairs_and_truncation(data_dir, tokenizer):
    examples = load_examples("wic", "validation", data_dir)[:6] + load_examples("wic", "train", data_dir)[:2]
    encoded = encode_examples(examples, tokenizer, max_length=64)
    assert encoded.input_ids.shape[0] == 8 and encoded.input_ids.shape[1] <= 64
    first = tokenizer.decode(encoded.input_ids[0][encoded.attention_mask[0].bool()])
    assert first == "[CLS] class [SEP] an emerging professional class. [SEP] apologizing for losing your temper, " \
                    "even though you were badly provoked, showed real class. [SEP]"
    word_length = len(tokenizer("class", add_special_tokens=False)["input_ids"]) + 2
    assert encoded.token_type_ids[0, :word_length].eq(0).all() and encoded.token_type_ids[0, word_length] == 1
    assert encoded.labels.tolist() == [e.label for e in examples]
    long = encode_examples(load_examples("boolq", "validation", data_dir)[:4], tokenizer, max_length=32)
    assert long.input_ids.shape == (4, 32) and long.attention_mask.all()


def test_encoding_multiple_choice_and_left_padding(data_dir, tokenizer):
    examples = load_examples("copa", "validation", data_dir)[:5]
    encoded = encode_examples(examples, tokenizer, max_length=48)
    assert encoded.input_ids.dim() == 3 and encoded.input_ids.shape[:2] == (5, 2)
    second = tokenizer.decode(encoded.input_ids[0, 1][encoded.attention_mask[0, 1].bool()])
    assert second == "[CLS] the man turned on the faucet. what happened as a result? [SEP] water flowed from the " \
                     "spout. [SEP]"
    tokenizer.padding_side = "left"
    try:
        left = encode_examples(examples, tokenizer, max_length=48)
    finally:
        tokenizer.padding_side = "right"
    assert left.attention_mask[..., -1].all() and not encoded.attention_mask[..., -1].all()
    for row in range(5):
        for choice in range(2):
            assert (left.input_ids[row, choice][left.attention_mask[row, choice].bool()].tolist()
                    == encoded.input_ids[row, choice][encoded.attention_mask[row, choice].bool()].tolist())
    with pytest.raises(ValueError, match="one task"):
        encode_examples(examples + load_examples("cb", "validation", data_dir)[:1], tokenizer, 48)
    with pytest.raises(ValueError, match="max_length"):
        encode_examples(examples, tokenizer, 4)
    with pytest.raises(ValueError, match="examples"):
        encode_examples([], tokenizer, 48)


def test_batches_are_deterministic_complete_and_resumable(data_dir, tokenizer):
    split = encode_examples(load_examples("cb", "validation", data_dir), tokenizer, max_length=32)
    assert num_batches(split, 10) == 6
    state = torch.get_rng_state()
    epoch0 = list(iterate_batches(split, 10, shuffle=True, seed=7, epoch=0))
    assert torch.equal(state, torch.get_rng_state())
    order = torch.cat([b["example_index"] for b in epoch0])
    assert sorted(order.tolist()) == list(range(56)) and order.tolist() != list(range(56))
    assert [len(b["labels"]) for b in epoch0] == [10] * 5 + [6]
    again = torch.cat([b["example_index"] for b in iterate_batches(split, 10, shuffle=True, seed=7, epoch=0)])
    epoch1 = torch.cat([b["example_index"] for b in iterate_batches(split, 10, shuffle=True, seed=7, epoch=1)])
    assert torch.equal(order, again) and not torch.equal(order, epoch1)
    resumed = list(iterate_batches(split, 10, shuffle=True, seed=7, epoch=0, start_batch=4))
    assert len(resumed) == 2 and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed, epoch0[4:]))
    first = epoch0[0]
    assert torch.equal(first["input_ids"], split.input_ids[first["example_index"]])
    assert torch.equal(first["labels"], split.labels[first["example_index"]])
    for seed in (20240101, 2 ** 62 - 1, 2 ** 63 - 1):  # date-like and stream-mixed seeds overflowed manual_seed
        big = torch.cat([b["example_index"] for b in iterate_batches(split, 10, shuffle=True, seed=seed)])
        assert sorted(big.tolist()) == list(range(56))
    plain = torch.cat([b["example_index"] for b in iterate_batches(split, 10, shuffle=False, seed=7)])
    assert plain.tolist() == list(range(56))
    with pytest.raises(ValueError, match="start_batch"):
        next(iterate_batches(split, 10, shuffle=True, seed=7, start_batch=7))
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(split, 0)


@pytest.mark.parametrize("ranks, batch_size, sizes", [(3, 9, [9] * 6), (4, 12, [12] * 4 + [8]), (8, 16, [16] * 3 + [8]),
                                                     (1, 10, [10] * 5 + [6])])
def test_a_training_stream_splits_evenly_over_the_ranks(data_dir, tokenizer, ranks, batch_size, sizes):
    """``row_multiple``: each epoch leaves out its last len % ranks shuffled rows (56 CB validation rows: 2 of them
    for 3 ranks, none for 4 or 8), so every batch divides over the ranks and no row is repeated; which rows are left
    out changes with the epoch."""
    split = encode_examples(load_examples("cb", "validation", data_dir), tokenizer, max_length=32)
    assert num_batches(split, batch_size, ranks) == len(sizes)
    left_out = []
    for epoch in (0, 1):
        batches = list(iterate_batches(split, batch_size, shuffle=True, seed=7, epoch=epoch, row_multiple=ranks))
        assert [len(b["labels"]) for b in batches] == sizes
        rows = torch.cat([b["example_index"] for b in batches]).tolist()
        assert len(set(rows)) == len(rows) == 56 - 56 % ranks
        plain = torch.cat([b["example_index"] for b in iterate_batches(split, batch_size, shuffle=True, seed=7,
                                                                        epoch=epoch)])
        assert rows == plain.tolist()[:len(rows)]  # the same order, its tail cut
        left_out.append(set(range(56)) - set(rows))
    assert all(len(rows) == 56 % ranks for rows in left_out)
    if 56 % ranks:
        assert left_out[0] != left_out[1]
    with pytest.raises(ValueError, match="not a multiple of row_multiple"):
        num_batches(split, batch_size + 1, ranks + 1)
    with pytest.raises(ValueError, match="row_multiple"):
        num_batches(split, batch_size, 0)
    with pytest.raises(ValueError, match="cannot give each of 64 ranks a row"):
        num_batches(split, 64, 64)


@pytest.mark.parametrize("side", ["right", "left"])
def test_trim_padding_keeps_every_real_token(data_dir, tokenizer, side):
    tokenizer.padding_side = side
    try:
        split = encode_examples(load_examples("copa", "validation", data_dir)[:12], tokenizer, max_length=64)
    finally:
        tokenizer.padding_side = "right"
    for batch, full in zip(iterate_batches(split, 4, shuffle=True, seed=0, trim=True),
                           iterate_batches(split, 4, shuffle=True, seed=0)):
        longest = int(full["attention_mask"].sum(-1).max())
        assert batch["input_ids"].shape == (*full["input_ids"].shape[:-1], longest)
        for key in ("input_ids", "token_type_ids"):
            kept, original = batch[key][batch["attention_mask"].bool()], full[key][full["attention_mask"].bool()]
            assert torch.equal(kept, original)
        assert torch.equal(batch["labels"], full["labels"])
    padding_only = {"attention_mask": torch.zeros(2, 3, dtype=torch.long)}
    assert trim_padding(padding_only) is padding_only


def _reference_macro_f1(predictions: np.ndarray, labels: np.ndarray, num_classes: int = 3) -> float:
    """Independent float64 reference from the confusion matrix, averaged over every class as the official
    SuperGLUE scorer (jiant's CommitmentBankEvaluationScheme) does: a class never seen scores F1 = 0."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(confusion, (labels, predictions), 1.0)
    scores = []
    for c in range(num_classes):
        precision = confusion[c, c] / confusion[:, c].sum() if confusion[:, c].sum() else 0.0
        recall = confusion[c, c] / confusion[c, :].sum() if confusion[c, :].sum() else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return float(np.mean(scores))


@pytest.mark.parametrize("trial", range(4))
def test_metrics_match_a_float64_reference(trial):
    rng = random.Random(trial)
    n = rng.randint(1, 60)
    labels = torch.tensor([rng.randrange(3) for _ in range(n)])
    predictions = torch.tensor([rng.randrange(2 if trial == 3 else 3) for _ in range(n)])
    result = compute_metrics("cb", predictions, labels)
    accuracy = float(np.mean(predictions.numpy() == labels.numpy()))
    f1 = _reference_macro_f1(predictions.numpy(), labels.numpy())
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert result["macro_f1"] == pytest.approx(f1, abs=1e-12)
    assert result["main"] == pytest.approx((accuracy + f1) / 2, abs=1e-12)
    logits = torch.nn.functional.one_hot(predictions, 3).double() + 0.1 * torch.rand(n, 3)
    assert compute_metrics("cb", logits, labels) == result
    rte = compute_metrics("rte", predictions.clamp(max=1), labels.clamp(max=1))
    assert set(rte) == {"accuracy", "main"} and rte["main"] == rte["accuracy"]


def test_cb_macro_f1_averages_over_all_three_classes_like_the_official_scorer():
    # hand-computed: labels [0, 0, 1, 1], predictions [0, 1, 1, 1]; F1 entailment 2/3, contradiction 4/5, neutral
    # (never seen) 0 -> macro-F1 22/45 (scikit-learn's macro average, which drops neutral, would give 11/15)
    result = compute_metrics("cb", torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]))
    assert result["macro_f1"] == pytest.approx(22 / 45, abs=1e-12)
    assert result["main"] == pytest.approx((0.75 + 22 / 45) / 2, abs=1e-12)
    perfect_two_classes = compute_metrics("cb", torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1]))
    assert perfect_two_classes["macro_f1"] == pytest.approx(2 / 3, abs=1e-12)


def test_cb_rows_without_neutral_score_as_jiant():
    # CB rows without a neutral one (CB's seed-0 quiz split had none before it was stratified; a small capped
    # subset still can): one entailment row predicted as contradiction:
    # F1 = (22/23, 26/27, 0), accuracy 24/25 -> main 0.7999 (not 0.9599, the mean over the two seen classes)
    labels = torch.tensor([0, 1] * 12 + [1])[torch.randperm(25, generator=torch.Generator().manual_seed(0))]
    assert torch.bincount(labels, minlength=3).tolist() == [12, 13, 0]
    predictions = labels.clone()
    predictions[int((labels == 0).nonzero()[0])] = 1
    result = compute_metrics("cb", predictions, labels)
    f1 = (22 / 23 + 26 / 27 + 0) / 3
    assert result["macro_f1"] == pytest.approx(f1, abs=1e-12)
    assert result["main"] == pytest.approx((24 / 25 + f1) / 2, abs=1e-12)
    assert round(result["main"], 4) == 0.7999


def test_metric_errors_name_the_argument():
    with pytest.raises(TypeError, match="predictions"):
        compute_metrics("rte", [1, 0], torch.tensor([1, 0]))
    with pytest.raises(TypeError, match="labels"):
        compute_metrics("rte", torch.tensor([1, 0]), [1, 0])
    with pytest.raises(ValueError, match="predictions"):
        compute_metrics("rte", torch.tensor([1, 0, 1]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="task"):
        compute_metrics("nope", torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(TypeError, match="integer"):
        compute_metrics("rte", torch.tensor([1.0]), torch.tensor([1]))


def test_metrics_refuse_ids_and_logits_outside_the_tasks_classes():
    """A CB score from a two-class head's logits, a class id 3 or an unlabelled row's -1 is a bug upstream: it was
    scored silently (an out-of-range id counted as a wrong answer, a [N, 2] logit matrix as classes 0 and 1)."""
    labels = torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        compute_metrics("cb", torch.randn(4, 2), labels)
    with pytest.raises(ValueError, match="predictions"):
        compute_metrics("cb", torch.tensor([0, 1, 3, 1]), labels)
    with pytest.raises(ValueError, match="labels"):
        compute_metrics("rte", torch.tensor([0, 1]), torch.tensor([0, -1]))
    assert compute_metrics("cb", torch.tensor([0, 1, 2, 0]), labels)["accuracy"] == 0.75
    logits = torch.nn.functional.one_hot(labels, 3).float()  # every row right, but one holds a NaN
    logits[2, 0] = float("nan")
    with pytest.raises(ValueError, match="logits of cb hold NaN in 1 of 4 rows"):
        compute_metrics("cb", logits, labels)
    logits[2, 0] = -float("inf")  # -inf is a class ruled out, not a NaN
    assert compute_metrics("cb", logits, labels)["accuracy"] == 1.0


def test_a_quiz_share_tied_on_remainder_goes_to_the_more_frequent_label():
    """Largest remainders, ties to the more frequent label: 5 rows of label 0 and 3 of label 1 give a 4-row quiz the
    exact shares 2.5 and 1.5, both remainders 0.5, so the fourth row goes to label 0 (its first 3 rows, label 1's
    first row, in pool order)."""
    from mpdistil_fast.data.loading import _stratified_quiz
    from mpdistil_fast.data.tasks import Example

    pool = [Example("rte", i, ("premise", "hypothesis"), label) for i, label in enumerate([1, 0, 0, 1, 0, 1, 0, 0])]
    quiz, train = _stratified_quiz(pool, 4)
    assert [e.label for e in quiz] == [1, 0, 0, 0] and [e.index for e in quiz] == [0, 1, 2, 4]
    assert [e.index for e in train] == [3, 5, 6, 7]


def test_the_last_partial_batch_also_leaves_out_the_rows_of_no_rank(data_dir, tokenizer):
    """56 CB rows over 3 ranks in batches of 12: an epoch uses 54 rows, so its last batch holds 6 (48..53 of the
    order), not the 8 rows left to the end of the order, which no rank could share evenly."""
    split = encode_examples(load_examples("cb", "validation", data_dir), tokenizer, max_length=32)
    batches = list(iterate_batches(split, 12, shuffle=True, seed=7, row_multiple=3))
    assert [len(b["labels"]) for b in batches] == [12] * 4 + [6]
    rows = torch.cat([b["example_index"] for b in batches]).tolist()
    assert len(set(rows)) == 54
