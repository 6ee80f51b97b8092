"""Atomic file and folder writes: readers see the old content or the new one, never a part."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import LamdaError


def _check_writable_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LamdaError(
            f"cannot create output directory {path.parent}: {err.strerror}; choose a writable location"
        ) from err
    if not os.access(path.parent, os.W_OK):
        raise LamdaError(f"output directory {path.parent} is not writable; choose a writable location")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Raises:
        LamdaError: if the folder cannot be created or written.
    """
    path = Path(path)
    _check_writable_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates files readable by the owner only; give them the usual umask mode.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success its files move into ``path``.

    Files are renamed into ``path`` one by one only after the block completes, so an exception
    inside the block leaves ``path`` as it was. Existing files in ``path`` with other names are
    kept; files with the same names are replaced.

    Raises:
        LamdaError: if ``path`` cannot be created or written.
    """
    path = Path(path)
    _check_writable_parent(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        path.mkdir(parents=True, exist_ok=True)
        items = sorted(staging.iterdir())
        # Never delete a user's folder to make room for an output file: reject before moving anything.
        blocked = [str(path / item.name) for item in items if (path / item.name).is_dir() and not item.is_dir()]
        if blocked:
            raise LamdaError(f"cannot write {', '.join(blocked)}: a folder has that name; move it or choose another output folder")
        for item in items:
            target = path / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_writable_location(path: str | os.PathLike) -> None:
    """Check, without creating anything, that ``path`` could be created as a file or folder.

    The nearest existing ancestor must be a writable folder. Commands call this before long work
    so that a bad output path fails at once and leaves nothing behind.

    Raises:
        LamdaError: an ancestor is a file, or the nearest existing folder is not writable.
    """
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LamdaError(f"cannot write {path}: {ancestor} is a file, not a folder; choose another output path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LamdaError(f"cannot write {path}: folder {ancestor} is not writable; choose another output path")
