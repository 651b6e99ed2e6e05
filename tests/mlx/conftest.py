"""torch runs on one thread in the MLX parity tests: the tiny models' matmuls take
microseconds, and two torch threads spinning against a neighbour process on a
two-core box made them take milliseconds (the same choice as tests/corpus)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread():
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
