"""Tokenising examples into tensors, and the deterministic, resumable batch iterator.

A split is encoded once into padded tensors (padded to its longest example, at most ``max_length``), so batches are
plain index selections and a teacher's outputs can be cached per row.  Segments: the first text is the first
segment; the remaining texts form the second, joined by the tokenizer's separator (WiC: ``word [SEP] sentence1
[SEP] sentence2``).  Multiple-choice tasks encode the pair ``(context, choice_i)`` for every choice, giving
``[N, C, S]`` tensors.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from mpdistil_fast.data.tasks import Example, task_spec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class EncodedSplit:
    """Token tensors of one split of one task: ``[N, S]``, or ``[N, C, S]`` for multiple choice; ``labels`` ``[N]``.
    Row ``i`` is the ``i``-th example given to :func:`encode_examples` (a batch's ``example_index``)."""

    task: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, rows: torch.Tensor) -> "EncodedSplit":
        """The split of rows ``rows`` (in that order; row ``i`` of the result is row ``rows[i]`` here)."""
        return EncodedSplit(self.task, self.input_ids[rows], self.attention_mask[rows], self.token_type_ids[rows],
                            self.labels[rows])

    def inputs(self) -> list[tuple[str, torch.Tensor]]:
        """The model's inputs, by name: what a model's outputs on this split depend on (labels apart)."""
        return [("input_ids", self.input_ids), ("attention_mask", self.attention_mask),
                ("token_type_ids", self.token_type_ids)]

    def fingerprint(self) -> str:
        """SHA-256 of the task name, the inputs and the labels: equal fingerprints, the same rows in the same order."""
        digest = hashlib.sha256(self.task.encode())
        hash_tensors(digest, [*self.inputs(), ("labels", self.labels)])
        return digest.hexdigest()


def hash_tensors(digest: "hashlib._Hash", named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Feed each tensor's name, shape, dtype and bytes into ``digest`` (so no two different lists hash alike)."""
    for name, tensor in named:
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _separator(tokenizer) -> str:
    for token in (tokenizer.sep_token, tokenizer.eos_token):
        if token:
            return f" {token} "
    return "\n"


def _segment_pairs(examples: list[Example], separator: str, multiple_choice: bool) -> tuple[list[str], list | None]:
    if multiple_choice:
        firsts = [example.texts[0] for example in examples for _ in example.texts[1:]]
        seconds = [choice for example in examples for choice in example.texts[1:]]
        return firsts, seconds
    firsts = [example.texts[0] for example in examples]
    if all(len(example.texts) == 1 for example in examples):
        return firsts, None
    return firsts, [separator.join(example.texts[1:]) for example in examples]


#: The shortest ``max_length`` :func:`encode_examples` takes (room for the special tokens and some text).
MIN_MAX_LENGTH = 8


def encode_examples(examples: list[Example], tokenizer: "PreTrainedTokenizerBase", max_length: int) -> EncodedSplit:
    """Tokenise ``examples`` (all of one task) with a Hugging Face tokenizer, truncating the longest segment first to
    ``max_length`` tokens and padding on the tokenizer's padding side."""
    if not examples:
        raise ValueError("examples must not be empty")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < MIN_MAX_LENGTH:
        raise ValueError(f"max_length must be an int >= {MIN_MAX_LENGTH}, got {max_length!r}")
    tasks = {example.task for example in examples}
    if len(tasks) != 1:
        raise ValueError(f"examples must all belong to one task, got {sorted(tasks)}")
    spec = task_spec(tasks.pop())
    if spec.multiple_choice and any(len(example.texts) != spec.num_labels + 1 for example in examples):
        raise ValueError(f"every {spec.name} example must hold a context and {spec.num_labels} choices")
    firsts, seconds = _segment_pairs(examples, _separator(tokenizer), spec.multiple_choice)
    encoded = tokenizer(firsts, seconds, truncation=True, max_length=max_length, padding="longest",
                        return_tensors="pt", return_token_type_ids=True)
    input_ids = encoded["input_ids"].long()
    attention_mask = encoded["attention_mask"].long()
    token_type_ids = encoded.get("token_type_ids")
    token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.long()
    if spec.multiple_choice:
        shape = (len(examples), spec.num_labels, input_ids.shape[-1])
        input_ids, attention_mask, token_type_ids = (t.reshape(shape) for t in (input_ids, attention_mask,
                                                                               token_type_ids))
    labels = torch.tensor([example.label for example in examples], dtype=torch.long)
    return EncodedSplit(spec.name, input_ids, attention_mask, token_type_ids, labels)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _epoch_rows(split: EncodedSplit, batch_size: int, row_multiple: int) -> int:
    """Rows an epoch of :func:`iterate_batches` uses: ``len(split)`` rounded down to a multiple of ``row_multiple``."""
    _check_batch_size(batch_size)
    if isinstance(row_multiple, bool) or not isinstance(row_multiple, int) or row_multiple < 1:
        raise ValueError(f"row_multiple must be a positive int, got {row_multiple!r}")
    if batch_size % row_multiple:
        raise ValueError(f"batch_size {batch_size} is not a multiple of row_multiple {row_multiple}")
    if 0 < len(split) < row_multiple:
        raise ValueError(f"a split of {len(split)} rows cannot give each of {row_multiple} ranks a row")
    return len(split) - len(split) % row_multiple


def num_batches(split: EncodedSplit, batch_size: int, row_multiple: int = 1) -> int:
    """Batches per epoch of :func:`iterate_batches` (the last one may be smaller)."""
    return -(-_epoch_rows(split, batch_size, row_multiple) // batch_size)


def epoch_order(num_rows: int, *, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """Row order of one epoch: a permutation drawn from a generator seeded by ``(seed, epoch)`` only, so it does not
    depend on (or disturb) the global RNG, and a resumed run sees the same order.  Any int seed works (the generator
    takes seeds below 2^63)."""
    if not shuffle:
        return torch.arange(num_rows)
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % 2 ** 63)
    return torch.randperm(num_rows, generator=generator)


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the sequence columns that are padding in every row of the batch (trailing for right padding, leading for
    left padding): with the attention mask applied the real tokens' outputs are unchanged, and shorter batches run
    faster (a split is padded to its longest example)."""
    mask = batch["attention_mask"]
    used = mask.reshape(-1, mask.shape[-1]).ne(0).any(dim=0).nonzero()
    if used.numel() == 0:
        return batch
    first, last = int(used[0]), int(used[-1]) + 1
    trimmed = dict(batch)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        trimmed[key] = batch[key][..., first:last]
    return trimmed


def iterate_batches(split: EncodedSplit, batch_size: int, *, shuffle: bool, seed: int, epoch: int = 0,
                    start_batch: int = 0, trim: bool = False, row_multiple: int = 1
                    ) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``split`` for one epoch: dicts with ``input_ids``, ``attention_mask``, ``token_type_ids``,
    ``labels`` and ``example_index`` (rows of ``split``).  Deterministic given ``(seed, epoch)``; ``start_batch``
    skips the batches a resumed run has already consumed; ``trim`` applies :func:`trim_padding` to each batch
    (do not combine it with all-token cached teacher hidden states, whose length is the split's).

    ``row_multiple`` (the data-parallel world size of a training stream; ``batch_size`` must be a multiple of it):
    each epoch leaves out the last ``len(split) % row_multiple`` rows of its order, as
    ``DistributedSampler(drop_last=True)`` does, so every batch, the last included, splits evenly over the ranks and
    no row is repeated to fill a rank's share (a repeated row would count twice in that step's mean gradient).  The
    rows left out change with the epoch's shuffle."""
    total = num_batches(split, batch_size, row_multiple)
    if isinstance(start_batch, bool) or not isinstance(start_batch, int) or not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must be an int in [0, {total}], got {start_batch!r}")
    used = _epoch_rows(split, batch_size, row_multiple)
    order = epoch_order(len(split), shuffle=shuffle, seed=seed, epoch=epoch)[:used]
    for batch in range(start_batch, total):
        rows = order[batch * batch_size:(batch + 1) * batch_size]
        tensors = {"input_ids": split.input_ids[rows], "attention_mask": split.attention_mask[rows],
                   "token_type_ids": split.token_type_ids[rows], "labels": split.labels[rows], "example_index": rows}
        yield trim_padding(tensors) if trim else tensors
