"""Loading the tasks from a local folder of the official files, or from the Hugging Face hub, and the train/quiz split.

Local layout (the official SuperGLUE jsonl and GLUE tsv files, as in ``../shared/data``)::

    DATA_DIR/superglue/{BoolQ,CB,COPA,RTE,WiC,WSC}/{train,val}.jsonl
    DATA_DIR/glue/{RTE,QNLI,SST-2}/{train,dev}.tsv      (../shared/data holds RTE only; the others come from the hub)

``DATA_DIR`` is the ``data_dir`` argument, else ``$MPDISTIL_DATA_DIR``; with neither, the tasks come from the hub
through ``datasets.load_dataset`` (``$MPDISTIL_SUPERGLUE_HUB`` / ``$MPDISTIL_GLUE_HUB`` override the dataset ids).

Splits: SuperGLUE test labels are hidden, so ``validation`` is the split every table reports.  Model selection must
not see it, so :func:`load_task_splits` carves a seeded ``quiz`` split (10 % by default) out of ``train``.  The local
folder has no full BoolQ train file (only FewGLUE's 32 rows), so locally BoolQ's ``val.jsonl`` is split into
validation (500 rows, drawn with the fixed seed :data:`BOOLQ_LOCAL_VALIDATION_SEED` whatever the run's seed, as the
data README prescribes: every seed reports on the same rows and none trains on them), and train/quiz from the rest
(the quiz split with the run's seed).  The ``TaskSplits.source`` string says where the rows came from and which caps
(``max_train``, ``max_eval``) cut them, for result tables.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from mpdistil_fast.hub import HubUnavailableError
from mpdistil_fast.data.tasks import Example, format_row, task_spec

DATA_DIR_ENV = "MPDISTIL_DATA_DIR"
SPLITS = ("train", "validation")
#: Local file of each (task, split), relative to the data directory.
LOCAL_FILES: dict[str, dict[str, str]] = {
    "boolq": {"validation": "superglue/BoolQ/val.jsonl", "train32": "superglue/BoolQ/train32.jsonl"},
    "cb": {"train": "superglue/CB/train.jsonl", "validation": "superglue/CB/val.jsonl"},
    "copa": {"train": "superglue/COPA/train.jsonl", "validation": "superglue/COPA/val.jsonl"},
    "rte": {"train": "superglue/RTE/train.jsonl", "validation": "superglue/RTE/val.jsonl"},
    "wic": {"train": "superglue/WiC/train.jsonl", "validation": "superglue/WiC/val.jsonl"},
    "wsc": {"train": "superglue/WSC/train.jsonl", "validation": "superglue/WSC/val.jsonl"},
    "glue_rte": {"train": "glue/RTE/train.tsv", "validation": "glue/RTE/dev.tsv"},
    "glue_qnli": {"train": "glue/QNLI/train.tsv", "validation": "glue/QNLI/dev.tsv"},
    "glue_sst2": {"train": "glue/SST-2/train.tsv", "validation": "glue/SST-2/dev.tsv"},
}
#: Hub configuration name of each task (``datasets.load_dataset(hub_id, config)``).
HUB_CONFIGS: dict[str, str] = {"boolq": "boolq", "cb": "cb", "copa": "copa", "rte": "rte", "wic": "wic",
                               "wsc": "wsc.fixed", "glue_rte": "rte", "glue_qnli": "qnli", "glue_sst2": "sst2"}
#: Rows of BoolQ's val.jsonl kept as the reported split when BoolQ is read locally (data README).
BOOLQ_LOCAL_VALIDATION_ROWS = 500
#: Seed of the shuffle that picks those rows: fixed, so that every run seed reports on (and never trains on) the same
#: 500 rows (the data README asks for a fixed seed).
BOOLQ_LOCAL_VALIDATION_SEED = 0
#: Seed of the validation subset ``max_eval`` keeps: fixed too, so that runs of every seed are scored on the same
#: rows (1 keeps the subset that seed-0 runs drew when it was ``seed + 1``, so their tables stay comparable).
EVAL_SUBSET_SEED = 1


def hub_dataset_id(benchmark: str) -> str:
    """The hub dataset id of ``benchmark`` (``super_glue`` or ``glue``), overridable by environment variable."""
    if benchmark == "glue":
        return os.environ.get("MPDISTIL_GLUE_HUB", "nyu-mll/glue")
    return os.environ.get("MPDISTIL_SUPERGLUE_HUB", "aps/super_glue")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir``, else ``$MPDISTIL_DATA_DIR``, else None (load from the hub).  A given folder must exist."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        origin = "data_dir" if data_dir not in (None, "") else f"${DATA_DIR_ENV}"
        raise FileNotFoundError(f"{origin} {str(chosen)!r} is not a directory (expected the official "
                                "SuperGLUE/GLUE files under superglue/ and glue/)")
    return path


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _decoded_lines(handle: Iterable[bytes], path: Path) -> Iterator[str]:
    """The lines of a file opened in binary, decoded as UTF-8 (a byte-order mark before the first line is dropped).
    A line that is not UTF-8 raises a ``ValueError`` naming the file and the line (a text-mode read raised a
    UnicodeDecodeError naming neither)."""
    for number, line in enumerate(handle, start=1):
        try:
            yield line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not UTF-8 text ({exc.reason} at byte {exc.start + 1} of the "
                             "line); the official files are UTF-8") from None


def _numbered_rows(path: Path, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """The first ``limit`` (default all) rows of an official jsonl or tsv file, each with its line number in the file
    (1-based).  A line that does not parse -- not UTF-8, invalid JSON, not a JSON object, a tsv line with too few or
    too many fields -- raises a ``ValueError`` naming the file and the line."""
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open("rb") as handle:
        lines = _decoded_lines(handle, path)
        if path.suffix == ".tsv":
            reader = csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
            for row in itertools.islice(reader, limit):
                extra, missing = row.get(None, []), [key for key, value in row.items() if value is None]
                if extra or missing:
                    fields = len(reader.fieldnames) + len(extra) - len(missing)
                    raise ValueError(f"{path}, line {reader.line_num}: expected {len(reader.fieldnames)} "
                                     f"tab-separated fields {reader.fieldnames}, got {fields}")
                rows.append((reader.line_num, row))
            return rows
        numbered = ((number, line) for number, line in enumerate(lines, start=1) if line.strip())
        for number, line in itertools.islice(numbered, limit):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def _format_rows(task: str, rows: Iterable[Mapping[str, Any]]) -> list[Example]:
    return [format_row(task, row, position) for position, row in enumerate(rows)]


def _format_file_rows(task: str, path: Path, limit: int | None = None) -> list[Example]:
    """:func:`format_row` of every row of a local file; a row it refuses gets the file and line in the error, and so
    does a row repeating an earlier row's ``idx`` (a duplicated row would be trained on twice, or land in both the
    train and the quiz split).  A file without rows (empty, blank lines only, or a tsv header alone) is an error
    naming it: it loaded as no examples, and the run then failed far from the cause ("lower quiz_fraction")."""
    examples, lines = [], {}
    for position, (number, row) in enumerate(_numbered_rows(path, limit)):
        try:
            example = format_row(task, row, position)
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from None
        if example.index in lines:
            raise ValueError(f"{path}, line {number}: a {task} row with idx {example.index}, as on line "
                             f"{lines[example.index]}: each row of the file must have its own idx")
        lines[example.index] = number
        examples.append(example)
    if not examples:
        what = "empty, or a header alone" if path.suffix == ".tsv" else "empty"
        raise ValueError(f"{path} holds no {task} rows (the file is {what}); expected the official file (see the "
                         "data README)")
    return examples


def load_local_file(task: str, file_key: str, data_dir: Path) -> list[Example]:
    """Examples of one local file of ``task`` (``file_key`` is a key of :data:`LOCAL_FILES`)."""
    files = LOCAL_FILES[task]
    if file_key not in files:
        if task == "boolq" and file_key == "train":
            raise FileNotFoundError(
                "the local data has no full BoolQ train file (only FewGLUE's train32.jsonl); use "
                "load_task_splits('boolq', ...), which splits val.jsonl into train/quiz/validation")
        raise ValueError(f"split must be one of {tuple(files)} for local {task}, got {file_key!r}")
    path = data_dir / files[file_key]
    if not path.is_file():
        raise FileNotFoundError(f"missing data file for task {task!r}, split {file_key!r}: {path} "
                                f"(data_dir {str(data_dir)!r} must hold the official files; see the data README)")
    return _format_file_rows(task, path)


#: The hub's automatic Parquet export of a dataset repository: the fallback for script-based repositories, which
#: ``datasets`` >= 4 no longer runs.
HUB_PARQUET_REVISION = "refs/convert/parquet"


def load_hub_split(task: str, split: str) -> list[Example]:
    """Examples of ``task``/``split`` from the Hugging Face hub via ``datasets.load_dataset`` (retried on the
    repository's Parquet export when the plain load fails)."""
    import datasets

    spec = task_spec(task)
    dataset_id = hub_dataset_id(spec.benchmark)
    try:
        try:
            rows = datasets.load_dataset(dataset_id, HUB_CONFIGS[task], split=split)
        except Exception:  # e.g. "Dataset scripts are no longer supported"
            rows = datasets.load_dataset(dataset_id, HUB_CONFIGS[task], split=split, revision=HUB_PARQUET_REVISION)
    except Exception as exc:  # offline, unknown id, ...: say what to do instead
        raise HubUnavailableError(f"could not load {task!r} ({dataset_id}, {HUB_CONFIGS[task]}, {split}) from the hub: "
                           f"{exc}. Offline, pass data_dir or set ${DATA_DIR_ENV} to a folder of the official "
                           "files") from exc
    return _format_rows(task, rows)


def load_examples(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """All examples of ``task``'s official ``split`` (``train`` or ``validation``), from the local folder
    (:func:`resolve_data_dir`) or from the hub.  Use :func:`load_task_splits` for training: it adds the quiz split
    (and handles local BoolQ, whose train file is absent)."""
    task_spec(task)
    _check_split(split)
    directory = resolve_data_dir(data_dir)
    if directory is None:
        return load_hub_split(task, split)
    return load_local_file(task, split, directory)


def check_task_data(task: str, data_dir: str | os.PathLike | None = None) -> None:
    """Fail early, without parsing whole files, when :func:`load_task_splits` could not load ``task`` locally:
    a ``FileNotFoundError`` naming the missing file, a ``ValueError`` naming an empty one or the line of a first row
    that does not load.  With no local folder (hub) there is nothing to check offline."""
    task_spec(task)
    directory = resolve_data_dir(data_dir)
    if directory is None:
        return
    needed = ("validation",) if task == "boolq" else SPLITS
    for split in needed:
        path = directory / LOCAL_FILES[task][split]
        if not path.is_file():
            raise FileNotFoundError(f"missing data file for task {task!r}, split {split!r}: {path}")
        _format_file_rows(task, path, limit=1)  # an unreadable first row or no rows at all: a ValueError naming path


@dataclass
class TaskSplits:
    """The three splits of a task: ``train`` (optimised on), ``quiz`` (model selection, MPDistil's rewards) and
    ``validation`` (reported only); ``source`` says where they came from."""

    train: list[Example]
    quiz: list[Example]
    validation: list[Example]
    source: str = ""


def _shuffled(examples: list[Example], seed: int) -> list[Example]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order]


def _stratified_quiz(pool: list[Example], size: int) -> tuple[list[Example], list[Example]]:
    """``(quiz, train)``: ``size`` rows of the shuffled ``pool`` for the quiz, each label's share of them in
    proportion to its share of the pool (largest remainders, ties to the more frequent label), taking each label's
    first rows in pool order; both parts keep pool order (as scikit-learn's stratified ``train_test_split``, without
    its reordering)."""
    by_label: dict[int, list[int]] = {}
    for index, example in enumerate(pool):
        by_label.setdefault(example.label, []).append(index)
    exact = {label: size * len(rows) / len(pool) for label, rows in by_label.items()}
    quota = {label: int(share) for label, share in exact.items()}
    by_remainder = sorted(by_label, key=lambda label: (exact[label] - quota[label], len(by_label[label])),
                          reverse=True)
    for label in by_remainder[:size - sum(quota.values())]:
        quota[label] += 1
    chosen = {index for label, rows in by_label.items() for index in rows[:quota[label]]}
    return ([example for i, example in enumerate(pool) if i in chosen],
            [example for i, example in enumerate(pool) if i not in chosen])


def _check_cap(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def load_task_splits(task: str, data_dir: str | os.PathLike | None = None, *, seed: int = 0,
                     quiz_fraction: float = 0.1, max_train: int | None = None,
                     max_eval: int | None = None) -> TaskSplits:
    """Train, quiz and validation examples of ``task``.

    The official train split is shuffled with ``seed``; ``round(n * quiz_fraction)`` of its rows (at least one),
    stratified by label (each label's first rows in that order), become the quiz split and the rest train (9:1 by
    default), both in the shuffled order.  The caps apply after that split: ``max_train`` keeps
    the first train rows (of the shuffled order), ``max_eval`` a quiz subset stratified the same way and a random
    subset of validation
    (drawn with the fixed :data:`EVAL_SUBSET_SEED`, kept in file order: the same rows for every run seed).
    Locally, BoolQ's ``val.jsonl`` provides all three splits, its validation rows drawn with a fixed seed (see the
    module docstring).  ``source`` says where the rows came from and
    what the caps kept.  A split left empty (e.g. ``quiz_fraction`` near 1) raises a ``ValueError`` naming the task.
    """
    task_spec(task)
    if isinstance(quiz_fraction, bool) or not isinstance(quiz_fraction, (int, float)) or not 0 < quiz_fraction < 1:
        raise ValueError(f"quiz_fraction must be a number in (0, 1), got {quiz_fraction!r}")
    _check_cap("max_train", max_train)
    _check_cap("max_eval", max_eval)
    directory = resolve_data_dir(data_dir)
    if directory is not None and task == "boolq":
        rows = load_local_file(task, "validation", directory)
        if len(rows) < BOOLQ_LOCAL_VALIDATION_ROWS + 2:  # it said "lower quiz_fraction" of its 0 or 1 train rows
            raise ValueError(f"{directory / LOCAL_FILES[task]['validation']} holds {len(rows)} boolq rows: local BoolQ "
                             f"keeps {BOOLQ_LOCAL_VALIDATION_ROWS} of them for validation and needs at least 2 more "
                             "for train and quiz (the official val.jsonl has 3,270)")
        pool = _shuffled(list(range(len(rows))), BOOLQ_LOCAL_VALIDATION_SEED)
        validation = [rows[i] for i in sorted(pool[:BOOLQ_LOCAL_VALIDATION_ROWS])]
        train_pool = _shuffled([rows[i] for i in sorted(pool[BOOLQ_LOCAL_VALIDATION_ROWS:])], seed)
        source = (f"local {directory}: BoolQ val.jsonl split into validation ({len(validation)} rows, fixed seed "
                  f"{BOOLQ_LOCAL_VALIDATION_SEED}) and train/quiz ({len(train_pool)} rows, seed {seed}; the full "
                  "BoolQ train file is not local)")
    else:
        validation = load_examples(task, "validation", directory)
        train_pool = _shuffled(load_examples(task, "train", directory), seed)
        source = f"local {directory}" if directory is not None else f"hub {hub_dataset_id(task_spec(task).benchmark)}"
    quiz, train = _stratified_quiz(train_pool, max(1, round(len(train_pool) * quiz_fraction)))
    if not train:
        raise ValueError(f"task {task!r}: quiz_fraction {quiz_fraction} puts {len(quiz)} of its {len(train_pool)} "
                         "train rows in the quiz split and leaves no train rows; lower quiz_fraction")
    if not validation:
        raise ValueError(f"task {task!r}: no validation rows")
    caps = []
    if max_train is not None and len(train) > max_train:
        caps.append(f"train capped to {max_train} of {len(train)} rows")
        train = train[:max_train]
    if max_eval is not None and len(quiz) > max_eval:
        caps.append(f"quiz capped to {max_eval} of {len(quiz)} rows")
        quiz = _stratified_quiz(quiz, max_eval)[0]
    if max_eval is not None and len(validation) > max_eval:
        caps.append(f"validation capped to {max_eval} of {len(validation)} rows (fixed seed {EVAL_SUBSET_SEED})")
        keep = sorted(random.Random(EVAL_SUBSET_SEED).sample(range(len(validation)), max_eval))
        validation = [validation[i] for i in keep]
    if caps:
        source += "; " + ", ".join(caps)
    return TaskSplits(train=train, quiz=quiz, validation=validation, source=source)
