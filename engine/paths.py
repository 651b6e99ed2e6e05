"""Where Quire keeps its data: the platform's user data directory, or `QUIRE_HOME`."""

from __future__ import annotations

import os
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
