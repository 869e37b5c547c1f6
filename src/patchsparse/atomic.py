"""Atomic file and directory writes: readers see the old state or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which would race with other threads.
_UMASK = _read_umask()


def usual_file_modes(directory: Path) -> None:
    """Give every file under `directory` the mode the umask allows (some writers make files private)."""
    for path in Path(directory).rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~_UMASK)


def _owner_tag() -> str:
    """Host and process that own a temporary sibling, so a later writer can tell a dead one's leftovers."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove the temporary siblings of `final` left by killed writers on this host; returns them.

    Only names of the form `.NAME.HOST-PID.XXXX.partial` / `.tmp` whose HOST is this machine and
    whose PID no longer runs are removed: a live writer's, another machine's (a shared disk) and
    anything else are left alone.
    """
    final = Path(final)
    host = _owner_tag().rsplit("-", 1)[0]
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.{re.escape(host)}-(\d+)\.[^.]+\.(partial|tmp)$")
    removed = []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = pattern.match(path.name)
        if match is None or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed


def atomic_write_with(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Let `write` fill a temporary sibling file, then rename it over `path` in one step.

    Streams straight to disk, so large objects (e.g. `torch.save` of a checkpoint) need no copy in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give it the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` in one rename.

    On any exception the temporary directory is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_owner_tag()}.", suffix=".partial", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private; give it the usual mode
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} exists")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def set_aside(directory: Path) -> Iterator[Path]:
    """Move `directory` to a hidden sibling and yield a fresh empty one in its place.

    On success the old contents are deleted; on any exception the new directory is removed and
    the old one put back, so replacing a finished run with a failed one loses nothing. (Killed
    outright, the old run survives as `.NAME.old-PID` beside the new one.)
    """
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    os.replace(directory, old)
    try:
        directory.mkdir()
        yield old
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)
