"""Frozen-teacher outputs computed once per (task, split) and reused, in memory or memory-mapped from a directory.

When the teacher no longer trains (plain KD, MPDistil stages 3 and 4) its logits, pooled representation and hidden
states for a split are fixed, so each epoch's teacher forward pass is wasted work.  :class:`TeacherCache` runs the
teacher once (eval mode, no dropout, no autograd graph) and serves rows by ``example_index``.  With a ``directory``
the arrays are ``.npy`` files opened as memory maps, in ``<directory>/<task>-<split>/<fingerprint>/``, and a later
run whose teacher weights and inputs are identical (same SHA-256 fingerprint) reuses them without running the
teacher at all.  Data parallel (``sharding``), every rank computes its share of the rows and the ranks all-gather
them; on disk they share one folder, which rank 0 writes.  Runs that share a ``directory`` at the same time do not
mix their files: each teacher's outputs have a folder of their own, and every writer fills temporary files of its
own that it renames into place (the same outputs, written twice, end up whole); ``meta.json``, written last, marks
a folder complete.  Folders of teachers no longer used stay until deleted.

Time accounting: an entry whose teacher pass cost ``c`` seconds for ``N`` rows and took ``s`` seconds to obtain in this
run (computing, or loading from disk) and that served ``r`` rows through :meth:`CachedOutputs.gather` saved
``r / N * c - s`` seconds: the teacher forwards avoided minus the time the cache itself took.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Protocol

import numpy as np
import torch

from mpdistil_fast.data.encoding import EncodedSplit, _check_batch_size, hash_tensors, iterate_batches
from mpdistil_fast.files import fsync, remove_abandoned_temporaries, temporary_beside, written_atomically

if TYPE_CHECKING:
    from mpdistil_fast.models.task_model import TaskModel, TaskModelOutput

_ARRAYS = ("logits", "pooled", "hidden")
#: hex digits of the fingerprint that name an entry's folder (meta.json holds the whole fingerprint)
FOLDER_KEY_LENGTH = 16


class RowSharding(Protocol):
    """How data-parallel ranks share a pass over ``n`` rows and a cache folder (a
    :class:`mpdistil_fast.distributed.Runtime` is one)."""

    world_size: int

    @property
    def is_main(self) -> bool: ...

    def rank_rows(self, n: int) -> torch.Tensor: ...

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor: ...

    def read_weights(self, module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]: ...

    def from_main(self, value: int) -> int: ...

    def barrier(self) -> None: ...


#: ``keep_hidden`` values and what they store.
HIDDEN_MODES: dict[bool | str, str | None] = {False: None, True: "all", "all": "all", "layer_states": "layer_states"}


@dataclass
class CachedOutputs:
    """Teacher outputs of every row of one split: ``logits`` ``[N, K]``, ``pooled`` ``[N, H]`` (multiple choice:
    ``[N, C, H]``), ``hidden`` (``hidden_kind``): ``"all"`` every layer's states ``[N, L+1, S, H]``, ``"layer_states"``
    each layer's state at the pooling position ``[N, L, 1, H]`` (multiple choice: ``[N, C, ...]``), or None.  Use
    :meth:`gather` for batches: it counts the rows it serves, which is what :attr:`TeacherCache.seconds_saved` reports.
    """

    logits: torch.Tensor
    pooled: torch.Tensor
    hidden: torch.Tensor | None
    compute_seconds: float
    obtain_seconds: float
    rows_served: int = field(default=0)
    hidden_kind: str | None = None

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def gather(self, example_index: torch.Tensor, device: torch.device | str | None = None) -> "TaskModelOutput":
        """The teacher's :class:`~mpdistil_fast.models.TaskModelOutput` for rows ``example_index`` (a batch's
        ``example_index``), shaped exactly like a live teacher forward pass, on ``device`` (default CPU)."""
        from mpdistil_fast.models.task_model import TaskModelOutput

        rows = example_index.cpu().long()
        if rows.dim() != 1 or (rows.numel() and (rows.min() < 0 or rows.max() >= len(self))):
            raise ValueError(f"example_index must be a 1-D tensor of rows in [0, {len(self)}), got {rows.tolist()}")
        self.rows_served += rows.numel()
        move = lambda t: t[rows].to(device) if device is not None else t[rows]  # noqa: E731
        hidden = layer_states = None
        if self.hidden is not None:
            states = move(self.hidden)
            states = states.reshape(-1, *states.shape[-3:])  # [B(*C), L(+1), S, H]
            if self.hidden_kind == "layer_states":
                layer_states = states.transpose(0, 1)
            else:
                hidden = tuple(states.unbind(dim=1))
        return TaskModelOutput(logits=move(self.logits), pooled=move(self.pooled), hidden_states=hidden,
                               layer_states=layer_states)

    @property
    def seconds_saved(self) -> float:
        """Teacher forward time the rows served so far would have cost (at the measured seconds per row of the pass
        that filled this entry), minus the time spent obtaining it; negative while the cache has not paid off."""
        return self.rows_served / len(self) * self.compute_seconds - self.obtain_seconds


def fingerprint(teacher: torch.nn.Module, split: EncodedSplit, keep_hidden: str | None,
                weights: Iterable[tuple[str, torch.Tensor]] | None = None) -> str:
    """SHA-256 of the teacher's weights (``weights``: its state dict's entries, default ``teacher.state_dict()``),
    its backbone's configuration (activation, norm epsilon, ...: same weights, other outputs), pooling and the
    split's tensors: equal fingerprints give equal outputs."""
    digest = hashlib.sha256()
    digest.update(f"{split.task}|{keep_hidden}|{getattr(teacher, 'pooling', '')}".encode())
    config = getattr(getattr(teacher, "backbone", None), "config", None)
    if config is not None:  # (private keys such as _name_or_path and the library version do not change outputs)
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    weights = teacher.state_dict().items() if weights is None else weights
    hash_tensors(digest, itertools.chain(weights, split.inputs()))
    return digest.hexdigest()


class TeacherCache:
    """Outputs of a frozen ``teacher`` per (task, split), in memory or as memory-mapped ``.npy`` files under
    ``directory``.  ``keep_hidden`` also stores every layer's hidden states: ``True``/``"all"`` every token (large:
    ``N (L+1) S H`` floats), ``"layer_states"`` only each layer's state at the pooling position, all that patient
    KD's hidden loss reads (Sun et al., 2019; :meth:`~mpdistil_fast.models.TaskModel.pooled_layer_states`):
    ``N L H`` floats, served as ``layer_states`` ``[L, B, 1, H]``."""

    def __init__(self, teacher: "TaskModel", directory: Path | str | None = None, *, batch_size: int = 64,
                 keep_hidden: bool | str = False, sharding: RowSharding | None = None) -> None:
        """``sharding``: each data-parallel rank runs the teacher on its share of a split's rows and the ranks
        exchange the outputs (a run of ``W`` ranks does ``1/W`` of the teacher work per rank).  On disk the ranks
        share one ``directory`` (a filesystem every node sees): rank 0 decides whether its files are valid and
        writes them, every rank maps them; the fingerprint reads a ZeRO-3 teacher's weights gathered (every rank takes
        part)."""
        _check_batch_size(batch_size)
        self.teacher = teacher
        self.sharding = sharding
        # one process computes straight into the files (or memory), with no gather and no copy of the split
        self._shared_pass = sharding is not None and sharding.world_size > 1
        self.directory = Path(directory) if directory is not None else None
        self.batch_size = batch_size
        if keep_hidden not in HIDDEN_MODES:
            raise ValueError(f"keep_hidden must be one of {tuple(HIDDEN_MODES)}, got {keep_hidden!r}")
        self.keep_hidden = HIDDEN_MODES[keep_hidden]
        self.entries: dict[tuple[str, str], CachedOutputs] = {}

    @property
    def seconds_spent(self) -> float:
        """Seconds spent computing or loading teacher outputs in this run."""
        return sum(entry.obtain_seconds for entry in self.entries.values())

    @property
    def seconds_saved(self) -> float:
        """Teacher forward time avoided by the rows served so far, minus :attr:`seconds_spent` (module docstring)."""
        return sum(entry.seconds_saved for entry in self.entries.values())

    def summary(self) -> str:
        """One log line: what the cache cost and what it saved."""
        rows = sum(entry.rows_served for entry in self.entries.values())
        net = round(self.seconds_saved, 1)
        outcome = f"saved {abs(net):.1f} s" if net >= 0 else f"cost {-net:.1f} s more than it saved"  # (no -0.0)
        return (f"teacher cache: {len(self.entries)} split(s), {self.seconds_spent:.1f} s to build/load, "
                f"{rows} rows served, {outcome}")

    def outputs(self, split: EncodedSplit, split_name: str) -> CachedOutputs:
        """The teacher's outputs for every row of ``split`` (computed on first use, then reused)."""
        key = (split.task, split_name)
        if key not in self.entries:
            start = time.perf_counter()
            folder, arrays, compute_seconds, print_key = None, None, 0.0, ""
            if self.directory is not None:
                print_key = fingerprint(self.teacher, split, self.keep_hidden,
                                        None if self.sharding is None else self.sharding.read_weights(self.teacher))
                folder = self.directory / f"{split.task}-{split_name}" / print_key[:FOLDER_KEY_LENGTH]
                arrays, compute_seconds = self._load(folder, print_key)
            if arrays is None:
                if folder is not None and self._is_main:  # what a killed earlier pass was writing here
                    remove_abandoned_temporaries(folder)
                if not self._shared_pass:
                    arrays = self._compute(split, folder)  # on disk: straight into the memory-mapped files
                else:
                    share = self._compute(split.select(self.sharding.rank_rows(len(split))), None)
                    arrays = tuple(None if a is None else self.sharding.gather_rows(a, len(split)) for a in share)
                    if folder is not None:
                        arrays = self._store(folder, arrays)
                compute_seconds = time.perf_counter() - start
                if folder is not None and self._is_main:
                    self._write_meta(folder, print_key, compute_seconds)
            self.entries[key] = CachedOutputs(*arrays, compute_seconds=compute_seconds,
                                              obtain_seconds=time.perf_counter() - start,
                                              hidden_kind=self.keep_hidden)
        return self.entries[key]

    @property
    def _is_main(self) -> bool:
        return self.sharding is None or self.sharding.is_main

    def _store(self, folder: Path, arrays: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Rank 0 writes the gathered ``arrays`` as ``.npy`` files; then every rank maps them (the memory the
        gathered copies held is released)."""
        if self._is_main:
            folder.mkdir(parents=True, exist_ok=True)
            for name, array in zip(_ARRAYS, arrays):
                if array is not None:
                    with written_atomically(folder / f"{name}.npy") as temporary, open(temporary, "wb") as file:
                        np.save(file, array.float().numpy())
        self.sharding.barrier()
        return self._load_arrays(folder, self.keep_hidden)

    @torch.no_grad()
    def _compute(self, split: EncodedSplit, folder: Path | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        was_training = self.teacher.training
        self.teacher.eval()
        device = next(self.teacher.parameters()).device
        stores: dict[str, np.ndarray | torch.Tensor] = {}
        try:
            for batch in iterate_batches(split, self.batch_size, shuffle=False, seed=0):
                out = self.teacher(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                   batch["token_type_ids"].to(device), task=split.task,
                                   output_hidden_states=self.keep_hidden == "all",
                                   output_layer_states=self.keep_hidden == "layer_states")
                values = {"logits": out.logits, "pooled": out.pooled}
                if self.keep_hidden is not None:
                    # [B(*C), L+1, S, H] or [B(*C), L, 1, H]
                    hidden = torch.stack(out.hidden_states, dim=1) if self.keep_hidden == "all" \
                        else out.layer_states.transpose(0, 1)
                    values["hidden"] = hidden.reshape(*out.pooled.shape[:-1], *hidden.shape[1:])
                rows = batch["example_index"]
                for name, value in values.items():
                    if name not in stores:
                        stores[name] = self._allocate(folder, name, (len(split), *value.shape[1:]), value.dtype)
                    target = stores[name]
                    target[rows.numpy() if isinstance(target, np.ndarray) else rows] = (
                        value.float().cpu().numpy() if isinstance(target, np.ndarray) else value.cpu())
        except BaseException:  # an interrupted pass leaves no half-written files behind
            for array in stores.values():
                if isinstance(array, np.memmap):
                    Path(array.filename).unlink(missing_ok=True)
            raise
        finally:
            self.teacher.train(was_training)
        if folder is not None:
            for name, array in stores.items():
                array.flush()
                fsync(Path(array.filename))  # on the disk before meta.json marks it complete
                # a fresh inode: arrays of an earlier entry that still map the old file keep their values
                os.replace(array.filename, folder / f"{name}.npy")
            return self._load_arrays(folder, self.keep_hidden)
        return stores["logits"], stores["pooled"], stores.get("hidden")

    @staticmethod
    def _allocate(folder: Path | None, name: str, shape: tuple[int, ...], dtype: torch.dtype):
        if folder is None:
            return torch.empty(shape, dtype=dtype)
        folder.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(temporary_beside(folder / f"{name}.npy"), mode="w+", dtype=np.float32,
                                         shape=shape)

    @staticmethod
    def _load_arrays(folder: Path, keep_hidden: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # mmap_mode "c" (copy-on-write) gives writable arrays, so torch.from_numpy shares them without copying
        tensors = [torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="c"))
                   if name != "hidden" or keep_hidden is not None else None for name in _ARRAYS]
        return tensors[0], tensors[1], tensors[2]

    def _load(self, folder: Path, print_key: str) -> tuple[tuple | None, float]:
        """The arrays in ``folder`` and what computing them cost, when its files hold ``print_key``'s outputs
        (rank 0 decides, every rank follows); otherwise ``(None, 0.0)``."""
        meta_path = folder / "meta.json"
        valid = False
        if self._is_main and meta_path.is_file():
            valid = json.loads(meta_path.read_text()).get("fingerprint") == print_key
        if self.sharding is not None:
            valid = bool(self.sharding.from_main(int(valid)))
        if not valid:
            return None, 0.0
        return self._load_arrays(folder, self.keep_hidden), float(json.loads(meta_path.read_text())["compute_seconds"])

    @staticmethod
    def _write_meta(folder: Path, print_key: str, compute_seconds: float) -> None:
        """meta.json is written last (atomically): its presence marks the arrays complete."""
        with written_atomically(folder / "meta.json") as temporary:
            temporary.write_text(json.dumps({"fingerprint": print_key, "compute_seconds": compute_seconds}))

