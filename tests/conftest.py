"""Shared test plumbing: the three top-level scripts importable from any working directory, and the
fixtures several test files use (plain helper functions live in helpers.py).

Device switch: ASVAE_TEST_DEVICE=cuda (or cuda:1, cpu; default cpu) sets the `device` fixture, so
the tests that take it run their assertions on that device. A device that is not there stops the
run with one line instead of quietly testing the CPU.
"""

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEVICE_VARIABLE = "ASVAE_TEST_DEVICE"


def chosen_device():
    """torch.device named by $ASVAE_TEST_DEVICE (default cpu); pytest.UsageError if unusable."""
    name = os.environ.get(DEVICE_VARIABLE, "").strip() or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(
            f"{DEVICE_VARIABLE}={name!r} is not a torch device (cpu, cuda, cuda:1)"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"{DEVICE_VARIABLE}={name} but torch sees no CUDA GPU")
        if (device.index or 0) >= torch.cuda.device_count():
            raise pytest.UsageError(
                f"{DEVICE_VARIABLE}={name} but torch sees {torch.cuda.device_count()} CUDA GPU(s)"
            )
        device = torch.device("cuda", device.index or 0)
    elif device.type != "cpu":
        raise pytest.UsageError(f"{DEVICE_VARIABLE}={name}: only cpu and cuda are supported")
    return device



def pytest_configure(config):
    chosen_device()  # a bad device stops the run before collection


def pytest_report_header(config):
    device = chosen_device()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"device-dependent tests ({DEVICE_VARIABLE}): {device} ({where})"


@pytest.fixture(scope="session")
def device():
    """The torch.device of the device-dependent tests: $ASVAE_TEST_DEVICE, default cpu."""
    return chosen_device()


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


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder with train.npz (20 images) and test.npz (12), 16 x 16 RGB patterns, for tiny
    as_introvae.py runs through --dataset npz."""
    from helpers import pattern_images  # after ROOT is on sys.path

    folder = tmp_path_factory.mktemp("data")
    np.savez(folder / "train.npz", images=pattern_images(20, 0))
    np.savez(folder / "test.npz", images=pattern_images(12, 1))
    return folder
