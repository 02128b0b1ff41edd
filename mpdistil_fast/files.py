"""Files written so that a reader never sees them half-written: a temporary name beside the target, flushed to the
disk and renamed into place (``os.replace``, atomic on POSIX) when complete, the folder flushed after (so that after
a power loss the target is the old file or the new one, never a renamed file whose data never reached the disk), and
deleted when the writing fails."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync(path: Path) -> None:
    """Flush ``path`` to the disk: a file's data, or a folder's entries (renames and new names in it)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_beside(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer (process or thread) uses."""
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A :func:`temporary_beside` name for the block to write; flushed and renamed to ``path`` when the block
    succeeds (then ``path``'s folder is flushed), deleted when it fails."""
    temporary = temporary_beside(path)
    try:
        yield temporary
        fsync(temporary)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)
    fsync(path.parent)
