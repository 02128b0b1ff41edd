"""Files written so that a reader never sees them half-written: a temporary name beside the target, renamed into
place (``os.replace``, atomic on POSIX) when complete, and deleted when the writing fails."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_beside(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer (process or thread) uses."""
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A :func:`temporary_beside` name for the block to write; renamed to ``path`` when the block succeeds, deleted
    when it fails."""
    temporary = temporary_beside(path)
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)
