"""Keyed, locked cache entries (trained classifiers, searched UAPs) under `paths.cache_dir/<kind>/<key>/`.

`claim(key)` holds a file lock on the entry while the caller reads it or makes and writes it, so that jobs
running at once wait for the one that makes it and then find it; every file of an entry is written atomically
(pipeline.files), so a half-written entry is never read under its final name.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


class Cache:
    def __init__(self, cache_dir: str | Path, kind: str):
        self.root = Path(cache_dir) / kind

    def entry(self, key: str) -> Path:
        return self.root / key

    @contextmanager
    def claim(self, key: str) -> Iterator[Path]:
        """The entry's folder, created if missing, held under its lock until the block ends."""
        entry = self.entry(key)
        entry.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry / ".lock")):
            yield entry
