"""Output files: checked before any work starts, written atomically (temp file + ``os.replace``).

A crash or a kill at any moment leaves either the old file or the new one, never a partial one;
a bad output path is a one-line ``UserInputError`` before anything is computed or written.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserInputError

__all__ = ["check_output_path", "check_output_dir", "atomic_write", "atomic_write_text", "atomic_write_bytes"]


def check_output_path(path: str | os.PathLike, what: str = "output", missing_parents_ok: bool = False) -> Path:
    """``path`` as a Path if a file can be written there, else UserInputError. Creates nothing.

    Refused: an existing directory, a parent folder that is missing (unless
    ``missing_parents_ok``: the writer creates it) or an ancestor that is a file.
    """
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"cannot write {what} {str(path)!r}: it is a directory; give a file path")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserInputError(f"cannot write {what} {str(path)!r}: {str(existing)!r} is a file, not a folder")
    if not parent.exists() and not missing_parents_ok:
        raise UserInputError(f"cannot write {what} {str(path)!r}: folder {str(parent)!r} does not exist")
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` as a Path if it is a folder or can be created as one, else UserInputError. Creates nothing."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserInputError(f"cannot write {what} into {str(path)!r}: {str(existing)!r} is a file, not a folder")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, flush it to disk, then
    ``os.replace`` it onto ``path`` (missing parent folders are created). The temporary file is
    removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode(path))  # mkstemp makes 0600 files; keep the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def _new_file_mode(path: Path) -> int:
    """The mode of the file being replaced, else what ``open()`` would give (0666 minus umask)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
