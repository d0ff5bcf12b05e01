"""Files and folders that appear whole or not at all, and the one rule for their temporaries.

Everything is written under a hidden temporary name beside its final path
(``.<name>.tmp-<writer>``, which no ``<name>*`` pattern matches), synced, and renamed into
place, so a reader, a rerun or a second writer never sees half a file; a failure removes the
temporary. A kill leaves it behind, and only the process that owns the final path removes it
(:func:`remove_temporaries`): the rank that owns a code cache shard, rank 0 of a training run
for its checkpoints, the builder of a pack index. Ownership, not age: the age of a file on a
shared filesystem (NFS) compares the clocks of two machines, and a PID means nothing on another
host or in another container.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from llama_mimi_tt.errors import UserError, writing

TEMPORARY_MARK = ".tmp-"


def temporary_path(path: Path, writer: Optional[str] = None) -> Path:
    """``.<name>.tmp-<writer>`` beside ``path``. ``writer`` defaults to this host, PID and a
    random token (unique to the call); processes that fill one folder together (the ranks of
    a training run) pass a name they all know."""
    path = Path(path)
    if writer is None:
        writer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{writer}")


def _move(tmp: Path, path: Path) -> None:
    """Syncs ``tmp`` (a file; a folder's files are the caller's) and renames it to ``path``,
    with a clear error when it is gone: the owner of ``path`` removed it (the same command
    started twice on one folder)."""
    try:
        if not tmp.is_dir():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except FileNotFoundError:
        if tmp.exists() or not path.parent.is_dir():
            raise
        raise UserError(
            f"{tmp} was removed before it could be renamed to {path}: another process that "
            f"writes {path.parent} removed it (is the same command running twice?). Run the "
            "command again: what is finished is kept."
        ) from None


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s new content to; when the block ends, the
    file is synced and renamed to ``path``. A failure (disk full, permissions: a UserError
    naming ``path``) removes the temporary and leaves ``path`` as it was."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with writing(path):
            yield tmp
            _move(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _sync_folder(folder: Path) -> None:
    """Syncs every file under ``folder`` to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def place_folder(tmp: Path, path: Path, keep_existing: bool) -> bool:
    """Renames the finished folder ``tmp`` to ``path``; True when it is in place. A folder
    already at ``path`` is kept and ``tmp`` removed (``keep_existing``: another process put an
    equal one there first), or removed and replaced (an incomplete one of an earlier run)."""
    tmp, path = Path(tmp), Path(path)
    if not keep_existing and path.exists():
        shutil.rmtree(path)
    try:
        _move(tmp, path)
    except OSError:  # a non-empty folder is in the way
        if not (keep_existing and path.is_dir()):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


@contextmanager
def new_folder(path: Path) -> Iterator[Path]:
    """Yields an empty temporary folder to build ``path`` in; when the block ends its files are
    synced and it is renamed to ``path``, unless another process put ``path`` there first:
    theirs is kept and ours dropped. A failure removes the temporary folder."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with writing(path):
            tmp.mkdir(parents=True)
            yield tmp
            _sync_folder(tmp)
            place_folder(tmp, path, keep_existing=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(path: Path) -> int:
    """Removes the temporaries (files or folders) that writers of ``path`` left; returns how
    many. Only the process that owns ``path`` may call it: it removes a live writer's
    temporary too. ``path``'s name may be a glob pattern (``step_*``). One that cannot be
    removed is left: temporary names are unique, so it blocks nothing."""
    path = Path(path)
    n = 0
    for tmp in path.parent.glob(f".{path.name}{TEMPORARY_MARK}*"):
        try:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        except OSError:
            continue
        n += 1
    return n
