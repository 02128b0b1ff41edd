"""Atomic checkpoints of the full training state: safetensors for tensors, JSON for everything else.

Layout of one checkpoint directory::

    <component>.safetensors   one file per component ("student", "teacher", "optimizer/student", ...; "/" nests)
    state.json                the JSON state (step, epoch, data position, RNG, flattened optimizer metadata, ...)

A checkpoint is written into a hidden temporary directory beside its destination, every file is fsync'ed, and the
directory is renamed into place with ``os.replace`` (atomic on POSIX), so a run killed at any moment leaves either
the previous checkpoint or the new one, never half of one.  Replacing an existing checkpoint moves the old one aside
first; if a kill lands between the two renames, the moved-aside copy is still found (and restored by the next save).
:func:`checkpoint_dir` names checkpoints ``RUN_DIR/checkpoints/step-000000123`` and :func:`latest_checkpoint` finds
the newest complete one.

Optimizer, scheduler and policy state dicts mix tensors with Python values (int keys, tuples such as Adam's betas);
:func:`flatten_state_dict` splits them into a flat ``{name: tensor}`` dict for safetensors and a JSON-safe
description that :func:`unflatten_state_dict` turns back into the identical object.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from mpdistil_fast.files import fsync

STATE_FILE = "state.json"
CHECKPOINTS_SUBDIR = "checkpoints"
_STEP_NAME = re.compile(r"^step-(\d+)$")
#: A checkpoint moved aside while being replaced (see :func:`save_checkpoint`).
_ASIDE_NAME = re.compile(r"^\.(step-\d+)\.old-[0-9a-f]+$")
_TAGS = ("__tensor__", "__tuple__", "__dict__")


def flatten_state_dict(obj: Any, *, copy: bool = True) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts with any scalar keys, lists, tuples, tensors, numpy arrays, JSON scalars) into
    ``(tensors, meta)``: CPU tensors keyed by their path (copies; ``copy=False`` takes tensors that are private CPU
    copies already as they are), and a JSON-serialisable skeleton referring to them."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if isinstance(value, torch.Tensor):
            key = path or "value"
            while key in tensors:
                key += "'"
            tensors[key] = value.detach().to("cpu", copy=copy).contiguous()
            return {"__tensor__": key}
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, tuple):
            return {"__tuple__": [encode(item, f"{path}.{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, f"{path}.{i}") for i, item in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(key, str) and key not in _TAGS for key in value):
                return {key: encode(item, f"{path}.{key}" if path else key) for key, item in value.items()}
            return {"__dict__": [[encode(key, f"{path}.key{i}"), encode(item, f"{path}.{key}" if path else str(key))]
                                 for i, (key, item) in enumerate(value.items())]}
        raise TypeError(f"state at {path or '<root>'!r} has unsupported type {type(value).__name__}")

    meta = encode(obj, "")
    return tensors, meta


def unflatten_state_dict(tensors: dict[str, torch.Tensor], meta: Any) -> Any:
    """Inverse of :func:`flatten_state_dict`."""
    if isinstance(meta, list):
        return [unflatten_state_dict(tensors, item) for item in meta]
    if isinstance(meta, dict):
        if set(meta) == {"__tensor__"}:
            if meta["__tensor__"] not in tensors:
                raise KeyError(f"tensors has no entry {meta['__tensor__']!r} referenced by the state")
            return tensors[meta["__tensor__"]]
        if set(meta) == {"__tuple__"}:
            return tuple(unflatten_state_dict(tensors, item) for item in meta["__tuple__"])
        if set(meta) == {"__dict__"}:
            return {_hashable(unflatten_state_dict(tensors, key)): unflatten_state_dict(tensors, item)
                    for key, item in meta["__dict__"]}
        return {key: unflatten_state_dict(tensors, item) for key, item in meta.items()}
    return meta


def _hashable(key: Any) -> Any:
    return tuple(_hashable(item) for item in key) if isinstance(key, (list, tuple)) else key


def capture_rng_state(device: torch.device | None = None) -> dict:
    """The Python, NumPy and torch CPU generator states, and that of the CUDA ``device`` the run computes on, as a
    JSON-serialisable dict.  Only that device's: each data-parallel rank draws on its own device in step with rank
    0 (same seed, same draws), whose saved state is then every rank's (all devices' states would give rank k rank
    0's untouched generator of device k)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    encode = lambda tensor: base64.b64encode(tensor.numpy().tobytes()).decode("ascii")  # noqa: E731
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
             "torch": encode(torch.get_rng_state())}
    if device is not None and device.type == "cuda":
        state["cuda_device"] = encode(torch.cuda.get_rng_state(device))
    return state


def restore_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore the generators saved by :func:`capture_rng_state`, the CUDA one onto ``device`` (when both sides have
    one; a checkpoint written before per-device states restores every device's, as saved)."""
    missing = {"python", "numpy", "torch"} - set(state)
    if missing:
        raise ValueError(f"state lacks the RNG entries {sorted(missing)}")
    decode = lambda text: torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)  # noqa: E731
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(decode(state["torch"]))
    if device is not None and device.type == "cuda" and "cuda_device" in state:
        torch.cuda.set_rng_state(decode(state["cuda_device"]), device)
    elif "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])


def _component_path(directory: Path, component: str) -> Path:
    parts = component.split("/")
    if not component or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"component names must be non-empty relative names like 'optimizer/student', got "
                         f"{component!r}")
    return directory.joinpath(*parts).with_name(parts[-1] + ".safetensors")


def save_checkpoint(directory: Path | str, tensors: dict[str, dict[str, torch.Tensor]], state: dict, *,
                    folders: dict[str, Path] | None = None, linked: dict[str, Path] | None = None) -> None:
    """Write ``tensors`` (component -> name -> tensor) and the JSON ``state`` to ``directory`` atomically,
    replacing an existing checkpoint there.  ``folders`` (name -> folder on the same filesystem, e.g. what every
    rank of a distributed run wrote) are moved into the checkpoint under their names, inside the same atomic step.
    ``linked`` (component -> a component file of an earlier checkpoint, e.g. a frozen teacher's) is hard-linked in
    (copied where the filesystem cannot link) instead of written again."""
    directory = Path(directory)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    try:
        state_text = json.dumps(state)
    except TypeError as exc:
        raise TypeError(f"state must be JSON-serialisable (flatten tensors with flatten_state_dict): {exc}") from None
    directory.parent.mkdir(parents=True, exist_ok=True)
    _clean_interrupted(directory.parent)
    temporary = _temporary_name(directory)
    temporary.mkdir()
    try:
        for component, named in tensors.items():
            path = _component_path(temporary, component)
            path.parent.mkdir(parents=True, exist_ok=True)
            safetensors.torch.save_file({name: t.detach().cpu().contiguous().clone() for name, t in named.items()},
                                        str(path))
            fsync(path)
        for component, source in (linked or {}).items():
            path = _component_path(temporary, component)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, path)
            except OSError:
                shutil.copyfile(source, path)
                fsync(path)
        for name, folder in (folders or {}).items():
            _component_path(temporary, name)  # the same name rules as components
            os.replace(folder, temporary / name)
            for path in (temporary / name).rglob("*"):
                if path.is_file():
                    fsync(path)
        (temporary / STATE_FILE).write_text(state_text)
        fsync(temporary / STATE_FILE)
        for folder in sorted({p.parent for p in temporary.rglob("*")} | {temporary}, reverse=True):
            fsync(folder)
        if directory.exists():
            stale = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex}"
            os.replace(directory, stale)
            os.replace(temporary, directory)
            shutil.rmtree(stale)
        else:
            os.replace(temporary, directory)
        fsync(directory.parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _temporary_name(directory: Path) -> Path:
    """A hidden name beside ``directory`` for a checkpoint being written or deleted (:func:`_clean_interrupted`
    clears such folders away)."""
    return directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"


def _clean_interrupted(folder: Path) -> None:
    """Undo what a killed :func:`save_checkpoint` left in ``folder``: put a moved-aside checkpoint whose replacement
    never arrived back in place, delete other moved-aside copies and unfinished temporary directories."""
    for path in sorted(folder.iterdir()):
        aside = _ASIDE_NAME.match(path.name)
        if aside and not (folder / aside.group(1)).exists():
            os.replace(path, folder / aside.group(1))
        elif aside or (path.name.startswith(".") and ".tmp-" in path.name and path.is_dir()):
            shutil.rmtree(path, ignore_errors=True)


class DamagedCheckpointError(ValueError):
    """A checkpoint folder whose files cannot be read back: damaged after it was written (a save is atomic, so a
    killed one leaves no such folder; a disk fault, an edit, a copy or deletion cut short do)."""

    def __init__(self, directory: Path, what: str) -> None:
        super().__init__(f"checkpoint {directory} is damaged ({what}): evaluate or resume from an earlier checkpoint "
                         "(delete this one: --resume takes the newest left)")


def read_state(directory: Path | str, *, skip: tuple[str, ...] = ()) -> dict:
    """The JSON state of the checkpoint ``directory``, once every component it describes (``state["meta"]``) has
    its file, except those under the top-level folders named in ``skip`` (:class:`DamagedCheckpointError`
    otherwise: before models load, so that a run learns in a second what it would after minutes)."""
    directory = Path(directory)
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"directory {str(directory)!r} is not a checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_path.read_text())
    except ValueError as error:  # (UnicodeDecodeError included)
        raise DamagedCheckpointError(directory, f"{STATE_FILE} is not valid JSON: {error}") from None
    if not isinstance(state, dict):
        raise DamagedCheckpointError(directory, f"{STATE_FILE} holds a {type(state).__name__}, not an object")
    missing = [name for name in state.get("meta") or {}
               if name.split("/")[0] not in skip and not _component_path(directory, name).is_file()]
    if missing:
        raise DamagedCheckpointError(directory, "no file for " + ", ".join(f"{name}.safetensors" for name in missing))
    return state


def load_checkpoint(directory: Path | str, *, skip: tuple[str, ...] = ()
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``(tensors, state)`` as given to :func:`save_checkpoint`; the ``.safetensors`` files under the top-level
    folders named in ``skip`` (e.g. one every rank reads its own part of) are not read.  A file that cannot be read,
    or a component the state describes (``state["meta"]``) without its file, is a :class:`DamagedCheckpointError`."""
    directory = Path(directory)
    state = read_state(directory, skip=skip)
    tensors = {}
    for path in sorted(directory.rglob("*.safetensors")):
        if path.relative_to(directory).parts[0] in skip:
            continue
        try:
            tensors[path.relative_to(directory).with_suffix("").as_posix()] = safetensors.torch.load_file(str(path))
        except Exception as error:  # safetensors' own error type (truncated, not a safetensors file)
            raise DamagedCheckpointError(directory, f"{path.name} cannot be read: {error}") from None
    return tensors, state


def checkpoint_dir(run_dir: Path | str, step: int) -> Path:
    """Where the checkpoint of global step ``step`` lives: ``RUN_DIR/checkpoints/step-000000123``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return Path(run_dir) / CHECKPOINTS_SUBDIR / f"step-{step:09d}"


def checkpoints_by_step(run_dir: Path | str) -> dict[int, Path]:
    """The complete checkpoints of a run by global step (a checkpoint moved aside by an interrupted replacement
    stands in for its step)."""
    folder = Path(run_dir) / CHECKPOINTS_SUBDIR
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        aside = _ASIDE_NAME.match(path.name)
        name = aside.group(1) if aside and not (folder / aside.group(1)).exists() else path.name
        if (match := _STEP_NAME.match(name)) and (path / STATE_FILE).is_file():
            found[int(match.group(1))] = path
    return found


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    found = checkpoints_by_step(run_dir)
    return [found[step] for step in sorted(found)]


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(run_dir: Path | str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints.  Each is first renamed to a temporary name (one that the next
    :func:`save_checkpoint` clears away), so a deletion cut short leaves no half-deleted checkpoint in the listing."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int, got {keep!r}")
    for path in list_checkpoints(run_dir)[:-keep]:
        doomed = _temporary_name(path)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
