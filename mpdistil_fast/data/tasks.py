"""The tasks: SuperGLUE BoolQ, CB, COPA, RTE, WiC, WSC and GLUE RTE, QNLI, SST-2, and how one raw row becomes an
:class:`Example`.

Every loader (local jsonl/tsv files or the Hugging Face hub) hands rows to :func:`format_row`, so the two sources give
identical examples.  Formatting (Wang et al., 2019, "SuperGLUE: A Stickier Benchmark for General-Purpose Language
Understanding Systems", section 3 and appendix; the BERT baselines of its jiant code):

* BoolQ: ``(question, passage)``; CB / RTE / GLUE RTE: ``(premise, hypothesis)``; GLUE QNLI: ``(question,
  sentence)``; GLUE SST-2: ``(sentence,)``.
* WiC: ``(word, sentence1, sentence2)`` -- the target word and both sentences (the encoder sees
  ``[CLS] word [SEP] sentence1 [SEP] sentence2 [SEP]``).
* COPA: a two-choice task.  ``texts = (premise + cause/effect question, choice1, choice2)``; the encoder scores each
  choice as the pair ``(premise + question, choice_i)`` and the label is the index of the right choice.
* WSC: ``(marked text,)`` with both spans marked in place: the noun phrase as ``*span1*`` and the pronoun as
  ``#span2#``.

Label ids follow the hub's ``ClassLabel`` order (CB: entailment, contradiction, neutral; RTE and QNLI: entailment,
not_entailment; boolean tasks: False, True; SST-2: negative, positive), so local and hub data agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its label space and the metrics the benchmark reports for it.

    ``num_labels`` is the number of classes, or of choices when ``multiple_choice`` (then the model scores each
    choice and its logits are ``[B, num_labels]`` as well).  ``main_metric`` names the entry of
    :func:`~mpdistil_fast.data.compute_metrics`'s result that model selection uses (also returned as ``"main"``).
    """

    name: str
    num_labels: int
    multiple_choice: bool
    metrics: tuple[str, ...]
    main_metric: str
    label_names: tuple[str, ...] = ()
    benchmark: str = "super_glue"


@dataclass(frozen=True)
class Example:
    """One formatted example.

    ``index`` is the row's ``idx`` in the official file (its provenance); ``texts`` holds the text segments the
    encoder needs (see the module docstring; for multiple choice ``texts[0]`` is the shared context and
    ``texts[1:]`` the choices); ``label`` is a class id, or the index of the right choice.
    """

    task: str
    index: int
    texts: tuple[str, ...]
    label: int


_ACCURACY = ("accuracy",)
TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("boolq", 2, False, _ACCURACY, "accuracy", ("False", "True")),
    "cb": TaskSpec("cb", 3, False, ("accuracy", "macro_f1"), "accuracy_macro_f1_mean",
                   ("entailment", "contradiction", "neutral")),
    "copa": TaskSpec("copa", 2, True, _ACCURACY, "accuracy", ("choice1", "choice2")),
    "rte": TaskSpec("rte", 2, False, _ACCURACY, "accuracy", ("entailment", "not_entailment")),
    "wic": TaskSpec("wic", 2, False, _ACCURACY, "accuracy", ("False", "True")),
    "wsc": TaskSpec("wsc", 2, False, _ACCURACY, "accuracy", ("False", "True")),
    "glue_rte": TaskSpec("glue_rte", 2, False, _ACCURACY, "accuracy", ("entailment", "not_entailment"), "glue"),
    "glue_qnli": TaskSpec("glue_qnli", 2, False, _ACCURACY, "accuracy", ("entailment", "not_entailment"), "glue"),
    "glue_sst2": TaskSpec("glue_sst2", 2, False, _ACCURACY, "accuracy", ("negative", "positive"), "glue"),
}
#: The six SuperGLUE tasks MPDistil's curriculum chooses among (its action space).
SUPERGLUE_TASKS: tuple[str, ...] = ("boolq", "cb", "copa", "rte", "wic", "wsc")

COPA_QUESTIONS = {"cause": "What was the cause of this?", "effect": "What happened as a result?"}
WSC_MARKERS = (("*", "*"), ("#", "#"))


def task_spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``task``; a ``ValueError`` naming the known tasks otherwise."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    return TASKS[task]


BOOLEAN_LABELS = ("False", "True")


def label_id(task: str, value: Any) -> int:
    """Map a raw label (string name, int id, or -- for the boolean tasks BoolQ, WiC, WSC only -- a bool) to the
    task's class id.  A bool for another task (e.g. CB's ``"label": true``) is refused, not read as class 1."""
    spec = task_spec(task)
    if isinstance(value, bool):
        if spec.label_names != BOOLEAN_LABELS:
            boolean_tasks = tuple(name for name, other in TASKS.items() if other.label_names == BOOLEAN_LABELS)
            raise ValueError(f"label of a {task} row must be one of {spec.label_names} or a class id in "
                             f"[0, {spec.num_labels}), got the boolean {value!r} (boolean labels belong to the "
                             f"boolean tasks {boolean_tasks})")
        return int(value)
    if isinstance(value, str):
        if value in spec.label_names:
            return spec.label_names.index(value)
        if value.lstrip("-").isdigit():
            value = int(value)
        else:
            raise ValueError(f"label of a {task} row must be one of {spec.label_names}, got {value!r}")
    if isinstance(value, int) and 0 <= value < spec.num_labels:
        return value
    raise ValueError(f"label of a {task} row must be a class id in [0, {spec.num_labels}), got {value!r}")


def _normalise(text: str) -> str:
    return re.sub(r"[^\w]", "", text.lower())


def _words_match(words: list[str], start: int, span: list[str]) -> bool:
    return _normalise(" ".join(words[start:start + len(span)])) == _normalise(" ".join(span))


def _span_start(words: list[str], index: int, span_text: str, search_radius: int = 3) -> int:
    """Word index of ``span_text`` in ``words``: the given index, or the nearest match within ``search_radius``
    (a few official rows are off by one word); the given index when nothing matches."""
    span = span_text.split()
    for offset in sorted(range(-search_radius, search_radius + 1), key=abs):
        start = index + offset
        if 0 <= start <= len(words) - len(span) and _words_match(words, start, span):
            return start
    return index


def mark_wsc_spans(text: str, span1_index: int, span1_text: str, span2_index: int, span2_text: str) -> str:
    """The WSC text with the noun phrase marked ``*...*`` and the pronoun ``#...#`` (indices are word indices of
    ``text.split()``)."""
    words = text.split()
    spans = [(_span_start(words, span1_index, span1_text), len(span1_text.split()), WSC_MARKERS[0]),
             (_span_start(words, span2_index, span2_text), len(span2_text.split()), WSC_MARKERS[1])]
    for start, length, (left, right) in spans:
        end = min(start + length, len(words)) - 1
        # markers go inside surrounding punctuation: '"him,"' -> '"#him#,"'
        leading = re.match(r"^\W*", words[start]).end()
        words[start] = words[start][:leading] + left + words[start][leading:]
        trailing = re.search(r"\W*$", words[end]).start() or len(words[end])
        words[end] = words[end][:trailing] + right + words[end][trailing:]
    return " ".join(words)


class _BadField(ValueError):
    """A field holding a value of the wrong kind (``args``: the field's name, its value, what it must be)."""


def _text(row: Mapping[str, Any], field: str) -> str:
    """``row[field]``, which must be a string (a null or a number would fail later, deep in the tokenizer)."""
    value = row[field]
    if not isinstance(value, str):
        raise _BadField(field, value, "a string")
    return value


def _word_index(spans: Mapping[str, Any], field: str, text: str) -> int:
    """``spans[field]``, a word index of ``text`` (a null or an index past the text failed in the span search)."""
    value, words = spans[field], len(text.split())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < words:
        raise _BadField(field, value, f"a word index of the text's {words} words")
    return value


def _row_index(row: Mapping[str, Any], position: int) -> int:
    """The row's ``idx`` (jsonl, hub) or ``index`` (GLUE tsv, a string of digits) as an int; ``position`` when it has
    neither.  A null raised a bare TypeError, a non-numeric string an int() message naming no field, and a float or a
    bool was read as a truncated number."""
    for field in ("idx", "index"):
        if field in row:
            value = row[field]
            if isinstance(value, str) and value.isascii() and value.isdigit():
                return int(value)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise _BadField(field, value, "a row number (an int, or a string of digits in a tsv)")
    return position


def _fields(*fields: str) -> Callable[[Mapping[str, Any]], tuple[str, ...]]:
    return lambda row: tuple(_text(row, field) for field in fields)


def _copa_texts(row: Mapping[str, Any]) -> tuple[str, ...]:
    question = _text(row, "question")  # a list here raised "unhashable type" from the lookup below
    if question not in COPA_QUESTIONS:
        raise _BadField("question", question, f"one of {tuple(COPA_QUESTIONS)}")
    return (f"{_text(row, 'premise')} {COPA_QUESTIONS[question]}", _text(row, "choice1"), _text(row, "choice2"))


def _span_text(spans: Mapping[str, Any], field: str) -> str:
    """``spans[field]``, a string holding at least one word (an empty span was marked around the wrong words: the
    closing marker went on the text's last word, or before the opening one)."""
    value = _text(spans, field)
    if not value.split():
        raise _BadField(field, value, "a span of at least one word")
    return value


def _wsc_texts(row: Mapping[str, Any]) -> tuple[str, ...]:
    spans = row.get("target", row)  # local jsonl nests the spans under "target"; the hub's wsc.fixed does not
    if not isinstance(spans, Mapping):  # a null or a list raised a bare TypeError naming no row
        raise _BadField("target", spans, "an object holding span1_index, span1_text, span2_index and span2_text")
    text = _text(row, "text")
    return (mark_wsc_spans(text, _word_index(spans, "span1_index", text), _span_text(spans, "span1_text"),
                           _word_index(spans, "span2_index", text), _span_text(spans, "span2_text")),)


_TEXTS: dict[str, Callable[[Mapping[str, Any]], tuple[str, ...]]] = {
    "boolq": _fields("question", "passage"),
    "cb": _fields("premise", "hypothesis"),
    "copa": _copa_texts,
    "rte": _fields("premise", "hypothesis"),
    "wic": _fields("word", "sentence1", "sentence2"),
    "wsc": _wsc_texts,
    "glue_rte": _fields("sentence1", "sentence2"),
    "glue_qnli": _fields("question", "sentence"),
    "glue_sst2": _fields("sentence"),
}


def format_row(task: str, row: Mapping[str, Any], position: int) -> Example:
    """Turn one raw row (official file or hub) into an :class:`Example`; ``position`` is used when the row has no
    ``idx``/``index`` field.  A missing field, a text field that is not a string, an ``idx``/``index`` that is not a
    row number, a WSC ``target`` that is not an object or an empty span, or a bad label raises a ``ValueError`` naming
    the task, the field and the row."""
    task_spec(task)
    index = row.get("idx", row.get("index", position))
    try:
        row_index = _row_index(row, position)
        texts = _TEXTS[task](row)
        raw_label = row["label"]
    except KeyError as exc:
        raise ValueError(f"a {task} row (idx {index}) lacks the field {exc.args[0]!r}; got fields "
                         f"{sorted(row)}") from None
    except _BadField as exc:
        field, value, expected = exc.args
        raise ValueError(f"field {field!r} of a {task} row (idx {index}) must be {expected}, got {value!r} "
                         f"({type(value).__name__})") from None
    try:
        label = label_id(task, raw_label)
    except ValueError as exc:
        raise ValueError(f"{exc} (idx {index})") from None
    return Example(task=task, index=row_index, texts=tuple(texts), label=label)
