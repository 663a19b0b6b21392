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

from pipeline.errors import ConfigError, StorageError

FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no space left, quota exceeded, file too large


# torch.save's own errors when the file cannot take its bytes (`PytorchStreamWriter failed writing file`,
# `[enforce fail at inline_container.cc] unexpected pos`): it does not say why
TORCH_WRITE = ("PytorchStreamWriter", "inline_container", "failed writing file")


def is_disk_full(e: BaseException) -> bool:
    """An OSError of a full disk (or a file over its size limit), or torch's error for a failed write."""
    return (isinstance(e, OSError) and e.errno in FULL) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in TORCH_WRITE))


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
    import numpy as np

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
    return atomic_write(path, save)


def check_writable(folder: Path | str, key: str) -> None:
    """`folder` exists (or can be made) and a file can be written in it; else a ConfigError naming `key`."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"{key}={folder}: cannot write there ({e.strerror or e}): expected a folder this "
                          f"user can write") from None
