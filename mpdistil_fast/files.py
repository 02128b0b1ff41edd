"""Files written so that a reader never sees them half-written: a temporary name beside the target, flushed to the
disk and renamed into place (``os.replace``, atomic on POSIX) when complete, the folder flushed after (so that after
a power loss the target is the old file or the new one, never a renamed file whose data never reached the disk), and
deleted when the writing fails."""
from __future__ import annotations

import os
import re
import socket
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


#: ``<target name>.<pid>-<32 hex>.<host>.tmp``: the names :func:`temporary_beside` gives
_TEMPORARY_NAME = re.compile(r"^.+?\.(?P<pid>\d+)-[0-9a-f]{32}\.(?P<host>.+)\.tmp$")


def temporary_beside(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer (process or thread) uses; it names the writing process
    and its host, so that :func:`remove_abandoned_temporaries` can tell a killed writer's file from a live one's."""
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex}.{socket.gethostname()}.tmp")


def remove_abandoned_temporaries(folder: Path) -> list[Path]:
    """Delete the :func:`temporary_beside` files in ``folder`` whose writer is gone: a process of this host that no
    longer runs (killed by SIGKILL or the machine's out-of-memory killer, it left e.g. a teacher cache's
    multi-gigabyte array behind).  Files of other hosts (a shared filesystem) and of live processes are kept.
    Returns the deleted paths."""
    host, removed = socket.gethostname(), []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _TEMPORARY_NAME.match(path.name)
        if match is None or match["host"] != host or _process_alive(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        pass
    return True


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
