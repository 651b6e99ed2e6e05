"""Where the library lives: the platform's user data directory, or `QUIRE_HOME`.

Mirrors `engine.paths.data_dir` on purpose (ingest may not import engine), so the
app, the CLI and the engine all agree on one data directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def data_dir() -> Path:
    """The root of all user data (library.db, models/, cache/), created if missing."""
    override = os.environ.get("QUIRE_HOME")
    root = Path(override).expanduser() if override else Path(platformdirs.user_data_dir("Quire", appauthor=False))
    root.mkdir(parents=True, exist_ok=True)
    return root


def library_path() -> Path:
    """The default library database."""
    return data_dir() / "library.db"
