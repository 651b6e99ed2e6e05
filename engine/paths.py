"""Where Quire keeps its data: the platform's user data directory, or `QUIRE_HOME`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import platformdirs


def data_dir() -> Path:
    """The root of all user data (library.db, models/, cache/)."""
    override = os.environ.get("QUIRE_HOME")
    root = Path(override).expanduser() if override else Path(platformdirs.user_data_dir("Quire", appauthor=False))
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    path = data_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write via `write(tmp)` to a temp file beside `path`, fsync, then rename over it."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb+") as synced:
            os.fsync(synced.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on Windows, where it is skipped.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
