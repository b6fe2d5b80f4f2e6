"""The run directory: an append-only JSONL results file and a lock against concurrent writers.

Each finished run is one JSON line, appended with ``flush`` and ``fsync`` as soon as the run
ends, so a crash loses at most the run in progress. The file is never rewritten. A process
killed mid-write can leave a torn last line; the reader skips it with a warning, and the next
writer first ends it with a newline so that new lines stay whole.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_NAME",
    "LOCK_NAME",
    "DirectoryLocked",
    "RunDirLock",
    "append_result",
    "read_results",
]

RESULTS_NAME = "results.jsonl"
LOCK_NAME = ".lock"


class DirectoryLocked(RuntimeError):
    """Another process holds the lock of this run directory."""


class RunDirLock:
    """An exclusive ``flock`` on ``DIR/.lock`` for as long as the ``with`` block runs.

    The kernel drops the lock when the holder exits, even by SIGKILL, so a stale lock file
    never blocks a restart.

    Raises:
        DirectoryLocked: on entry, when another process holds it.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DirectoryLocked(
                f"{self.path.parent} is in use by another `groupnorm reproduce` (pid {holder}); "
                f"wait for it to finish, or pass a different --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def append_result(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line and force it to disk (flush + fsync)."""
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "ab") as f:
        if f.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":  # a torn line from a killed writer: close it off
                    f.write(b"\n")
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All whole records of a results file, in order; ``[]`` if it does not exist.

    Lines that are not valid JSON objects (a torn write) are skipped with a warning.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "key" not in record:
                raise ValueError("not a run record")
        except ValueError:
            warnings.warn(
                f"{path}:{number}: skipping an unreadable line (a write cut short by a crash?)",
                stacklevel=2,
            )
            continue
        records.append(record)
    return records
