"""An exclusive lock on an output directory, so two commands never write the same run.

The lock is a hidden sibling file `.NAME.lock` held with `flock`: the kernel drops it when the
process ends, however it ends, so a killed run never leaves a stale lock behind. The file is
removed on release; a waiter that locked a file just removed retries on the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from patchsparse.errors import PatchsparseError


def lock_path(directory: Path) -> Path:
    directory = Path(directory)
    return directory.with_name(f".{directory.name}.lock")


@contextlib.contextmanager
def directory_lock(directory: str | Path, what: str = "--out") -> Iterator[Path]:
    """Hold the lock of `directory` (which need not exist yet); refuse at once if another process holds it."""
    path = lock_path(Path(directory).absolute())
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PatchsparseError(f"{what} {directory} is in use by another patchsparse process "
                                   f"(lock {path.name} is held); wait for it to finish") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
