"""Atomic file and folder writes: readers see the old content or the new one, never a part."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Literal

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
        LamdaError: if ``path`` is a folder, or its folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise LamdaError(f"cannot write {path}: a folder has that name; move it or choose another output path")
    _check_writable_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise LamdaError(f"cannot write {path}: {err.strerror}; choose a writable location") from err
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
    check_writable_location(path, kind="folder")
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


def _reject_file_as_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise LamdaError(f"cannot write into folder {path}: it is a file; move it or choose another output folder")


def check_writable_location(path: str | os.PathLike, *, kind: Literal["file", "folder"] = "file") -> None:
    """Check that ``path`` can be written as a file or a folder, before long work starts.

    Commands call this before a scan so that a bad output path fails at once. Creating a file
    is the test, not :func:`os.access`: for root, ``os.access`` ignores the mode bits, and
    pseudo-filesystems such as ``/proc`` and ``/sys`` reject new files that ``os.access``
    allows. The test file comes from :func:`tempfile.TemporaryFile`, which is unnamed on Linux
    (``O_TMPFILE``) and deleted on close elsewhere, so nothing is left behind.

    Args:
        path: the file or folder that the command will write; it may not exist yet.
        kind: ``"file"`` rejects an existing folder at ``path``; ``"folder"`` rejects an
            existing file there.

    Raises:
        LamdaError: ``path`` exists as the other kind, an ancestor is a file, or no file can be
            created in the nearest existing folder.
    """
    path = Path(path).absolute()
    if kind == "file" and path.is_dir():
        raise LamdaError(f"cannot write file {path}: a folder has that name; move it or choose another output path")
    if kind == "folder":
        _reject_file_as_folder(path)
    ancestor = path if kind == "folder" else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LamdaError(f"cannot write {path}: {ancestor} is a file, not a folder; choose another output path")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise LamdaError(
            f"cannot write {path}: cannot create files in folder {ancestor} ({err.strerror}); "
            "choose another output path"
        ) from err


class StagedWrites:
    """Output folders of one command, filled under temporary names and renamed into place at the end.

    :meth:`folder` returns a hidden staging folder inside each target folder. Leaving the
    ``with`` block normally moves every staged file into its target folder. An exception,
    ``KeyboardInterrupt`` included, removes every staging folder and every target folder that
    staging created, so a failed command leaves no output behind. Files are written completely
    before the first rename, and every rename stays inside one folder.

    NOTE: the renames themselves are not atomic as a group. Targets are checked before the
    first one, but a rename that still fails (a folder replaced meanwhile) or a Ctrl-C between
    two renames leaves the earlier files replaced. A failed rename's error names them.

    Example::

        with StagedWrites() as staged:
            plan.save(staged.folder(out_dir) / "plan.json")
            write_spectra_csv(table, staged.folder(out_dir) / "spectra.csv")
    """

    def __init__(self) -> None:
        self._staging: dict[Path, Path] = {}  # target folder -> staging folder inside it
        self._created: list[Path] = []  # folders created for staging, parents first

    def __enter__(self) -> StagedWrites:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def folder(self, target: str | os.PathLike) -> Path:
        """Return the staging folder for ``target``, creating it (and ``target``) on first use.

        Raises:
            LamdaError: ``target`` is a file or cannot be created or written.
        """
        target = Path(target).absolute()
        if target in self._staging:
            return self._staging[target]
        _reject_file_as_folder(target)
        self._make_folders(target)
        try:
            staging = Path(tempfile.mkdtemp(prefix=".staged-", suffix=".tmp", dir=target))
        except OSError as err:
            raise LamdaError(f"cannot write into folder {target}: {err.strerror}; choose a writable location") from err
        self._staging[target] = staging
        return staging

    def _make_folders(self, target: Path) -> None:
        missing = []
        ancestor = target
        while not ancestor.exists():
            missing.append(ancestor)
            ancestor = ancestor.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except OSError as err:
                raise LamdaError(
                    f"cannot create output folder {folder}: {err.strerror}; choose a writable location"
                ) from err
            self._created.append(folder)

    def commit(self) -> list[Path]:
        """Move every staged file into its target folder; returns the target paths in staging order.

        Raises:
            LamdaError: a folder is in the way of a staged file, or a rename fails. Every file
                is checked before the first rename, and the staged files are removed on failure.
        """
        moves = [
            (item, target / item.name)
            for target, staging in self._staging.items()
            for item in sorted(staging.iterdir())
        ]
        blocked = [str(destination) for item, destination in moves if destination.is_dir() and not item.is_dir()]
        if blocked:
            self.discard()
            raise LamdaError(
                f"cannot write {', '.join(blocked)}: a folder has that name; move it or choose another output folder"
            )
        done: list[Path] = []
        try:
            for item, destination in moves:
                os.replace(item, destination)
                done.append(destination)
        except BaseException as err:
            self.discard()
            if not isinstance(err, OSError):
                raise
            replaced = f"; already replaced: {', '.join(map(str, done))}" if done else ""
            raise LamdaError(f"cannot move {item.name} into {destination.parent}: {err.strerror}{replaced}") from err
        self._remove_staging()
        self._created.clear()
        return done

    def discard(self) -> None:
        """Remove every staging folder and every output folder that staging created (when empty)."""
        self._remove_staging()
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created.clear()

    def _remove_staging(self) -> None:
        for staging in self._staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        self._staging.clear()
