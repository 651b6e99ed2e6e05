"""Garbage collection in the window tests happens between tests, not inside them.

`make test` in a fresh clone once died with a segmentation fault while Python's
cyclic collector ran on the GUI thread inside `qtbot.waitUntil`, as a new window's
service and ingest threads were opening the library: the collector was finalising
objects left by earlier tests (windows, workers and their Qt children) while other
threads ran. The app makes one window for its life; the tests make and close dozens.
So each window test runs with the collector off, and collects once its windows are
closed and their threads stopped (this fixture is set up before qtbot's, so it is
torn down after qtbot has closed the test's widgets).
"""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(autouse=True)
def collect_between_tests():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()
