"""The app's device setting resolved on this machine: a backend and device, or a
clear error naming what to choose instead."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from app.service import resolve_device


@pytest.mark.skipif(sys.platform == "darwin", reason="automatic means MLX on Apple Silicon")
def test_automatic_is_torch_on_a_cuda_gpu_where_there_is_one_else_the_cpu():
    from engine.runtime import device_available

    assert resolve_device("auto") == ("torch", "cuda" if device_available("cuda") else "cpu")
    assert resolve_device("cpu") == ("torch", "cpu")


def test_a_device_missing_here_is_a_clear_error():
    from engine.runtime import device_available

    if device_available("cuda"):
        assert resolve_device("cuda") == ("torch", "cuda")
    else:
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            resolve_device("cuda")
    if not device_available("mps"):
        with pytest.raises(ValueError, match="MPS is not available on this machine"):
            resolve_device("mps")


def test_mlx_when_installed_else_a_clear_error():
    if importlib.util.find_spec("mlx") is None:
        with pytest.raises(ValueError, match="MLX is not installed"):
            resolve_device("mlx")
    else:
        backend, device = resolve_device("mlx")
        assert backend == "mlx" and device in ("cpu", "gpu")


def test_chapters_come_from_the_top_level_of_the_outline():
    from types import SimpleNamespace

    from app.service import chapter_pages, chapters
    from ingest.document import OutlineEntry

    record = SimpleNamespace(display_title="Manual", pages=40, outline=[
        OutlineEntry("Preface", 0, 0), OutlineEntry("1 Introduction", 2, 0), OutlineEntry("1.1 Scope", 3, 1),
        OutlineEntry("2 Simple manipulations", 9, 0), OutlineEntry("Index", None, 0), OutlineEntry("3 Objects", 9, 0)])
    assert chapters(record) == [("Preface", 1, 2), ("1 Introduction", 3, 9), ("2 Simple manipulations", 10, 10),
                                ("3 Objects", 10, 40)]
    assert chapter_pages(record, "2 simple") == (10, 10) and chapter_pages(record, "introduction") == (3, 9)
    with pytest.raises(ValueError, match="no chapter"):
        chapter_pages(record, "Appendix")
    with pytest.raises(ValueError, match="no outline"):
        chapter_pages(SimpleNamespace(display_title="Tale", pages=3, outline=[]), "1")
