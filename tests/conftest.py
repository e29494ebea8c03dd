"""Shared test plumbing: the three top-level scripts importable from any working directory, and the
fixtures several test files use (plain helper functions live in helpers.py)."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster than two contending for a busy CPU (and keeps runs
    reproducible)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """No Inception weights anywhere: FID must say how to provide them (downloads fail offline)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
