"""Plain helpers shared by several test files (fixtures live in conftest.py)."""

import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pattern_images(n, seed, size=16):
    """n smooth colour patterns plus noise, uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(n):
        base = (np.sin(xx / (2 + i % 3) + i) + np.cos(yy / (2 + i % 4))) * 60 + 128
        out.append(
            np.stack([base, base[::-1], base[:, ::-1]], -1) + rng.normal(0, 10, (size, size, 3))
        )
    return np.clip(out, 0, 255).astype(np.uint8)


def run_script(script, args, cwd):
    """`python ROOT/script *args` in cwd on one thread -> the CompletedProcess, text output."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def npz_run_flags(data, out, *extra, every):
    """as_introvae.py flags for a tiny run on data/train.npz (test.npz held out): 8,16 channels,
    z = 4, batches of 8, a log line per step, grids and checkpoints every `every` steps, no FID;
    `extra` last, so it overrides any of these."""
    return [
        *("--dataset", "npz", "--data-root", str(data / "train.npz")),
        *("--test-root", str(data / "test.npz"), "--channels", "8,16", "--z-dim", "4"),
        *("--batch-size", "8", "--log-every", "1", "--img-every", str(every)),
        *("--ckpt-every", str(every), "--fid-samples", "0", "--num-workers", "0"),
        *("--out", str(out), *extra),
    ]


def assert_identical(a, b, where="state"):
    """Assert two checkpoint-like structures bit-identical, recursively (tensors by torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
