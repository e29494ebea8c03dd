"""Evaluation metrics equal to the tools researchers trust: FID, PSNR, SSIM, MSE, sharpness, KL.

FID equals pytorch-fid 0.3.0, PSNR / SSIM / MSE scikit-image, Laplacian-variance sharpness OpenCV,
and the histogram KL / JSD of 2D samples Soft-IntroVAE's evaluation.

Every function takes (N, C, H, W) float images in [0, 1] (C = 1, 3 or 4; grey is replicated, alpha
dropped) and reduces in float64 (float32 statistics move FID by up to 2). FID is pytorch-fid's:
eval-mode Inception, bilinear resize to 299 x 299, mean and ddof-1 covariance. PSNR and MSE are per
image on [0, 1], then the mean over images; reconstructions are clamped to [0, 1] first. SSIM is
Wang et al. 2004 as scikit-image computes it with gaussian_weights=True (11-tap window, sigma 1.5,
valid region). Folders are read recursively (list_images), as as_introvae.py reads training data.

    python eval_metrics.py fid real_dir fake_dir                 # FID, pytorch-fid convention
    python eval_metrics.py fid real_dir stats.npz --dims 2048    # a folder or .npz stats, each side
    python eval_metrics.py stats real_dir real_stats.npz         # pytorch-fid's .npz (mu, sigma)
    python eval_metrics.py recon real_dir rec_dir                # PSNR / SSIM / MSE of pairs
    python eval_metrics.py sharpness sample_dir                  # Laplacian variance (AVAE-S)

Import:  from eval_metrics import psnr, ssim, frechet_distance, load_inception, stats_from_generator
"""

import argparse
import contextlib
import dataclasses
import hashlib
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models.inception import (
    BasicConv2d,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)


class MetricInputError(ValueError):
    """Bad input: the message is one line naming the problem; the CLI prints it and exits 2."""


class MetricWarning(UserWarning):
    """A result that is valid but not comparable or biased (few images, unofficial weights, ...)."""


# --------------------------------------------------------------------------------------------------
# config: one field per command-line option (subcommands pick theirs in build_parser)
# --------------------------------------------------------------------------------------------------
def option(default, help):
    """A config field whose one-line help text is also its --flag's help (the three scripts'
    configs all use it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class MetricsConfig:
    weights: str = option(
        "", "Inception weights file; default: torch hub cache (downloads when online)"
    )
    device: str = option("cpu", "torch device for the Inception, e.g. cpu or cuda")
    batch_size: int = option(50, "images per Inception forward (pytorch-fid's default 50)")
    dims: int = option(2048, "Inception feature depth; only 2048 is comparable across papers")
    bn_batch_stats: bool = option(
        False, "Soft-IntroVAE's training-time FID: train-mode BatchNorm (NOT standard FID)"
    )
    frechet_method: str = option(
        "symmetric", "tr sqrt(S1 S2): symmetric (eigh, fast) or eigvals (closest to scipy)"
    )
    ssim_convention: str = option(
        "gaussian", "gaussian (Wang 2004 = skimage gaussian_weights) or skimage_default (7x7 box)"
    )
    opencv_exact: bool = option(
        False, "sharpness on OpenCV's rounded uint8 grey instead of float grey"
    )
    progress: bool = option(True, "one-line progress with rate and ETA on stderr")


CHOICES = {
    "dims": (64, 192, 768, 2048),
    "frechet_method": ("symmetric", "eigvals"),
    "ssim_convention": ("gaussian", "skimage_default"),
}

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
# What list_images counts as an image (suffix, any case): one list for training folders and metrics.
IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
FID_MIN_IMAGES = 2048  # below this FID is biased upward and the 2048x2048 covariance is singular


# --------------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------------
def format_seconds(seconds):
    """H:MM:SS (M:SS under an hour); "?" when not finite."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """done/total, rate, ETA on stderr: one line rewritten with '\\r' on a terminal, a line per
    update (at most one every 10 s) when redirected to a file or a pipe.

    `Progress(total, desc)`, `.update(n)`, `.close()` (or use it as a context manager).

    total may be None (no percentage / ETA). enabled=False makes every call a no-op.
    """

    def __init__(self, total, desc="", unit="img", stream=None, min_interval=None, enabled=True):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        if min_interval is None:
            min_interval = 0.5 if self.terminal else 10.0
        self.min_interval, self.enabled = min_interval, enabled
        self.done, self.start, self.last_print = 0, time.perf_counter(), -math.inf
        self.shown = None  # the count the last written line showed

    def update(self, n=1):
        self.done += n
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if self.enabled and (now - self.last_print >= self.min_interval or finished):
            self.last_print = now
            self._write(now)

    def _write(self, now):
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            where = f"{self.done}/{self.total} ({100.0 * self.done / self.total:.0f}%)"
            timing = f"ETA {format_seconds(eta)}, elapsed {format_seconds(elapsed)}"
        else:
            where, timing = f"{self.done}", f"elapsed {format_seconds(elapsed)}"
        line = f"{self.desc}: {where} {rate:.1f} {self.unit}/s, {timing}"
        self.stream.write(f"\r{line}  " if self.terminal else f"{line}\n")
        self.stream.flush()
        self.shown = self.done

    def close(self):
        if self.enabled and self.done and self.shown != self.done:
            self._write(time.perf_counter())
        if self.terminal and self.shown is not None:
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:  # wipe the line so an error message stands alone
            if self.terminal and self.shown is not None:
                self.stream.write("\r" + " " * 100 + "\r")
            self.shown, self.enabled = None, False
        self.close()


# --------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------
def _image_batch(x, name):
    """Any array-like (N, C, H, W) -> float64 CPU tensor; MetricInputError on another shape."""
    x = torch.as_tensor(x).detach()
    if x.dim() != 4:
        raise MetricInputError(f"{name} must be a (N, C, H, W) batch, got shape {tuple(x.shape)}")
    return x.to("cpu", torch.float64)


def _image_pair(x, y, data_range):
    """Reference x and reconstruction y as float64 (N, C, H, W), both clamped to [0, data_range].

    y is clamped silently (the decoders have no output activation, so reconstructions overshoot);
    x must already be in range, because a reference outside it means the wrong scale (e.g. [-1, 1]
    images).
    """
    x, y = _image_batch(x, "x"), _image_batch(y, "y")
    if x.shape != y.shape:
        raise MetricInputError(f"image shapes differ: x {tuple(x.shape)} vs y {tuple(y.shape)}")
    tolerance = 1e-6 * data_range
    if x.numel() and (x.min() < -tolerance or x.max() > data_range + tolerance):
        raise MetricInputError(
            f"x has values in [{x.min():.4g}, {x.max():.4g}], outside [0, {data_range:g}]: "
            f"rescale or pass data_range"
        )
    return x.clamp(0, data_range), y.clamp(0, data_range)


# --------------------------------------------------------------------------------------------------
# data: image folders and stats files
# --------------------------------------------------------------------------------------------------
def list_images(folder):
    """Every image file under folder, subfolders included, sorted: the one folder semantics of
    training (as_introvae.py's --data-root) and of every eval_metrics command.

    An image is a regular file (or a link to one) whose suffix, in any case, is in IMAGE_EXTENSIONS
    (pytorch-fid's extensions; pytorch-fid matches them case-sensitively, not recursively, and so
    skips '*.PNG' and subfolders). Links to folders are not entered (os.walk's default). Order:
    pathlib's, component by component ("a/z.png" before "a-b/a.png"). Returns path strings.
    """
    if not os.path.isdir(folder):
        raise MetricInputError(f"no such folder: {folder}")
    paths = [
        os.path.join(parent, name)
        for parent, _, names in os.walk(folder)
        for name in names
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS
        and os.path.isfile(os.path.join(parent, name))
    ]
    if not paths:
        raise MetricInputError(
            f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) in folder {folder} "
            f"or its subfolders"
        )
    return sorted(paths, key=lambda path: Path(path).parts)


def load_image(path):
    """One file -> (3, H, W) float32 in [0, 1]: PIL convert("RGB") (grey replicated, alpha
    dropped), / 255."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except Exception as error:  # PIL raises many types for a bad file; all mean "unreadable"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MetricInputError(f"cannot read image {path}: {reason}")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def image_batches(paths, batch_size):
    """Yield (B, 3, H, W) float32 batches of consecutive files, B <= batch_size; a new batch starts
    where the image size changes (one size per batch, like pytorch-fid's DataLoader)."""
    batch = []
    for path in paths:
        image = load_image(path)
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield torch.stack(batch)


def atomic_write(path, write, binary=True):
    """write(handle) into a new temporary file beside path, flush and fsync it, rename it over path,
    fsync the folder: a crash or a kill leaves the old file or the new one, never a part of one.
    The file gets a plain open()'s permissions (0o666 less the umask); binary=False: a text
    handle. The one atomic writer of the three scripts. An OSError becomes a MetricInputError."""
    temporary = f"{path}.{os.urandom(4).hex()}.tmp"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with open(os.open(temporary, flags, 0o666), "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise MetricInputError(f"cannot write {path}: {error.strerror or error}") from error
        raise
    with contextlib.suppress(OSError, AttributeError):  # the rename itself; not every OS allows it
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def save_stats(path, mu, sigma):
    """pytorch-fid's stats file: np.savez_compressed with float64 mu (D,) and sigma (D, D), written
    atomically. '.npz' is appended to a path without it (as numpy does).
    Returns the path written."""
    path = path if path.endswith(".npz") else path + ".npz"
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    atomic_write(path, lambda handle: np.savez_compressed(handle, mu=mu, sigma=sigma))
    return path


def load_stats(path):
    """pytorch-fid's .npz stats -> (mu (D,), sigma (D, D)) float64."""
    try:
        with np.load(path) as stats:
            mu, sigma = stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
    except FileNotFoundError:
        raise MetricInputError(f"no such stats file: {path}")
    except KeyError:
        raise MetricInputError(
            f"stats file {path} lacks the keys 'mu' and 'sigma' (pytorch-fid's .npz format)"
        )
    except Exception as error:
        raise MetricInputError(f"cannot read stats file {path}: {type(error).__name__}: {error}")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricInputError(
            f"stats file {path} has mu {mu.shape} and sigma {sigma.shape}; expected (D,), (D, D)"
        )
    return mu, sigma


# --------------------------------------------------------------------------------------------------
# model: pytorch-fid's "FID Inception" (TF inception-2015-12-05 ported) on torchvision's blocks
# --------------------------------------------------------------------------------------------------
class FIDInceptionA(InceptionA):
    """Mixed_5b/5c/5d. TF's average pool ignores the padded zeros: count_include_pad=False."""

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(
            F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        )
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(InceptionC):
    """Mixed_6b..6e. Same pool fix as FIDInceptionA."""

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(
            F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        )
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class FIDInceptionE(InceptionE):
    """Mixed_7b (average pool, count_include_pad=False) and Mixed_7c (MAX pool: a quirk of the TF
    graph)."""

    def __init__(self, in_channels, max_pool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1
        )
        if self.max_pool:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class InceptionV3FID(nn.Module):
    """FID Inception: torchvision's Inception3(num_classes=1008, aux_logits=False) state-dict layout
    (566 tensors, BN eps 1e-3, convs without bias) with the TF pool patches above.

    forward: (N, 3, H, W) in [0, 1] -> bilinear 299x299 (align_corners=False, no antialias, even
    at 299) -> 2x - 1 -> the block ending at `dims` (64: after Conv2d_2b + max pool, 192: Conv2d_4a
    + max pool, 768: Mixed_6e, 2048: Mixed_7c = pool3) -> global average pool -> (N, dims) float32.
    bn_batch_stats=True marks the model for train-mode BatchNorm (Soft-IntroVAE's training-time
    FID).
    """

    def __init__(self, dims=2048, bn_batch_stats=False):
        super().__init__()
        if dims not in CHOICES["dims"]:
            raise MetricInputError(
                f"dims must be one of {CHOICES['dims']} (pytorch-fid's blocks), got {dims}"
            )
        self.dims, self.bn_batch_stats = dims, bn_batch_stats
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        # unused by FID; present so the official file loads with strict=True
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):  # (N, 3, H, W) in [0, 1] -> (N, dims)
        return self.features_by_depth(x)[self.dims]

    def features_by_depth(self, x, up_to=None):
        """(N, 3, H, W) in [0, 1] -> {64: (N, 64), 192: (N, 192), 768: (N, 768), 2048: (N, 2048)}
        in one pass, each block output average-pooled over H, W; stops at up_to (default
        self.dims)."""
        up_to = up_to or self.dims
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        features = {64: F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)}
        if up_to > 64:
            # (N, 192, 35, 35)
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
            features[192] = F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)
        if up_to > 192:
            for block in (
                self.Mixed_5b,
                self.Mixed_5c,
                self.Mixed_5d,
                self.Mixed_6a,
                self.Mixed_6b,
                self.Mixed_6c,
                self.Mixed_6d,
                self.Mixed_6e,
            ):
                x = block(x)  # ends (N, 768, 17, 17)
            features[768] = F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)
        if up_to > 768:
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
            features[2048] = F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)  # pool3
        return features


def default_weights_path():
    """torch hub's cache file: $TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_FILE)


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_inception(weights=None, device="cpu", dims=2048, bn_batch_stats=False, flag="--weights"):
    """InceptionV3FID with the FID weights loaded strictly, on `device`, in eval mode (train-mode
    BatchNorm only with bn_batch_stats=True; its momentum is set to 0 so the running stats never
    move).

    weights: a file path, or None for the torch hub cache file (downloaded from pytorch-fid's
    release when missing and online). Wrong keys or an unreadable file raise MetricInputError; a
    file whose sha256 does not start with 6726825d loads with a MetricWarning (not the official
    weights). flag: the calling script's option for the file, named in the message.
    """
    path = weights or default_weights_path()
    if not os.path.isfile(path):
        if weights:
            raise MetricInputError(f"no such Inception weights file: {path}")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(
                FID_WEIGHTS_URL, path, hash_prefix=FID_WEIGHTS_SHA256_PREFIX
            )
        except Exception as error:
            raise MetricInputError(
                f"FID Inception weights unavailable ({type(error).__name__}); put "
                f"{FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL} at {path} or pass its path "
                f"({flag} PATH)"
            )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise MetricInputError(f"cannot read Inception weights {path}: {type(error).__name__}")
    model = InceptionV3FID(dims=dims, bn_batch_stats=bn_batch_stats)
    expected = set(model.state_dict())
    found = set(state_dict) if isinstance(state_dict, dict) else set()
    missing = sorted(k for k in expected - found if not k.endswith("num_batches_tracked"))
    unexpected = sorted(found - expected)
    if missing or unexpected:
        raise MetricInputError(
            f"Inception weights {path} have the wrong keys ({len(missing)} missing, e.g. "
            f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]}): "
            f"not an FID Inception file"
        )
    # files saved before torch 0.4.1
    old_format = any(k.endswith("num_batches_tracked") for k in expected - found)
    try:
        # every other key was checked above
        model.load_state_dict(state_dict, strict=not old_format)
    except RuntimeError as error:
        raise MetricInputError(
            f"Inception weights {path} do not fit: {str(error).splitlines()[-1].strip()}"
        )
    sha256 = _file_sha256(path)
    if not sha256.startswith(FID_WEIGHTS_SHA256_PREFIX):
        warnings.warn(
            f"{path} is not the official FID Inception file (sha256 {sha256[:8]}..., expected "
            f"{FID_WEIGHTS_SHA256_PREFIX}...): FID values are not comparable with papers",
            MetricWarning,
            stacklevel=2,
        )
    if bn_batch_stats:
        warnings.warn(
            "bn_batch_stats: train-mode BatchNorm (Soft-IntroVAE's training-time FID); "
            "NOT comparable with standard FID",
            MetricWarning,
            stacklevel=2,
        )
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.0
    return model.to(device).train(bn_batch_stats)


# --------------------------------------------------------------------------------------------------
# ALGO LOGIC: MSE, PSNR
# --------------------------------------------------------------------------------------------------
def _mse_per_image(x, y):
    """(N, C, H, W) float64 pair, checked and clamped -> (N,) mean over C*H*W of (x - y)^2."""
    return ((x - y) ** 2).mean(dim=(1, 2, 3)).numpy()


def mse(x, y, data_range=1.0):
    """Per-pixel MSE: mean over C*H*W of (x - y)^2 per image, float64.

    x, y: (N, C, H, W) in [0, data_range] (y clamped). Returns (per_image (N,) float64, mean over
    images). Training losses SUM over pixels instead; this is C*H*W times smaller.
    """
    per_image = _mse_per_image(*_image_pair(x, y, data_range))
    return per_image, float(per_image.mean())


def psnr_from_mse(mse_value, data_range=1.0):
    """PSNR = 10 log10(data_range^2 / MSE), inf where MSE is 0. An array (per-image MSEs) gives an
    array, a number (a pooled MSE) gives a float."""
    if np.ndim(mse_value) == 0:
        mse_value = float(mse_value)
        return 10.0 * math.log10(data_range**2 / mse_value) if mse_value > 0 else math.inf
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / np.asarray(mse_value, np.float64))


def mean_finite_psnr(per_image):
    """Mean of the finite per-image PSNRs; inf when every pair is identical (all inf)."""
    finite = per_image[np.isfinite(per_image)]
    return float(finite.mean()) if finite.size else math.inf


def psnr(x, y, data_range=1.0):
    """PSNR_i = 10 log10(data_range^2 / MSE_i) per image (skimage's peak_signal_noise_ratio on
    each image).

    x, y: (N, C, H, W) in [0, data_range] (y clamped). Returns (per_image (N,) float64, mean).
    Identical images have MSE 0 and PSNR inf: they stay inf in per_image and are EXCLUDED from the
    mean (count them with np.isinf(per_image).sum()); the mean is inf only when every pair is
    identical.
    """
    per_image = psnr_from_mse(mse(x, y, data_range)[0], data_range)
    return per_image, mean_finite_psnr(per_image)


def psnr_pooled(x, y, data_range=1.0):
    """Pooled PSNR = 10 log10(data_range^2 / MSE over every pixel of the batch): skimage on the
    whole batch, torchmetrics with dim=None; for images of one size, that MSE is the mean over
    images of MSE_i. NOT the mean of per-image PSNR (they differ by dB). Returns a float."""
    x, y = _image_pair(x, y, data_range)
    return psnr_from_mse(float(((x - y) ** 2).mean()), data_range)


# --------------------------------------------------------------------------------------------------
# ALGO LOGIC: SSIM (Wang et al. 2004 = skimage structural_similarity(gaussian_weights=True,
# sigma=1.5, use_sample_covariance=False), valid region only)
# --------------------------------------------------------------------------------------------------
def ssim_window(convention="gaussian"):
    """1D taps of the separable SSIM window and the covariance normalisation.

    gaussian: 11 taps, exp(-k^2 / (2 * 1.5^2)) for k = -5..5, normalised (skimage: sigma 1.5,
              truncate 3.5); population variances (cov_norm 1).
    skimage_default: 7 taps of 1/7 (uniform 7x7) with sample covariance (cov_norm 49/48).
    Returns (taps (K,) float64 tensor, cov_norm).
    """
    if convention == "gaussian":
        k = torch.arange(-5, 6, dtype=torch.float64)
        taps = torch.exp(-0.5 * k**2 / 1.5**2)
        return taps / taps.sum(), 1.0
    if convention == "skimage_default":
        return torch.full((7,), 1.0 / 7.0, dtype=torch.float64), 49.0 / 48.0
    raise MetricInputError(
        f"unknown SSIM convention {convention!r}: use 'gaussian' or 'skimage_default'"
    )


def ssim_torch(x, y, data_range=1.0, convention="gaussian"):
    """Differentiable SSIM per image, in x's dtype and device (usable as a training loss).

    x, y: (N, C, H, W), H and W >= window size (11; 7 for skimage_default). Returns (N,).
    SSIM map = ((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, local moments from the window; averaged over the VALID region
    (no padding) per channel, then over channels.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise MetricInputError(
            f"SSIM needs two (N, C, H, W) batches of one shape, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    taps, cov_norm = ssim_window(convention)
    size = taps.numel()
    n, c, h, w = x.shape
    if h < size or w < size:
        raise MetricInputError(f"SSIM needs images of at least {size}x{size} px, got {h}x{w}")
    taps = taps.to(device=x.device, dtype=x.dtype)

    def local_mean(t):  # (N*C, 1, H, W) -> (N*C, 1, H-size+1, W-size+1)
        t = F.conv2d(t, taps.view(1, 1, size, 1))
        return F.conv2d(t, taps.view(1, 1, 1, size))

    x = x.reshape(n * c, 1, h, w)
    y = y.reshape(n * c, 1, h, w)
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = cov_norm * (local_mean(x * x) - mu_x * mu_x)
    var_y = cov_norm * (local_mean(y * y) - mu_y * mu_y)
    cov_xy = cov_norm * (local_mean(x * y) - mu_x * mu_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.mean(dim=(1, 2, 3)).view(n, c).mean(dim=1)  # (N,)


def ssim(x, y, data_range=1.0, convention="gaussian"):
    """SSIM per image (ssim_torch in float64, y clamped to [0, data_range]) and the mean over
    images.

    x, y: (N, C, H, W) in [0, data_range]. Returns (per_image (N,) float64, mean).
    """
    x, y = _image_pair(x, y, data_range)
    with torch.no_grad():
        per_image = ssim_torch(x, y, data_range, convention).numpy()
    return per_image, float(per_image.mean())


# --------------------------------------------------------------------------------------------------
# ALGO LOGIC: Laplacian-variance sharpness (AVAE-S paper; = cv2.Laplacian(gray, cv2.CV_64F).var())
# --------------------------------------------------------------------------------------------------
def grey_255(x, opencv_exact=False):
    """(N, C, H, W) in [0, 1] -> (N, H, W) float64 grey on the [0, 255] scale, BT.601 luma.

    Float route: 255 * (0.299 R + 0.587 G + 0.114 B). opencv_exact: round to uint8 first, then
    OpenCV's fixed-point cvtColor(RGB2GRAY) = (9798 R + 19235 G + 3735 B + 16384) >> 15.
    """
    x = _image_batch(x, "x")
    if x.shape[1] not in (1, 3, 4):
        raise MetricInputError(f"images need 1, 3 or 4 channels, got {x.shape[1]}")
    if opencv_exact:
        u8 = torch.round(x.clamp(0, 1) * 255).to(torch.int64)
        if u8.shape[1] == 1:
            return u8[:, 0].to(torch.float64)
        return ((9798 * u8[:, 0] + 19235 * u8[:, 1] + 3735 * u8[:, 2] + 16384) >> 15).to(
            torch.float64
        )
    if x.shape[1] == 1:
        return 255.0 * x[:, 0]
    return 255.0 * (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])


def sharpness(x, opencv_exact=False):
    """Variance of the Laplacian per image (higher = sharper), on the [0, 255] grey scale.

    x: (N, C, H, W) in [0, 1], H, W >= 2. Grey (grey_255) -> reflect-101 pad 1 px ->
    3x3 kernel [[0,1,0],[1,-4,1],[0,1,0]] -> population variance (ddof 0) over the H*W pixels.
    Returns (per_image (N,) float64, mean); report per_image.std() beside the mean.
    """
    grey = grey_255(x, opencv_exact).unsqueeze(1)  # (N, 1, H, W)
    if grey.shape[-1] < 2 or grey.shape[-2] < 2:
        raise MetricInputError(
            f"sharpness needs images of at least 2x2 px, got {grey.shape[-2]}x{grey.shape[-1]}"
        )
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    # (N, 1, H, W)
    laplacian = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="reflect"), kernel.view(1, 1, 3, 3))
    per_image = laplacian.flatten(1).var(dim=1, correction=0).numpy()
    return per_image, float(per_image.mean())


# --------------------------------------------------------------------------------------------------
# ALGO LOGIC: histogram KL / JSD of 2D samples
# --------------------------------------------------------------------------------------------------
def _kl_terms(target, log_other):
    """sum over bins with target > 0 of target * (ln target - log_other) (torch's kl_div
    pointwise rule)."""
    inside = target > 0
    return float(np.sum(target[inside] * (np.log(target[inside]) - log_other[inside])))


def hist_kl_jsd(real_xy, fake_xy, bins=100, span=2.0, convention="paper", eps=1e-14):
    """KL(real || fake) and JSD between 2D histograms on [-span, span]^2 with bins x bins cells.

    real_xy, fake_xy: (N, 2) arrays; points outside the square are dropped.
    paper (Soft-IntroVAE's 2D evaluation, used by the AS paper's Tables 1 and 4): p, q = density
      histograms (numpy histogram2d density=True); KL = sum_{p>0} p (ln p - ln(q + eps)) / bins;
      "JSD" = 0.5 [KL'(m, p) + KL'(m, q)], m = (p + q) / 2,
      KL'(m, t) = sum_{m>0} m (ln m - ln(t + eps)) / bins.
      That JSD is the REVERSED form and unbounded; the KL is the bin-probability KL times
      1 / (bins * cell area) (6.25x at span 2, 1.5625x at span 4).
    textbook: bin probabilities P, Q; KL = sum_{P>0} P ln(P / max(Q, eps));
      JSD = 0.5 KL(P||M) + 0.5 KL(Q||M) with M = (P + Q) / 2, so 0 <= JSD <= ln 2.
    Returns (kl, jsd) floats; NaN (with a MetricWarning) when either set has no point inside the
    square.
    """
    real_xy, fake_xy = np.asarray(real_xy, np.float64), np.asarray(fake_xy, np.float64)
    for name, points in (("real_xy", real_xy), ("fake_xy", fake_xy)):
        if points.ndim != 2 or points.shape[1] != 2:
            raise MetricInputError(f"{name} must be an (N, 2) array, got shape {points.shape}")
    if convention not in ("paper", "textbook"):
        raise MetricInputError(
            f"unknown KL/JSD convention {convention!r}: use 'paper' or 'textbook'"
        )
    square = [[-span, span], [-span, span]]
    # counts, (bins, bins)
    count_real = np.histogram2d(real_xy[:, 0], real_xy[:, 1], bins=bins, range=square)[0]
    count_fake = np.histogram2d(fake_xy[:, 0], fake_xy[:, 1], bins=bins, range=square)[0]
    if count_real.sum() == 0 or count_fake.sum() == 0:
        warnings.warn(
            f"no {'real' if count_real.sum() == 0 else 'generated'} point inside "
            f"[-{span:g}, {span:g}]^2: "
            "KL and JSD are NaN",
            MetricWarning,
            stacklevel=2,
        )
        return math.nan, math.nan
    if convention == "paper":
        p = np.histogram2d(real_xy[:, 0], real_xy[:, 1], bins=bins, range=square, density=True)[0]
        q = np.histogram2d(fake_xy[:, 0], fake_xy[:, 1], bins=bins, range=square, density=True)[0]
        m = 0.5 * (p + q)
        kl = _kl_terms(p, np.log(q + eps)) / bins
        jsd = 0.5 * (_kl_terms(m, np.log(p + eps)) + _kl_terms(m, np.log(q + eps))) / bins
        return kl, jsd
    p, q = count_real / count_real.sum(), count_fake / count_fake.sum()
    m = 0.5 * (p + q)
    kl = _kl_terms(p, np.log(np.maximum(q, eps)))
    with np.errstate(divide="ignore"):  # ln 0 only where m = 0, cells _kl_terms skips
        log_m = np.log(m)
    jsd = 0.5 * _kl_terms(p, log_m) + 0.5 * _kl_terms(q, log_m)
    return kl, jsd


# --------------------------------------------------------------------------------------------------
# ALGO LOGIC: Frechet distance (float64, no scipy)
# --------------------------------------------------------------------------------------------------
def trace_sqrt_product(sigma1, sigma2, method="symmetric"):
    """tr sqrt(S1 S2) for covariance matrices (D, D), float64.

    eigvals: sum of Re(sqrt(eigenvalues of S1 @ S2)) with numpy, what scipy's
      sqrtm(...).real.trace() equals; closest to pytorch-fid (~1e-7 rank-deficient) but slow (tens
      of s at D = 2048 on 2 cores).
    symmetric: with any factor S1 = F F^T, S1 S2 is similar to F^T S2 F, which is symmetric PSD, so
      the trace is the sum of sqrt(eigvalsh(F^T S2 F)) clipped at 0. F = Cholesky factor (fast);
      when S1 is singular (fewer images than dims), F = S1^(1/2) from eigh (slow at D = 2048).
    """
    if method == "eigvals":
        eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
        return float(np.sqrt(eigenvalues).real.sum())
    if method == "symmetric":
        s1, s2 = torch.from_numpy(sigma1), torch.from_numpy(sigma2)
        factor, info = torch.linalg.cholesky_ex(s1)  # (D, D) lower triangular
        if info.item() != 0:
            w, v = torch.linalg.eigh(s1)
            factor = (v * w.clamp(min=0).sqrt()) @ v.T
        middle = factor.T @ s2 @ factor
        middle = 0.5 * (middle + middle.T)
        return float(torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum())
    raise MetricInputError(f"unknown Frechet method {method!r}: use 'symmetric' or 'eigvals'")


def frechet_distance(mu1, sigma1, mu2, sigma2, method="symmetric", eps=1e-6):
    """d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), all float64 (FID when the
    inputs are Inception pool3 statistics). mu: (D,), sigma: (D, D). Not clipped at 0 (a set against
    itself can give -1e-10). If the trace is non-finite, retries with eps added to both diagonals
    (as pytorch-fid does).
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(mu, np.float64)) for mu in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(sigma, np.float64)) for sigma in (sigma1, sigma2))
    dim = mu1.shape[0]
    if (
        mu1.shape != (dim,)
        or mu2.shape != (dim,)
        or sigma1.shape != (dim, dim)
        or sigma2.shape != (dim, dim)
    ):
        raise MetricInputError(
            f"statistics do not match: mu {mu1.shape} / {mu2.shape}, "
            f"sigma {sigma1.shape} / {sigma2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise MetricInputError("statistics contain NaN or inf")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2, method)
    if not math.isfinite(tr_covmean):
        warnings.warn(
            f"tr sqrt(S1 S2) is not finite; adding {eps:g} to both diagonals",
            MetricWarning,
            stacklevel=2,
        )
        offset = eps * np.eye(dim)
        tr_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset, method)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# --------------------------------------------------------------------------------------------------
# evaluation: features, statistics, FID
# --------------------------------------------------------------------------------------------------
def _to_rgb(images):
    """(N, C, H, W) with C = 1 (grey, replicated), 3, or 4 (alpha dropped) -> (N, 3, H, W)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3, 4):
        raise MetricInputError(
            f"images must be (N, C, H, W) with C = 1, 3 or 4, got shape {tuple(images.shape)}"
        )
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    return images[:, :3]


def inception_features(images, model, batch_size=50, device=None):
    """Pool features of the FID Inception: (N, C, H, W) tensor in [0, 1] -> (N, model.dims)
    float64 array.

    The forward runs in float32 under no_grad, batch_size images at a time, in eval mode (train mode
    only for a model built with bn_batch_stats=True); device defaults to the model's.
    """
    device = device or next(model.parameters()).device
    model.train(model.bn_batch_stats)
    images = _to_rgb(torch.as_tensor(images))
    features = np.empty((images.shape[0], model.dims), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size].to(device=device, dtype=torch.float32)
            features[start : start + chunk.shape[0]] = model(chunk).cpu().numpy()
    return features


def feature_stats(features):
    """(N, D) features -> (mu (D,), sigma (D, D)): mean and ddof-1 covariance, float64 (np.cov)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise MetricInputError(
            f"FID statistics need at least 2 feature rows, got shape {features.shape}"
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


class _StreamingStats:
    """Mean and ddof-1 covariance of feature rows added in chunks, float64, without keeping them.

    Sums are taken around the first chunk's mean (a shift), which keeps the one-pass formula as
    accurate as np.cov's two passes (~1e-15) for features of any offset.
    """

    def __init__(self, dims):
        self.n, self.shift = 0, None
        self.total, self.outer = np.zeros(dims), np.zeros((dims, dims))

    def add(self, rows):  # rows: (B, D) float64
        if self.shift is None:
            self.shift = rows.mean(axis=0)
        centred = rows - self.shift
        self.n += rows.shape[0]
        self.total += centred.sum(axis=0)
        self.outer += centred.T @ centred

    def result(self):
        if self.n < 2:
            raise MetricInputError(f"FID needs at least 2 images per set, got {self.n}")
        mean_centred = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mean_centred, mean_centred)) / (self.n - 1)
        return self.shift + mean_centred, sigma


def _warn_few_images(n, what):
    if n < FID_MIN_IMAGES:
        warnings.warn(
            f"{what}: {n} images < {FID_MIN_IMAGES}: FID is biased upward and the covariance is "
            f"singular; compare only numbers computed with the same n",
            MetricWarning,
            stacklevel=3,
        )


def stats_from_batches(
    batches, model, max_images=None, device=None, progress=True, batch_size=50, total=None
):
    """Inception statistics of a stream of images: (mu (D,), sigma (D, D), n images).

    batches: iterable of (B, C, H, W) tensors in [0, 1], or of (images, labels) tuples (a
    DataLoader).
    max_images: stop after this many (the last batch is computed whole, then cut).
    Each batch is split into batch_size forwards, except with bn_batch_stats, where the batch IS the
    BatchNorm batch. total: images expected, for the progress line (default len(batches.dataset)).
    """
    if total is None:
        total = len(batches.dataset) if hasattr(batches, "dataset") else None
    if max_images is not None:
        total = min(total, max_images) if total is not None else max_images
    stats = _StreamingStats(model.dims)
    with Progress(total, "Inception features", enabled=progress) as bar:
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            chunk = images.shape[0] if model.bn_batch_stats else batch_size
            features = inception_features(images, model, batch_size=chunk, device=device)
            if max_images is not None:
                features = features[: max_images - stats.n]
            stats.add(features)
            bar.update(features.shape[0])
            if max_images is not None and stats.n >= max_images:
                break
    mu, sigma = stats.result()
    _warn_few_images(stats.n, "image set")
    return mu, sigma, stats.n


def stats_from_generator(
    generate, n_samples, model, batch_size=100, device=None, progress=True, quantize="none"
):
    """Inception statistics of n_samples generated images: (mu (D,), sigma (D, D)).

    generate(k) -> (k, C, H, W) tensor (e.g. an EMA decoder on k latent draws); called under
    no_grad and clamped to [0, 1] here. quantize: "none", "round" (what saving 8-bit PNGs gives), or
    "truncate" (Soft-IntroVAE's np.uint8 cast). With bn_batch_stats every call generates a full
    batch_size.
    """
    if quantize not in ("none", "round", "truncate"):
        raise MetricInputError(f"quantize must be 'none', 'round' or 'truncate', got {quantize!r}")
    stats = _StreamingStats(model.dims)
    with Progress(n_samples, "generated features", enabled=progress) as bar, torch.no_grad():
        while stats.n < n_samples:
            k = batch_size if model.bn_batch_stats else min(batch_size, n_samples - stats.n)
            images = generate(k).detach().float().clamp(0, 1)
            if quantize == "round":
                images = torch.round(images * 255) / 255
            elif quantize == "truncate":
                images = torch.floor(images * 255) / 255
            chunk = images.shape[0] if model.bn_batch_stats else batch_size
            features = inception_features(images, model, batch_size=chunk, device=device)[
                : n_samples - stats.n
            ]
            stats.add(features)
            bar.update(features.shape[0])
    mu, sigma = stats.result()
    _warn_few_images(stats.n, "generated set")
    return mu, sigma


def stats_from_path(path, model, batch_size=50, device=None, progress=True):
    """A .npz stats file or an image folder -> (mu, sigma, n); n is None for a stats file."""
    if path.endswith(".npz"):
        mu, sigma = load_stats(path)
        return mu, sigma, None
    paths = list_images(path)
    if len(paths) < 2:
        raise MetricInputError(f"FID needs at least 2 images per set, {path} has {len(paths)}")
    mu, sigma, n = stats_from_batches(
        image_batches(paths, batch_size),
        model,
        device=device,
        progress=progress,
        batch_size=batch_size,
        total=len(paths),
    )
    return mu, sigma, n


def fid_from_dirs(
    dir_a,
    dir_b,
    weights=None,
    batch_size=50,
    device=None,
    dims=2048,
    bn_batch_stats=False,
    frechet_method="symmetric",
    progress=False,
):
    """FID between two image folders (either may be a pytorch-fid .npz stats file instead).

    pytorch-fid's pipeline: PIL RGB / 255 -> InceptionV3FID -> float64 mean and ddof-1 covariance ->
    frechet_distance. Returns a float. Warns (MetricWarning) below 2048 images per set.
    """
    folders = [path for path in (dir_a, dir_b) if not path.endswith(".npz")]
    for path in (
        dir_a,
        dir_b,
    ):  # bad input fails before the weights load and the long forward passes
        if path in folders:
            if len(list_images(path)) < 2:
                raise MetricInputError(f"FID needs at least 2 images per set, {path} has 1")
        elif folders:
            file_dims = load_stats(path)[0].shape[0]
            if file_dims != dims:
                raise MetricInputError(
                    f"stats file {path} holds {file_dims}-d statistics, "
                    f"the folder would give {dims}-d (set dims / --dims)"
                )
    model = load_inception(weights, device or "cpu", dims, bn_batch_stats) if folders else None
    mu_a, sigma_a, _ = stats_from_path(dir_a, model, batch_size, device, progress)
    mu_b, sigma_b, _ = stats_from_path(dir_b, model, batch_size, device, progress)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b, method=frechet_method)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def _fid_label(dims, bn_batch_stats):
    """What a printed FID is: the label every FID line carries."""
    label = f"pytorch-fid convention, {dims}-d Inception features"
    if dims != 2048:
        label += "; only 2048-d FID is comparable across papers"
    if bn_batch_stats:
        label += (
            "; bn_batch_stats: train-mode BatchNorm (Soft-IntroVAE's training-time FID), "
            "NOT standard FID"
        )
    return label


def run_fid(cfg, path_a, path_b):
    """`fid A B`: FID between two folders / .npz stats files, printed with its label."""
    fid = fid_from_dirs(
        path_a,
        path_b,
        weights=cfg.weights or None,
        batch_size=cfg.batch_size,
        device=cfg.device,
        dims=cfg.dims,
        bn_batch_stats=cfg.bn_batch_stats,
        frechet_method=cfg.frechet_method,
        progress=cfg.progress,
    )
    print(f"FID: {fid:.6f}  ({_fid_label(cfg.dims, cfg.bn_batch_stats)})")
    return fid


def run_stats(cfg, folder, out_path):
    """`stats DIR OUT.npz`: Inception statistics of a folder in pytorch-fid's .npz format."""
    list_images(folder)  # bad input fails before the weights load and the long forward passes
    out_folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_folder):
        raise MetricInputError(f"cannot write {out_path}: no such folder {out_folder}")
    model = load_inception(cfg.weights or None, cfg.device, cfg.dims, cfg.bn_batch_stats)
    mu, sigma, n = stats_from_path(folder, model, cfg.batch_size, cfg.device, cfg.progress)
    out_path = save_stats(out_path, mu, sigma)
    print(
        f"saved mu {mu.shape} and sigma {sigma.shape} of {n} images to {out_path}  "
        f"({_fid_label(cfg.dims, cfg.bn_batch_stats)})"
    )


def _pair_files(real_dir, rec_dir):
    """Images of two folders paired by path relative to their folder ("sub/001.png" with
    "sub/001.png"), in list_images order; MetricInputError when the two sets of names differ."""
    real = {os.path.relpath(p, real_dir): p for p in list_images(real_dir)}
    rec = {os.path.relpath(p, rec_dir): p for p in list_images(rec_dir)}
    only_real, only_rec = sorted(set(real) - set(rec)), sorted(set(rec) - set(real))
    if only_real or only_rec:
        example = (
            f"{only_real[0]} only in {real_dir}"
            if only_real
            else f"{only_rec[0]} only in {rec_dir}"
        )
        raise MetricInputError(
            f"folders do not pair by relative path ({len(only_real) + len(only_rec)} unmatched, "
            f"e.g. {example})"
        )
    return [(path, rec[name]) for name, path in real.items()]


def run_recon(cfg, real_dir, rec_dir):
    """`recon REAL_DIR REC_DIR`: per-image PSNR / SSIM / MSE of pairs with the same relative path,
    mean and std table. Each pair is converted to float64 and clamped once; all three metrics read
    that copy."""
    pairs = _pair_files(real_dir, rec_dir)
    psnr_all, ssim_all, mse_all = [], [], []
    window = ssim_window(cfg.ssim_convention)[0].numel()
    with Progress(len(pairs), "recon pairs", enabled=cfg.progress) as bar:
        for real_path, rec_path in pairs:
            real, rec = load_image(real_path)[None], load_image(rec_path)[None]  # (1, 3, H, W)
            if real.shape != rec.shape:
                raise MetricInputError(
                    f"image sizes differ: {real_path} {tuple(real.shape[2:])} "
                    f"vs {rec_path} {tuple(rec.shape[2:])}"
                )
            if min(real.shape[2:]) < window:
                raise MetricInputError(
                    f"SSIM needs images of at least {window}x{window} px, "
                    f"{real_path} is {real.shape[2]}x{real.shape[3]}"
                )
            real, rec = _image_pair(real, rec, 1.0)  # the pair's one float64 conversion and clamp
            mse_all.append(_mse_per_image(real, rec))
            psnr_all.append(psnr_from_mse(mse_all[-1]))
            with torch.no_grad():
                ssim_all.append(ssim_torch(real, rec, 1.0, cfg.ssim_convention).numpy())
            bar.update()
    psnr_per, ssim_per, mse_per = (
        np.concatenate(psnr_all),
        np.concatenate(ssim_all),
        np.concatenate(mse_all),
    )
    finite = psnr_per[np.isfinite(psnr_per)]
    pooled = psnr_from_mse(mse_per.mean())  # pooled over images (pairs may differ in size)
    print(f"{len(pairs)} pairs, images as PIL RGB / 255, data_range 1")
    print(f"{'metric':<34}{'mean':>14}{'std':>14}")
    print(
        f"{'PSNR dB (per image, then mean)':<34}{mean_finite_psnr(psnr_per):>14.6f}"
        f"{(finite.std() if finite.size else math.nan):>14.6f}"
    )
    print(f"{'PSNR dB (pooled: 1 / mean MSE)':<34}{pooled:>14.6f}{'':>14}")
    print(
        f"{'SSIM (' + cfg.ssim_convention + ')':<34}{ssim_per.mean():>14.6f}{ssim_per.std():>14.6f}"
    )
    print(f"{'MSE per pixel on [0, 1]':<34}{mse_per.mean():>14.8f}{mse_per.std():>14.8f}")
    identical = int(np.isinf(psnr_per).sum())
    if identical:
        print(f"{identical} identical pairs have PSNR inf and are excluded from the PSNR mean")
    return psnr_per, ssim_per, mse_per


def run_sharpness(cfg, folder):
    """`sharpness DIR`: Laplacian variance per image on the [0, 255] grey scale, mean and std."""
    paths = list_images(folder)
    values = []
    with Progress(len(paths), "sharpness", enabled=cfg.progress) as bar:
        for path in paths:
            values.append(sharpness(load_image(path)[None], cfg.opencv_exact)[0])
            bar.update()
    values = np.concatenate(values)
    grey = "OpenCV uint8 grey" if cfg.opencv_exact else "float BT.601 grey x 255"
    print(
        f"Laplacian variance ({grey}, reflect-101, ddof 0) over {len(values)} images: "
        f"mean {values.mean():.6f}, std {values.std():.6f}"
    )
    return values


POSITIONAL_HELP = {
    "A": "the first image set: a folder of images (read recursively) or a .npz with mu, sigma",
    "B": "the second image set, the same kinds",
    "DIR": "a folder of images (read recursively)",
    "OUT": "the .npz file to write",
    "REAL_DIR": "the folder of real images",
    "REC_DIR": "the folder of reconstructions, paired with REAL_DIR by relative path",
}
SUBCOMMANDS = {
    # name: (help, positional arguments, config fields it uses)
    "fid": (
        "FID between two image sets A and B, each an image folder or a pytorch-fid .npz stats "
        "file (mu, sigma)",
        ("A", "B"),
        ("weights", "device", "batch_size", "dims", "bn_batch_stats", "frechet_method", "progress"),
    ),
    "stats": (
        "save a folder's Inception statistics as pytorch-fid .npz (mu, sigma)",
        ("DIR", "OUT"),
        ("weights", "device", "batch_size", "dims", "bn_batch_stats", "progress"),
    ),
    "recon": (
        "PSNR / SSIM / MSE of image pairs with the same path relative to their folders",
        ("REAL_DIR", "REC_DIR"),
        ("ssim_convention", "progress"),
    ),
    "sharpness": (
        "Laplacian-variance sharpness of a folder",
        ("DIR",),
        ("opencv_exact", "progress"),
    ),
}


def parse_bool(text):
    """A boolean option's value: 1/true/yes/on or 0/false/no/off, any case (as in as_introvae.py:
    --bf16 false)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are one line on stderr, '<script>: error: <message> (see
    <prog> --help)', and exit code 2 (SystemExit), like bad input; the script is the first word
    of prog, so pass prog. The three scripts' parsers all use it."""

    def error(self, message):
        negated = re.search(r"unrecognized arguments: --no-(\S+)", message)
        parsers = [self] + [sub for action in self._actions
                            if isinstance(action, argparse._SubParsersAction)
                            for sub in action.choices.values()]
        hint = ""
        if negated and any(f"--{negated.group(1)}" in p._option_string_actions for p in parsers):
            hint = f"boolean options take a value, e.g. --{negated.group(1)} false; "
        self.exit(2, f"{self.prog.split()[0]}: error: {message} ({hint}see {self.prog} --help)\n")


def build_parser():
    """argparse from MetricsConfig: each subcommand gets its positional paths and its config fields.
    Every boolean option takes a value: --progress false (parse_bool)."""
    parser = OneLineParser(
        prog="eval_metrics.py",
        description=__doc__.split("\n")[0],
        epilog="Each subcommand has its own help: eval_metrics.py fid --help, and so on.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    fields = {f.name: f for f in dataclasses.fields(MetricsConfig)}
    for name, (help_text, positionals, field_names) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        for positional in positionals:
            sub.add_argument(positional, help=POSITIONAL_HELP[positional])
        for field_name in field_names:
            spec = fields[field_name]
            flag = "--" + field_name.replace("_", "-")
            kind = {int: int, str: str, bool: parse_bool}[spec.type]
            boolean = kind is parse_bool
            default = str(spec.default).lower() if boolean else repr(spec.default)
            sub.add_argument(
                flag,
                type=kind,
                default=spec.default,
                choices=CHOICES.get(field_name),
                metavar="{true,false}" if boolean else None,
                help=f"{spec.metadata['help']} (default {default})",
            )
    return parser


def main(argv=None):
    """Parse, run one subcommand; MetricInputError -> 'eval_metrics.py: error: <message>' on
    stderr, exit code 2."""
    args = build_parser().parse_args(argv)
    known = {f.name for f in dataclasses.fields(MetricsConfig)}
    cfg = MetricsConfig(**{k: v for k, v in vars(args).items() if k in known})
    with warnings.catch_warnings():
        warnings.simplefilter("always", MetricWarning)
        warnings.showwarning = lambda message, *rest, **kw: print(
            f"warning: {message}", file=sys.stderr
        )
        return _run_command(args, cfg)


def _run_command(args, cfg):
    """Dispatch one subcommand; MetricInputError -> one line on stderr, exit code 2."""
    try:
        if cfg.batch_size < 1:
            raise MetricInputError("--batch-size must be positive")
        try:
            torch.device(cfg.device)
        except RuntimeError:
            raise MetricInputError(f"unknown device {cfg.device!r}: use e.g. cpu, cuda, cuda:1")
        if args.command == "fid":
            run_fid(cfg, args.A, args.B)
        elif args.command == "stats":
            run_stats(cfg, args.DIR, args.OUT)
        elif args.command == "recon":
            run_recon(cfg, args.REAL_DIR, args.REC_DIR)
        else:
            run_sharpness(cfg, args.DIR)
    except MetricInputError as error:
        print(f"eval_metrics.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
