"""The files the pipeline writes: each one whole or not at all (a temporary file beside it, then a rename), and
a folder that cannot be written or a disk that fills is a one-line error naming the file, with no temporary
file left behind."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, StorageError

FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no space left, quota exceeded, file too large


# what a failed write says where it gives no errno: torch.save (`PytorchStreamWriter failed writing file`,
# `[enforce fail at inline_container.cc] unexpected pos`), SQLite (`database or disk is full`)
FULL_TEXT = ("PytorchStreamWriter failed writing", "unexpected pos", "database or disk is full")


def is_disk_full(e: BaseException | None) -> bool:
    """A full disk (or a file over its size limit) anywhere in the error's chain of causes."""
    while e is not None:
        if (isinstance(e, OSError) and e.errno in FULL) or any(m in str(e) for m in FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def write_error(path: Path, e: BaseException) -> StorageError:
    if is_disk_full(e):
        reason = os.strerror(e.errno) if isinstance(e, OSError) else "the write failed"
        return StorageError(f"cannot write {path}: {reason} (is the disk full? free some space, or set "
                            f"paths.root_dir / paths.cache_dir to a folder on another disk)")
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
    return StorageError(f"cannot write {path}: {reason}")


def atomic_write(path: Path | str, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` writes the content to a temporary file beside `path`, which then replaces `path` at once."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) or is_disk_full(e):
            raise write_error(path, e) from None
        raise
    return path


def write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path | str, obj: Any, **kw) -> Path:
    return write_text(path, json.dumps(obj, **kw))


def write_npy(path: Path | str, array) -> Path:
    """np.save to exactly `path` (np.save itself adds `.npy` to a temporary name)."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
    return atomic_write(path, save)


def check_writable(folder: Path | str, key: str) -> None:
    """A file can be written in `folder`, or in the folder that would hold it; else a ConfigError naming `key`.
    Nothing is created: an existing folder gets a temporary file, a missing one its nearest existing parent's
    permissions checked."""
    folder = Path(folder).expanduser().absolute()
    try:
        if folder.is_dir():
            with tempfile.TemporaryFile(dir=folder):
                pass
            return
        parent = next(p for p in folder.parents if p.exists())  # the root always exists
        if folder.exists() or not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{folder if folder.exists() else parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"{parent} cannot be written")
    except OSError as e:
        raise ConfigError(f"{key}={folder}: cannot write there ({e.strerror or e}): expected a folder this "
                          f"user can write") from None
