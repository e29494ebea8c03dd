"""AS-IntroVAE (Lu et al., ACML 2022) and its baselines VAE, IntroVAE and Soft-IntroVAE on images:
the models, the losses, the annealing schedule and the training loop, in one file.

    python as_introvae.py --dataset cifar10                                  # AS-IntroVAE with the paper's settings
    python as_introvae.py --dataset mnist --data-root ../shared/data         # a local torchvision root
    python as_introvae.py --dataset npz --data-root ../shared/data/cifar10/train_first10k.npz \
                          --test-root ../shared/data/cifar10/test.npz        # uint8 arrays (N, H, W[, C])
    python as_introvae.py --dataset folder --data-root my_images --image-size 128
    python as_introvae.py --dataset cifar10 --model sintrovae                # or introvae, vae: same nets, same loop
    python as_introvae.py --dataset cifar10 --variant official               # what the released AS code computes
    python as_introvae.py --eval runs/cifar10_asintrovae_s0/checkpoint.pt    # PSNR/SSIM/MSE, FID, grids -> results.json
    python as_introvae.py --dataset cifar10 --bench 20                       # ms/iteration, img/s, peak memory

A run writes runs/<dataset>_<model>[_official]_s<seed>/ (or --out); rerunning the same command after a
kill resumes from its checkpoint.pt. Every loss follows ../shared/spec/algorithm.md. "Eq. N" is the
AS-IntroVAE paper's equation N unless another paper is named.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import io
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw

from eval_metrics import (MetricInputError, Progress, frechet_distance, load_inception, mse, psnr, sharpness, ssim,
                          stats_from_batches, stats_from_generator)


class ConfigError(ValueError):
    """A flag value that cannot work; main prints the one-line message and exits 2."""


class DataError(ValueError):
    """Missing, empty or unreadable data; main prints the one-line message and exits 2."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit this run; main prints it and exits 2."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss; main prints the step and the last good checkpoint and exits 2."""


# ---------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------
def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    dataset: str = option("cifar10", "mnist | fmnist | cifar10 | svhn | celeba128 | celeba256 | oxford | folder | npz")
    data_root: str = option("data", "torchvision root, image folder, or .npz file with uint8 `images` (N, H, W[, C])")
    test_root: str = option("", "folder / npz only: test split (folder or .npz); none: reconstructions use training images")
    image_size: int = option(32, "image side in pixels; folder datasets are resized (bicubic) to it")
    model: str = option("asintrovae", "asintrovae | sintrovae | introvae | vae")
    variant: str = option("paper", "AS-IntroVAE losses: paper (Eq. 7-9 as written) | official (the released code)")
    channels: tuple = option((64, 128, 256), "encoder channel list, e.g. 64,128,256; the decoder mirrors it")
    z_dim: int = option(128, "latent size D")
    batch_size: int = option(64, "images per iteration (the last batch of an epoch may be smaller)")
    epochs: int = option(150, "epochs; T = iterations per epoch * epochs sets the annealing (Eq. 9)")
    lr: float = option(2e-4, "Adam learning rate of both networks, betas (0.9, 0.999)")
    beta_rec: float = option(1.0, "weight of the reconstruction error")
    beta_kl: float = option(1.0, "weight of the real data's KL (and of the decoder's adversarial KL)")
    beta_neg: float = option(256.0, "Soft/AS: KL weight inside the exponent; IntroVAE: weight of the hinges")
    gamma_r: float = option(1e-8, "weight of the re-reconstruction error in the decoder loss")
    margin: float = option(10.0, "IntroVAE hinge margin m")
    num_vae: int = option(0, "epochs of plain-VAE warm-up before the introspective losses")
    ema_decay: float = option(0.999, "decay of the decoder's exponential moving average (samples, FID)")
    hflip: bool = option(False, "mirror training images left-right at random (the official code does for file datasets)")
    seed: int = option(0, "seed of the weights, the noise and the data order")
    out: str = option("", "run folder; default runs/<dataset>_<model>[_official]_s<seed>")
    max_iters: int = option(0, "stop after this many iterations (0: all epochs); does not change T")
    log_every: int = option(100, "iterations between log.jsonl records and progress lines")
    img_every: int = option(1000, "iterations between image grids")
    ckpt_every: int = option(1000, "iterations between checkpoints (one is also written at the end)")
    num_workers: int = option(4, "DataLoader workers for image folders (arrays are indexed in memory)")
    device: str = option("auto", "auto | cpu | cuda (all visible GPUs, nn.DataParallel)")
    bf16: bool = option(True, "CUDA only: bf16 autocast for the networks; losses and exp terms stay float32")
    eval: str = option("", "evaluate this checkpoint into results.json and exit")
    eval_images: int = option(10000, "test images for PSNR / SSIM / MSE and sharpness (0: all)")
    fid_samples: int = option(50000, "EMA-decoder samples for FID, and at most as many training images (0: no FID)")
    fid_weights: str = option("", "FID Inception weights file; default the torch hub cache (downloads when online)")
    bn_mode: str = option("train", "BatchNorm for samples, reconstructions and FID: train (batch stats) | eval")
    bench: int = option(0, "time this many iterations on synthetic data at the preset's shapes and exit")


CHOICES = {
    "dataset": ("mnist", "fmnist", "cifar10", "svhn", "celeba128", "celeba256", "oxford", "folder", "npz"),
    "model": ("asintrovae", "sintrovae", "introvae", "vae"),
    "variant": ("paper", "official"),
    "device": ("auto", "cpu", "cuda"),
    "bn_mode": ("train", "eval"),
}

# The spec's preset table (AS-IntroVAE's run script). Each value is overridden by its flag.
PRESETS = {
    "mnist": dict(image_size=28, channels=(64, 128), z_dim=32, batch_size=128, epochs=100,
                  beta_kl=1.0, beta_rec=1.0, beta_neg=256.0, margin=10.0),
    "cifar10": dict(image_size=32, channels=(64, 128, 256), z_dim=128, batch_size=64, epochs=150,
                    beta_kl=1.0, beta_rec=1.0, beta_neg=256.0, margin=10.0),
    "celeba128": dict(image_size=128, channels=(64, 128, 256, 512, 512), z_dim=256, batch_size=32, epochs=150,
                      beta_kl=0.5, beta_rec=1.0, beta_neg=256.0, margin=100.0, hflip=True),
    "celeba256": dict(image_size=256, channels=(64, 128, 256, 512, 512, 512), z_dim=256, batch_size=32, epochs=150,
                      beta_kl=0.5, beta_rec=1.0, beta_neg=1024.0, margin=120.0, hflip=True),
}
PRESETS["fmnist"] = PRESETS["mnist"]
PRESETS["svhn"] = PRESETS["cifar10"]
PRESETS["oxford"] = {**PRESETS["celeba128"], "z_dim": 128, "beta_kl": 1.0}
SIZE_PRESET = {28: "mnist", 32: "cifar10", 128: "celeba128", 256: "celeba256"}  # folder / npz: the row of that size
MODEL_PRESETS = {"introvae": dict(beta_rec=0.05, beta_kl=1.0, beta_neg=0.5)}  # IntroVAE as the AS paper ran it
TORCHVISION_SETS = ("mnist", "fmnist", "cifar10", "svhn")
IMAGE_CHANNELS = {"mnist": 1, "fmnist": 1}  # everything else is RGB (npz: from the array)
# Flags that steer a run or its evaluation but not what is trained: they may change on resume / --eval.
RUN_FLAGS = {"data_root", "test_root", "out", "max_iters", "log_every", "img_every", "ckpt_every", "num_workers",
             "device", "bf16", "eval", "eval_images", "fid_samples", "fid_weights", "bn_mode", "bench"}


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_channels(text):
    try:
        channels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,128,256, got {text!r}")
    if not channels or min(channels) < 1:
        raise argparse.ArgumentTypeError(f"channels must be positive, got {text!r}")
    return channels


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"{message} (see --help)")


def build_parser():
    """One --flag per Config field; only the flags actually given end up in the namespace."""
    parser = OneLineParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS,
                           allow_abbrev=False)
    parse = {int: int, float: float, str: str, bool: parse_bool, tuple: parse_channels}
    for f in dataclasses.fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=parse[f.type],
                            choices=CHOICES.get(f.name), help=f"{f.metadata['help']} (default {f.default})")
    return parser


def default_channels(image_size):
    """Halve the image until it is odd or 4 px: one encoder stage per halving (28 -> 64,128; 32 -> 64,128,256)."""
    stages = 0
    while image_size % 2 == 0 and image_size > 4:
        image_size //= 2
        stages += 1
    return (64, 128, 256, 512, 512, 512, 512, 512)[:max(stages, 1)]


def make_config(given):
    """Config defaults < the dataset's preset row < the model's preset < the flags given."""
    dataset = given.get("dataset", Config.dataset)
    if dataset == "npz":
        size = given.get("image_size") or npz_images(given.get("data_root", Config.data_root)).images.shape[-1]
    elif dataset == "folder":
        size = given.get("image_size", 128)
    else:
        size = given.get("image_size", PRESETS[dataset]["image_size"])
    row = PRESETS.get(dataset) or PRESETS.get(SIZE_PRESET.get(size), {"channels": default_channels(size)})
    values = {**row, "image_size": size, **MODEL_PRESETS.get(given.get("model", Config.model), {}), **given}
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg):
    positive = ("image_size", "z_dim", "batch_size", "epochs", "log_every", "img_every", "ckpt_every")
    non_negative = ("max_iters", "num_vae", "seed", "num_workers", "eval_images", "fid_samples", "bench")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and 0 <= cfg.ema_decay < 1):
        raise ConfigError(f"need --lr > 0 and 0 <= --ema-decay < 1, got {cfg.lr} and {cfg.ema_decay}")
    stride = 2 ** len(cfg.channels)
    if cfg.image_size % stride:
        raise ConfigError(f"--image-size {cfg.image_size} is not divisible by 2^{len(cfg.channels)} = {stride} "
                          f"(one halving per entry of --channels {','.join(map(str, cfg.channels))})")


def run_name(cfg):
    official = "_official" if cfg.model == "asintrovae" and cfg.variant == "official" else ""
    return f"{cfg.dataset}_{cfg.model}{official}_s{cfg.seed}"


# ---------------------------------------------------------------------------------------------------
# data: uint8 (N, C, H, W) batches; scaled to [0, 1] on the device (= ToTensor, no normalisation)
# ---------------------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageArray(torch.utils.data.Dataset):
    """A whole dataset held as one uint8 tensor (N, C, H, W); batches are gathered by indexing it."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, index):
        return self.images[index]

    @property
    def shape(self):  # (C, H, W)
        return tuple(self.images.shape[1:])


class ImageFolder(torch.utils.data.Dataset):
    """Every image file under root (sorted), as RGB resized bicubic to size x size (no crop, as the official code)."""

    def __init__(self, root, size):
        if not os.path.isdir(root):
            raise DataError(f"data folder {root} does not exist")
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        except (OSError, ValueError) as error:
            raise DataError(f"unreadable image {path}: {error}")
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8

    @property
    def shape(self):
        return (3, self.size, self.size)


def npz_images(path):
    """An .npz file whose `images` entry is uint8 (N, H, W) or (N, H, W, C) with C in 1, 3."""
    if not os.path.isfile(path):
        raise DataError(f"no such .npz file: {path}")
    try:
        with np.load(path) as archive:
            if "images" not in archive:
                raise DataError(f"{path} has no `images` array (it has: {', '.join(archive.files)})")
            images = archive["images"]
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path}: {error}")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise DataError(f"{path}: `images` must be uint8 (N, H, W) or (N, H, W, 1|3), got {images.dtype} {images.shape}")
    if images.shape[1] != images.shape[2] or images.shape[0] == 0:
        raise DataError(f"{path}: need a non-empty set of square images, got shape {images.shape}")
    images = torch.from_numpy(images)
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return ImageArray(images.contiguous())


def torchvision_images(name, root, train):
    """MNIST / FashionMNIST / CIFAR-10 / SVHN through torchvision, downloaded when missing and online."""
    dataset_class = {"mnist": torchvision.datasets.MNIST, "fmnist": torchvision.datasets.FashionMNIST,
                     "cifar10": torchvision.datasets.CIFAR10, "svhn": torchvision.datasets.SVHN}[name]
    split = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    try:
        dataset = dataset_class(root, download=False, **split)
    except RuntimeError:
        print(f"{name} not found under {root}: downloading it ...", flush=True)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                dataset = dataset_class(root, download=True, **split)
        except Exception as error:
            raise DataError(f"cannot load {name} from {root} ({type(error).__name__}); offline, put torchvision's "
                            f"{name} files under {root} or pass --data-root")
    images = torch.as_tensor(np.asarray(dataset.data))
    if images.dim() == 3:  # MNIST, FashionMNIST: (N, H, W)
        images = images[:, None]
    elif name == "cifar10":  # (N, H, W, C); SVHN is already (N, C, H, W)
        images = images.permute(0, 3, 1, 2)
    return ImageArray(images.contiguous())


def load_data(cfg):
    """-> (train set, evaluation set, name of the evaluation split). Both give uint8 (C, H, W) images."""
    if cfg.dataset in TORCHVISION_SETS:
        train = torchvision_images(cfg.dataset, cfg.data_root, train=True)
        test = torchvision_images(cfg.dataset, cfg.data_root, train=False)
        split = "test"
    elif cfg.dataset == "npz":
        train = npz_images(cfg.data_root)
        test = npz_images(cfg.test_root) if cfg.test_root else None
    else:
        train = ImageFolder(cfg.data_root, cfg.image_size)
        test = ImageFolder(cfg.test_root, cfg.image_size) if cfg.test_root else None
    if cfg.dataset not in TORCHVISION_SETS:
        split = "test" if test is not None else "train (no --test-root given)"
        test = test if test is not None else train
    for data in (train, test):
        if data.shape[1:] != (cfg.image_size, cfg.image_size) or data.shape[0] != train.shape[0]:
            raise DataError(f"{cfg.dataset} images are {'x'.join(map(str, data.shape))} (C x H x W); this run expects "
                            f"{train.shape[0]} x {cfg.image_size} x {cfg.image_size} (--image-size)")
    return train, test, split


def epoch_batches(data, batch_size, seed, epoch, skip, num_workers):
    """uint8 batches of one epoch in the order fixed by (seed, epoch), without its first `skip` batches.

    The order depends on nothing else, so a resumed run sees exactly the batches a one-go run sees.
    The last batch is smaller when len(data) is not a multiple of batch_size (drop_last=False).
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(data))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][skip:]
    if isinstance(data, ImageArray):
        for indices in batches:
            yield data.images[torch.from_numpy(indices).to(data.images.device)]
    else:
        yield from torch.utils.data.DataLoader(data, batch_sampler=[b.tolist() for b in batches],
                                               num_workers=num_workers, pin_memory=torch.cuda.is_available())


def ordered_batches(data, batch_size, limit, num_workers):
    """uint8 batches of the first `limit` images (0: all) in file / array order, for evaluation."""
    count = min(limit or len(data), len(data))
    if isinstance(data, ImageArray):
        for start in range(0, count, batch_size):
            yield data.images[start:min(start + batch_size, count)]
    else:
        yield from torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(count)), batch_size=batch_size,
                                               num_workers=num_workers)


def to_float(images, device):
    """uint8 (B, C, H, W) -> float32 in [0, 1] on device (channels_last on CUDA)."""
    images = images.to(device, non_blocking=True).float().div_(255)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


# ---------------------------------------------------------------------------------------------------
# model: Soft-IntroVAE's "standard" ResNet VAE (spec: training details; official notes 1.3)
# ---------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """conv3x3-BN-LeakyReLU(0.2)-conv3x3-BN, plus the skip (1x1 conv when the channels change), then LeakyReLU(0.2)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.2),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels))
        # `!=`, not the official `is not` (trap 14), so equal channel counts always get the identity
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else nn.Identity()
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


class Encoder(nn.Module):
    """x (B, C, H, W) -> mu, logvar, each (B, z_dim) in float32."""

    def __init__(self, image_channels, channels, image_size, z_dim):
        super().__init__()
        layers = [nn.Conv2d(image_channels, channels[0], 5, padding=2, bias=False), nn.BatchNorm2d(channels[0]),
                  nn.LeakyReLU(0.2), nn.AvgPool2d(2)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [ResBlock(c_in, c_out), nn.AvgPool2d(2)]
        layers.append(ResBlock(channels[-1], channels[-1]))
        self.conv = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.fc = nn.Linear(channels[-1] * side * side, 2 * z_dim)

    def forward(self, x):
        mu, logvar = self.fc(self.conv(x).flatten(1)).float().chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    """z (B, z_dim) -> image (B, C, H, W) in float32, no output activation (images live in [0, 1])."""

    def __init__(self, image_channels, channels, image_size, z_dim):
        super().__init__()
        self.side = image_size // 2 ** len(channels)
        self.fc = nn.Sequential(nn.Linear(z_dim, channels[-1] * self.side * self.side), nn.ReLU())
        layers, c_in = [], channels[-1]
        for c_out in reversed(channels):
            layers += [ResBlock(c_in, c_out), nn.Upsample(scale_factor=2, mode="nearest")]
            c_in = c_out
        layers += [ResBlock(c_in, c_in), nn.Conv2d(c_in, image_channels, 5, padding=2)]
        self.conv = nn.Sequential(*layers)

    def forward(self, z):
        return self.conv(self.fc(z).view(z.shape[0], -1, self.side, self.side)).float()


def build_networks(image_channels, channels, image_size, z_dim):
    """The encoder and decoder every method here shares."""
    return (Encoder(image_channels, channels, image_size, z_dim),
            Decoder(image_channels, channels, image_size, z_dim))


def reparameterize(mu, logvar):
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I); (B, z) -> (B, z)."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


# ---------------------------------------------------------------------------------------------------
# losses: pure functions of tensors. Per-sample values are (B,); "mean" is over the batch.
# ---------------------------------------------------------------------------------------------------
def sse(x, y):
    """Per-sample sum of squared errors over all pixels: SSE_i = sum_p (x_ip - y_ip)^2 (the -log p(x|z) of
    Eq. 1 up to constants; a SUM, not a mean, trap 1). (B, ...) x 2 -> (B,)."""
    return (x - y).pow(2).flatten(1).sum(dim=1)


def kl_divergence(mu, logvar):
    """Eq. 2 for q = N(mu, exp(logvar)), p = N(0, I): KL_i = -1/2 sum_d (1 + logvar - exp(logvar) - mu^2).
    (B, D) x 2 -> (B,)."""
    return -0.5 * (1 + logvar - logvar.exp() - mu.pow(2)).sum(dim=1)


def as_distance(mu_a, logvar_a, mu_b, logvar_b, reduction="paper"):
    """AS-Distance between two batches of diagonal Gaussians, Eq. 7 with the kernel of Eq. 8.

    k_d(a_i, b_j) = exp(-(mu_a[i,d] - mu_b[j,d])^2 / (2 (v_a[i,d] + v_b[j,d]))) / sqrt(2 pi (v_a[i,d] + v_b[j,d])),
    v = exp(logvar): the integral of the product of the two 1-D normal densities. With all B*B pairs (i = j too):
        AS = sum_d [ mean_ij k_d(a_i, a_j) + mean_ij k_d(b_i, b_j) - 2 mean_ij k_d(a_i, b_j) ]
           = sum_d integral (p_a,d(u) - p_b,d(u))^2 du,   p_.,d = the batch mixture's marginal in dimension d,
    so AS >= 0 and AS(a, a) = 0. One scalar for the whole batch (the paper's "per-batch" alignment).
    reduction: "paper" (above) | "official_sum" | "official_mean": the released code's kernel without the
    1/sqrt(2 pi) and the SUM / MEAN over all B*B*D terms (its encoder / decoder step).
    mu_a, logvar_a: (B, D); mu_b, logvar_b: (B', D). Returns a 0-d tensor.
    """
    def kernel(mu_1, var_1, mu_2, var_2):  # (B1, D), (B2, D) -> (B1, B2, D)
        var = var_1[:, None, :] + var_2[None, :, :]
        norm = 2 * math.pi * var if reduction == "paper" else var
        return torch.exp(-(mu_1[:, None, :] - mu_2[None, :, :]).pow(2) / (2 * var)) / torch.sqrt(norm)

    if reduction == "paper":
        def reduce(k):
            return k.mean(dim=(0, 1)).sum()
    elif reduction == "official_sum":
        # DEVIATION (official 3, 4): no 1/sqrt(2 pi); the encoder step SUMS all B*B*D terms
        reduce = torch.sum
    elif reduction == "official_mean":
        # DEVIATION (official 3, 4): no 1/sqrt(2 pi); the decoder step AVERAGES all B*B*D terms
        reduce = torch.mean
    else:
        raise ValueError(f"reduction must be paper, official_sum or official_mean, got {reduction!r}")
    var_a, var_b = logvar_a.exp(), logvar_b.exp()
    return (reduce(kernel(mu_a, var_a, mu_a, var_a)) + reduce(kernel(mu_b, var_b, mu_b, var_b))
            - 2 * reduce(kernel(mu_a, var_a, mu_b, var_b)))


def annealing_coefficient(t, total, schedule="linear"):
    """Eq. 9: c = min(5 t / T, 1); t = iteration from 0, T = iterations of the whole run. c weighs the KL and
    (1 - c) the AS-Distance, so training starts all AS and is plain Soft-IntroVAE from t = T / 5 on.
    schedule "tanh": c = tanh(5 t / T), what the released code computes."""
    if schedule == "linear":
        return min(5.0 * t / total, 1.0)
    # DEVIATION (official 1): tanh(5t/T) reaches 0.76 at T/5 and never exactly 1
    return math.tanh(5.0 * t / total)


def vae_loss(rec_err, kl, beta_rec, beta_kl):
    """The negative beta-ELBO of Eq. 1: L = mean_i (beta_rec * SSE_i + beta_kl * KL_i), without s.
    Also the warm-up loss of the introspective methods."""
    return (beta_rec * rec_err + beta_kl * kl).mean()


def intro_encoder_loss(rec_err, kl_real, kl_rec, kl_fake, margin, beta_rec, beta_kl, beta_neg):
    """IntroVAE encoder, Eq. 3 (Huang et al.'s original weighting, not the AS repo's copy; trap 13):
    L_E = beta_rec mean SSE(x, rec) + beta_kl [ mean KL_real
          + beta_neg / 2 (relu(m - mean KL_rec) + relu(m - mean KL_fake)) ]; the hinges act on batch means."""
    hinges = F.relu(margin - kl_rec.mean()) + F.relu(margin - kl_fake.mean())
    return beta_rec * rec_err.mean() + beta_kl * (kl_real.mean() + 0.5 * beta_neg * hinges)


def intro_decoder_loss(rec_err, kl_rec, kl_fake, beta_rec, beta_kl):
    """IntroVAE decoder, Eq. 3: L_D = beta_rec mean SSE(x, rec) + beta_kl / 2 (mean KL_rec + mean KL_fake),
    the KLs from the encoder as updated this iteration."""
    return beta_rec * rec_err.mean() + 0.5 * beta_kl * (kl_rec.mean() + kl_fake.mean())


def exp_elbo(rec_err, kl, s, beta_rec, beta_neg, alpha=2.0):
    """exp(alpha * ELBO) of Eq. 4, per sample, with the scaled beta-ELBO written as a loss:
    exp(-alpha s (beta_rec SSE_i + beta_neg KL_i)). (B,) x 2 -> (B,)."""
    return torch.exp(-alpha * s * (beta_rec * rec_err + beta_neg * kl))


def soft_intro_encoder_loss(rec_err, kl_real, rec_err_r, kl_r, rec_err_f, kl_f, s, beta_rec, beta_kl, beta_neg,
                            alpha=2.0):
    """Soft-IntroVAE encoder, Eq. 4 (Soft-IntroVAE paper Eq. 4, Algorithm 1 lines 11-14), r = reconstructions,
    f = generated samples:
    L_E = s (beta_rec mean SSE(x, rec) + beta_kl mean KL_real)
          + 1/alpha * 1/2 [ mean exp(-alpha s (beta_rec SSE_r + beta_neg KL_r)) + mean exp(... f ...) ]
    (1/(2 alpha) = 0.25 at alpha = 2: the exp-terms averaged over the two kinds of sample)."""
    exp_r = exp_elbo(rec_err_r, kl_r, s, beta_rec, beta_neg, alpha).mean()
    exp_f = exp_elbo(rec_err_f, kl_f, s, beta_rec, beta_neg, alpha).mean()
    return s * (beta_rec * rec_err.mean() + beta_kl * kl_real.mean()) + 0.5 / alpha * (exp_r + exp_f)


def soft_intro_decoder_loss(rec_err, kl_r, kl_f, rec_err_rr, rec_err_rf, s, beta_rec, beta_kl, gamma_r):
    """Soft-IntroVAE decoder, Eq. 4 (Soft-IntroVAE Algorithm 1 lines 21-23):
    L_D = s [ beta_rec mean SSE(x, rec) + beta_kl / 2 (mean KL_r + mean KL_f)
              + gamma_r beta_rec / 2 (mean SSE(rec, rr) + mean SSE(fake, rf)) ]."""
    return s * (beta_rec * rec_err.mean() + 0.5 * beta_kl * (kl_r.mean() + kl_f.mean())
                + 0.5 * gamma_r * beta_rec * (rec_err_rr.mean() + rec_err_rf.mean()))


def as_intro_encoder_loss(rec_err, kl_real, rec_err_r, kl_r, rec_err_f, kl_f, as_dist, c, s, beta_rec, beta_kl,
                          beta_neg, alpha=2.0):
    """AS-IntroVAE encoder, Eq. 9: Soft-IntroVAE's encoder loss with KL_s replaced by c KL_s + (1 - c) AS inside
    each exponent (s in r, f); the real data's ELBO is not annealed:
    L_E = s (beta_rec mean SSE(x, rec) + beta_kl mean KL_real)
          + 1/(2 alpha) sum_{s=r,f} mean exp(-alpha s (beta_rec SSE_s + beta_neg (c KL_s + (1 - c) AS)))."""
    return soft_intro_encoder_loss(rec_err, kl_real, rec_err_r, c * kl_r + (1 - c) * as_dist,
                                   rec_err_f, c * kl_f + (1 - c) * as_dist, s, beta_rec, beta_kl, beta_neg, alpha)


def as_intro_decoder_loss(rec_err, kl_r, kl_f, rec_err_rr, rec_err_rf, as_dist, c, s, beta_rec, beta_kl, gamma_r,
                          variant="paper"):
    """AS-IntroVAE decoder, Eq. 9: Soft-IntroVAE's decoder loss with each KL_s replaced by c KL_s + (1 - c) AS:
    L_D = s [ beta_rec mean SSE(x, rec) + beta_kl / 2 (c (mean KL_r + mean KL_f) + 2 (1 - c) AS)
              + gamma_r beta_rec / 2 (mean SSE(rec, rr) + mean SSE(fake, rf)) ]
    variant "official": AS counted once, beta_kl / 2 (c (KL_r + KL_f) + (1 - c) AS), as the released code."""
    as_term = (1 - c) * as_dist
    if variant == "official":
        # DEVIATION: Eq. 9 sums (1 - c) D over s = r, g (AS twice, as the encoder has it once per exp-term);
        # the released code, and algorithm.md's formula, add it once. The paper variant follows Eq. 9.
        as_term = 0.5 * as_term
    return soft_intro_decoder_loss(rec_err, c * kl_r + as_term, c * kl_f + as_term, rec_err_rr, rec_err_rf,
                                   s, beta_rec, beta_kl, gamma_r)


# ---------------------------------------------------------------------------------------------------
# training steps: step(nets, opts, x, cfg, c, s, amp) -> dict of detached 0-d tensors (no GPU sync)
# ---------------------------------------------------------------------------------------------------
def set_requires_grad(module, flag):
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


def vae_step(nets, opts, x, cfg, c, s, amp):
    """Plain VAE (and the introspective methods' warm-up): one step of both networks on vae_loss."""
    encoder, decoder = nets["encoder"], nets["decoder"]
    set_requires_grad(encoder, True)
    set_requires_grad(decoder, True)
    with amp():
        mu, logvar = encoder(x)  # (B, z)
        rec = decoder(reparameterize(mu, logvar))  # (B, C, H, W)
    # ALGO LOGIC
    rec_err, kl_real = sse(x, rec), kl_divergence(mu, logvar)
    loss = vae_loss(rec_err, kl_real, cfg.beta_rec, cfg.beta_kl)
    opts["encoder"].zero_grad(set_to_none=True)
    opts["decoder"].zero_grad(set_to_none=True)
    loss.backward()
    opts["encoder"].step()
    opts["decoder"].step()
    return {"loss": loss.detach(), "rec": rec_err.mean().detach(), "kl_real": kl_real.mean().detach()}


def intro_encoder_step(nets, opt, x, eps, cfg, amp):
    """IntroVAE encoder update (decoder frozen). Returns z (reused by the decoder step) and the logged values."""
    encoder, decoder = nets["encoder"], nets["decoder"]
    set_requires_grad(encoder, True)
    set_requires_grad(decoder, False)
    with amp():
        fake = decoder(eps)
        mu, logvar = encoder(x)
        z = reparameterize(mu, logvar)
        rec = decoder(z)
        mu_r, logvar_r = encoder(rec.detach())
        mu_f, logvar_f = encoder(fake.detach())
    # ALGO LOGIC
    rec_err, kl_real = sse(x, rec), kl_divergence(mu, logvar)
    kl_r, kl_f = kl_divergence(mu_r, logvar_r), kl_divergence(mu_f, logvar_f)
    loss = intro_encoder_loss(rec_err, kl_real, kl_r, kl_f, cfg.margin, cfg.beta_rec, cfg.beta_kl, cfg.beta_neg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    stats = {"loss_e": loss, "rec": rec_err.mean(), "kl_real": kl_real.mean(), "kl_rec": kl_r.mean(),
             "kl_fake": kl_f.mean(), "kl_diff": kl_f.mean() - kl_real.mean()}
    return z, {k: v.detach() for k, v in stats.items()}


def intro_decoder_step(nets, opt, x, z, eps, cfg, amp):
    """IntroVAE decoder update (encoder frozen, as just updated) on the same z and eps."""
    encoder, decoder = nets["encoder"], nets["decoder"]
    set_requires_grad(encoder, False)
    set_requires_grad(decoder, True)
    with amp():
        fake = decoder(eps)
        rec = decoder(z.detach())
        mu_r, logvar_r = encoder(rec)
        mu_f, logvar_f = encoder(fake)
    # ALGO LOGIC
    loss = intro_decoder_loss(sse(x, rec), kl_divergence(mu_r, logvar_r), kl_divergence(mu_f, logvar_f),
                              cfg.beta_rec, cfg.beta_kl)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss_d": loss.detach()}


def introvae_step(nets, opts, x, cfg, c, s, amp):
    eps = torch.randn(x.shape[0], cfg.z_dim, device=x.device)  # (B, z) prior draw shared by both steps
    z, stats = intro_encoder_step(nets, opts["encoder"], x, eps, cfg, amp)
    return {**stats, **intro_decoder_step(nets, opts["decoder"], x, z, eps, cfg, amp)}


def soft_intro_encoder_step(nets, opt, x, eps, cfg, c, s, amp):
    """Soft-IntroVAE / AS-IntroVAE encoder update (decoder frozen). Returns z and the logged values."""
    encoder, decoder = nets["encoder"], nets["decoder"]
    set_requires_grad(encoder, True)
    set_requires_grad(decoder, False)
    with amp():
        fake = decoder(eps)  # (B, C, H, W)
        mu, logvar = encoder(x)  # (B, z)
        z = reparameterize(mu, logvar)
        rec = decoder(z)
        mu_r, logvar_r = encoder(rec.detach())
        rec_rec = decoder(reparameterize(mu_r, logvar_r))
        mu_f, logvar_f = encoder(fake.detach())
        rec_fake = decoder(reparameterize(mu_f, logvar_f))
    # ALGO LOGIC: everything below is float32 (the networks return float32)
    rec_err, kl_real = sse(x, rec), kl_divergence(mu, logvar)  # (B,)
    rec_err_r, kl_r = sse(rec, rec_rec), kl_divergence(mu_r, logvar_r)  # rec NOT detached (trap 3)
    rec_err_f, kl_f = sse(fake, rec_fake), kl_divergence(mu_f, logvar_f)
    stats = {}
    if cfg.model == "asintrovae":
        if cfg.variant == "official":
            # DEVIATION (official 2): tanh on the posteriors of rec and fake before the AS-Distance
            as_dist = as_distance(mu_r.tanh(), logvar_r.tanh(), mu_f.tanh(), logvar_f.tanh(), "official_sum")
        else:
            as_dist = as_distance(mu_r, logvar_r, mu_f, logvar_f)  # E(rec) vs E(fake), never E(x) (trap 4)
        loss = as_intro_encoder_loss(rec_err, kl_real, rec_err_r, kl_r, rec_err_f, kl_f, as_dist, c, s,
                                     cfg.beta_rec, cfg.beta_kl, cfg.beta_neg)
        kl_in_exp_r, kl_in_exp_f = c * kl_r + (1 - c) * as_dist, c * kl_f + (1 - c) * as_dist
        stats["as_dist"] = as_dist
    else:
        loss = soft_intro_encoder_loss(rec_err, kl_real, rec_err_r, kl_r, rec_err_f, kl_f, s,
                                       cfg.beta_rec, cfg.beta_kl, cfg.beta_neg)
        kl_in_exp_r, kl_in_exp_f = kl_r, kl_f
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        stats.update(loss_e=loss, rec=rec_err.mean(), kl_real=kl_real.mean(), kl_rec=kl_r.mean(), kl_fake=kl_f.mean(),
                     kl_diff=kl_f.mean() - kl_real.mean(),
                     exp_elbo_rec=exp_elbo(rec_err_r, kl_in_exp_r, s, cfg.beta_rec, cfg.beta_neg).mean(),
                     exp_elbo_fake=exp_elbo(rec_err_f, kl_in_exp_f, s, cfg.beta_rec, cfg.beta_neg).mean())
    return z, {k: v.detach() for k, v in stats.items()}


def soft_intro_decoder_step(nets, opt, x, z, eps, cfg, c, s, amp):
    """Soft-IntroVAE / AS-IntroVAE decoder update (encoder frozen) on the encoder step's z and eps."""
    encoder, decoder = nets["encoder"], nets["decoder"]
    set_requires_grad(encoder, False)
    set_requires_grad(decoder, True)
    with amp():
        fake = decoder(eps)  # the SAME eps as the encoder step
        rec = decoder(z.detach())  # the SAME z, drawn before the encoder's update
        mu_r, logvar_r = encoder(rec)  # the encoder AFTER its update; gradients reach the decoder through it
        z_r = reparameterize(mu_r, logvar_r)
        mu_f, logvar_f = encoder(fake)
        z_f = reparameterize(mu_f, logvar_f)
        rec_rec, rec_fake = decoder(z_r.detach()), decoder(z_f.detach())
    # ALGO LOGIC
    rec_err = sse(x, rec)
    rec_err_rr, rec_err_rf = sse(rec.detach(), rec_rec), sse(fake.detach(), rec_fake)
    if cfg.model == "asintrovae":
        if cfg.variant == "official":
            # DEVIATION (official 2): tanh on mu and logvar before the decoder's KLs and the AS-Distance
            mu_r, logvar_r, mu_f, logvar_f = (v.tanh() for v in (mu_r, logvar_r, mu_f, logvar_f))
            as_dist = as_distance(mu_r, logvar_r, mu_f, logvar_f, "official_mean")
        else:
            as_dist = as_distance(mu_r, logvar_r, mu_f, logvar_f)
        loss = as_intro_decoder_loss(rec_err, kl_divergence(mu_r, logvar_r), kl_divergence(mu_f, logvar_f),
                                     rec_err_rr, rec_err_rf, as_dist, c, s, cfg.beta_rec, cfg.beta_kl, cfg.gamma_r,
                                     cfg.variant)
    else:
        loss = soft_intro_decoder_loss(rec_err, kl_divergence(mu_r, logvar_r), kl_divergence(mu_f, logvar_f),
                                       rec_err_rr, rec_err_rf, s, cfg.beta_rec, cfg.beta_kl, cfg.gamma_r)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss_d": loss.detach()}


def soft_intro_step(nets, opts, x, cfg, c, s, amp):
    """One Soft-IntroVAE iteration (cfg.model "sintrovae") or AS-IntroVAE iteration ("asintrovae")."""
    eps = torch.randn(x.shape[0], cfg.z_dim, device=x.device)  # (B, z) prior draw shared by both steps
    z, stats = soft_intro_encoder_step(nets, opts["encoder"], x, eps, cfg, c, s, amp)
    return {**stats, **soft_intro_decoder_step(nets, opts["decoder"], x, z, eps, cfg, c, s, amp)}


TRAIN_STEPS = {"vae": vae_step, "introvae": introvae_step, "sintrovae": soft_intro_step, "asintrovae": soft_intro_step}


@torch.no_grad()
def update_ema(ema, decoder, decay):
    """shadow <- decay * shadow + (1 - decay) * weight after each decoder step; BatchNorm buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(decoder.parameters()), 1.0 - decay)
    for shadow, buffer in zip(ema.buffers(), decoder.buffers()):
        shadow.copy_(buffer)


# ---------------------------------------------------------------------------------------------------
# loop: device, state, checkpoints, logs, grids
# ---------------------------------------------------------------------------------------------------
def setup_device(name, bf16):
    """-> (device, amp), amp() a bf16 autocast context on CUDA (a no-op elsewhere)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is visible")
    device = torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp = functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16,
                            enabled=bf16 and device.type == "cuda")
    return device, amp


def describe_device(device):
    if device.type == "cuda":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


def unwrap(module):
    return module.module if isinstance(module, nn.DataParallel) else module


def make_state(cfg, image_channels, device):
    """-> (nets {encoder, decoder, ema}, opts {encoder, decoder}); the two networks in nn.DataParallel on >1 GPU."""
    encoder, decoder = build_networks(image_channels, cfg.channels, cfg.image_size, cfg.z_dim)
    ema = copy.deepcopy(decoder).requires_grad_(False)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for net in (encoder, decoder, ema):
        net.to(device, memory_format=memory_format)
    opts = {name: torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=device.type == "cuda")
            for name, net in (("encoder", encoder), ("decoder", decoder))}
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        encoder, decoder = nn.DataParallel(encoder), nn.DataParallel(decoder)
    return {"encoder": encoder, "decoder": decoder, "ema": ema}, opts


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG the run could touch, as tensors / ints (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached], "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path, nets, opts, step, epoch, total_iters, cfg):
    """Write atomically: a temp file in the same folder, flushed to disk, then renamed over the old one."""
    state = {"step": step, "epoch": epoch, "total_iters": total_iters, "config": dataclasses.asdict(cfg), "rng": rng_state(),
             "nets": {name: unwrap(net).state_dict() for name, net in nets.items()},
             "opts": {name: o.state_dict() for name, o in opts.items()}}
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path} ({type(error).__name__}): corrupt or not a checkpoint")
    needed = {"step", "total_iters", "config", "rng", "nets", "opts"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(f"{path} is not an as_introvae.py checkpoint")
    return state


def restore(state, nets, opts, path):
    try:
        for name, net in nets.items():
            unwrap(net).load_state_dict(state["nets"][name])
        for name, o in opts.items():
            o.load_state_dict(state["opts"][name])
    except (KeyError, RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model: {first_line}")


def config_from_checkpoint(state, path):
    try:
        return Config(**state["config"])
    except TypeError as error:
        raise CheckpointError(f"checkpoint {path} has an unknown config: {error}")


def check_same_run(saved, cfg, path):
    """The flags that decide what is trained must equal the checkpoint's (RUN_FLAGS may differ)."""
    for f in dataclasses.fields(Config):
        if f.name not in RUN_FLAGS and getattr(saved, f.name) != getattr(cfg, f.name):
            raise CheckpointError(f"checkpoint {path} was made with --{f.name.replace('_', '-')} "
                                  f"{getattr(saved, f.name)}, this command has {getattr(cfg, f.name)}: "
                                  f"use the same flags or another --out")


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def save_grid(rows, path, nrow):
    """Stack image batches (each (n, C, H, W) in [0, 1]) into one PNG, nrow images per line (Pillow)."""
    torchvision.utils.save_image(torch.cat([r.float().cpu().clamp(0, 1) for r in rows]), path, nrow=nrow, padding=2)


@contextlib.contextmanager
def batchnorm_mode(modules, mode):
    """BatchNorm on batch statistics ("train", as in every training forward) or on the running averages
    ("eval") for the duration; the modules' flags and running averages are restored afterwards."""
    saved = [(m, m.training, [b.clone() for b in m.buffers()]) for m in modules]
    for m in modules:
        m.train(mode == "train")
    try:
        yield
    finally:
        for m, training, buffers in saved:
            m.train(training)
            with torch.no_grad():
                for buffer, old in zip(m.buffers(), buffers):
                    buffer.copy_(old)


@torch.no_grad()
def training_grid(nets, real, noise, bn_mode, amp, path):
    """Rows: 16 real training images / their reconstructions (z = mu) / 16 EMA-decoder samples; the whole
    fixed batch goes through the networks so that batch statistics are those of a training batch."""
    encoder, decoder, ema = (unwrap(nets[k]) for k in ("encoder", "decoder", "ema"))
    with batchnorm_mode([encoder, decoder, ema], bn_mode), amp():
        rec = decoder(encoder(real)[0])
        fake = ema(noise)
    save_grid([real[:16], rec[:16], fake[:16]], path, nrow=16)


def plot_curves(records, path, keys):
    """Small multiples of logged values against the step, one panel per key (Pillow only).
    A positive series spanning more than two decades is drawn on a log10 axis."""
    keys = [k for k in keys if any(r.get(k) is not None for r in records)]
    cols, width, height = 3, 380, 210
    image = Image.new("RGB", (cols * width, max(1, math.ceil(len(keys) / cols)) * height), "white")
    draw = ImageDraw.Draw(image)
    for i, key in enumerate(keys):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])]
        x0, y0 = (i % cols) * width, (i // cols) * height
        left, top, right, bottom = x0 + 60, y0 + 22, x0 + width - 12, y0 + height - 24
        draw.rectangle((left, top, right, bottom), outline="black")
        if not points:
            draw.text((left, y0 + 6), key, fill="black")
            continue
        steps, values = zip(*points)
        log_axis = min(values) > 0 and max(values) / min(values) > 100
        ys = [math.log10(v) for v in values] if log_axis else list(values)
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1.0
        first, last = min(steps), max(steps)
        span = last - first or 1
        xy = [(left + (st - first) / span * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))
              for st, y in zip(steps, ys)]
        draw.text((left, y0 + 6), f"{key}{' (log10)' if log_axis else ''}  last {values[-1]:.4g}", fill="black")
        draw.text((x0 + 4, top), f"{hi:.3g}", fill="black")
        draw.text((x0 + 4, bottom - 10), f"{lo:.3g}", fill="black")
        draw.text((left, bottom + 6), f"step {first}", fill="black")
        draw.text((right - 70, bottom + 6), f"{last}", fill="black")
        if len(xy) > 1:
            draw.line(xy, fill=(200, 30, 30), width=2)
        else:
            draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=(200, 30, 30))
    image.save(path)


CURVE_KEYS = ("loss_e", "loss_d", "loss", "rec", "kl_real", "kl_rec", "kl_fake", "kl_diff", "exp_elbo_rec",
              "exp_elbo_fake", "as_dist", "c")


def read_log(path, max_step):
    """log.jsonl records up to max_step (a resumed run drops what was logged after its checkpoint)."""
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r for r in records if r["step"] <= max_step]


def train(cfg):
    out_dir = cfg.out or os.path.join("runs", run_name(cfg))
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    state = load_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else None
    if state is not None:
        check_same_run(config_from_checkpoint(state, ckpt_path), cfg, ckpt_path)
        schedule = "tanh" if cfg.variant == "official" else "linear"
        c_now = annealing_coefficient(state["step"], state["total_iters"], schedule)
        print(f"resuming from {ckpt_path} at step {state['step']} of {state['total_iters']}"
              + (f" (c = {c_now:.6f})" if cfg.model == "asintrovae" else ""), flush=True)
    device, amp = setup_device(cfg.device, cfg.bf16)
    train_set, test_set, split = load_data(cfg)
    if isinstance(train_set, ImageArray):
        train_set.images = train_set.images.to(device)
    image_channels = train_set.shape[0]
    s = 1.0 / math.prod(train_set.shape)  # 1 / (C H W): keeps the exp-terms from vanishing (Soft-IntroVAE)
    iters_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_iters = iters_per_epoch * cfg.epochs  # T of Eq. 9, the last partial batch included
    stop = min(total_iters, cfg.max_iters) if cfg.max_iters else total_iters
    seed_everything(cfg.seed)
    nets, opts = make_state(cfg, image_channels, device)
    step = 0
    if state is not None:
        restore(state, nets, opts, ckpt_path)
        set_rng_state(state["rng"])
        step = state["step"]
    else:
        print(f"new run {out_dir}: {cfg.model}{' (' + cfg.variant + ')' if cfg.model == 'asintrovae' else ''} on "
              f"{cfg.dataset} {'x'.join(map(str, train_set.shape))}, {len(train_set)} images, {iters_per_epoch} "
              f"iterations/epoch, T = {total_iters}, stop at {stop}, {describe_device(device)}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as handle:
        json.dump({**dataclasses.asdict(cfg), "derived": {
            "image_shape": train_set.shape, "s": s, "train_images": len(train_set), "eval_split": split,
            "iters_per_epoch": iters_per_epoch, "total_iters": total_iters, "device": describe_device(device),
            "torch": torch.__version__}}, handle, indent=2)
    log_path = os.path.join(out_dir, "log.jsonl")
    records = read_log(log_path, step)
    with open(log_path, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)

    # fixed inputs of the periodic grids, from their own generator so that grids never move the training RNG
    grid_real = to_float(next(ordered_batches(train_set, cfg.batch_size, cfg.batch_size, 0)), device)
    grid_noise = torch.randn(grid_real.shape[0], cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    schedule = "tanh" if cfg.model == "asintrovae" and cfg.variant == "official" else "linear"
    progress_end = "\r" if sys.stdout.isatty() else "\n"  # one line rewritten in a terminal, a line per log in a file
    sums, count, images_seen, tick = {}, 0, 0, time.perf_counter()
    epoch = step // iters_per_epoch
    while step < stop:
        skip = step - epoch * iters_per_epoch
        for batch in epoch_batches(train_set, cfg.batch_size, cfg.seed, epoch, skip, cfg.num_workers):
            x = to_float(batch, device)
            if cfg.hflip:
                flip = torch.rand(x.shape[0], device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            c = annealing_coefficient(step, total_iters, schedule)
            step_fn = vae_step if epoch < cfg.num_vae else TRAIN_STEPS[cfg.model]
            stats = step_fn(nets, opts, x, cfg, c, s, amp)
            update_ema(nets["ema"], unwrap(nets["decoder"]), cfg.ema_decay)
            losses = {k: v for k, v in stats.items() if k.startswith("loss")}
            if not torch.isfinite(torch.stack(list(losses.values()))).all():
                last = load_checkpoint(ckpt_path)["step"] if os.path.exists(ckpt_path) else None
                values = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
                raise TrainingDiverged(f"non-finite loss at step {step + 1} ({values}); " + (
                    f"last good checkpoint: {ckpt_path} (step {last})" if last is not None else "no checkpoint yet"))
            step += 1
            count += 1
            images_seen += x.shape[0]
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            if step % cfg.log_every == 0 or step == stop:
                now = time.perf_counter()
                rate = images_seen / (now - tick)
                record = {"step": step, "epoch": epoch + 1, **{k: (v / count).item() for k, v in sums.items()}}
                if cfg.model == "asintrovae":
                    record["c"] = c
                record["img_per_s"] = rate
                records.append(record)
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                eta = (stop - step) * (now - tick) / count
                keys = [k for k in ("loss_e", "loss_d", "loss", "rec", "kl_real", "kl_fake", "kl_rec", "exp_elbo_fake",
                                    "as_dist", "c") if k in record]
                print(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{stop} | {rate:.0f} img/s | ETA {format_seconds(eta)}"
                      f" | " + " ".join(f"{k} {record[k]:.4g}" for k in keys), end=progress_end, flush=True)
                plot_curves(records, os.path.join(out_dir, "curves.png"), CURVE_KEYS)
                sums, count, images_seen, tick = {}, 0, 0, time.perf_counter()
            if step % cfg.img_every == 0 or step == stop:
                training_grid(nets, grid_real, grid_noise, cfg.bn_mode, amp, os.path.join(out_dir, f"grid_{step:07d}.png"))
            if step % cfg.ckpt_every == 0 or step == stop:
                save_checkpoint(ckpt_path, nets, opts, step, step // iters_per_epoch, total_iters, cfg)
            if step >= stop:
                break
        epoch += 1
    if progress_end == "\r":
        print()
    if state is not None and state["step"] >= stop:
        print(f"training already done at step {state['step']} (stop at {stop}); evaluating", flush=True)
    results = evaluate(nets, cfg, train_set, test_set, split, device, amp, out_dir)
    results.update(checkpoint=ckpt_path, step=step)
    write_results(results, out_dir)


# ---------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------
def summary(per_image):
    return {"mean": float(np.mean(per_image)), "std": float(np.std(per_image))}


@torch.no_grad()
def evaluate(nets, cfg, train_set, test_set, split, device, amp, out_dir):
    """Reconstruction PSNR / SSIM / MSE with z = mu (Table 3's protocol) on the evaluation split, FID of
    EMA-decoder samples against the training images, sharpness, sample and interpolation grids."""
    encoder, decoder, ema = (unwrap(nets[k]) for k in ("encoder", "decoder", "ema"))
    generator = torch.Generator().manual_seed(cfg.seed + 1)  # evaluation never touches the training RNG
    batch = cfg.batch_size  # BatchNorm in train mode sees batches of the training size

    def sample(k):  # k EMA-decoder samples in [0, 1]; at least a training batch per forward
        z = torch.randn(max(k, batch), cfg.z_dim, generator=generator).to(device)
        with amp():
            return ema(z)[:k].clamp(0, 1)

    results = {"dataset": cfg.dataset, "model": cfg.model, "variant": cfg.variant, "bn_mode": cfg.bn_mode}
    with batchnorm_mode([encoder, decoder, ema], cfg.bn_mode):
        per_image = {"psnr": [], "ssim": [], "mse": [], "sharp_real": [], "sharp_rec": [], "sharp_fake": []}
        first = None
        bar = Progress(min(cfg.eval_images or len(test_set), len(test_set)), "reconstruction")
        for images in ordered_batches(test_set, batch, cfg.eval_images, cfg.num_workers):
            x = to_float(images, device)
            with amp():
                rec = decoder(encoder(x)[0]).clamp(0, 1)
            x_cpu, rec_cpu = x.float().cpu(), rec.float().cpu()
            for name, metric in (("psnr", psnr), ("ssim", ssim), ("mse", mse)):
                per_image[name].append(metric(x_cpu, rec_cpu)[0])
            per_image["sharp_real"].append(sharpness(x_cpu)[0])
            per_image["sharp_rec"].append(sharpness(rec_cpu)[0])
            per_image["sharp_fake"].append(sharpness(sample(x.shape[0]).float().cpu())[0])
            first = (x_cpu, rec_cpu) if first is None else first
            bar.update(x.shape[0])
        bar.close()
        per_image = {k: np.concatenate(v) for k, v in per_image.items()}
        psnr_finite = per_image["psnr"][np.isfinite(per_image["psnr"])]
        results["reconstruction"] = {
            "split": split, "images": int(per_image["mse"].size), "z": "mu", "decoder": "raw (not EMA)",
            "psnr": float(psnr_finite.mean()) if psnr_finite.size else math.inf,
            "psnr_identical_images": int(np.isinf(per_image["psnr"]).sum()),
            "ssim": float(per_image["ssim"].mean()), "mse": float(per_image["mse"].mean())}
        results["sharpness"] = {"real": summary(per_image["sharp_real"]), "reconstructed": summary(per_image["sharp_rec"]),
                                "generated_ema": summary(per_image["sharp_fake"])}

        # grids: reconstructions, samples, latent interpolations between pairs of evaluation images
        n = min(16, first[0].shape[0])
        save_grid([first[0][:n], first[1][:n]], os.path.join(out_dir, "reconstruction.png"), nrow=n)
        save_grid([sample(64)], os.path.join(out_dir, "samples.png"), nrow=8)
        pairs = min(8, first[0].shape[0] // 2)
        with amp():
            mu = encoder(first[0].to(device))[0]  # (B, z)
            weights = torch.linspace(0, 1, 8, device=device)[None, :, None]  # (1, 8, 1)
            path = (1 - weights) * mu[:pairs, None] + weights * mu[pairs:2 * pairs, None]  # (pairs, 8, z)
            frames = decoder(path.reshape(-1, cfg.z_dim)).reshape(pairs, 8, *first[0].shape[1:])
        rows = [torch.cat([first[0][i:i + 1], frames[i].float().cpu(), first[0][pairs + i:pairs + i + 1]])
                for i in range(pairs)]
        results["images"] = {"reconstruction": "reconstruction.png", "samples": "samples.png"}
        if rows:
            save_grid(rows, os.path.join(out_dir, "interpolation.png"), nrow=10)
            results["images"]["interpolation"] = "interpolation.png"
        results["fid"] = fid_of_samples(cfg, sample, train_set, device)
    return results


def fid_of_samples(cfg, sample, train_set, device):
    """FID of cfg.fid_samples EMA-decoder samples against (at most as many) training images, standard
    pytorch-fid convention (eval-mode Inception, float images in [0, 1], no quantisation)."""
    if cfg.fid_samples == 0:
        return {"value": None, "note": "skipped (--fid-samples 0)"}
    try:
        inception = load_inception(cfg.fid_weights or None, device=str(device))
    except MetricInputError as error:
        print(f"FID skipped: {error} (in this script: --fid-weights PATH); the rest of the evaluation still runs",
              flush=True)
        return {"value": None, "note": f"skipped: {error}"}
    reference = (to_float(images, device) for images in ordered_batches(train_set, cfg.batch_size, cfg.fid_samples,
                                                                        cfg.num_workers))
    mu_real, sigma_real, n_real = stats_from_batches(reference, inception, max_images=cfg.fid_samples, device=device,
                                                     batch_size=100, total=min(cfg.fid_samples, len(train_set)))
    mu_fake, sigma_fake = stats_from_generator(sample, cfg.fid_samples, inception, batch_size=100, device=device)
    return {"value": frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake), "generated": cfg.fid_samples,
            "reference": "training images", "reference_images": n_real, "decoder": "EMA"}


def write_results(results, out_dir):
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)
    rec, fid = results["reconstruction"], results["fid"]["value"]
    print(f"{rec['split']} reconstruction ({rec['images']} images, z = mu): PSNR {rec['psnr']:.3f} SSIM {rec['ssim']:.3f} "
          f"MSE {rec['mse']:.4f} | FID {'n/a' if fid is None else f'{fid:.2f}'} -> {path}", flush=True)


def run_evaluation(given):
    """--eval CKPT: the checkpoint's config, RUN_FLAGS from the command line; results next to the checkpoint."""
    path = given["eval"]
    state = load_checkpoint(path)
    saved = config_from_checkpoint(state, path)
    check_same_run(saved, Config(**{**dataclasses.asdict(saved), **given}), path)
    cfg = Config(**{**dataclasses.asdict(saved), **{k: v for k, v in given.items() if k in RUN_FLAGS}})
    validate(cfg)
    device, amp = setup_device(cfg.device, cfg.bf16)
    train_set, test_set, split = load_data(cfg)
    nets, opts = make_state(cfg, train_set.shape[0], device)
    restore(state, nets, opts, path)
    out_dir = cfg.out or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    print(f"evaluating {path} (step {state['step']}) on {describe_device(device)}", flush=True)
    results = evaluate(nets, cfg, train_set, test_set, split, device, amp, out_dir)
    results.update(checkpoint=path, step=state["step"])
    write_results(results, out_dir)


def bench(cfg):
    """cfg.bench timed iterations (after 2 untimed ones) on random images at the config's shapes."""
    device, amp = setup_device(cfg.device, cfg.bf16)
    image_channels = IMAGE_CHANNELS.get(cfg.dataset, 3)
    shape = (image_channels, cfg.image_size, cfg.image_size)
    seed_everything(cfg.seed)
    nets, opts = make_state(cfg, image_channels, device)
    images = torch.randint(0, 256, (4 * cfg.batch_size, *shape), dtype=torch.uint8, device=device)
    s, warmup = 1.0 / math.prod(shape), 2
    for i in range(warmup + cfg.bench):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        x = to_float(images[(i % 4) * cfg.batch_size:(i % 4 + 1) * cfg.batch_size], device)
        stats = TRAIN_STEPS[cfg.model](nets, opts, x, cfg, annealing_coefficient(i, 10 ** 6), s, amp)
        update_ema(nets["ema"], unwrap(nets["decoder"]), cfg.ema_decay)
    if device.type == "cuda":
        torch.cuda.synchronize()
        memory = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB"
    else:
        memory = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10:.0f} MiB"
    seconds = (time.perf_counter() - start) / cfg.bench
    losses = " ".join(f"{k} {v.item():.4g}" for k, v in stats.items() if k.startswith("loss"))
    print(f"bench {cfg.dataset} {cfg.model}{'/' + cfg.variant if cfg.model == 'asintrovae' else ''}: batch "
          f"{cfg.batch_size}, {'x'.join(map(str, shape))}, z {cfg.z_dim}, channels {','.join(map(str, cfg.channels))}, "
          f"{'bf16' if cfg.bf16 and device.type == 'cuda' else 'fp32'}, {describe_device(device)}: "
          f"{1000 * seconds:.1f} ms/iteration, {cfg.batch_size / seconds:.1f} img/s, {memory} ({cfg.bench} iterations; "
          f"{losses})", flush=True)


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def one_line(error):
    """The message of an error as one line (an error re-raised from a DataLoader worker carries a traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else lines[-1].split(": ", 1)[-1]


def main(argv=None):
    try:
        given = vars(build_parser().parse_args(argv))
        if given.get("eval"):
            run_evaluation(given)
        elif given.get("bench"):
            bench(make_config(given))
        else:
            train(make_config(given))
    except (ConfigError, DataError, CheckpointError, MetricInputError, TrainingDiverged) as error:
        print(f"as_introvae.py: error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
