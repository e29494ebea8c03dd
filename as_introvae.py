"""AS-IntroVAE (Lu et al., ACML 2022) and its baselines VAE, IntroVAE and Soft-IntroVAE on images,
plus the sharpened VAEs of the AVAE-S paper (VAE-S, AVAE, AVAE-S) and WGAN-GP: models, losses, the
annealing schedule and the training loop, in one file. The paper's algorithm reads top to bottom
up to train(); the other papers' models and the plumbing follow as appendices.

    python as_introvae.py --dataset cifar10 --data-root data     # AS-IntroVAE, the paper's settings
    python as_introvae.py --dataset cifar10 --data-root data --model sintrovae  # or introvae, vae
    python as_introvae.py --dataset cifar10 --data-root data --variant official # the released code
    python as_introvae.py --dataset mnist --data-root data --model vae-s        # AVAE-S baselines:
    python as_introvae.py --dataset mnist --data-root data --model avae-s \
                          --pretrain-epochs 100 --adv-epochs 50                # vae-s, avae, avae-s
    python as_introvae.py --dataset folder --data-root my_images --image-size 128  # image folder
    python as_introvae.py --dataset celeba96 --data-root img_align_celeba --model avae-s  # 96px
    python as_introvae.py --dataset cifar10 --data-root data --model wgan-gp  # Table 2's GAN
    python as_introvae.py --dataset npz --data-root train.npz --test-root test.npz  # uint8 arrays
    python as_introvae.py --eval runs/cifar10_asintrovae_s0/checkpoint.pt  # PSNR, SSIM, FID, grids
    python as_introvae.py --dataset cifar10 --bench 20 --bf16 both  # ms/iteration, img/s, memory
    python as_introvae.py --table runs/a,runs/b --out runs/ab     # finished runs side by side
    torchrun --standalone --nproc_per_node=4 as_introvae.py --dataset cifar10 --data-root data
                                                 # one process per GPU; the same flags, same batch

torchvision downloads MNIST, FashionMNIST, CIFAR-10 and SVHN into --data-root when online. A run
writes runs/<dataset>_<model>[_official]_s<seed>/ (or --out); the same command after a kill resumes
from its checkpoint.pt. "Eq. N" is the AS-IntroVAE paper's equation N; equations of other papers
carry the paper's name ("Soft-IntroVAE Eq. 4", "AVAE-S Eq. 5"). `# OFFICIAL:` marks what
`--variant official` computes as the released AS-IntroVAE code does; `# DEVIATION:` marks where the
default path departs from its paper, and why.

Glossary: paper symbol, Config field (flag), default (a dataset's preset row may override it).
    alpha     factor in the exponent of Eq. 9          as_intro_encoder_loss(alpha)    2
    gamma     weight of the ELBO of the reconstructed  fixed                           1
              and generated samples in L_D (Eq. 4, 9)
    gamma_r   weight of the re-reconstruction error    gamma_r (--gamma-r)             1e-8
              in the decoder loss
    s         scale of every ELBO in Eq. 9             derived: 1 / (C H W)            1/3072 CIFAR
    beta_rec  weight of the reconstruction error       beta_rec (--beta-rec)           1.0
    beta_kl   weight of the real data's KL and of the  beta_kl (--beta-kl)             1.0 (0.5 for
              decoder's adversarial KL                                                 CelebA)
    beta_neg  weight of the KL inside the exponent     beta_neg (--beta-neg)           256 (1024 at
              (IntroVAE: of the hinges)                                                256 px)
    c         Eq. 9's annealing coefficient            derived: min(5 t / T, 1)        0 at t = 0
    T         iterations of the whole run              derived: iterations per epoch x epochs
"""


import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import gzip
import io
import json
import math
import multiprocessing
import os
import random
import resource
import struct
import sys
import textwrap
import time
from dataclasses import dataclass
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont
from eval_metrics import (MetricInputError, OneLineParser, Progress, atomic_write, format_seconds,
                          frechet_distance, list_images, load_inception, mean_finite_psnr, mse,
                          option, parse_bool, psnr, sharpness, ssim, ssim_torch,
                          stats_from_batches, stats_from_generator)


class ConfigError(ValueError):
    """A flag value that cannot work; main prints the one-line message and exits 2."""


class DataError(ValueError):
    """Missing, empty or unreadable data; main prints the one-line message and exits 2."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit this run; main prints it and exits 2."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss; main prints the step and the last good checkpoint and exits 2."""


# --------------------------------------------------------------------------------------------------
# config: one dataclass, the dataset presets (the released run script's settings), checks
# --------------------------------------------------------------------------------------------------
@dataclass
class Config:
    dataset: str = option(
        "cifar10",
        "mnist | fmnist | cifar10 | svhn | celeba96 | celeba128 | celeba256 | oxford | "
        "folder | npz",
    )
    data_root: str = option(
        "data", "torchvision root, image folder, or .npz file with uint8 `images` (N, H, W[, C])"
    )
    test_root: str = option(
        "",
        "folder / npz only: test split (folder or .npz); none: reconstructions use training images",
    )
    image_size: int = option(
        32, "image side in pixels; folder datasets are resized (bicubic) to it"
    )
    model: str = option(
        "asintrovae",
        "asintrovae | sintrovae | introvae | vae | vae-s | avae | avae-s (AVAE-S paper) | wgan-gp "
        "(Table 2's GAN: the decoder as generator)",
    )
    variant: str = option(
        "paper", "AS-IntroVAE losses: paper (Eq. 7-9 as written) | official (the released code)"
    )
    arch: str = option(
        "resnet",
        "resnet (the shared ResNet VAE) | avae (AVAE-S Table I; image side divisible by 16)",
    )
    channels: tuple = option(
        (64, 128, 256), "encoder channel list, e.g. 64,128,256; the decoder mirrors it"
    )
    z_dim: int = option(128, "latent size D")
    batch_size: int = option(
        64,
        "images per iteration, all processes together: under torchrun each of the N ranks gets "
        "batch / N (N must divide it); the last batch of an epoch may be smaller",
    )
    epochs: int = option(
        150, "epochs; T = iterations per epoch * epochs sets the annealing (Eq. 9)"
    )
    lr: float = option(2e-4, "Adam learning rate of every network (wgan-gp: 1e-4)")
    adam_beta1: float = option(0.9, "Adam's beta1 (wgan-gp: 0, Gulrajani et al.'s Algorithm 1)")
    adam_beta2: float = option(0.999, "Adam's beta2 (wgan-gp: 0.9)")
    beta_rec: float = option(1.0, "weight of the reconstruction error")
    beta_kl: float = option(
        1.0, "weight of the real data's KL (and of the decoder's adversarial KL)"
    )
    beta_neg: float = option(
        256.0, "Soft/AS: KL weight inside the exponent; IntroVAE: weight of the hinges"
    )
    gamma_r: float = option(1e-8, "weight of the re-reconstruction error in the decoder loss")
    margin: float = option(10.0, "IntroVAE hinge margin m")
    num_vae: int = option(0, "epochs of plain-VAE warm-up before the introspective losses")
    pretrain_epochs: int = option(
        100, "avae / avae-s: epochs of VAE / VAE-S pre-training (AVAE-S Sec. III: 100)"
    )
    adv_epochs: int = option(
        50, "avae / avae-s: epochs of adversarial fine-tuning after it (the paper gives none)"
    )
    lambda_batches: int = option(
        0, "vae-s / avae-s: batches probed before AVAE-S Eq. 5's lambdas freeze (0: one epoch)"
    )
    tc_estimator: str = option(
        "mss", "AVAE-S Eq. 10 on a minibatch: mss (stratified) | mws (weighted), beta-TCVAE's"
    )
    beta_tc: float = option(
        1.0, "vae-s / avae-s: weight of the total-correlation KL (AVAE-S Eq. 11: 1)"
    )
    adv_loss: str = option(
        "minimax",
        "VAE's adversarial term: minimax log(1 - Dis(rec)) (AVAE-S Eq. 11-12) | "
        "nonsaturating -log Dis(rec)",
    )
    beta_adv: float = option(
        1.0, "avae / avae-s: weight of the VAE's adversarial term (AVAE-S Eq. 11: 1)"
    )
    lambda_gp: float = option(10.0, "wgan-gp: weight of the gradient penalty (Algorithm 1: 10)")
    n_critic: int = option(
        5, "wgan-gp: critic steps per generator step; an iteration is one critic step on a batch"
    )
    disc_train_below: float = option(
        0.7, "AVAE-S Algorithm 1: the discriminator steps while its batch accuracy < this"
    )
    adv_use_above: float = option(
        0.5, "AVAE-S Algorithm 1: the VAE gets the adversarial term while accuracy > this"
    )
    ema_decay: float = option(
        0.999, "decay of the decoder's exponential moving average (samples, FID)"
    )
    hflip: bool = option(
        False,
        "mirror training images left-right at random (the official code does for file datasets)",
    )
    seed: int = option(0, "seed of the weights, the noise and the data order")
    out: str = option("", "run folder; default runs/<dataset>_<model>[_official]_s<seed>")
    max_iters: int = option(0, "stop after this many iterations (0: all epochs); does not change T")
    log_every: int = option(100, "iterations between log.jsonl records and progress lines")
    img_every: int = option(1000, "iterations between image grids")
    ckpt_every: int = option(
        1000, "iterations between checkpoints (one is also written at the end)"
    )
    num_workers: int = option(
        4, "DataLoader workers for image folders (arrays are indexed in memory)"
    )
    device: str = option(
        "auto",
        "auto | cpu | cuda (all visible GPUs in nn.DataParallel; under torchrun one GPU per rank, "
        "nccl)",
    )
    sync_bn: bool = option(
        False,
        "torchrun on CUDA: SyncBatchNorm, batch statistics over all ranks (false: each rank's own "
        "batch, as each GPU's chunk under nn.DataParallel)",
    )
    as_gather: bool = option(
        True,
        "torchrun: the AS-Distance (Eq. 7) over the batch gathered from all ranks, the loss of "
        "one process on the whole batch (false: over each rank's batch, no all_gather)",
    )
    bf16: str = option(
        "auto",
        "auto | true | false: bf16 autocast for the networks, losses and exp terms in float32; "
        "auto: bf16 on CUDA, fp32 on the CPU; --bench also takes both (one line per precision)",
    )
    compile: bool = option(
        False,
        "torch.compile the trained networks and the EMA decoder (in place: checkpoints unchanged); "
        "the first iterations compile",
    )
    recon_every: int = option(
        1000,
        "iterations between reconstruction records (PSNR / SSIM / MSE, z = mu, on the first "
        "--recon-images of the evaluation split) in log.jsonl and curves.png, and one at T "
        "(0: none)",
    )
    recon_images: int = option(2000, "evaluation images of each reconstruction record")
    eval: str = option("", "evaluate this checkpoint into results.json and exit")
    eval_images: int = option(10000, "test images for PSNR / SSIM / MSE and sharpness (0: all)")
    fid_samples: int = option(
        50000, "EMA-decoder samples for FID, and at most as many training images (0: no FID)"
    )
    fid_weights: str = option(
        "", "FID Inception weights file; default the torch hub cache (downloads when online)"
    )
    bn_mode: str = option(
        "train",
        "BatchNorm for samples, reconstructions and FID: train (statistics of batches of the size "
        "one BatchNorm saw in training: the rank's batch, per GPU chunk under nn.DataParallel) | "
        "eval (running averages); train for every model, VAE family included (MNIST check: "
        "closer samples, equal PSNR)",
    )
    bench: int = option(
        0, "time this many iterations on synthetic data at the preset's shapes and exit"
    )
    table: str = option(
        "",
        "finished run folders, comma-separated (a folder of run folders counts as all of them): "
        "table.md, curves.png and pictures.png into --out (default runs/table); no training",
    )


CHOICES = {
    "dataset": ("mnist", "fmnist", "cifar10", "svhn", "celeba96", "celeba128", "celeba256",
                "oxford", "folder", "npz"),
    "model": ("asintrovae", "sintrovae", "introvae", "vae", "vae-s", "avae", "avae-s", "wgan-gp"),
    "variant": ("paper", "official"),
    "arch": ("resnet", "avae"),
    "tc_estimator": ("mss", "mws"),
    "adv_loss": ("minimax", "nonsaturating"),
    "device": ("auto", "cpu", "cuda"),
    "bn_mode": ("train", "eval"),
    "bf16": ("auto", "true", "false", "both"),
}


# The released AS-IntroVAE run script's settings, one row per dataset; a flag overrides a value.
PRESETS = {
    "mnist": dict(image_size=28, channels=(64, 128), z_dim=32, batch_size=128, epochs=100,
                  beta_kl=1.0, beta_rec=1.0, beta_neg=256.0, margin=10.0),
    "cifar10": dict(image_size=32, channels=(64, 128, 256), z_dim=128, batch_size=64, epochs=150,
                    beta_kl=1.0, beta_rec=1.0, beta_neg=256.0, margin=10.0),
    "celeba128": dict(image_size=128, channels=(64, 128, 256, 512, 512), z_dim=256, batch_size=32,
                      epochs=150, beta_kl=0.5, beta_rec=1.0, beta_neg=256.0, margin=100.0,
                      hflip=True),
    "celeba256": dict(image_size=256, channels=(64, 128, 256, 512, 512, 512), z_dim=256,
                      batch_size=32, epochs=150, beta_kl=0.5, beta_rec=1.0, beta_neg=1024.0,
                      margin=120.0, hflip=True),
}


PRESETS["fmnist"] = PRESETS["mnist"]


PRESETS["svhn"] = PRESETS["cifar10"]


PRESETS["oxford"] = {**PRESETS["celeba128"], "z_dim": 128, "beta_kl": 1.0}


# AVAE-S Sec. III: 96 x 96 CelebA, AVAE-S Table I's network, latent 32, 100 epochs of pre-training;
# batch size and augmentation are not given (none here). channels are for --arch resnet (one stage
# per halving of 96).
PRESETS["celeba96"] = {**PRESETS["celeba128"], "image_size": 96,
                       "channels": (64, 128, 256, 512, 512), "z_dim": 32, "beta_kl": 1.0,
                       "hflip": False, "arch": "avae", "pretrain_epochs": 100}


# AVAE-S Eq. 5's reconstruction loss and AVAE-S Eq. 10's total correlation:
SHARP_MODELS = ("vae-s", "avae-s")


# pre-training, then AVAE-S Algorithm 1's adversarial fine-tuning:
ADVERSARIAL_MODELS = ("avae", "avae-s")


TABLE_I_WIDTHS = (24, 48, 96, 192)  # AVAE-S Table I's conv widths; each halves the image side


SIZE_PRESET = {28: "mnist", 32: "cifar10", 128: "celeba128", 256: "celeba256"}  # folder, npz


# IntroVAE's weights as the AS-IntroVAE paper ran it:
MODEL_PRESETS = {"introvae": dict(beta_rec=0.05, beta_kl=1.0, beta_neg=0.5),
                 # Gulrajani et al.'s Algorithm 1 defaults (alpha, beta1, beta2):
                 "wgan-gp": dict(lr=1e-4, adam_beta1=0.0, adam_beta2=0.9)}


TORCHVISION_SETS = ("mnist", "fmnist", "cifar10", "svhn")


IMAGE_CHANNELS = {"mnist": 1, "fmnist": 1}  # everything else is RGB (npz: from the array)


# Flags that steer a run or its evaluation, not what is trained: they may change on resume, --eval.
RUN_FLAGS = {"data_root", "test_root", "out", "max_iters", "log_every", "img_every", "ckpt_every",
             "recon_every", "recon_images",
             "num_workers", "device", "bf16", "compile", "eval", "eval_images", "fid_samples",
             "fid_weights", "bn_mode", "bench", "table"}


def default_channels(image_size):
    """Halve the image until it is odd or 4 px: one encoder stage per halving
    (28 -> 64,128; 32 -> 64,128,256)."""
    stages = 0
    while image_size % 2 == 0 and image_size > 4:
        image_size //= 2
        stages += 1
    return (64, 128, 256, 512, 512, 512, 512, 512)[:max(stages, 1)]


def make_config(given):
    """Config defaults < the dataset's preset row < the model's preset < the flags given."""
    dataset = given.get("dataset", Config.dataset)
    if dataset == "npz":
        size = (
            given.get("image_size")
            or npz_images(given.get("data_root", Config.data_root)).images.shape[-1]
        )
    elif dataset == "folder":
        size = given.get("image_size", 128)
    else:
        size = given.get("image_size", PRESETS[dataset]["image_size"])
    row = PRESETS.get(dataset) or PRESETS.get(
        SIZE_PRESET.get(size), {"channels": default_channels(size)}
    )
    values = {
        **row,
        "image_size": size,
        **MODEL_PRESETS.get(given.get("model", Config.model), {}),
        **given,
    }
    if values.get("model", Config.model) in ADVERSARIAL_MODELS:
        if "epochs" in given:
            raise ConfigError(
                "--epochs does not apply to avae / avae-s: the run is --pretrain-epochs + "
                "--adv-epochs"
            )
        values["epochs"] = (values.get("pretrain_epochs", Config.pretrain_epochs)
                            + values.get("adv_epochs", Config.adv_epochs))
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg):
    positive = ("image_size", "z_dim", "batch_size", "epochs", "log_every", "img_every",
                "ckpt_every", "recon_images", "n_critic")
    non_negative = ("max_iters", "num_vae", "seed", "num_workers", "eval_images", "fid_samples",
                    "recon_every",
                    "bench", "pretrain_epochs", "adv_epochs", "lambda_batches")
    if cfg.model in ADVERSARIAL_MODELS and cfg.pretrain_epochs + cfg.adv_epochs < 1:
        raise ConfigError("avae / avae-s need --pretrain-epochs + --adv-epochs >= 1")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}"
            )
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and 0 <= cfg.ema_decay < 1):
        raise ConfigError(
            f"need --lr > 0 and 0 <= --ema-decay < 1, got {cfg.lr} and {cfg.ema_decay}"
        )
    if not (0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1 and cfg.lambda_gp >= 0):
        raise ConfigError("need 0 <= --adam-beta1, --adam-beta2 < 1 and --lambda-gp >= 0")
    if cfg.model == "wgan-gp" and cfg.arch != "resnet":
        raise ConfigError("wgan-gp is built from the ResNet networks: use --arch resnet")
    if cfg.bf16 == "both" and not cfg.bench:
        raise ConfigError("--bf16 both times both precisions with --bench; a run takes auto, true "
                          "or false")
    if cfg.arch == "avae":
        if cfg.image_size % 2 ** len(TABLE_I_WIDTHS):
            raise ConfigError(
                "--arch avae needs an --image-size divisible by 16 (AVAE-S Table I halves it 4 "
                "times), "
                f"got {cfg.image_size}"
            )
    elif cfg.image_size % 2 ** len(cfg.channels):
        raise ConfigError(
            f"--image-size {cfg.image_size} is not divisible by 2^{len(cfg.channels)} = "
            f"{2 ** len(cfg.channels)} (one halving per entry of --channels "
            f"{','.join(map(str, cfg.channels))})"
        )
    if cfg.model in ADVERSARIAL_MODELS and cfg.epochs != cfg.pretrain_epochs + cfg.adv_epochs:
        raise ConfigError(
            f"{cfg.model}: epochs ({cfg.epochs}) must be --pretrain-epochs + --adv-epochs "
            f"({cfg.pretrain_epochs} + {cfg.adv_epochs})"
        )
    if cfg.model in SHARP_MODELS + ADVERSARIAL_MODELS and cfg.num_vae:
        raise ConfigError(
            f"--num-vae is the introspective methods' warm-up; {cfg.model} pre-trains with "
            f"--pretrain-epochs (avae, avae-s) or not at all (vae-s)"
        )
    if cfg.model in SHARP_MODELS and cfg.image_size < GABOR_MAX_KERNEL:
        raise ConfigError(
            f"{cfg.model} needs images of at least {GABOR_MAX_KERNEL} px (the largest Gabor "
            "kernel of "
            f"AVAE-S Eq. 7), got --image-size {cfg.image_size}"
        )
    if (cfg.model in SHARP_MODELS or cfg.arch == "avae") and cfg.batch_size < 2:
        raise ConfigError(
            f"--batch-size must be at least 2 for {cfg.model} / --arch {cfg.arch} (AVAE-S Eq. 10's "
            f"minibatch estimator and AVAE-S Table I's BatchNorm1d need 2 images)"
        )


def run_name(cfg):
    official = "_official" if cfg.model == "asintrovae" and cfg.variant == "official" else ""
    arch = "_tableI" if cfg.arch == "avae" else ""
    return f"{cfg.dataset}_{cfg.model}{official}{arch}_s{cfg.seed}"


def check_batch_sizes(cfg, train_images, eval_images, recon_images=0):
    """With drop_last=False an epoch (or the evaluation) can end on a single image, which the
    minibatch estimator of AVAE-S Eq. 10 and AVAE-S Table I's BatchNorm1d layers cannot take:
    refuse before anything runs."""
    if not (cfg.model in SHARP_MODELS or cfg.arch == "avae"):
        return
    for what, count, flag in (
        ("training set", train_images, "--batch-size"),
        ("evaluation", eval_images, "--eval-images"),
        ("reconstruction record", recon_images, "--recon-images"),
    ):
        if count % cfg.batch_size == 1:
            raise ConfigError(
                f"the {what} ({count} images) ends on a batch of 1 at --batch-size "
                f"{cfg.batch_size}, which "
                f"{cfg.model} / --arch {cfg.arch} cannot take: change {flag}"
            )


# --------------------------------------------------------------------------------------------------
# data: uint8 (N, C, H, W) batches; scaled to [0, 1] on the device (= ToTensor, no normalisation)
# --------------------------------------------------------------------------------------------------
class ImageArray(torch.utils.data.Dataset):
    """A whole dataset held as one uint8 tensor (N, C, H, W); batches are gathered by indexing."""

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
    """Every image under root, subfolders included, in eval_metrics.list_images' order (the folder
    semantics of the FID and reconstruction commands too), as RGB resized bicubic to size x size
    (no crop, as the released code)."""

    def __init__(self, root, size):
        if not os.path.isdir(root):
            raise DataError(f"data folder {root} does not exist")
        try:
            self.files = list_images(root)
        except MetricInputError as error:
            raise DataError(str(error))
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB").resize(
                    (self.size, self.size), Image.Resampling.BICUBIC
                )
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
                raise DataError(
                    f"{path} has no `images` array (it has: {', '.join(archive.files)})"
                )
            images = archive["images"]
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path}: {error}")
    if (
        images.dtype != np.uint8
        or images.ndim not in (3, 4)
        or (images.ndim == 4 and images.shape[3] not in (1, 3))
    ):
        raise DataError(
            f"{path}: `images` must be uint8 (N, H, W) or (N, H, W, 1|3), got {images.dtype} "
            f"{images.shape}"
        )
    if images.shape[1] != images.shape[2] or images.shape[0] == 0:
        raise DataError(f"{path}: need a non-empty set of square images, got shape {images.shape}")
    images = torch.from_numpy(images)
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return ImageArray(images.contiguous())


# torchvision's folder and image files of the two IDX datasets (each file may also be .gz)
IDX_FOLDERS = {"mnist": "MNIST", "fmnist": "FashionMNIST"}


IDX_FILES = {True: "train-images-idx3-ubyte", False: "t10k-images-idx3-ubyte"}


IDX_LABEL_FILES = ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")


def idx_images(folder, train):
    """The MNIST-format image file of the split in folder (plain or .gz), read directly: no
    extraction, so a read-only copy works. -> uint8 (N, H, W), or None when the file is absent."""
    for path, opener in ((os.path.join(folder, IDX_FILES[train]), open),
                         (os.path.join(folder, IDX_FILES[train] + ".gz"), gzip.open)):
        if not os.path.isfile(path):
            continue
        try:
            with opener(path, "rb") as handle:
                data = handle.read()
        except (OSError, EOFError) as error:
            raise DataError(f"cannot read {path} ({type(error).__name__}): delete it and "
                            "download again")
        magic, count, height, width = struct.unpack(">IIII", data[:16]) if len(data) >= 16 else (
            0, 0, 0, 0)
        if magic != 2051 or len(data) != 16 + count * height * width:
            raise DataError(f"{path} is not a complete IDX image file: delete it and download "
                            "again")
        return np.frombuffer(data, np.uint8, offset=16).reshape(count, height, width)
    return None


def torchvision_images(name, root, train):
    """MNIST / FashionMNIST (torchvision's raw IDX files, read directly), CIFAR-10 / SVHN through
    torchvision; downloaded when missing and online."""
    if name in IDX_FOLDERS:
        raw = os.path.join(root, IDX_FOLDERS[name], "raw")
        images = idx_images(raw, train)
        if images is not None:
            return ImageArray(torch.from_numpy(images.copy())[:, None])
    dataset_class = {
        "mnist": torchvision.datasets.MNIST,
        "fmnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
        "svhn": torchvision.datasets.SVHN,
    }[name]
    split = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    try:
        dataset = dataset_class(root, download=False, **split)
    except RuntimeError:
        print(f"{name} not found under {root}: downloading it ...", flush=True)
        folders_before = {folder for folder, _, _ in os.walk(root)}
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                dataset = dataset_class(root, download=True, **split)
        except Exception as error:
            for folder, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
                if folder not in folders_before and not os.listdir(folder):
                    os.rmdir(folder)  # a failed download leaves no empty folder behind
            if name in IDX_FOLDERS:
                files = ", ".join(f"{f}.gz" for f in (*IDX_FILES.values(), *IDX_LABEL_FILES))
                where = f"put {files} under {os.path.join(root, IDX_FOLDERS[name], 'raw')}"
            else:
                where = f"put torchvision's {name} files under {root}"
            raise DataError(f"cannot load {name} from {root} and cannot download it "
                            f"({type(error).__name__}); offline, {where}, or pass --data-root")
    images = torch.as_tensor(np.asarray(dataset.data))
    if images.dim() == 3:  # MNIST, FashionMNIST: (N, H, W)
        images = images[:, None]
    elif name == "cifar10":  # (N, H, W, C); SVHN is already (N, C, H, W)
        images = images.permute(0, 3, 1, 2)
    return ImageArray(images.contiguous())


def load_data(cfg):
    """-> (train set, evaluation set, name of the evaluation split), of uint8 (C, H, W) images."""
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
            raise DataError(
                f"{cfg.dataset} images are {'x'.join(map(str, data.shape))} (C x H x W); this run "
                "expects "
                f"{train.shape[0]} x {cfg.image_size} x {cfg.image_size} (--image-size)"
            )
    return train, test, split


def epoch_batches(data, batch_size, seed, epoch, skip, num_workers, ranks=None):
    """uint8 batches of one epoch in the order fixed by (seed, epoch), without its first `skip`
    batches; under torchrun (ranks) this rank's share of each global batch.

    The order depends on nothing else, so a resumed run sees exactly the batches a one-go run sees,
    and the ranks together see the batches of a one-process run (each rank reads only its share).
    The last batch is smaller when len(data) is not a multiple of batch_size (drop_last=False).
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(data))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][skip:]
    if ranks is not None and ranks.world > 1:
        batches = [rank_share(indices, ranks) for indices in batches]
    if isinstance(data, ImageArray):
        for indices in batches:
            yield data.images[torch.from_numpy(indices).to(data.images.device)]
    else:
        yield from torch.utils.data.DataLoader(
            data,
            batch_sampler=[b.tolist() for b in batches],
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
        )


def ordered_batches(data, batch_size, limit, num_workers, first=0):
    """uint8 batches of the first `limit` images (0: all) in file / array order, for evaluation;
    first > 0: from image `first` on (a torchrun rank's share)."""
    count = min(limit or len(data), len(data))
    if isinstance(data, ImageArray):
        for start in range(first, count, batch_size):
            yield data.images[start:min(start + batch_size, count)]
    else:
        yield from torch.utils.data.DataLoader(
            torch.utils.data.Subset(data, range(first, count)),
            batch_size=batch_size,
            num_workers=num_workers,
        )


def to_float(images, device):
    """uint8 (B, C, H, W) -> float32 in [0, 1] on device (channels_last on CUDA)."""
    images = images.to(device, non_blocking=True).float().div_(255)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


def flip_at_random(x, enabled):
    """Mirror each image left-right with probability 1/2 (draws from the training RNG)."""
    if not enabled:
        return x
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


# --------------------------------------------------------------------------------------------------
# networks: Soft-IntroVAE's "standard" ResNet VAE, which the released AS-IntroVAE code uses
# --------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """conv3x3-BN-LeakyReLU(0.2)-conv3x3-BN, plus the skip (1x1 conv when the channels change),
    then LeakyReLU(0.2)."""

    def __init__(self, in_channels, out_channels, norm=nn.BatchNorm2d):
        super().__init__()
        bias = norm is nn.Identity  # without a normalisation the convs keep their own shift
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            norm(out_channels),
            nn.LeakyReLU(0.2),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            norm(out_channels),
        )
        # `!=`, not the released code's `is not` (an identity test on ints): equal channel counts
        # always get the identity skip
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False)
            if in_channels != out_channels
            else nn.Identity()
        )
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


def encoder_convs(image_channels, channels, pool, norm=nn.BatchNorm2d):
    """The encoder's convolutional part: conv5x5-BN-LeakyReLU(0.2)-pool, per further channel
    entry ResBlock-pool, a final ResBlock. pool: nn.AvgPool2d (the encoder) or nn.MaxPool2d
    (the discriminator); norm: nn.Identity for WGAN-GP's critic. (B, C, H, W) -> (B,
    channels[-1], H / 2^len(channels), W / 2^len(channels))."""
    layers = [
        nn.Conv2d(image_channels, channels[0], 5, padding=2, bias=norm is nn.Identity),
        norm(channels[0]),
        nn.LeakyReLU(0.2),
        pool(2),
    ]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [ResBlock(c_in, c_out, norm), pool(2)]
    layers.append(ResBlock(channels[-1], channels[-1], norm))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x (B, C, H, W) -> mu, logvar, each (B, z_dim) in float32."""

    def __init__(self, image_channels, channels, image_size, z_dim):
        super().__init__()
        self.conv = encoder_convs(image_channels, channels, nn.AvgPool2d)
        side = image_size // 2 ** len(channels)
        self.fc = nn.Linear(channels[-1] * side * side, 2 * z_dim)

    def forward(self, x):
        mu, logvar = self.fc(self.conv(x).flatten(1)).float().chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    """z (B, z_dim) -> image (B, C, H, W) in float32, no output activation
    (images live in [0, 1])."""

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


def build_networks(image_channels, channels, image_size, z_dim, arch="resnet"):
    """The encoder and decoder every method here shares: the ResNet VAE, or AVAE-S Table I's
    (arch "avae")."""
    if arch == "avae":
        return AVAEEncoder(image_channels, image_size, z_dim), AVAEDecoder(
            image_channels, image_size, z_dim
        )
    return (Encoder(image_channels, channels, image_size, z_dim),
            Decoder(image_channels, channels, image_size, z_dim))


def reparameterize(mu, logvar):
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I); (B, z) -> (B, z)."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


# --------------------------------------------------------------------------------------------------
# losses (Eq. 1-9): pure functions of tensors. Per-sample values are (B,); "mean" is over the
# batch. The functions from kl_divergence to as_intro_decoder_loss are word for word those of
# toy2d.py.
# --------------------------------------------------------------------------------------------------
def sse(x, y):
    """Per-sample sum of squared errors over all pixels: SSE_i = sum_p (x_ip - y_ip)^2, the
    -log p(x|z) of Eq. 1 up to constants (a SUM over pixels, not a mean, as the released code).
    (B, ...) x 2 -> (B,)."""
    return (x - y).pow(2).flatten(1).sum(dim=1)


def kl_divergence(mu, logvar):
    """Eq. 2 for q = N(mu, exp(logvar)) and p = N(0, I) (Kingma & Welling, Appendix B):
    KL_i = -1/2 sum_d (1 + logvar_id - exp(logvar_id) - mu_id^2).  (..., B, D) -> (..., B)."""
    return -0.5 * (1 + logvar - torch.exp(logvar) - mu**2).sum(-1)


def as_distance(mu_a, logvar_a, mu_b, logvar_b, reduction="paper", kernel="marginal"):
    """AS-Distance between two batches of diagonal Gaussians, Eq. 7 with the kernel of Eq. 8:
    k_d(a_i, b_j) = exp(-(mu_a,id - mu_b,jd)^2 / (2 V)) / sqrt(2 pi V),  V = v_a,id + v_b,jd,
    v = exp(logvar), the integral of the product of the two 1-D normal densities; over all B*B pairs
    AS = sum_d [mean_ij k_d(a_i, a_j) + mean_ij k_d(b_i, b_j) - 2 mean_ij k_d(a_i, b_j)]
       = sum_d integral (p_a,d(u) - p_b,d(u))^2 du  (p_.,d: the batch mixture's marginal in d),
    so AS >= 0 and AS(a, a) = 0: one value per batch, the paper's per-batch alignment.
    kernel "joint": Eq. 8 read with its (2 pi)^(n/2), the overlap of the n-dimensional Gaussians,
    k(a_i, b_j) = prod_d k_d(a_i, b_j), so that AS = integral over R^n of (p_a - p_b)^2 of the
    two batch mixtures (not of their marginals); the three means of exp(log k) are taken relative
    to the largest log k, so no term underflows before the difference. In the 32-256 latent
    dimensions of the image models exp of that largest log k (a sum of n log-densities) itself
    leaves float32's range: the joint kernel is for 2D, and as_introvae.py has no flag for it.
    reduction "official_sum" / "official_mean": the released code's kernel without 1/sqrt(2 pi),
    SUMMED (its encoder step) / AVERAGED (its decoder step) over all B*B*D terms (marginal only).
    mu_a, logvar_a: (..., B, D); mu_b, logvar_b: (..., B', D) -> (...,)."""
    check_as_distance_arguments(reduction, kernel)

    def kernel_reduced(mu_1, var_1, mu_2, var_2):
        var = var_1.unsqueeze(-2) + var_2.unsqueeze(-3)  # (..., B1, B2, D)
        k = torch.exp(-((mu_1.unsqueeze(-2) - mu_2.unsqueeze(-3)) ** 2) / (2 * var))
        if reduction == "paper":
            return (k / torch.sqrt(2 * math.pi * var)).mean((-3, -2)).sum(-1)
        # OFFICIAL: no 1/sqrt(2 pi); the encoder step sums, the decoder step averages all terms.
        k = k / torch.sqrt(var)
        return k.sum((-3, -2, -1)) if reduction == "official_sum" else k.mean((-3, -2, -1))

    def log_joint_kernel(mu_1, var_1, mu_2, var_2):
        var = var_1.unsqueeze(-2) + var_2.unsqueeze(-3)  # (..., B1, B2, D)
        diff = mu_1.unsqueeze(-2) - mu_2.unsqueeze(-3)
        return (-diff**2 / (2 * var) - 0.5 * torch.log(2 * math.pi * var)).sum(-1)  # (..., B1, B2)

    var_a, var_b = torch.exp(logvar_a), torch.exp(logvar_b)
    if kernel == "joint":
        logs = (log_joint_kernel(mu_a, var_a, mu_a, var_a),
                log_joint_kernel(mu_b, var_b, mu_b, var_b),
                log_joint_kernel(mu_a, var_a, mu_b, var_b))
        top = torch.stack([v.amax((-2, -1)) for v in logs]).amax(0).detach()  # (...,)
        means = [(v - top[..., None, None]).exp().mean((-2, -1)) for v in logs]
        return top.exp() * (means[0] + means[1] - 2 * means[2])
    return (
        kernel_reduced(mu_a, var_a, mu_a, var_a)
        + kernel_reduced(mu_b, var_b, mu_b, var_b)
        - 2 * kernel_reduced(mu_a, var_a, mu_b, var_b)
    )


def check_as_distance_arguments(reduction, kernel):
    """ValueError unless reduction is paper | official_sum | official_mean and kernel is marginal,
    or joint with reduction paper."""
    if reduction not in ("paper", "official_sum", "official_mean"):
        raise ValueError(
            f"reduction must be paper, official_sum or official_mean, got {reduction!r}"
        )
    if kernel not in ("marginal", "joint") or (kernel == "joint" and reduction != "paper"):
        raise ValueError(f"kernel must be marginal, or joint with reduction paper, got {kernel!r}")


def annealing_coefficient(t, total, schedule="linear"):
    """Eq. 9's c: "linear" c = min(5 t / T, 1), t = iteration from 0, T = iterations of the run, so
    training starts all AS-Distance and is plain Soft-IntroVAE from t = T/5 on;
    "tanh" c = tanh(5 t / T), the released code's schedule (0.76 at T/5, never exactly 1)."""
    if schedule == "linear":
        return min(5.0 * t / total, 1.0)
    if schedule == "tanh":
        # OFFICIAL: the released code anneals with tanh(5 t / T).
        return math.tanh(5.0 * t / total)
    raise ValueError(f"schedule must be linear or tanh, got {schedule!r}")


def vae_loss(rec_err, kl, *, beta_rec, beta_kl):
    """The negative beta-ELBO of Eq. 1 without s (also the introspective methods' warm-up loss):
    L = mean_i (beta_rec SSE_i + beta_kl KL_i).  (..., B) -> (...,)."""
    return (beta_rec * rec_err + beta_kl * kl).mean(-1)


def intro_encoder_loss(rec_err, kl_real, kl_rec, kl_fake, *, margin, beta_rec, beta_kl, beta_neg):
    """IntroVAE's encoder loss, Eq. 3 with Huang et al.'s weighting; the hinges act on batch means:
    L_E = beta_rec mean SSE(x, rec)
          + beta_kl [mean KL_real + beta_neg/2 (relu(m - mean KL_rec) + relu(m - mean KL_fake))].
    (..., B) -> (...,)."""
    hinge_rec = torch.relu(margin - kl_rec.mean(-1, keepdim=True))  # (..., 1)
    hinge_fake = torch.relu(margin - kl_fake.mean(-1, keepdim=True))
    per_sample = beta_rec * rec_err + beta_kl * (
        kl_real + 0.5 * beta_neg * (hinge_rec + hinge_fake)
    )
    return per_sample.mean(-1)


def intro_decoder_loss(rec_err, kl_rec, kl_fake, *, beta_rec, beta_kl):
    """IntroVAE's decoder loss, Eq. 3, the KLs from the encoder as updated this iteration:
    L_D = beta_rec mean SSE(x, rec) + beta_kl/2 (mean KL_rec + mean KL_fake).
    (..., B) -> (...,)."""
    return (beta_rec * rec_err + 0.5 * beta_kl * (kl_rec + kl_fake)).mean(-1)


def as_intro_encoder_loss(
    rec_err,
    kl_real,
    rec_err_r,
    kl_r,
    rec_err_f,
    kl_f,
    as_dist,
    *,
    c,
    s,
    beta_rec,
    beta_kl,
    beta_neg,
    alpha=2.0,
):
    """AS-IntroVAE's encoder loss, Eq. 9; with c = 1 it is Soft-IntroVAE's (Eq. 4):
    L_E = s (beta_rec mean SSE(x, rec) + beta_kl mean KL_real)
          + 1/(2 alpha) sum_{q=r,f} mean_i exp(-alpha s ELBO_qi),
    ELBO_qi = beta_rec SSE_qi + beta_neg (c KL_qi + (1 - c) AS)
    q = r: SSE(rec, Dec(z_r)) and KL(E(rec)); q = f: the same for the generated samples; AS is one
    value per batch. Per-sample inputs (..., B); as_dist broadcasts against them.
    Returns (L_E, mean exp-term of r, mean exp-term of f), each (...,)."""
    exp_r = torch.exp(
        -alpha * s * (beta_rec * rec_err_r + beta_neg * (c * kl_r + (1 - c) * as_dist))
    )
    exp_f = torch.exp(
        -alpha * s * (beta_rec * rec_err_f + beta_neg * (c * kl_f + (1 - c) * as_dist))
    )
    per_sample = s * (beta_rec * rec_err + beta_kl * kl_real) + (0.5 / alpha) * (exp_r + exp_f)
    return per_sample.mean(-1), exp_r.mean(-1), exp_f.mean(-1)


def as_intro_decoder_loss(
    rec_err,
    kl_r,
    kl_f,
    rec_err_rr,
    rec_err_rf,
    as_dist,
    *,
    c,
    s,
    beta_rec,
    beta_kl,
    gamma_r,
    variant="paper",
):
    """AS-IntroVAE's decoder loss, Eq. 9 (each KL_q replaced by c KL_q + (1-c) AS, q = r, g);
    with c = 1 it is Soft-IntroVAE's (Eq. 4):
    L_D = s [beta_rec mean SSE(x, rec) + beta_kl/2 (c (mean KL_r + mean KL_f) + 2 (1-c) AS)
             + gamma_r beta_rec/2 (mean SSE(rec, rr) + mean SSE(fake, rf))]
    variant "official": AS once, beta_kl/2 (c (KL_r + KL_f) + (1-c) AS).  (..., B) -> (...,)."""
    # Eq. 9 sums c KL_q + (1 - c) D over q = r, g: the AS-Distance enters once per kind of sample.
    as_count = 2.0
    if variant == "official":
        # OFFICIAL: the released code adds (1 - c) AS once.
        as_count = 1.0
    per_sample = s * (
        beta_rec * rec_err
        + 0.5 * beta_kl * (c * (kl_r + kl_f) + as_count * (1 - c) * as_dist)
        + 0.5 * gamma_r * beta_rec * (rec_err_rr + rec_err_rf)
    )
    return per_sample.mean(-1)


# --------------------------------------------------------------------------------------------------
# training steps. Each takes the networks, their optimiser(s), the batch x (B, C, H, W) in [0, 1],
# the noise it shares between its two halves, its weights and amp (a bf16 autocast context or a
# no-op), and returns a dict of detached 0-d tensors (no host sync). train_step picks one per phase.
# --------------------------------------------------------------------------------------------------
def optimizer_step(loss, *optimizers):
    """Gradients of loss for every parameter that requires them, then one step of each optimiser.
    Under torchrun each optimiser first averages the gradients over the ranks (a pre-step hook
    that make_state registers: average_gradients_before_step)."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()  # torchrun: all_reduce of the gradients, then the Adam step


def set_requires_grad(module, flag):
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


def detached(stats):
    return {name: value.detach() for name, value in stats.items()}


def vae_objective(encoder, decoder, x, *, beta_rec, beta_kl, amp):
    """The negative beta-ELBO of x (Eq. 1, no s) -> (loss, rec (B, C, H, W), logged values)."""
    with amp():
        mu, logvar = encoder(x)  # (B, z)
        rec = decoder(reparameterize(mu, logvar))  # (B, C, H, W)
    rec_err, kl_real = sse(x, rec), kl_divergence(mu, logvar)  # (B,)
    loss = vae_loss(rec_err, kl_real, beta_rec=beta_rec, beta_kl=beta_kl)
    return loss, rec, {"rec": rec_err.mean(), "kl_real": kl_real.mean()}


def vae_step(encoder, decoder, opt_encoder, opt_decoder, x, *, beta_rec, beta_kl, amp):
    """Plain VAE: the `vae` model, avae's pre-training and the introspective methods' warm-up
    (num_vae epochs). One step of both networks on the negative beta-ELBO."""
    set_requires_grad(encoder, True)
    set_requires_grad(decoder, True)
    loss, _, stats = vae_objective(encoder, decoder, x, beta_rec=beta_rec, beta_kl=beta_kl, amp=amp)
    optimizer_step(loss, opt_encoder, opt_decoder)
    return detached({"loss": loss, **stats})


def intro_encoder_step(
    encoder, decoder, opt_encoder, x, eps, *, margin, beta_rec, beta_kl, beta_neg, amp
):
    """IntroVAE's encoder update (decoder frozen), eps (B, z) the prior draw. -> (z, logged values);
    z (B, z) is reused by the decoder step."""
    set_requires_grad(encoder, True)
    set_requires_grad(decoder, False)
    with amp():
        fake = decoder(eps)
        mu, logvar = encoder(x)
        z = reparameterize(mu, logvar)
        rec = decoder(z)
        mu_r, logvar_r = encoder(rec.detach())
        mu_f, logvar_f = encoder(fake.detach())
    rec_err, kl_real = sse(x, rec), kl_divergence(mu, logvar)
    kl_r, kl_f = kl_divergence(mu_r, logvar_r), kl_divergence(mu_f, logvar_f)
    loss = intro_encoder_loss(rec_err, kl_real, kl_r, kl_f, margin=margin, beta_rec=beta_rec,
                              beta_kl=beta_kl, beta_neg=beta_neg)
    optimizer_step(loss, opt_encoder)
    return z, detached({"loss_e": loss, "rec": rec_err.mean(), "kl_real": kl_real.mean(),
                        "kl_rec": kl_r.mean(), "kl_fake": kl_f.mean(),
                        "kl_diff": kl_f.mean() - kl_real.mean()})


def intro_decoder_step(encoder, decoder, opt_decoder, x, z, eps, *, beta_rec, beta_kl, amp):
    """IntroVAE's decoder update (encoder frozen, as just updated), the encoder step's z, eps."""
    set_requires_grad(encoder, False)
    set_requires_grad(decoder, True)
    with amp():
        fake = decoder(eps)
        rec = decoder(z.detach())
        mu_r, logvar_r = encoder(rec)
        mu_f, logvar_f = encoder(fake)
    loss = intro_decoder_loss(sse(x, rec), kl_divergence(mu_r, logvar_r),
                              kl_divergence(mu_f, logvar_f), beta_rec=beta_rec, beta_kl=beta_kl)
    optimizer_step(loss, opt_decoder)
    return {"loss_d": loss.detach()}


def introvae_step(encoder, decoder, opt_encoder, opt_decoder, x, eps, *, margin, beta_rec, beta_kl,
                  beta_neg, amp):
    """One IntroVAE iteration: the encoder step, then the decoder step on the same z and eps."""
    z, stats = intro_encoder_step(encoder, decoder, opt_encoder, x, eps, margin=margin,
                                  beta_rec=beta_rec, beta_kl=beta_kl, beta_neg=beta_neg, amp=amp)
    return {**stats, **intro_decoder_step(encoder, decoder, opt_decoder, x, z, eps,
                                          beta_rec=beta_rec, beta_kl=beta_kl, amp=amp)}


def as_batch(mu_r, logvar_r, mu_f, logvar_f, gather):
    """The posteriors the AS-Distance compares: this process's (B, z) each, or, gather, the
    batches of all torchrun ranks stacked (world B, z), differentiable."""
    posteriors = (mu_r, logvar_r, mu_f, logvar_f)
    return [gather_over_ranks(v) for v in posteriors] if gather else list(posteriors)


def as_intro_encoder_step(encoder, decoder, opt_encoder, x, eps, *, c, s, beta_rec, beta_kl,
                          beta_neg, as_variant, amp, as_gather=False):
    """The encoder update of AS-IntroVAE (as_variant "paper" | "official") or of Soft-IntroVAE
    (as_variant "none": Eq. 9 at c = 1, no AS-Distance); the decoder is frozen.
    eps (B, z): the prior draw shared with the decoder step. as_gather: the AS-Distance over the
    batch of all torchrun ranks. -> (z (B, z), logged values)."""
    if as_variant == "none" and c != 1.0:
        raise ValueError(f"Soft-IntroVAE is Eq. 9 at c = 1, got c = {c}")
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
    # The networks return float32, so the losses stay float32 under bf16 autocast.
    rec_err, kl_real = sse(x, rec), kl_divergence(mu, logvar)  # (B,)
    # rec is not detached here: the encoder also learns through Dec(z) (Soft-IntroVAE Algorithm 1).
    rec_err_r, kl_r = sse(rec, rec_rec), kl_divergence(mu_r, logvar_r)
    rec_err_f, kl_f = sse(fake, rec_fake), kl_divergence(mu_f, logvar_f)
    stats = {}
    as_dist = 0.0
    if as_variant == "paper":
        # Between the posteriors of the reconstructions and of the generated samples (Fig. 2);
        # the real data's posteriors never enter it.
        as_dist = stats["as_dist"] = as_distance(*as_batch(mu_r, logvar_r, mu_f, logvar_f,
                                                           as_gather))
    elif as_variant == "official":
        # OFFICIAL: tanh on mu and logvar before the AS-Distance, whose terms are summed.
        squashed = (v.tanh() for v in (mu_r, logvar_r, mu_f, logvar_f))
        as_dist = stats["as_dist"] = as_distance(*as_batch(*squashed, as_gather),
                                                 reduction="official_sum")
    loss, exp_r, exp_f = as_intro_encoder_loss(rec_err, kl_real, rec_err_r, kl_r, rec_err_f, kl_f,
                                               as_dist, c=c, s=s, beta_rec=beta_rec,
                                               beta_kl=beta_kl, beta_neg=beta_neg)
    optimizer_step(loss, opt_encoder)
    stats.update(loss_e=loss, rec=rec_err.mean(), kl_real=kl_real.mean(), kl_rec=kl_r.mean(),
                 kl_fake=kl_f.mean(), kl_diff=kl_f.mean() - kl_real.mean(), exp_elbo_rec=exp_r,
                 exp_elbo_fake=exp_f)
    return z, detached(stats)


def as_intro_decoder_step(encoder, decoder, opt_decoder, x, z, eps, *, c, s, beta_rec, beta_kl,
                          gamma_r, as_variant, amp, as_gather=False):
    """The decoder update of AS-IntroVAE (as_variant "paper" | "official") or Soft-IntroVAE
    (as_variant "none", c = 1), the encoder frozen as just updated, on the encoder step's z and
    eps. The decoder's forwards run again here: keeping the encoder step's graph for them
    (toy2d.py does, retain_graph) would hold every image activation through both steps."""
    if as_variant == "none" and c != 1.0:
        raise ValueError(f"Soft-IntroVAE is Eq. 9 at c = 1, got c = {c}")
    set_requires_grad(encoder, False)
    set_requires_grad(decoder, True)
    with amp():
        fake = decoder(eps)  # the SAME eps as the encoder step
        rec = decoder(z.detach())  # the SAME z, drawn before the encoder's update
        mu_r, logvar_r = encoder(rec)  # gradients reach the decoder through the frozen encoder
        z_r = reparameterize(mu_r, logvar_r)
        mu_f, logvar_f = encoder(fake)
        z_f = reparameterize(mu_f, logvar_f)
        rec_rec, rec_fake = decoder(z_r.detach()), decoder(z_f.detach())
    rec_err = sse(x, rec)
    rec_err_rr, rec_err_rf = sse(rec.detach(), rec_rec), sse(fake.detach(), rec_fake)
    if as_variant == "official":
        # OFFICIAL: tanh on mu and logvar before the decoder's KLs and the AS-Distance.
        mu_r, logvar_r, mu_f, logvar_f = (v.tanh() for v in (mu_r, logvar_r, mu_f, logvar_f))
    kl_r, kl_f = kl_divergence(mu_r, logvar_r), kl_divergence(mu_f, logvar_f)  # (B,)
    as_dist = 0.0
    if as_variant == "paper":
        as_dist = as_distance(*as_batch(mu_r, logvar_r, mu_f, logvar_f, as_gather))
    elif as_variant == "official":
        # OFFICIAL: the decoder step averages the AS-Distance's terms.
        as_dist = as_distance(*as_batch(mu_r, logvar_r, mu_f, logvar_f, as_gather),
                              reduction="official_mean")
    loss = as_intro_decoder_loss(rec_err, kl_r, kl_f, rec_err_rr, rec_err_rf, as_dist, c=c, s=s,
                                 beta_rec=beta_rec, beta_kl=beta_kl, gamma_r=gamma_r,
                                 variant="official" if as_variant == "official" else "paper")
    optimizer_step(loss, opt_decoder)
    return {"loss_d": loss.detach()}


def as_intro_step(encoder, decoder, opt_encoder, opt_decoder, x, eps, *, c, s, beta_rec, beta_kl,
                  beta_neg, gamma_r, as_variant, amp, as_gather=False):
    """One AS-IntroVAE (as_variant "paper" | "official") or Soft-IntroVAE (as_variant "none",
    c = 1) iteration: the encoder step, then the decoder step on the same z and eps."""
    z, stats = as_intro_encoder_step(encoder, decoder, opt_encoder, x, eps, c=c, s=s,
                                     beta_rec=beta_rec, beta_kl=beta_kl, beta_neg=beta_neg,
                                     as_variant=as_variant, amp=amp, as_gather=as_gather)
    return {**stats, **as_intro_decoder_step(encoder, decoder, opt_decoder, x, z, eps, c=c, s=s,
                                             beta_rec=beta_rec, beta_kl=beta_kl, gamma_r=gamma_r,
                                             as_variant=as_variant, amp=amp, as_gather=as_gather)}


# --------------------------------------------------------------------------------------------------
# one training iteration, and the loop: Eq. 9's s, T and c, then Algorithm 1 with the EMA decoder.
# The paper's algorithm ends here; below are appendices, each under its own banner.
# --------------------------------------------------------------------------------------------------
def step_method(cfg, epoch):
    """The method whose step trains this epoch: the plain VAE during the introspective warm-up
    (num_vae epochs) and avae's pre-training, VAE-S during avae-s's, else cfg.model."""
    if epoch < cfg.num_vae or (cfg.model == "avae" and epoch < cfg.pretrain_epochs):
        return "vae"
    if cfg.model == "avae-s" and epoch < cfg.pretrain_epochs:
        return "vae-s"
    return cfg.model


def train_step(method, nets, opts, x, cfg, c, s, amp, vae_s_state=None, step=0):
    """One iteration of `method` (step_method's name) on the batch x: the one place that turns the
    config into the steps' arguments. c: Eq. 9's annealing coefficient of this iteration (used by
    asintrovae only); s = 1 / (C H W); step: the iteration, from 0 (used by wgan-gp only).
    -> dict of detached 0-d tensors."""
    if method == "wgan-gp":
        return wgan_gp_step(nets, opts, x, cfg, step, amp)
    encoder, decoder = nets["encoder"], nets["decoder"]
    pair = (encoder, decoder, opts["encoder"], opts["decoder"])
    betas = {"beta_rec": cfg.beta_rec, "beta_kl": cfg.beta_kl, "amp": amp}
    sharp = {"beta_tc": cfg.beta_tc, "tc_estimator": cfg.tc_estimator}
    if method == "vae":
        return vae_step(*pair, x, **betas)
    if method == "vae-s":
        return vae_s_step(*pair, x, vae_s_state, **betas, **sharp)
    if method in ("avae", "avae-s"):
        if method == "avae":
            objective = functools.partial(vae_objective, **betas)
        else:
            objective = functools.partial(
                vae_s_objective, vae_s_state=vae_s_state, **betas, **sharp
            )
        return adversarial_step(encoder, decoder, nets["disc"], opts["encoder"], opts["decoder"],
                                opts["disc"], x, objective, beta_adv=cfg.beta_adv,
                                adv_loss=cfg.adv_loss, disc_train_below=cfg.disc_train_below,
                                adv_use_above=cfg.adv_use_above, amp=amp)
    eps = torch.randn(x.shape[0], cfg.z_dim, device=x.device)  # (B, z), shared by both halves
    if method == "introvae":
        return introvae_step(*pair, x, eps, margin=cfg.margin, beta_neg=cfg.beta_neg, **betas)
    # Soft-IntroVAE is AS-IntroVAE without the AS-Distance, at c = 1 (Eq. 4 = Eq. 9 at c = 1)
    as_intro = method == "asintrovae"
    return as_intro_step(*pair, x, eps, c=c if as_intro else 1.0, s=s, beta_neg=cfg.beta_neg,
                         gamma_r=cfg.gamma_r, as_variant=cfg.variant if as_intro else "none",
                         as_gather=cfg.as_gather and world_size() > 1, **betas)


@torch.no_grad()
def update_ema(ema, decoder, decay):
    """shadow <- decay * shadow + (1 - decay) * weight after each decoder step; BatchNorm buffers
    are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(decoder.parameters()), 1.0 - decay)
    for shadow, buffer in zip(ema.buffers(), decoder.buffers()):
        shadow.copy_(buffer)


def elbo_scale(image_shape):
    """Eq. 9's s = 1 / (C H W), image_shape (C, H, W): every ELBO per pixel, which keeps the
    exp-terms from vanishing on large images."""
    return 1.0 / math.prod(image_shape)


def annealing_length(train_images, cfg):
    """-> (iterations per epoch, Eq. 9's T): T counts every iteration of the run, the last partial
    batch of each epoch included, so c = min(5 t / T, 1) reaches 1 at a fifth of the run."""
    iters_per_epoch = math.ceil(train_images / cfg.batch_size)
    return iters_per_epoch, iters_per_epoch * cfg.epochs


def annealing_schedule(cfg):
    """annealing_coefficient's schedule: linear, as Eq. 9 writes it."""
    if cfg.model == "asintrovae" and cfg.variant == "official":
        return "tanh"  # OFFICIAL: the released code anneals with c = tanh(5 t / T)
    return "linear"


def train(cfg):
    """Soft-IntroVAE's Algorithm 1 with Eq. 9's c: per iteration c, the encoder step then the
    decoder step (train_step), the decoder's EMA; around it the log, image grids, checkpoints.
    Under torchrun every rank runs this loop on its share of each global batch; the optimisers
    average the gradients over the ranks (make_state), so the weights stay the same everywhere."""
    run = open_run(cfg)  # a new run, or the folder's run resumed from its checkpoint
    nets, opts, step, ranks = run.nets, run.opts, run.step, run.ranks
    s = elbo_scale(run.train_set.shape)  # Eq. 9's s
    iters_per_epoch, T = annealing_length(len(run.train_set), cfg)  # Eq. 9's T
    schedule = annealing_schedule(cfg)
    log = TrainingLog(cfg, run.out_dir, step, run.stop, writer=ranks.is_writer)
    watch = FiniteWatch(run.device)
    # the grids' fixed inputs; their noise has its own generator: grids never move the training RNG
    grid_batch = batchnorm_batch(cfg, ranks, nets["decoder"])  # what one BatchNorm sees
    grid_real = to_float(next(ordered_batches(run.train_set, grid_batch, grid_batch, 0)),
                         run.device)
    grid_noise = torch.randn(grid_real.shape[0], cfg.z_dim,
                             generator=torch.Generator().manual_seed(cfg.seed)).to(run.device)
    epoch = step // iters_per_epoch
    while step < run.stop:
        skip = step - epoch * iters_per_epoch
        for batch in epoch_batches(run.train_set, cfg.batch_size, cfg.seed, epoch, skip,
                                   cfg.num_workers, ranks):  # this rank's share
            x = flip_at_random(to_float(batch, run.device), cfg.hflip)  # (B, C, H, W) in [0, 1]
            c = annealing_coefficient(step, T, schedule)  # Eq. 9, t = step
            stats = train_step(step_method(cfg, epoch), nets, opts, x, cfg, c, s, run.amp,
                               run.vae_s_state, step)
            average_buffers_over_ranks([nets[name] for name in opts])  # no-op in a plain run
            if generator_turn(step, cfg):  # every iteration but wgan-gp's critic-only ones
                update_ema(nets["ema"], unwrap(nets["decoder"]), cfg.ema_decay)
            step += 1
            watch.add(stats, step)
            if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or step == run.stop:
                watch.raise_if_diverged(run.ckpt_path)  # the one host sync of the interval
            log.add(step, epoch, stats, c, x.shape[0] * ranks.world, run.vae_s_state)
            # at T too, not at --max-iters: a stopped and resumed run logs what an unbroken one does
            if cfg.recon_every and "encoder" in nets and (step % cfg.recon_every == 0
                                                          or step == T):
                # every rank runs the same forwards (SyncBatchNorm's collectives), rank 0 writes
                log.add_record(step, reconstruction_record(
                    unwrap(nets["encoder"]), unwrap(nets["decoder"]), run.test_set, cfg,
                    run.device, run.amp, grid_batch))
            if step % cfg.img_every == 0 or step == run.stop:
                path = os.path.join(run.out_dir, f"grid_{step:07d}.png")
                # every rank runs the forwards (SyncBatchNorm's collectives), rank 0 saves
                training_grid(nets, grid_real, grid_noise, cfg.bn_mode, run.amp,
                              path if ranks.is_writer else None)
            if step % cfg.ckpt_every == 0 or step == run.stop:
                epochs_done = step // iters_per_epoch
                rng_by_rank = rng_states_of_all_ranks(ranks)
                if ranks.is_writer:
                    save_checkpoint(run.ckpt_path, nets, opts, step, epochs_done, T, cfg,
                                    avae_s_record(cfg, epochs_done, run.vae_s_state), rng_by_rank)
            if step >= run.stop:
                break
        epoch += 1
    log.close()
    results_path = os.path.join(run.out_dir, "results.json")
    if run.resumed and run.step >= run.stop and os.path.exists(results_path):
        if ranks.is_writer:
            print(f"already done: {run.out_dir} holds the run trained to step {run.step} and its "
                  f"results.json (--eval {run.ckpt_path} evaluates it again)", flush=True)
        if ranks.world > 1:
            dist.destroy_process_group()
        return
    if run.resumed and run.step >= run.stop and ranks.is_writer:
        print(f"training done at step {run.step} (stop at {run.stop}); evaluating", flush=True)
    if ranks.world > 1:
        # the evaluation's forwards are each rank's own: plain BatchNorm copies of the networks
        nets = plain_copies(nets, cfg, run.train_set.shape[0], run.device)
    results = evaluate(nets, cfg, run.train_set, run.test_set, run.split, run.device, run.amp,
                       run.out_dir, ranks)
    if ranks.is_writer:
        results.update(checkpoint=run.ckpt_path, step=step,
                       **avae_s_results(cfg, step, iters_per_epoch, run.vae_s_state))
        write_results(results, run.out_dir)
    if ranks.world > 1:
        dist.barrier()  # no rank leaves while rank 0 still writes
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# APPENDIX: the AVAE-S paper's models (Naderi, Haji Soleimani, Matwin, "Generating High-Fidelity
# Images with Disentangled Adversarial VAEs and Structure-Aware Loss"): VAE-S, AVAE, AVAE-S.
# Their networks, losses and steps. Reconstruction terms are PER SAMPLE (B,), summed over pixels
# / maps like sse(); the total correlation is a property of the batch (a scalar).
# --------------------------------------------------------------------------------------------------
class Discriminator(nn.Module):
    """Dis(x) of AVAE-S Eq. 11 for --arch resnet: the encoder, but "it uses max pooling for
    down-sampling" (AVAE-S Sec. III). Our encoder down-samples with AvgPool2d, not strided convs,
    so MaxPool2d takes its place; the head is one logit (the sigmoid lives in the losses).
    (B, C, H, W) -> logits (B,) in float32."""

    def __init__(self, image_channels, channels, image_size):
        super().__init__()
        self.conv = encoder_convs(image_channels, channels, nn.MaxPool2d)
        side = image_size // 2 ** len(channels)
        self.fc = nn.Linear(channels[-1] * side * side, 1)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1)).float().view(-1)


# AVAE-S Table I (--arch avae), verbatim (encoder | decoder):
#   24 conv. 3x3, stride 1, bnorm, ReLU   | 48 fully-connected, bnorm, tanh
#   24 conv. 4x4, stride 2, bnorm, ReLU   | 6x6x192 fully-connected, bnorm, tanh
#   48 conv. 3x3, stride 1, bnorm, ReLU   | 192 conv. 3x3, bnorm, ReLU, NN_upsample
#   48 conv. 4x4, stride 2, bnorm, ReLU   | 192 conv. 3x3, bnorm, ReLU
#   96 conv. 3x3, stride 1, bnorm, ReLU   | 96 conv. 3x3, bnorm, ReLU, NN_upsample
#   96 conv. 4x4, stride 2, bnorm, ReLU   | 96 conv. 3x3, bnorm, ReLU
#   192 conv. 3x3, stride 1, bnorm, ReLU  | 48 conv. 3x3, bnorm, ReLU, NN_upsample
#   192 conv. 4x4, stride 2, bnorm, ReLU  | 48 conv. 3x3, bnorm, ReLU
#   48 fully-connected, bnorm, tanh       | 24 conv. 3x3, bnorm, ReLU, NN_upsample
#   32 latent dim, z_mean, z_sigma        | 24 conv. 3x3, bnorm, ReLU
#   32 sampling layer, z_sample           | 3 conv_transpose 1x1, sigmoid
# Padding "same" (3x3: pad 1; 4x4 stride 2: pad 1, which halves the side), so 96 px -> 6 x 6.
# Convs before a BatchNorm have no bias (the BatchNorm shift replaces it). The sampling layer is
# reparameterize().
class AVAEEncoder(nn.Module):
    """AVAE-S Table I encoder: x (B, C, S, S) -> mu, logvar, each (B, z_dim) in float32; S
    divisible by 16 (96 in the paper)."""

    def __init__(self, image_channels, image_size, z_dim, widths=TABLE_I_WIDTHS):
        super().__init__()
        side = image_size // 2 ** len(widths)
        layers, c_in = [], image_channels
        for width in widths:
            layers += [
                nn.Conv2d(c_in, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            c_in = width
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(widths[-1] * side * side, 48, bias=False), nn.BatchNorm1d(48), nn.Tanh()
        )
        self.fc_mu = nn.Linear(48, z_dim)
        # DEVIATION: AVAE-S Table I names the second head z_sigma; it outputs log-variance here,
        # like every encoder in this file, so the shared KL and reparameterisation apply unchanged.
        self.fc_logvar = nn.Linear(48, z_dim)

    def forward(self, x):
        h = self.fc(self.conv(x).flatten(1))  # (B, 48)
        return self.fc_mu(h).float(), self.fc_logvar(h).float()


class AVAEDecoder(nn.Module):
    """AVAE-S Table I decoder: z (B, z_dim) -> image (B, C, S, S) in (0, 1) (sigmoid output),
    float32. Nearest-neighbour upsampling after the first conv of each width (AVAE-S Sec. III: no
    checkerboard artifacts)."""

    def __init__(self, image_channels, image_size, z_dim, widths=TABLE_I_WIDTHS):
        super().__init__()
        self.side, self.top = image_size // 2 ** len(widths), widths[-1]
        flat = self.top * self.side * self.side
        self.fc = nn.Sequential(nn.Linear(z_dim, 48, bias=False), nn.BatchNorm1d(48), nn.Tanh(),
                                nn.Linear(48, flat, bias=False), nn.BatchNorm1d(flat), nn.Tanh())
        layers, c_in = [], self.top
        for width in reversed(widths):  # 192, 96, 48, 24
            layers += [
                nn.Conv2d(c_in, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            c_in = width
        layers += [nn.ConvTranspose2d(c_in, image_channels, 1), nn.Sigmoid()]
        self.conv = nn.Sequential(*layers)

    def forward(self, z):
        return self.conv(self.fc(z).view(z.shape[0], self.top, self.side, self.side)).float()


class AVAEDiscriminator(nn.Module):
    """Dis(x) for --arch avae: AVAE-S Table I's encoder with each 4x4 stride-2 conv replaced by
    MaxPool2d(2) (AVAE-S Sec. III), its 48-unit fully-connected layer (bnorm, tanh), then one
    logit. (B, C, S, S) -> logits (B,)."""

    def __init__(self, image_channels, image_size, widths=TABLE_I_WIDTHS):
        super().__init__()
        side = image_size // 2 ** len(widths)
        layers, c_in = [], image_channels
        for width in widths:
            layers += [
                nn.Conv2d(c_in, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = width
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(widths[-1] * side * side, 48, bias=False),
            nn.BatchNorm1d(48),
            nn.Tanh(),
            nn.Linear(48, 1),
        )

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1)).float().view(-1)


def build_discriminator(image_channels, channels, image_size, arch="resnet"):
    """Dis of AVAE-S Eq. 11 for the chosen architecture."""
    if arch == "avae":
        return AVAEDiscriminator(image_channels, image_size)
    return Discriminator(image_channels, channels, image_size)


REC_TERMS = ("mae", "mse", "1-ssim", "sobel", "gabor")  # AVAE-S Eq. 5's five terms, in its order


def loss_mae(x, rec):
    """L_MAE of AVAE-S Eq. 5 (AVAE-S Algorithm 1: ||X - X~||_1): sum_p |x_p - rec_p| per sample.
    (B, ...) x 2 -> (B,). (L_MSE, ||X - X~||_2 read as the squared error, is sse(): lambda_MSE =
    1 alone is the `vae` baseline.)"""
    return (x - rec).abs().flatten(1).sum(dim=1)


def loss_1_ssim(x, rec):
    """L_1-SSIM of AVAE-S Eq. 5 and 8: 1 - SSIM(x, rec) per sample, in [0, 2]. (B, C, H, W) x 2 ->
    (B,).

    SSIM is eval_metrics.ssim_torch, the function that scores SSIM at evaluation (Wang et al. 2004
    with alpha = beta = gamma = 1 in AVAE-S Eq. 8: 11-tap Gaussian window, sigma 1.5, valid region,
    data range 1), differentiable. rec is not clamped here (eval_metrics.ssim clamps): a clamp would
    zero the gradient of out-of-range pixels.
    """
    return 1.0 - ssim_torch(x, rec, data_range=1.0)


def sobel_edges(x):
    """E_Sobel of AVAE-S Eq. 6: the two 3x3 Sobel gradient maps of every channel, valid region.

    G_x = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] as a cross-correlation (F.conv2d; positive on a
    dark-to-bright step from left to right), G_y = G_x transposed; one scale, unnormalised
    (AVAE-S Eq. 5's lambda absorbs the scale). Both maps rather than the magnitude
    sqrt(G_x^2 + G_y^2), whose gradient is undefined on flat regions. (B, C, H, W) ->
    (B, 2C, H - 2, W - 2), channels (c0 G_x, c0 G_y, c1 G_x, ...).
    """
    g_x = torch.tensor(
        [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device
    )
    kernels = torch.stack([g_x, g_x.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    return F.conv2d(x, kernels.repeat(x.shape[1], 1, 1, 1), groups=x.shape[1])


def loss_sobel(x, rec):
    """L_Sobel, AVAE-S Eq. 6: ||E_Sobel(x) - E_Sobel(rec)||^2 summed over both maps of every
    channel, per sample (B,). Squared, as AVAE-S Algorithm 1's ||.||_2 for L_MSE."""
    return sse(sobel_edges(x), sobel_edges(rec))


GABOR_WAVELENGTHS = (4.0, 8.0)  # px: the scales of the bank


def gabor_geometry(wavelength):
    """-> (sigma, radius) of the bank's kernel at a wavelength: sigma = wavelength / 2 (about a
    1.1-octave bandwidth), radius ceil(2 sigma); the kernel's side is 2 radius + 1."""
    sigma = wavelength / 2.0
    return sigma, int(math.ceil(2.0 * sigma))


def gabor_kernels(
    wavelengths=GABOR_WAVELENGTHS, orientations_deg=(0.0, 45.0, 90.0, 135.0), gamma=1.0
):
    """The fixed Gabor bank T_Gabor of AVAE-S Eq. 7 (the paper gives no parameters): one
    (K, 1, k, k) float64 tensor per scale, K = 2 * len(orientations) (an even and an odd kernel per
    orientation).

    Per scale: wavelength lam px, sigma = lam / 2 (about a 1.1-octave bandwidth), radius
    ceil(2 sigma), so k = 9 at lam 4 and 17 at lam 8; orientation theta = the direction of the
    carrier's wave vector, from the column axis towards the row axis (theta = 0 responds to
    vertical edges):
        g(u, v) = exp(-(u'^2 + gamma^2 v'^2) / (2 sigma^2)) cos(2 pi u' / lam - psi) / Z,
        psi in {0, pi / 2},  u' = u cos(theta) + v sin(theta),  v' = -u sin(theta) + v cos(theta),
        u = column offset, v = row offset
    Z = the envelope's sum (responses stay in image units at every scale); then each kernel's mean
    is subtracted so a flat region gives 0 (brightness is L_MAE's and L_MSE's job). Order:
    (theta0 even, theta0 odd, theta1 ...).
    """
    bank = []
    for lam in wavelengths:
        sigma, radius = gabor_geometry(lam)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        v, u = torch.meshgrid(offsets, offsets, indexing="ij")  # v: row offset, u: column offset
        kernels = []
        for theta in (math.radians(deg) for deg in orientations_deg):
            u_rot = u * math.cos(theta) + v * math.sin(theta)
            v_rot = -u * math.sin(theta) + v * math.cos(theta)
            envelope = torch.exp(-(u_rot ** 2 + gamma ** 2 * v_rot ** 2) / (2.0 * sigma ** 2))
            for psi in (0.0, math.pi / 2.0):
                kernel = envelope * torch.cos(2.0 * math.pi * u_rot / lam - psi) / envelope.sum()
                kernels.append(kernel - kernel.mean())
        bank.append(torch.stack(kernels).unsqueeze(1))
    return bank


# The largest kernel's side (17 px): the smallest image side vae-s and avae-s can take.
GABOR_MAX_KERNEL = 2 * gabor_geometry(max(GABOR_WAVELENGTHS))[1] + 1


def gabor_responses(x, kernels):
    """T_Gabor of AVAE-S Eq. 7: every kernel of every scale on every channel, valid region. x
    (B, C, H, W), H and W >= the largest kernel; kernels: gabor_kernels()
    (moved to x's device and dtype). Returns one (B, C K, H - k + 1, W - k + 1) tensor per scale."""
    responses = []
    for bank in kernels:
        if bank.shape[-1] > min(x.shape[-2:]):
            raise ValueError(f"Gabor kernel {bank.shape[-1]}x{bank.shape[-1]} is larger than the "
                             f"{x.shape[-2]}x{x.shape[-1]} images")
        bank = bank.to(device=x.device, dtype=x.dtype)
        responses.append(F.conv2d(x, bank.repeat(x.shape[1], 1, 1, 1), groups=x.shape[1]))
    return responses


def loss_gabor(x, rec, kernels):
    """L_Gabor, AVAE-S Eq. 7: ||T_Gabor(x) - T_Gabor(rec)||^2 summed over scales, kernels,
    channels and positions, per sample (B,). Squared, as L_Sobel."""
    total = 0.0
    for response_x, response_rec in zip(gabor_responses(x, kernels), gabor_responses(rec, kernels)):
        total = total + sse(response_x, response_rec)
    return total


def reconstruction_terms(x, rec, kernels):
    """The five unweighted terms of AVAE-S Eq. 5, {name: (B,)} in REC_TERMS order
    (logged, and weighed by loss_rec)."""
    return {"mae": loss_mae(x, rec), "mse": sse(x, rec), "1-ssim": loss_1_ssim(x, rec),
            "sobel": loss_sobel(x, rec), "gabor": loss_gabor(x, rec, kernels)}


def loss_rec(terms, weights):
    """L_REC, AVAE-S Eq. 5: lambda_1 L_MAE + lambda_2 L_MSE + lambda_3 L_1-SSIM + lambda_4
    L_Sobel + lambda_5 L_Gabor. terms: {name: (B,)} from reconstruction_terms; weights:
    {name: lambda}, the same names. Returns (B,)."""
    if set(terms) != set(weights):
        raise ValueError(
            f"terms {sorted(terms)} and weights {sorted(weights)} name different losses"
        )
    return sum(weights[name] * terms[name] for name in terms)


def balance_weights(term_means, reference="mse"):
    """The lambdas of AVAE-S Eq. 5 from the terms' magnitudes: lambda_i = mean_reference / mean_i.

    The paper sets the lambdas so that "all of the losses stay in the same scale" (AVAE-S Eq. 5), by
    example (Sec. III: mean L1 30 and L2 900 -> lambda_L1 = 30, L2 weighted 1), from the terms
    probed over one epoch. So every weighted term starts at the reference's magnitude and
    lambda_MSE = 1. term_means: {name: mean of that unweighted per-sample term over the probe
    batches}. Returns {name: lambda} as floats, to be frozen.
    """
    if reference not in term_means:
        raise ValueError(f"the reference term {reference!r} is missing from {sorted(term_means)}")
    for name, value in term_means.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"cannot balance the loss terms: mean of {name!r} is {value!r}, need a positive "
                "finite number"
            )
    return {name: float(term_means[reference]) / float(value) for name, value in term_means.items()}


def total_correlation(z, mu, logvar, dataset_size, estimator="mss"):
    """L_KL-TC, AVAE-S Eq. 10: KL(q(z) || prod_j q(z_j)), estimated on the minibatch as in
    beta-TCVAE (Chen, Li, Grosse, Duvenaud, "Isolating Sources of Disentanglement in VAEs", NeurIPS
    2018, Sec. 3 and App. C). A scalar.

    z, mu, logvar: (M, D), z_i drawn from q(z | x_i); dataset size N >= M >= 2.
        TC ~= 1/M sum_i [ log q(z_i) - sum_d log q(z_id) ],  q(z_i) = sum_j w_ij q(z_i | x_j),
    q(z_id) likewise per dimension with the diagonal Gaussian posteriors:
      "mss" (default), minibatch-stratified sampling: w_ii = 1/N, w_ij = (N - 1) / (N (M - 1))
            for j != i (x_i's own posterior with its true weight plus the other N - 1 points
            estimated from the M - 1 others); unbiased for q(z_i), exact when M = N.
      "mws", minibatch-weighted sampling (beta-TCVAE's Sec. 3 estimator): w_ij = 1 / (N M) for
            all j.
    """
    batch = z.shape[0]
    if batch < 2 or dataset_size < batch:
        raise ValueError(
            f"total correlation needs 2 <= batch size ({batch}) <= dataset size ({dataset_size})"
        )
    # log q(z_id | x_j) for every pair: (M, M, D), row i = sample, column j = posterior
    log_q_pairs = -0.5 * (
        math.log(2.0 * math.pi)
        + logvar.unsqueeze(0)
        + (z.unsqueeze(1) - mu.unsqueeze(0)).pow(2) * torch.exp(-logvar.unsqueeze(0))
    )
    # MSS by default (the paper names no estimator): MWS's weights sum to 1/N instead of 1, which
    # shifts the joint by -log N and the product of marginals by -D log N: on a factorised q(z)
    # (every posterior N(0, I)) MWS returns (D - 1) log N (341 nats at D = 32, N = 60000) where the
    # truth and MSS give 0.
    if estimator == "mss":
        log_w = torch.full(
            (batch, batch),
            math.log((dataset_size - 1) / (dataset_size * (batch - 1))),
            dtype=z.dtype,
            device=z.device,
        )
        log_w.fill_diagonal_(-math.log(dataset_size))
    elif estimator == "mws":
        log_w = torch.full(
            (batch, batch), -math.log(dataset_size * batch), dtype=z.dtype, device=z.device
        )
    else:
        raise ValueError(f"unknown total-correlation estimator {estimator!r}: use 'mss' or 'mws'")
    log_q_joint = torch.logsumexp(log_q_pairs.sum(dim=2) + log_w, dim=1)  # (M,)
    log_q_marginals = torch.logsumexp(log_q_pairs + log_w.unsqueeze(2), dim=1)  # (M, D)
    return (log_q_joint - log_q_marginals.sum(dim=1)).mean()


def vae_s_loss(rec_loss, kl, tc, *, beta_rec, beta_kl, beta_tc):
    """L_VAE of AVAE-S Eq. 11 (VAE-S): mean_i (beta_rec L_REC_i + beta_kl KL_i) + beta_tc TC,
    with L_REC of AVAE-S Eq. 5 (B,), KL of AVAE-S Eq. 4 (B,) and the batch's TC of AVAE-S Eq. 10
    (a scalar); the paper's weights are all 1."""
    return (beta_rec * rec_loss + beta_kl * kl).mean() + beta_tc * tc


def loss_dis(logits_real, logits_rec):
    """L_Dis, AVAE-S Eq. 11, as the binary cross-entropy the discriminator minimises, per sample
    (B,), Dis = sigmoid(logit):
        -[log Dis(x) + log(1 - Dis(x~))] = softplus(-l_real) + softplus(l_rec).
    AVAE-S Eq. 11 writes the log-likelihood that Dis maximises (AVAE-S Eq. 12); the descent step
    of AVAE-S Algorithm 1 needs its negative. Pass the reconstructions' logits detached so only
    the discriminator learns from it."""
    return F.softplus(-logits_real) + F.softplus(logits_rec)


def loss_adv(logits_rec, form="minimax"):
    """The VAE's adversarial term of AVAE-S Eq. 11-12, per sample (B,), added to L_VAE while the
    gate allows: "minimax" (default): log(1 - Dis(x~)) = -softplus(l_rec), the generator's side of
    AVAE-S Eq. 11-12 read literally
        (L_AVAE = L_VAE + L_Dis; the log Dis(x) part has no VAE gradient);
    "nonsaturating": -log Dis(x~) = softplus(-l_rec) (Goodfellow et al. 2014's recommended form)."""
    # DEVIATION: AVAE-S Algorithm 1 writes L_AVAE = L_VAE + log Dis(X~); minimised, that pushes
    # reconstructions towards "fake", the opposite of AVAE-S Eq. 12. Both forms here have the sign
    # of AVAE-S Eq. 12.
    if form == "minimax":
        return -F.softplus(logits_rec)
    if form == "nonsaturating":
        return F.softplus(-logits_rec)
    raise ValueError(f"unknown adversarial loss form {form!r}: use 'minimax' or 'nonsaturating'")


def discriminator_accuracy(logits_real, logits_rec):
    """Accuracy_Dis of AVAE-S Algorithm 1 on one batch: the fraction of the 2B images classified
    correctly (real: logit > 0, reconstruction: logit < 0; a logit of exactly 0 is wrong). A
    float (one host sync). Under torchrun the batch is the global one (an all_reduce of the
    counts), so every rank opens the same gates."""
    counts = torch.stack([(logits_real > 0).sum() + (logits_rec < 0).sum(),
                          torch.tensor(logits_real.numel() + logits_rec.numel(),
                                       device=logits_real.device)]).double()
    correct, total = (mean_over_ranks(counts) * world_size()).tolist()
    return correct / total


def adversarial_gates(accuracy, disc_train_below=0.7, adv_use_above=0.5):
    """AVAE-S Algorithm 1's gates from the discriminator's accuracy on this batch, both strict as
    written: -> (train_disc = accuracy < 0.7: the discriminator steps, use_adv = accuracy > 0.5:
    L_VAE gets the adversarial term)."""
    return accuracy < disc_train_below, accuracy > adv_use_above


def new_vae_s_state(dataset_size, probe_batches, device):
    """What the VAE-S loss carries through a run: the Gabor bank (float32 on the device), N for
    AVAE-S Eq. 10, and the lambda probe of AVAE-S Eq. 5 (sums of the unweighted terms' batch
    means, the batches seen, the frozen lambdas)."""
    return {
        "kernels": [k.to(device, torch.float32) for k in gabor_kernels()],
        "dataset_size": dataset_size,
        "probe_batches": probe_batches,
        "term_count": 0,
        "rec_weights": None,
        "term_sums": {
            name: torch.zeros((), dtype=torch.float64, device=device) for name in REC_TERMS
        },
    }


def probe_rec_weights(vae_s_state, terms):
    """AVAE-S Eq. 5's lambdas for this batch. During the first probe_batches batches the
    unweighted terms' batch means are summed (on the device, no sync) and the loss is the plain
    SSE (lambda_MSE = 1, the others 0); at the last probe batch balance_weights freezes the
    lambdas (one host sync, once) for the rest of the run."""
    if vae_s_state["rec_weights"] is not None:
        return vae_s_state["rec_weights"]
    for name, term in terms.items():
        # averaged over the torchrun ranks: every rank freezes the same lambdas
        vae_s_state["term_sums"][name] = (
            vae_s_state["term_sums"][name] + mean_over_ranks(term.detach().mean().double())
        )
    vae_s_state["term_count"] += 1
    if vae_s_state["term_count"] >= vae_s_state["probe_batches"]:
        count = vae_s_state["term_count"]
        try:
            vae_s_state["rec_weights"] = balance_weights(
                {name: (total / count).item() for name, total in vae_s_state["term_sums"].items()})
        except ValueError as error:
            raise TrainingDiverged(f"AVAE-S Eq. 5's lambdas after {count} probe batches: {error}")
    return {name: float(name == "mse") for name in REC_TERMS}


def vae_s_objective(encoder, decoder, x, vae_s_state, *, beta_rec, beta_kl, beta_tc, tc_estimator,
                    amp):
    """AVAE-S Eq. 11's L_VAE of x (vae_s_loss: AVAE-S Eq. 5's L_REC with the probed lambdas,
    AVAE-S Eq. 4's KL, AVAE-S Eq. 10's TC) -> (loss, rec (B, C, H, W), logged values)."""
    with amp():
        mu, logvar = encoder(x)  # (B, z)
        z = reparameterize(mu, logvar)
        rec = decoder(z)  # (B, C, H, W)
    kl_real = kl_divergence(mu, logvar)  # (B,)
    terms = reconstruction_terms(x, rec, vae_s_state["kernels"])  # 5 x (B,)
    rec_loss = loss_rec(terms, probe_rec_weights(vae_s_state, terms))  # (B,)
    tc = total_correlation(z, mu, logvar, vae_s_state["dataset_size"], tc_estimator)
    loss = vae_s_loss(rec_loss, kl_real, tc, beta_rec=beta_rec, beta_kl=beta_kl, beta_tc=beta_tc)
    return loss, rec, {"rec": rec_loss.mean(), "kl_real": kl_real.mean(), "tc": tc,
                       **{f"term_{name}": term.mean() for name, term in terms.items()}}


def vae_s_step(encoder, decoder, opt_encoder, opt_decoder, x, vae_s_state, *, beta_rec, beta_kl,
               beta_tc, tc_estimator, amp):
    """VAE-S (vae-s, and avae-s's pre-training: AVAE-S Algorithm 1's first loop): one step of both
    networks on AVAE-S Eq. 11's L_VAE."""
    set_requires_grad(encoder, True)
    set_requires_grad(decoder, True)
    loss, _, stats = vae_s_objective(encoder, decoder, x, vae_s_state, beta_rec=beta_rec,
                                     beta_kl=beta_kl, beta_tc=beta_tc, tc_estimator=tc_estimator,
                                     amp=amp)
    optimizer_step(loss, opt_encoder, opt_decoder)
    return detached({"loss": loss, **stats})


def interleave(real, rec):
    """(B, ...) x 2 -> (2B, ...) in the order real_0, rec_0, real_1, rec_1, ...: the
    discriminator's batch [x, x~] of AVAE-S Algorithm 1, arranged so that any split along dim 0
    into chunks of even size (nn.DataParallel's per-GPU chunks) gives each BatchNorm both classes
    in equal numbers. On one device BatchNorm's statistics do not depend on the order."""
    return torch.stack([real, rec], dim=1).flatten(0, 1)


def split_pairs(logits):
    """interleave's inverse for the logits (2B,) -> (real (B,), rec (B,))."""
    return logits[0::2], logits[1::2]


def adversarial_step(encoder, decoder, disc, opt_encoder, opt_decoder, opt_disc, x, objective, *,
                     beta_adv, adv_loss, disc_train_below, adv_use_above, amp):
    """AVAE / AVAE-S fine-tuning, AVAE-S Algorithm 1's second loop. objective(encoder, decoder, x)
    -> (L_VAE, rec, logged values): vae_objective (avae) or vae_s_objective (avae-s). The
    discriminator's accuracy on (x, rec) gates its own step (< disc_train_below) and the VAE's
    adversarial term (> adv_use_above)."""
    set_requires_grad(encoder, True)
    set_requires_grad(decoder, True)
    set_requires_grad(disc, True)
    loss, rec, stats = objective(encoder, decoder, x)
    with amp():
        # one forward, BatchNorm sees both classes; interleaved so that every contiguous chunk
        # nn.DataParallel scatters holds as many real images as reconstructions
        logits_real, logits_rec = split_pairs(disc(interleave(x, rec.detach())))  # (B,) each
    accuracy = discriminator_accuracy(logits_real, logits_rec)  # a host sync: the gates need it
    train_disc, use_adv = adversarial_gates(accuracy, disc_train_below, adv_use_above)
    dis_loss = loss_dis(logits_real, logits_rec).mean()
    adv_term = loss_adv(logits_rec.detach(), adv_loss).mean()  # logged: the term at the gate check
    if train_disc:
        optimizer_step(dis_loss, opt_disc)
    if use_adv:
        set_requires_grad(disc, False)
        with amp():
            _, logits_rec_vae = split_pairs(disc(interleave(x, rec)))  # the updated discriminator
        loss = loss + beta_adv * loss_adv(logits_rec_vae, adv_loss).mean()
    # DEVIATION: AVAE-S Algorithm 1 skips the VAE update while accuracy <= 0.5; here the VAE keeps
    # training on L_VAE alone then, so the reconstruction never stalls while the discriminator
    # catches up.
    optimizer_step(loss, opt_encoder, opt_decoder)
    set_requires_grad(disc, True)
    gates = {"disc_acc": accuracy, "train_disc": float(train_disc), "use_adv": float(use_adv)}
    return {**detached({"loss": loss, **stats, "loss_dis": dis_loss}), "loss_adv": adv_term,
            **{name: torch.tensor(value) for name, value in gates.items()}}


# --------------------------------------------------------------------------------------------------
# APPENDIX: WGAN-GP (Gulrajani, Ahmed, Arjovsky, Dumoulin, Courville, "Improved Training of
# Wasserstein GANs", NeurIPS 2017), Table 2's third column, built from the same parts: the decoder
# is the generator, the critic is the encoder's trunk with a scalar head.
# --------------------------------------------------------------------------------------------------
class Critic(nn.Module):
    """D(x) of WGAN-GP: the encoder's convolutional trunk and a linear head to one value, with NO
    normalisation layer. The gradient penalty is taken per sample, and BatchNorm would make each
    sample's critic value depend on the rest of its batch (Gulrajani et al. Sec. 4: no batch
    normalisation in the critic; they suggest layer normalisation, none is the simpler choice).
    (B, C, H, W) -> (B,) in float32."""

    def __init__(self, image_channels, channels, image_size):
        super().__init__()
        self.conv = encoder_convs(image_channels, channels, nn.AvgPool2d, norm=nn.Identity)
        side = image_size // 2 ** len(channels)
        self.fc = nn.Linear(channels[-1] * side * side, 1)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1)).float().view(-1)


def interpolate(x_real, x_fake, eps):
    """Algorithm 1, line 6: x_hat = eps x + (1 - eps) x_fake, one eps ~ U[0, 1] per sample.
    x_real, x_fake (B, C, H, W); eps (B, 1, 1, 1)."""
    return eps * x_real + (1 - eps) * x_fake


def wgan_critic_loss(d_real, d_fake, grad_x_hat, *, lambda_gp):
    """Algorithm 1, line 7, averaged over the batch:
    L = mean_i [D(x_fake_i) - D(x_i) + lambda (||grad_{x_hat} D(x_hat_i)||_2 - 1)^2].
    d_real, d_fake (B,); grad_x_hat (B, C, H, W). -> (L, the penalty term's mean)."""
    penalty = lambda_gp * (grad_x_hat.flatten(1).norm(dim=1) - 1) ** 2  # (B,)
    return (d_fake - d_real + penalty).mean(), penalty.mean()


def wgan_generator_loss(d_fake):
    """Algorithm 1, line 11: L_G = -mean_i D(G(z_i)). d_fake (B,)."""
    return -d_fake.mean()


def wgan_critic_step(critic, generator, opt_critic, x, z, eps, *, lambda_gp, amp):
    """One critic update (the generator frozen) on the real batch x, the prior draw z (B, z_dim)
    and eps (B, 1, 1, 1). The penalty's gradient is taken with create_graph=True, so the critic's
    update differentiates through it. -> logged values."""
    set_requires_grad(critic, True)
    set_requires_grad(generator, False)
    with torch.no_grad(), amp():
        fake = generator(z)  # (B, C, H, W)
    x_hat = interpolate(x, fake, eps).requires_grad_(True)
    with amp():
        d_real, d_fake, d_hat = critic(x), critic(fake), critic(x_hat)  # (B,) each
    grad_x_hat, = torch.autograd.grad(d_hat.sum(), x_hat, create_graph=True)
    loss, penalty = wgan_critic_loss(d_real, d_fake, grad_x_hat, lambda_gp=lambda_gp)
    optimizer_step(loss, opt_critic)
    return detached({"loss_c": loss, "gp": penalty,
                     "wasserstein": d_real.mean() - d_fake.mean()})


def wgan_generator_step(critic, generator, opt_generator, z, *, amp):
    """One generator update (the critic frozen) on a new prior draw z (B, z_dim)."""
    set_requires_grad(critic, False)
    set_requires_grad(generator, True)
    with amp():
        loss = wgan_generator_loss(critic(generator(z)))
    optimizer_step(loss, opt_generator)
    return {"loss_g": loss.detach()}


def wgan_gp_step(nets, opts, x, cfg, step, amp):
    """Iteration `step` (from 0) of WGAN-GP: a critic step on the batch x; after every n_critic
    of them, a generator step (Algorithm 1's outer loop). Noise is drawn in this order: the
    critic's z, its eps, then the generator's z."""
    z = torch.randn(x.shape[0], cfg.z_dim, device=x.device)
    eps = torch.rand(x.shape[0], 1, 1, 1, device=x.device)  # one per sample
    stats = wgan_critic_step(nets["critic"], nets["decoder"], opts["critic"], x, z, eps,
                             lambda_gp=cfg.lambda_gp, amp=amp)
    if generator_turn(step, cfg):
        z_g = torch.randn(x.shape[0], cfg.z_dim, device=x.device)
        stats.update(wgan_generator_step(nets["critic"], nets["decoder"], opts["decoder"], z_g,
                                         amp=amp))
    return stats


def generator_turn(step, cfg):
    """Whether iteration `step` (from 0) ends with a generator update: always, but for wgan-gp
    only after every n_critic-th critic step. The decoder's EMA moves only then."""
    return cfg.model != "wgan-gp" or (step + 1) % cfg.n_critic == 0


# --------------------------------------------------------------------------------------------------
# APPENDIX: devices, nn.DataParallel and torchrun (one process per GPU or CPU process, gradients
# averaged by hand)
# Several forwards through one network before one backward (every step here) is what DDP's
# wrapper cannot take with BatchNorm (its buffer broadcast before each forward is an in-place
# write on a tensor autograd still needs). So no DDP wrapper: the ranks start from rank 0's
# weights, each computes its own gradients on its share of the batch, and each optimiser
# averages them over the ranks (one all_reduce) before it steps, so the weights stay identical.
# --------------------------------------------------------------------------------------------------
def uses_bf16(bf16, device):
    """--bf16 auto | true | false on this device -> whether the networks run in bf16. A
    checkpoint's config from before the flag took words holds True (= auto) or False."""
    bf16 = {True: "auto", False: "false"}.get(bf16, bf16)
    return bf16 == "true" or (bf16 == "auto" and device.type == "cuda")


def setup_device(name, bf16, ranks=None):
    """-> (device, amp), amp() a bf16 autocast context on the device when uses_bf16 (else a
    no-op); under torchrun the rank's GPU, cuda:LOCAL_RANK."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is visible")
    device = torch.device(
        "cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    )
    if device.type == "cuda" and ranks is not None and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp = functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16,
                            enabled=uses_bf16(bf16, device))
    return device, amp


def describe_device(device):
    if device.type == "cuda":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


# Several forwards through one network before one backward (every step here) is what DDP's
# wrapper cannot take with BatchNorm (its buffer broadcast before each forward is an in-place
# write on a tensor autograd still needs). So no DDP wrapper: the ranks start from rank 0's
# weights, each computes its own gradients on its share of the batch, and each optimiser
# averages them over the ranks (one all_reduce) before it steps, so the weights stay identical.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Ranks:
    """Where this process stands among torchrun's processes; Ranks() is a plain run."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_writer(self):  # only rank 0 writes logs, grids, checkpoints and results
        return self.rank == 0


def ranks_from_environment(environ, batch_size):
    """torchrun's variables -> Ranks, checked before any process group is made: none of them is
    a plain run; some but not all, or a world size that does not divide the global batch, is a
    ConfigError (one line)."""
    present = [name for name in TORCHRUN_VARIABLES if name in environ]
    if not present:
        return Ranks()
    missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
    if missing:
        raise ConfigError(
            f"{', '.join(present)} set but not {', '.join(missing)}: launch with torchrun "
            "(e.g. torchrun --standalone --nproc_per_node=2 as_introvae.py ...) or unset them"
        )
    try:
        ranks = Ranks(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                      int(environ["LOCAL_RANK"]))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers")
    if batch_size % ranks.world:
        raise ConfigError(
            f"--batch-size {batch_size} is the global batch and the {ranks.world} ranks do not "
            f"divide it: use a multiple of {ranks.world}"
        )
    return ranks


def start_process_group(ranks, device_name):
    """Join torchrun's process group (nccl on CUDA, gloo on the CPU); CUDA: this rank's GPU.
    A stuck rank fails after 10 minutes instead of hanging."""
    if ranks.world == 1:
        return
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=ranks.rank,
                            world_size=ranks.world, timeout=datetime.timedelta(minutes=10))


def world_size():
    """The number of torchrun ranks (1 in a plain run), from torch's process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_ranks(value):
    """value (a float tensor) averaged over the ranks, on every rank (itself in a plain run)."""
    if world_size() == 1:
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total / world_size()


class GatherOverRanks(torch.autograd.Function):
    """(B_r, D) on rank r -> (sum_r B_r, D), the ranks' rows in rank order (the B_r may differ
    by one at the end of an epoch: padded to the largest for all_gather, then cut). Backward:
    every rank's loss depends on every row, so the gradient of a row is the sum over the ranks'
    gradients (all_reduce), of which each rank keeps its own rows."""

    @staticmethod
    def forward(ctx, batch):
        world = dist.get_world_size()
        size = torch.tensor([batch.shape[0]], device=batch.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(n) for n in sizes]
        padded = batch.new_zeros((max(sizes), *batch.shape[1:]))
        padded[:batch.shape[0]] = batch
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def gather_over_ranks(batch):
    """(B, ...) on each rank -> (all ranks' B, ...), rank order, differentiable; the batch
    itself in a plain run."""
    if world_size() == 1:
        return batch
    return GatherOverRanks.apply(batch)


def average_gradients_before_step(optimizer, world):
    """optimizer.step() first replaces every gradient of its parameters by the mean of that
    gradient over the ranks (one all_reduce of all of them flattened): the gradient of the mean
    of the ranks' losses, i.e. of the global batch's loss when each rank's loss is a batch mean."""

    def average(opt, args, kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(averaged.view_as(grad))

    optimizer.register_step_pre_hook(average)


@torch.no_grad()
def average_buffers_over_ranks(modules):
    """BatchNorm's running averages (float buffers) averaged over the ranks, one all_reduce:
    each rank's own batches update them, so without this they drift apart. Training forwards
    use batch statistics and never read them; --bn-mode eval, the EMA copy and the checkpoint
    do, and they must not depend on which rank they come from."""
    if world_size() == 1:
        return
    buffers = [b for module in modules for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat)
    flat.div_(world_size())
    for buffer, averaged in zip(buffers, flat.split([b.numel() for b in buffers])):
        buffer.copy_(averaged.view_as(buffer))


def rank_share(global_batch, ranks):
    """This rank's contiguous part of a global batch (np.array_split: the sizes differ by at most
    one when the last batch of an epoch does not divide)."""
    return np.array_split(global_batch, ranks.world)[ranks.rank]


def unwrap(module):
    return module.module if isinstance(module, nn.DataParallel) else module


def replicas(module):
    """How many nn.DataParallel replicas run module's forward (1 when it is not wrapped)."""
    return len(module.device_ids) if isinstance(module, nn.DataParallel) else 1


def batchnorm_batch(cfg, ranks, decoder):
    """Images one BatchNorm layer normalises over in a training forward (and so in a train-mode
    sampling forward): the rank's batch (the global one with --sync-bn under torchrun), in
    nn.DataParallel's per-GPU chunks when decoder is wrapped."""
    if ranks.world > 1 and cfg.sync_bn:
        return cfg.batch_size
    return bn_batch_size(cfg.batch_size // ranks.world, replicas(decoder))


def bn_batch_size(batch_size, replica_count):
    """Images one BatchNorm layer normalises over in a training forward of batch_size images:
    nn.DataParallel scatters the batch along dim 0 in chunks of ceil(B / replicas) (the last
    may be smaller), each replica with its own batch statistics; replica 0's running averages
    are the ones kept. Under torchrun, batch_size is already the rank's batch."""
    return math.ceil(batch_size / replica_count)


def check_rank_batches(cfg, train_images, ranks):
    """Under torchrun every rank needs images in every batch, two for the AVAE-S models (Eq. 10's
    estimator, Table I's BatchNorm1d): the last batch of an epoch is split too."""
    if ranks.world == 1:
        return
    last = train_images % cfg.batch_size or cfg.batch_size
    need = 2 if cfg.model in SHARP_MODELS or cfg.arch == "avae" else 1
    if last // ranks.world < need:
        raise ConfigError(
            f"the last batch of an epoch ({last} images) leaves a rank fewer than {need} at "
            f"{ranks.world} ranks: change --batch-size"
        )


def plain_copies(nets, cfg, image_channels, device):
    """The networks with their weights and buffers but ordinary BatchNorm, no wrapper, no
    gradient averaging: what a rank evaluates on its own (SyncBatchNorm would wait for ranks
    that run a different number of forwards)."""
    copies = {**trained_networks(cfg, image_channels), "ema": nets["ema"]}
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for name, net in copies.items():
        if name != "ema":
            net.load_state_dict(unwrap(nets[name]).state_dict())
            net.to(device, memory_format=memory_format).train(unwrap(nets[name]).training)
    return copies


# --------------------------------------------------------------------------------------------------
# APPENDIX: state and checkpoints: the networks and optimisers, RNG states, opening a run
# --------------------------------------------------------------------------------------------------
def trained_networks(cfg, image_channels):
    """The networks a model trains, newly initialised: {encoder, decoder}; avae / avae-s add the
    discriminator (disc); wgan-gp trains the decoder as its generator and a critic."""
    encoder, decoder = build_networks(
        image_channels, cfg.channels, cfg.image_size, cfg.z_dim, cfg.arch
    )
    if cfg.model == "wgan-gp":
        return {"decoder": decoder,
                "critic": Critic(image_channels, cfg.channels, cfg.image_size)}
    trained = {"encoder": encoder, "decoder": decoder}
    if cfg.model in ADVERSARIAL_MODELS:
        trained["disc"] = build_discriminator(
            image_channels, cfg.channels, cfg.image_size, cfg.arch
        )
    return trained


def make_state(cfg, image_channels, device, ranks=None):
    """-> (nets {encoder, decoder, ema[, disc]}, opts {encoder, decoder[, disc]}): avae / avae-s
    add the discriminator and its Adam (the same lr and betas); the trained networks in
    nn.DataParallel on >1 GPU. Under torchrun (ranks.world > 1) no wrapper: rank 0's weights
    on every rank, SyncBatchNorm with cfg.sync_bn, optimisers that average the gradients."""
    ranks = ranks or Ranks()
    trained = trained_networks(cfg, image_channels)
    ema = copy.deepcopy(trained["decoder"]).requires_grad_(False)  # plain BatchNorm: samples alone
    if ranks.world > 1 and cfg.sync_bn:
        trained = {name: nn.SyncBatchNorm.convert_sync_batchnorm(net)
                   for name, net in trained.items()}
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for net in (*trained.values(), ema):
        net.to(device, memory_format=memory_format)
        if cfg.compile:
            net.compile()  # nn.Module.compile: the same module and state_dict, a compiled forward
    opts = {
        name: torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                               fused=device.type == "cuda")
        for name, net in trained.items()
    }
    if ranks.world > 1:
        with torch.no_grad():
            for net in (*trained.values(), ema):
                for tensor in (*net.parameters(), *net.buffers()):
                    source = tensor.contiguous()  # a copy of a channels_last weight
                    dist.broadcast(source, src=0)
                    tensor.copy_(source)
        for optimizer in opts.values():
            average_gradients_before_step(optimizer, ranks.world)
    elif device.type == "cuda" and torch.cuda.device_count() > 1:
        trained = {name: nn.DataParallel(net) for name, net in trained.items()}
    return {**trained, "ema": ema}, opts


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG the run could touch, as tensors / ints (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def avae_s_record(cfg, epoch, vae_s_state):
    """The AVAE-S part of a checkpoint (or None): the phase the run continues in, and the lambda
    probe of AVAE-S Eq. 5 (sums, count, frozen lambdas), so a resumed run neither probes again nor
    loses a probe in progress."""
    if cfg.model not in SHARP_MODELS + ADVERSARIAL_MODELS:
        return None
    record = {"phase": phase_name(cfg, epoch)}
    if vae_s_state is not None:
        record.update(
            probe_batches=vae_s_state["probe_batches"],
            term_count=vae_s_state["term_count"],
            rec_weights=vae_s_state["rec_weights"],
            term_sums={name: total.cpu() for name, total in vae_s_state["term_sums"].items()},
        )
    return record


def phase_name(cfg, epoch):
    if cfg.model not in ADVERSARIAL_MODELS:
        return cfg.model
    return "pretrain" if epoch < cfg.pretrain_epochs else "adversarial"


def restore_vae_s_state(vae_s_state, record, path):
    """Put a checkpoint's lambda probe back into vae_s_state (on the state's device)."""
    if not record or "term_sums" not in record:
        raise CheckpointError(
            f"checkpoint {path} has no AVAE-S lambda probe (avae_s): not a vae-s / avae-s run"
        )
    device = vae_s_state["term_sums"]["mse"].device
    vae_s_state.update(
        term_count=record["term_count"],
        rec_weights=record["rec_weights"],
        term_sums={name: total.to(device) for name, total in record["term_sums"].items()},
    )


def write_json(path, value):
    atomic_write(path, lambda handle: json.dump(value, handle, indent=2), binary=False)


def rng_states_of_all_ranks(ranks):
    """Every rank's rng_state(), in rank order (a collective: all ranks call it); None in a
    plain run. A checkpoint keeps them all, so each rank resumes its own noise."""
    if ranks.world == 1:
        return None
    states = [None] * ranks.world
    dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(path, nets, opts, step, epoch, total_iters, cfg, avae_s=None,
                    rng_by_rank=None):
    """checkpoint.pt, written atomically; avae_s: avae_s_record(...) for the AVAE-S models;
    rng_by_rank: rng_states_of_all_ranks(...) of a torchrun run (its length: the world size)."""
    state = {
        "step": step,
        "epoch": epoch,
        "total_iters": total_iters,
        "config": dataclasses.asdict(cfg),
        "rng": rng_state(),
        "nets": {name: unwrap(net).state_dict() for name, net in nets.items()},
        "opts": {name: o.state_dict() for name, o in opts.items()},
    }
    if avae_s is not None:
        state["avae_s"] = avae_s
    if rng_by_rank is not None:
        state["rng_by_rank"] = rng_by_rank
    atomic_write(path, functools.partial(torch.save, state))


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(error).__name__}): corrupt or not a "
            "checkpoint; delete it to start the run over, or pass another --out"
        )
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
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
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
            raise CheckpointError(
                f"checkpoint {path} was made with --{f.name.replace('_', '-')} "
                f"{getattr(saved, f.name)}, this command has {getattr(cfg, f.name)}: "
                f"use the same flags or another --out"
            )


@dataclass
class Run:
    """What a training run holds besides the config: where it writes, the data, the networks and
    optimisers, the VAE-S state, and the step it starts from."""
    out_dir: str
    ckpt_path: str
    device: torch.device
    amp: object  # amp() -> a bf16 autocast context (uses_bf16), else a no-op
    train_set: object
    test_set: object
    split: str  # the name of the evaluation split
    stop: int  # the last step this command trains: T, or --max-iters
    nets: dict
    opts: dict
    vae_s_state: object
    step: int
    resumed: bool
    ranks: Ranks  # torchrun's rank and world size; Ranks() in a plain run


def open_run(cfg):
    """The run of cfg's folder: a new one (start_run), or the one whose checkpoint.pt is there
    (resume_run: same flags, same RNG state). Under torchrun every rank joins the process group
    here, reads the checkpoint, and builds the same networks; only rank 0 prints and writes."""
    ranks = ranks_from_environment(os.environ, cfg.batch_size)
    say = print if ranks.is_writer else (lambda *args, **kwargs: None)
    out_dir = cfg.out or os.path.join("runs", run_name(cfg))
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    state = load_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else None
    if state is not None:
        check_resumable(state, cfg, ckpt_path, ranks, say)
    start_process_group(ranks, cfg.device)
    device, amp = setup_device(cfg.device, cfg.bf16, ranks)
    if cfg.sync_bn and ranks.world > 1 and device.type != "cuda":
        raise ConfigError("--sync-bn true needs CUDA: torch's SyncBatchNorm runs on GPUs only")
    train_set, test_set, split = load_data(cfg)
    if isinstance(train_set, ImageArray):
        train_set.images = train_set.images.to(device)
    iters_per_epoch, total_iters = annealing_length(len(train_set), cfg)
    stop = min(total_iters, cfg.max_iters) if cfg.max_iters else total_iters
    check_batch_sizes(cfg, len(train_set), min(cfg.eval_images or len(test_set), len(test_set)),
                      min(cfg.recon_images, len(test_set)) if cfg.recon_every else 0)
    check_rank_batches(cfg, len(train_set), ranks)
    seed_everything(cfg.seed)
    nets, opts = make_state(cfg, train_set.shape[0], device, ranks)
    if ranks.rank > 0:  # each rank its own noise; rank 0 draws what a plain run draws
        seed_everything(int(np.random.SeedSequence([cfg.seed, ranks.rank]).generate_state(1)[0]))
    vae_s_state = None
    if cfg.model in SHARP_MODELS:
        probe = cfg.lambda_batches or iters_per_epoch
        vae_s_state = new_vae_s_state(len(train_set), probe, device)
    if state is None:
        step = 0
        say(start_run_line(cfg, out_dir, train_set, iters_per_epoch, total_iters, stop, device,
                           ranks), flush=True)
    else:
        step = resume_run(state, nets, opts, vae_s_state, ckpt_path, ranks)
    say(effective_config(cfg, device), flush=True)
    derived = {"image_shape": train_set.shape, "s": elbo_scale(train_set.shape),
               "train_images": len(train_set), "eval_split": split,
               "iters_per_epoch": iters_per_epoch, "total_iters": total_iters,
               "device": describe_device(device), "torch": torch.__version__,
               "world_size": ranks.world, "batch_size_per_rank": cfg.batch_size // ranks.world,
               "batch_size_is": "global: all ranks together; each rank batch_size / world_size",
               "batchnorm_batch": batchnorm_batch(cfg, ranks, nets["decoder"]),
               "as_distance_over": ("all ranks' batch" if cfg.as_gather or ranks.world == 1
                                    else "each rank's batch")}
    if ranks.is_writer:
        os.makedirs(out_dir, exist_ok=True)
        write_json(
            os.path.join(out_dir, "config.json"), {**dataclasses.asdict(cfg), "derived": derived}
        )
    return Run(out_dir, ckpt_path, device, amp, train_set, test_set, split, stop, nets, opts,
               vae_s_state, step, resumed=state is not None, ranks=ranks)


def start_run_line(cfg, out_dir, train_set, iters_per_epoch, total_iters, stop, device, ranks):
    """The first line of a new run: model, data, T, where it stops, the device."""
    detail = {
        "asintrovae": f" ({cfg.variant})",
        "avae": f" ({cfg.pretrain_epochs} pretrain + {cfg.adv_epochs} adversarial epochs)",
    }
    detail["avae-s"] = detail["avae"]
    return (f"new run {out_dir}: {cfg.model}{detail.get(cfg.model, '')}"
            f"{' on AVAE-S Table I nets' if cfg.arch == 'avae' else ''} on {cfg.dataset} "
            f"{'x'.join(map(str, train_set.shape))}, {len(train_set)} images, {iters_per_epoch} "
            f"iterations/epoch, T = {total_iters}, stop at {stop}, {describe_device(device)}"
            + (f", {ranks.world} torchrun ranks of {cfg.batch_size // ranks.world} images"
               if ranks.world > 1 else ""))


def check_resumable(state, cfg, ckpt_path, ranks, say):
    """The checkpoint fits this command (the same training flags, the same number of processes);
    says where the run resumes."""
    check_same_run(config_from_checkpoint(state, ckpt_path), cfg, ckpt_path)
    saved_world = len(state.get("rng_by_rank") or [None])
    if saved_world != ranks.world:
        raise CheckpointError(
            f"checkpoint {ckpt_path} was made by {saved_world} process(es), this launch has "
            f"{ranks.world}: resume with the same torchrun --nproc_per_node x --nnodes"
        )
    c_now = annealing_coefficient(state["step"], state["total_iters"], annealing_schedule(cfg))
    say(f"resuming from {ckpt_path} at step {state['step']} of {state['total_iters']}"
        + (f" (c = {c_now:.6f})" if cfg.model == "asintrovae" else "")
        + (f" (phase {phase_name(cfg, state['epoch'])})"
           if cfg.model in ADVERSARIAL_MODELS else ""), flush=True)


def resume_run(state, nets, opts, vae_s_state, ckpt_path, ranks):
    """The checkpoint's networks, optimisers, VAE-S state and this rank's RNG state, in place;
    -> the step to go on from."""
    restore(state, nets, opts, ckpt_path)
    if vae_s_state is not None:
        restore_vae_s_state(vae_s_state, state.get("avae_s"), ckpt_path)
    set_rng_state(state["rng_by_rank"][ranks.rank] if ranks.world > 1 else state["rng"])
    return state["step"]


def effective_config(cfg, device):
    """The flags that decide what is trained, after the presets, as they would be typed, and the
    precision the networks run in; wrapped to 100 columns."""
    flags = " ".join(f"--{f.name.replace('_', '-')} {shown(getattr(cfg, f.name))}"
                      for f in dataclasses.fields(Config) if f.name not in RUN_FLAGS)
    precision = "bf16" if uses_bf16(cfg.bf16, device) else "fp32"
    return textwrap.fill(f"config: {flags} ({precision})", 100, subsequent_indent="  ",
                         break_on_hyphens=False)


# --------------------------------------------------------------------------------------------------
# APPENDIX: logs and pictures: log.jsonl, the progress line, curves.png, image grids, NaN watch
# --------------------------------------------------------------------------------------------------
def save_grid(rows, path, nrow):
    """Stack image batches (each (n, C, H, W) in [0, 1]) into one PNG, nrow images per line."""
    torchvision.utils.save_image(
        torch.cat([r.float().cpu().clamp(0, 1) for r in rows]), path, nrow=nrow, padding=2
    )


@contextlib.contextmanager
def batchnorm_mode(modules, mode):
    """BatchNorm on batch statistics ("train", as in every training forward) or on the running
    averages ("eval") for the duration; the modules' flags and running averages are restored
    afterwards."""
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
    """Rows: 16 real training images / their reconstructions (z = mu; none for wgan-gp, which has
    no encoder) / 16 EMA-decoder samples; the whole fixed batch goes through the networks so that
    batch statistics are those of a training batch. path None: the forwards only (torchrun ranks
    other than 0)."""
    decoder, ema = unwrap(nets["decoder"]), unwrap(nets["ema"])
    encoder = unwrap(nets["encoder"]) if "encoder" in nets else None
    with batchnorm_mode([m for m in (encoder, decoder, ema) if m is not None], bn_mode), amp():
        rows = [real[:16]] + ([decoder(encoder(real)[0])[:16]] if encoder is not None else [])
        rows.append(ema(noise)[:16])
    if path is not None:
        save_grid(rows, path, nrow=16)


def plot_curves(records, path, keys):
    """Small multiples of logged values against the step, one panel per key (Pillow only).
    A positive series spanning more than two decades is drawn on a log10 axis."""
    keys = [k for k in keys if any(r.get(k) is not None for r in records)]
    cols, width, height = 3, 380, 210
    image = Image.new("RGB", (cols * width, max(1, math.ceil(len(keys) / cols)) * height), "white")
    draw = ImageDraw.Draw(image)
    for i, key in enumerate(keys):
        points = [
            (r["step"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])
        ]
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
        xy = [
            (
                left + (st - first) / span * (right - left),
                bottom - (y - lo) / (hi - lo) * (bottom - top),
            )
            for st, y in zip(steps, ys)
        ]
        draw.text(
            (left, y0 + 6),
            f"{key}{' (log10)' if log_axis else ''}  last {values[-1]:.4g}",
            fill="black",
        )
        draw.text((x0 + 4, top), f"{hi:.3g}", fill="black")
        draw.text((x0 + 4, bottom - 10), f"{lo:.3g}", fill="black")
        draw.text((left, bottom + 6), f"step {first}", fill="black")
        draw.text((right - 70, bottom + 6), f"{last}", fill="black")
        if len(xy) > 1:
            draw.line(xy, fill=(200, 30, 30), width=2)
        else:
            draw.ellipse(
                (xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=(200, 30, 30)
            )
    image.save(path)


CURVE_KEYS = ("eval_psnr", "eval_ssim", "eval_mse",
              "loss_e", "loss_d", "loss", "rec", "kl_real", "kl_rec", "kl_fake", "kl_diff",
              "exp_elbo_rec", "exp_elbo_fake", "as_dist", "c", "tc",
              *(f"term_{name}" for name in REC_TERMS), "loss_dis", "loss_adv", "disc_acc",
              "train_disc", "use_adv", "loss_c", "loss_g", "wasserstein", "gp")


def read_log(path, max_step):
    """log.jsonl records up to max_step: a resumed run drops those logged after its checkpoint."""
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r for r in records if r["step"] <= max_step]


class FiniteWatch:
    """The first step with a non-finite loss, watched on the device: add() records it without a
    host sync (one sync per iteration would stall the GPU's queue), raise_if_diverged() reads it
    back, at each log record, before each checkpoint and at the end, so a checkpoint never holds
    diverged weights and the error still names the exact first bad step."""

    NONE = 2 ** 62  # "no bad step yet": larger than any step, so the minimum over ranks works

    def __init__(self, device):
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)
        # names of the logged losses -> ((number of losses,) at the first bad step, 0-d bool:
        # these were the losses of that step); one entry per set of names a model logs
        self.losses_then = {}

    def add(self, stats, step):
        """stats: train_step's dict of the 0-d values of step `step` (counted from 1); the losses
        it holds may differ from step to step (wgan-gp's generator loss)."""
        names = [name for name in stats if name.startswith("loss")]
        losses = torch.stack([stats[name].float() for name in names])  # (number of losses,)
        first_here = (self.first_bad == self.NONE) & ~torch.isfinite(losses).all()
        self.first_bad = torch.where(first_here, step, self.first_bad)
        key = tuple(names)
        if key not in self.losses_then:
            self.losses_then[key] = (torch.zeros_like(losses), torch.zeros_like(first_here))
        then, logged = self.losses_then[key]
        self.losses_then[key] = (torch.where(first_here, losses, then), first_here | logged)

    def raise_if_diverged(self, ckpt_path):
        """TrainingDiverged naming the first bad step, its losses and the last good checkpoint;
        under torchrun the first over all ranks, raised on every rank together."""
        first_bad = self.first_bad.clone()
        if world_size() > 1:
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        first_bad = int(first_bad)  # the host sync
        if first_bad == self.NONE:
            return
        last = load_checkpoint(ckpt_path)["step"] if os.path.exists(ckpt_path) else None
        values = ", ".join(f"{name} {value:.4g}"
                           for names, (then, logged) in self.losses_then.items() if logged
                           for name, value in zip(names, then.tolist()))
        where = (f"last good checkpoint: {ckpt_path} (step {last})" if last is not None
                 else "no checkpoint yet")
        raise TrainingDiverged(f"non-finite loss at step {first_bad} ({values}); {where}")


class TrainingLog:
    """Averages the logged values over each log_every interval into log.jsonl, the progress line
    and curves.png; a resumed run keeps the records up to its checkpoint's step. Under torchrun
    the averages are over the ranks too (one all_reduce per record) and only rank 0 writes."""

    PROGRESS_KEYS = ("loss_e", "loss_d", "loss", "rec", "kl_real", "kl_fake", "kl_rec",
                     "exp_elbo_fake", "as_dist", "c", "tc", "loss_dis", "loss_adv", "disc_acc",
                     "loss_c", "loss_g", "wasserstein", "gp")

    def __init__(self, cfg, out_dir, step, stop, writer=True):
        self.cfg, self.out_dir, self.stop, self.writer = cfg, out_dir, stop, writer
        self.path = os.path.join(out_dir, "log.jsonl")
        self.records = read_log(self.path, step)
        lines = [json.dumps(record) + "\n" for record in self.records]
        if writer:
            atomic_write(self.path, lambda handle: handle.writelines(lines), binary=False)
        # one line rewritten in a terminal, a line per record in a file
        self.end = "\r" if sys.stdout.isatty() else "\n"
        self.lambdas_shown = False
        self.reset()

    def reset(self):
        self.sums, self.counts, self.steps, self.images = {}, {}, 0, 0
        self.tick = time.perf_counter()

    def add(self, step, epoch, stats, c, images, vae_s_state=None):
        self.steps += 1
        self.images += images
        for key, value in stats.items():  # counted per key: an interval may span two phases
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        if (
            vae_s_state is not None
            and vae_s_state["rec_weights"] is not None
            and not self.lambdas_shown
            and self.writer
        ):
            weights = " ".join(
                f"{name} {value:.4g}" for name, value in vae_s_state["rec_weights"].items()
            )
            print(f"AVAE-S Eq. 5 lambdas, frozen after {vae_s_state['term_count']} probe batches: "
                  f"{weights}", flush=True)
            self.lambdas_shown = True
        if step % self.cfg.log_every and step != self.stop:
            return
        now = time.perf_counter()
        rate = self.images / (now - self.tick)
        keys = list(self.sums)  # the same keys, in the same order, on every rank
        device = next(v.device for v in self.sums.values())
        means = mean_over_ranks(torch.stack([
            (self.sums[key] / self.counts[key]).to(device, torch.float64) for key in keys]))
        record = {"step": step, "epoch": epoch + 1,
                  **{key: value for key, value in zip(keys, means.tolist())}}
        if not self.writer:
            self.reset()
            return
        if self.cfg.model == "asintrovae":
            record["c"] = c
        record["img_per_s"] = rate
        self.records.append(record)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        eta = (self.stop - step) * (now - self.tick) / self.steps
        shown = " ".join(f"{key} {record[key]:.4g}" for key in self.PROGRESS_KEYS if key in record)
        print(f"epoch {epoch + 1}/{self.cfg.epochs} step {step}/{self.stop} | {rate:.0f} img/s | "
              f"ETA {format_seconds(eta)} | {shown}", end=self.end, flush=True)
        plot_curves(self.records, os.path.join(self.out_dir, "curves.png"), CURVE_KEYS)
        self.reset()

    def add_record(self, step, values):
        """A record of its own at `step` (the reconstruction record) into log.jsonl and curves.png,
        on its own progress line."""
        if not self.writer:
            return
        record = {"step": step, **values}
        self.records.append(record)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        shown = " ".join(f"{key[5:]} {value:.4g}" for key, value in values.items()
                         if key != "eval_images")
        # its own line, also in a terminal, where the progress line is rewritten in place
        print(f"{chr(10) if self.end == chr(13) else ''}step {step} reconstruction of "
              f"{values['eval_images']} evaluation images (z = mu): {shown}", flush=True)
        plot_curves(self.records, os.path.join(self.out_dir, "curves.png"), CURVE_KEYS)

    def close(self):
        if self.end == "\r":
            print()


# --------------------------------------------------------------------------------------------------
# APPENDIX: evaluation: Table 3's reconstructions (during training and at the end), FID, pictures
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruction_record(encoder, decoder, test_set, cfg, device, amp, bn_batch):
    """PSNR / SSIM / MSE (eval_metrics, per image, then the mean) of the reconstructions with
    z = mu of the first cfg.recon_images evaluation images: Table 3's measure, tracked during
    training (Fig. 7's convergence). BatchNorm as in the final evaluation (cfg.bn_mode, bn_batch
    images a forward, running averages restored); no random draw, so training is unchanged.
    -> {"eval_psnr", "eval_ssim", "eval_mse", "eval_images"}."""
    per_image = {name: [] for name, _ in TABLE3_METRICS}
    with batchnorm_mode([encoder, decoder], cfg.bn_mode):
        for images in ordered_batches(test_set, bn_batch, cfg.recon_images, cfg.num_workers):
            x, rec = reconstruct(encoder, decoder, images, device, amp)
            for name, metric in TABLE3_METRICS:
                per_image[name].append(metric(x, rec)[0])
    per_image = {name: np.concatenate(values) for name, values in per_image.items()}
    return {"eval_psnr": mean_finite_psnr(per_image["psnr"]),
            "eval_ssim": float(per_image["ssim"].mean()),
            "eval_mse": float(per_image["mse"].mean()), "eval_images": int(per_image["mse"].size)}


# Table 3's per-image measures (eval_metrics), in the order results and logs show them
TABLE3_METRICS = (("psnr", psnr), ("ssim", ssim), ("mse", mse))


@torch.no_grad()
def reconstruct(encoder, decoder, images, device, amp):
    """uint8 images (B, C, H, W) -> (x, reconstruction with z = mu, clamped to [0, 1]), both
    float32 on the CPU, as every reconstruction score takes them."""
    x = to_float(images, device)
    with amp():
        rec = decoder(encoder(x)[0]).clamp(0, 1)
    return x.float().cpu(), rec.float().cpu()


def summary(per_image):
    return {"mean": float(np.mean(per_image)), "std": float(np.std(per_image))}


def cosine_similarity(x, y):
    """Cosine similarity of each pair of flattened images (AVAE-S Table III), float64 on the CPU:
    cos_i = <x_i, y_i> / (||x_i|| ||y_i||); an all-zero image has no direction and scores 0. x,
    y: (N, C, H, W); pass the clamped reconstructions eval_metrics scores. ->
    (per_image (N,), mean)."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64).flatten(1)
    y = torch.as_tensor(y).detach().to("cpu", torch.float64).flatten(1)
    if x.shape != y.shape:
        raise ValueError(
            f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)} after flattening"
        )
    norms = x.norm(dim=1) * y.norm(dim=1)
    dot = (x * y).sum(dim=1)
    per_image = torch.where(
        norms > 0, dot / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(dot)
    )
    per_image = per_image.numpy()
    return per_image, float(per_image.mean())


SHARPNESS_NOTE = (
    "Laplacian variance of the grey image on the [0, 255] scale (eval_metrics.sharpness); AVAE-S "
    "Table III's values (ground truth 0.112) look like the [0, 1] scale: divide by 255^2 = 65025 "
    "to compare"
)


@torch.no_grad()
def evaluate(nets, cfg, train_set, test_set, split, device, amp, out_dir, ranks=None):
    """results.json's body: reconstruction scores and sharpness on the evaluation split, the
    pictures, and FID of EMA-decoder samples against the training images. A model without an
    encoder (wgan-gp) has no reconstructions: samples and FID only."""
    decoder, ema = unwrap(nets["decoder"]), unwrap(nets["ema"])
    encoder = unwrap(nets["encoder"]) if "encoder" in nets else None
    ranks = ranks or Ranks()
    # never touches the training RNG; under torchrun each rank draws its own share of samples
    eval_seed = cfg.seed + 1 if ranks.rank == 0 else int(
        np.random.SeedSequence([cfg.seed + 1, ranks.rank]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(eval_seed)
    # Train-mode BatchNorm normalises over the batch one replica saw in training: the per-rank
    # batch, split again into nn.DataParallel's per-GPU chunks (bn_batch_size).
    bn_batch = batchnorm_batch(cfg, ranks, nets["decoder"])

    def sample(k):  # k EMA-decoder samples in [0, 1], every decoder forward exactly bn_batch
        z = torch.randn(math.ceil(k / bn_batch) * bn_batch, cfg.z_dim, generator=generator)
        with amp():
            images = torch.cat([ema(chunk.to(device)) for chunk in z.split(bn_batch)])
        return images[:k].clamp(0, 1)

    results = {"dataset": cfg.dataset, "model": cfg.model, "variant": cfg.variant, "arch": cfg.arch,
               "bn_mode": cfg.bn_mode}
    with batchnorm_mode([m for m in (encoder, decoder, ema) if m is not None], cfg.bn_mode):
        first = None
        if encoder is None:
            note = f"skipped: {cfg.model} has no encoder, so no reconstructions"
            if ranks.is_writer:
                print(f"reconstruction (PSNR / SSIM / MSE) {note}", flush=True)
            results["reconstruction"] = {"note": note}
        else:
            scores, first = reconstruction_scores(
                encoder, decoder, sample, test_set, split, cfg, device, amp, batch_size=bn_batch,
                ranks=ranks)
            results.update(scores)
        if ranks.is_writer:
            results["images"] = save_pictures(encoder, decoder, sample, first, cfg.z_dim, device,
                                              amp, out_dir)
        results["fid"] = fid_of_samples(cfg, sample, train_set, device, ranks)
    return results


def gathered_in_order(parts, ranks):
    """[(batch index, value)] of each rank -> the values of all ranks in batch order (every rank
    gets them; a collective)."""
    if ranks.world == 1:
        return [value for _, value in parts]
    everyone = [None] * ranks.world
    dist.all_gather_object(everyone, parts)
    return [value for _, value in sorted(pair for part in everyone for pair in part)]


def reconstruction_scores(encoder, decoder, sample, test_set, split, cfg, device, amp, *,
                          batch_size, ranks=None):
    """PSNR / SSIM / MSE / cosine similarity of the reconstructions with z = mu (Table 3's protocol;
    cosine: AVAE-S Table III) over the first eval_images of the evaluation split, and the sharpness
    of real, reconstructed and generated images. -> ({"reconstruction", "sharpness"}, the first
    batch (x, rec) on the CPU). batch_size: images per forward, the BatchNorm batch of training.
    Under torchrun (ranks) rank r scores batches r, r + world, ... and the scores are gathered."""
    ranks = ranks or Ranks()
    names = ("psnr", "ssim", "mse", "cosine", "sharp_real", "sharp_rec", "sharp_fake")
    per_image = {name: [] for name in names}
    first = None
    bar = Progress(min(cfg.eval_images or len(test_set), len(test_set)), "reconstruction",
                   enabled=ranks.is_writer)
    batches = ordered_batches(test_set, batch_size, cfg.eval_images, cfg.num_workers)
    mine = []  # the batch indices this rank scores
    for index, images in enumerate(batches):
        if index % ranks.world != ranks.rank:
            continue
        mine.append(index)
        x_cpu, rec_cpu = reconstruct(encoder, decoder, images, device, amp)
        for name, metric in (*TABLE3_METRICS, ("cosine", cosine_similarity)):
            per_image[name].append(metric(x_cpu, rec_cpu)[0])
        per_image["sharp_real"].append(sharpness(x_cpu)[0])
        per_image["sharp_rec"].append(sharpness(rec_cpu)[0])
        per_image["sharp_fake"].append(sharpness(sample(x_cpu.shape[0]).float().cpu())[0])
        first = (x_cpu, rec_cpu) if first is None else first
        bar.update(x_cpu.shape[0] * ranks.world)
    bar.close()
    per_image = {name: np.concatenate(gathered_in_order(list(zip(mine, values)), ranks))
                 for name, values in per_image.items()}
    reconstruction = {
        "split": split, "images": int(per_image["mse"].size), "z": "mu", "decoder": "raw (not EMA)",
        "psnr": mean_finite_psnr(per_image["psnr"]),
        "psnr_identical_images": int(np.isinf(per_image["psnr"]).sum()),
        "ssim": float(per_image["ssim"].mean()), "mse": float(per_image["mse"].mean()),
        "cosine": float(per_image["cosine"].mean())}
    sharp = {
        "real": summary(per_image["sharp_real"]),
        "reconstructed": summary(per_image["sharp_rec"]),
        "generated_ema": summary(per_image["sharp_fake"]),
        "note": SHARPNESS_NOTE,
    }
    return {"reconstruction": reconstruction, "sharpness": sharp}, first


def save_pictures(encoder, decoder, sample, first, z_dim, device, amp, out_dir):
    """samples.png (64 EMA samples), and with an encoder reconstruction.png (evaluation images over
    their reconstructions) and interpolation.png (decoded straight lines between pairs of
    posterior means). first: the first evaluation batch (x, rec) on the CPU; None without an
    encoder (wgan-gp): samples only. -> {picture: file name}."""
    save_grid([sample(64)], os.path.join(out_dir, "samples.png"), nrow=8)
    if first is None:
        return {"samples": "samples.png"}
    x, rec = first  # (B, C, H, W) each
    n = min(16, x.shape[0])
    save_grid([x[:n], rec[:n]], os.path.join(out_dir, "reconstruction.png"), nrow=n)
    pictures = {"reconstruction": "reconstruction.png", "samples": "samples.png"}
    pairs = min(8, x.shape[0] // 2)
    with amp():
        mu = encoder(x.to(device))[0]  # (B, z)
        weights = torch.linspace(0, 1, 8, device=device)[None, :, None]  # (1, 8, 1)
        path = (1 - weights) * mu[:pairs, None] + weights * mu[
            pairs : 2 * pairs, None
        ]  # (pairs, 8, z)
        frames = decoder(path.reshape(-1, z_dim)).reshape(pairs, 8, *x.shape[1:])
    rows = [torch.cat([x[i:i + 1], frames[i].float().cpu(), x[pairs + i:pairs + i + 1]])
            for i in range(pairs)]
    if rows:
        save_grid(rows, os.path.join(out_dir, "interpolation.png"), nrow=10)
        pictures["interpolation"] = "interpolation.png"
    return pictures


# pytorch-fid's blocks 0-3: first max pool, second max pool, pre-aux classifier, pool3
FID_DEPTHS = (64, 192, 768, 2048)


FID_NOTE = (
    "FID at pytorch-fid's four Inception depths (64: first max pool, 192: second max pool, 768: "
    "pre-aux "
    "classifier Mixed_6e, 2048: pool3), as AVAE-S Table III; only fid_2048 (= value) is "
    "comparable across papers"
)


class InceptionAllDepths(nn.Module):
    """The FID Inception returning its four depths side by side, (N, 64 + 192 + 768 + 2048), from
    ONE pass (eval_metrics' features_by_depth): eval_metrics' streaming statistics of these rows
    then hold each depth's mean and covariance as a block of the joint ones."""

    def __init__(self, inception):
        super().__init__()
        self.inception = inception
        self.dims = sum(FID_DEPTHS)  # read by eval_metrics' statistics
        self.bn_batch_stats = inception.bn_batch_stats

    def forward(self, x):  # (N, 3, H, W) in [0, 1] -> (N, 3072)
        features = self.inception.features_by_depth(x, up_to=FID_DEPTHS[-1])
        return torch.cat([features[depth] for depth in FID_DEPTHS], dim=1)


def fid_by_depth(mu_real, sigma_real, mu_fake, sigma_fake, depths=FID_DEPTHS):
    """{"fid_<d>": FID} from the joint statistics of features concatenated in `depths` order:
    depth d's mean and covariance are the slices of its block."""
    fids, start = {}, 0
    for depth in depths:
        block = slice(start, start + depth)
        fids[f"fid_{depth}"] = frechet_distance(
            mu_real[block], sigma_real[block, block], mu_fake[block], sigma_fake[block, block]
        )
        start += depth
    return fids


def pooled_statistics(parts):
    """[(mean (D,), ddof-1 covariance (D, D), n)] of disjoint sets -> (mean, covariance, n) of
    their union: sum_k [(n_k - 1) sigma_k + n_k mu_k mu_k^T] = sum of x x^T over all rows."""
    n = sum(count for _, _, count in parts)
    mean = sum(count * mu for mu, _, count in parts) / n
    second = sum((count - 1) * sigma + count * np.outer(mu, mu) for mu, sigma, count in parts)
    return mean, (second - n * np.outer(mean, mean)) / (n - 1), n


def statistics_over_ranks(mu, sigma, n, ranks):
    """This rank's feature statistics pooled with every other rank's (a collective)."""
    if ranks.world == 1:
        return mu, sigma, n
    everyone = [None] * ranks.world
    dist.all_gather_object(everyone, (mu, sigma, n))
    return pooled_statistics(everyone)


def fid_of_samples(cfg, sample, train_set, device, ranks=None):
    """FID of cfg.fid_samples EMA-decoder samples against (at most as many) training images at
    the four depths, standard pytorch-fid convention (eval-mode Inception, float images in
    [0, 1], no quantisation). Under torchrun each rank takes its share of both sets (training
    images, fid_samples / world samples) and the statistics are pooled."""
    ranks = ranks or Ranks()
    if cfg.fid_samples == 0:
        return {"value": None, "note": "skipped (--fid-samples 0)"}
    try:
        inception = load_inception(cfg.fid_weights or None, device=str(device),
                                   flag="--fid-weights")
    except MetricInputError as error:
        print(f"FID skipped: {error}; the rest of the evaluation still runs", flush=True)
        return {"value": None, "note": f"skipped: {error}"}
    count = min(cfg.fid_samples, len(train_set))
    mine = np.array_split(np.arange(count), ranks.world)[ranks.rank]  # this rank's images
    if len(mine) < 2:
        raise MetricInputError(f"FID over {ranks.world} ranks needs --fid-samples of at least "
                               f"{2 * ranks.world} (2 images per rank), got {cfg.fid_samples}")
    reference = (
        to_float(images, device)
        for images in ordered_batches(train_set, cfg.batch_size, int(mine[-1]) + 1,
                                      cfg.num_workers, first=int(mine[0]))
    )
    inception = InceptionAllDepths(inception)
    mu_real, sigma_real, n_real = statistics_over_ranks(*stats_from_batches(
        reference,
        inception,
        device=device,
        batch_size=100,
        progress=ranks.is_writer,
    ), ranks)
    # one call of sample per training-size batch: no decoded image is thrown away
    share = len(np.array_split(np.arange(cfg.fid_samples), ranks.world)[ranks.rank])
    mu_fake, sigma_fake = stats_from_generator(
        sample, share, inception, batch_size=cfg.batch_size, device=device,
        progress=ranks.is_writer
    )
    mu_fake, sigma_fake, _ = statistics_over_ranks(mu_fake, sigma_fake, share, ranks)
    fids = fid_by_depth(mu_real, sigma_real, mu_fake, sigma_fake)
    return {"value": fids["fid_2048"], **fids, "note": FID_NOTE, "generated": cfg.fid_samples,
            "reference": "training images", "reference_images": n_real, "decoder": "EMA"}


def write_results(results, out_dir):
    path = os.path.join(out_dir, "results.json")
    write_json(path, results)
    rec, fid = results["reconstruction"], results["fid"]
    fid_text = "n/a"
    if fid["value"] is not None:
        shallow = " / ".join(f"{fid['fid_' + str(depth)]:.4g}" for depth in FID_DEPTHS[:-1])
        fid_text = (f"{fid['value']:.2f} (64 / 192 / 768-d: {shallow}; only 2048-d is comparable "
                    "across papers)")
    if "psnr" not in rec:
        print(f"FID {fid_text} -> {path}", flush=True)
        return
    sharp = results["sharpness"]
    print(
        f"{rec['split']} reconstruction ({rec['images']} images, z = mu): PSNR {rec['psnr']:.3f} "
        f"SSIM {rec['ssim']:.3f} "
        f"MSE {rec['mse']:.4f} cosine {rec['cosine']:.4f} | sharpness rec "
        f"{sharp['reconstructed']['mean']:.4g} "
        f"(real {sharp['real']['mean']:.4g}) | FID {fid_text} -> {path}",
        flush=True,
    )


def avae_s_results(cfg, step, iters_per_epoch, vae_s_state):
    """results.json's AVAE-S block (nothing for the other models): the phase of the last step
    trained (avae, avae-s) and AVAE-S Eq. 5's frozen lambdas
    (vae-s, avae-s; None while still probing). vae_s_state: the live state or a checkpoint's
    avae_s record (the same keys)."""
    block = {}
    if cfg.model in ADVERSARIAL_MODELS:
        block["phase"] = phase_name(cfg, (step - 1) // iters_per_epoch) if step else "untrained"
    if cfg.model in SHARP_MODELS:
        block.update(rec_weights=(vae_s_state or {}).get("rec_weights"),
                     probe_batches_seen=(vae_s_state or {}).get("term_count", 0))
    return {"avae_s": block} if block else {}


def run_evaluation(given):
    """--eval CKPT: the checkpoint's config, RUN_FLAGS from the command line; results beside it."""
    path = given["eval"]
    state = load_checkpoint(path)
    saved = config_from_checkpoint(state, path)
    check_same_run(saved, Config(**{**dataclasses.asdict(saved), **given}), path)
    cfg = Config(
        **{**dataclasses.asdict(saved), **{k: v for k, v in given.items() if k in RUN_FLAGS}}
    )
    validate(cfg)
    device, amp = setup_device(cfg.device, cfg.bf16)
    train_set, test_set, split = load_data(cfg)
    check_batch_sizes(cfg, len(train_set), min(cfg.eval_images or len(test_set), len(test_set)))
    nets, opts = make_state(cfg, train_set.shape[0], device)
    restore(state, nets, opts, path)
    out_dir = cfg.out or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    print(f"evaluating {path} (step {state['step']}) on {describe_device(device)}", flush=True)
    results = evaluate(nets, cfg, train_set, test_set, split, device, amp, out_dir)
    iters_per_epoch, _ = annealing_length(len(train_set), cfg)
    results.update(checkpoint=path, step=state["step"],
                   **avae_s_results(cfg, state["step"], iters_per_epoch, state.get("avae_s")))
    write_results(results, out_dir)


# --------------------------------------------------------------------------------------------------
# APPENDIX: --table: finished runs side by side (the README's image tables and figures)
# --------------------------------------------------------------------------------------------------
# AS-IntroVAE Table 3 (test reconstructions, z = mu): PSNR, SSIM, MSE of S-IntroVAE and AS-IntroVAE.
PAPER_TABLE3 = {
    "mnist": {"sintrovae": (20.282, 0.885, 0.011), "asintrovae": (21.014, 0.898, 0.009)},
    "cifar10": {"sintrovae": (19.300, 0.599, 0.019), "asintrovae": (19.445, 0.620, 0.019)},
    "oxford": {"sintrovae": (15.372, 0.348, 0.049), "asintrovae": (20.168, 0.604, 0.013)},
    "celeba128": {"sintrovae": (17.818, 0.561, 0.018), "asintrovae": (22.924, 0.801, 0.006)},
    "celeba256": {"sintrovae": (22.422, 0.790, 0.007), "asintrovae": (23.156, 0.758, 0.006)},
}


METHOD_NAMES = {"vae": "VAE", "introvae": "IntroVAE", "sintrovae": "S-IntroVAE",
                "asintrovae": "AS-IntroVAE", "vae-s": "VAE-S", "avae": "AVAE", "avae-s": "AVAE-S",
                "wgan-gp": "WGAN-GP"}


# one colour per method in every figure: VAE grey, IntroVAE orange, S-IntroVAE blue, AS-IntroVAE
# red, the released code purple, WGAN-GP green
METHOD_COLOURS = {"VAE": (110, 110, 110), "IntroVAE": (230, 140, 20), "S-IntroVAE": (40, 90, 200),
                  "AS-IntroVAE": (200, 30, 30), "AS-IntroVAE (official)": (150, 60, 170),
                  "WGAN-GP": (20, 150, 90)}


# the curves of --table: log key, panel title (with unit)
COMPARISON_CURVES = (("eval_psnr", "test PSNR (dB), z = mu"), ("eval_ssim", "test SSIM, z = mu"),
                     ("eval_mse", "test MSE per pixel, z = mu"),
                     ("kl_real", "KL(q(z|x) || p(z)) of real images (nats)"))


def run_folders(spec):
    """--table's comma-separated paths -> the run folders (those holding results.json), sorted;
    a path without results.json stands for its sub-folders that have one."""
    folders = []
    for path in filter(None, (part.strip() for part in spec.split(","))):
        if os.path.isfile(os.path.join(path, "results.json")):
            folders.append(path)
        elif os.path.isdir(path):
            folders += sorted(os.path.join(path, name) for name in os.listdir(path)
                              if os.path.isfile(os.path.join(path, name, "results.json")))
        else:
            raise DataError(f"--table: {path} is not a folder")
    if not folders:
        raise DataError(f"--table: no finished run (a folder with results.json) in {spec}")
    return folders


def read_run(folder):
    """A finished run folder -> {"method", "dataset", "seed", "folder", "results", "records"}."""
    with open(os.path.join(folder, "config.json")) as handle:
        config = json.load(handle)
    with open(os.path.join(folder, "results.json")) as handle:
        results = json.load(handle)
    official = config["model"] == "asintrovae" and config["variant"] == "official"
    method = METHOD_NAMES.get(config["model"], config["model"]) + (" (official)" if official
                                                                  else "")
    return {"method": method, "model": config["model"], "dataset": config["dataset"],
            "seed": config["seed"], "folder": folder, "results": results,
            "records": read_log(os.path.join(folder, "log.jsonl"), math.inf)}


def by_method(runs):
    """{method: its runs by seed}, methods in the order of METHOD_NAMES."""
    order = list(METHOD_NAMES)
    groups = {}
    for run in sorted(runs, key=lambda r: (order.index(r["model"]) if r["model"] in order
                                           else len(order), r["method"], r["seed"])):
        groups.setdefault(run["method"], []).append(run)
    return groups


def mean_and_spread(values, digits):
    """"m ± s" (sample standard deviation over seeds) or "m" for one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def comparison_table(runs):
    """table.md's text: per method, PSNR / SSIM / MSE of the test reconstructions, mean ± sample
    std over seeds, beside the paper's Table 3 row; then one line per run."""
    groups = by_method(runs)
    lines = ["| method | seeds | PSNR (dB) ↑ | SSIM ↑ | MSE ↓ "
             "| paper Table 3 (PSNR / SSIM / MSE) |", "|---|---|---|---|---|---|"]
    for method, group in groups.items():
        scores = [g["results"]["reconstruction"] for g in group]
        paper = PAPER_TABLE3.get(group[0]["dataset"], {}).get(group[0]["model"])
        paper = (" / ".join(f"{v:.3f}" for v in paper)
                 if paper and "official" not in method else "")
        if any("psnr" not in r for r in scores):
            lines.append(f"| {method} | {','.join(str(g['seed']) for g in group)} | - | - | - | "
                         "no encoder: no reconstructions |")
            continue
        lines.append(
            f"| {method} | {','.join(str(g['seed']) for g in group)} | "
            f"{mean_and_spread([r['psnr'] for r in scores], 3)} | "
            f"{mean_and_spread([r['ssim'] for r in scores], 3)} | "
            f"{mean_and_spread([r['mse'] for r in scores], 4)} | {paper} |")
    lines += ["", "| run folder | method | seed | step | test images | PSNR | SSIM | MSE |",
              "|---|---|---|---|---|---|---|---|"]
    for method, group in groups.items():
        for run in group:
            rec = run["results"]["reconstruction"]
            if "psnr" not in rec:
                continue
            lines.append(f"| {run['folder']} | {method} | {run['seed']} | "
                         f"{run['results']['step']} | {rec['images']} | {rec['psnr']:.3f} | "
                         f"{rec['ssim']:.3f} | {rec['mse']:.4f} |")
    return "\n".join(lines) + "\n"


def nice_ticks(lo, hi, count=5):
    """About `count` round tick values covering [lo, hi] (steps of 1, 2 or 5 x 10^k)."""
    raw = (hi - lo) / max(count - 1, 1) or abs(hi) or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)
                if m * 10 ** math.floor(math.log10(raw)) >= raw))
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def draw_axes(draw, font, box, x_range, y_range, title, x_label):
    """A framed panel with ticks on both axes; -> the data -> pixel mapping."""
    left, top, right, bottom = box
    (x0, x1), (y0, y1) = x_range, y_range
    draw.rectangle(box, outline="black")
    draw.text((left, top - 16), title, fill="black", font=font)

    def to_pixel(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (y - y0) / (y1 - y0) * (bottom - top))

    for tick in nice_ticks(y0, y1):
        _, y = to_pixel(x0, tick)
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((left - 8, y), f"{tick:.4g}", fill="black", font=font, anchor="rm")
    for tick in nice_ticks(x0, x1):
        x, _ = to_pixel(tick, y0)
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x, bottom + 6), f"{tick:.6g}", fill="black", font=font, anchor="mt")
    draw.text(((left + right) / 2, bottom + 20), x_label, fill="black", font=font, anchor="mt")
    return to_pixel


def comparison_curves(runs, path, curves=COMPARISON_CURVES):
    """curves.png: one panel per logged value against the iteration, one colour per method, a
    line per seed; the legend names the methods and their seeds."""
    groups = {method: group for method, group in by_method(runs).items()
              if any(r.get(key) is not None for run in group for r in run["records"]
                     for key, _ in curves)}  # WGAN-GP logs none of these
    font = ImageFont.load_default()
    width, height, cols = 460, 300, 2
    rows = math.ceil(len(curves) / cols)
    legend_height = 24 + 16 * math.ceil(len(groups) / 3)
    image = Image.new("RGB", (cols * width, legend_height + rows * height), "white")
    draw = ImageDraw.Draw(image)
    colours = {method: METHOD_COLOURS.get(method, (0, 0, 0)) for method in groups}
    for i, (method, group) in enumerate(groups.items()):
        x, y = 20 + (i % 3) * 300, 8 + 16 * (i // 3)
        draw.line((x, y + 6, x + 24, y + 6), fill=colours[method], width=3)
        seeds = ",".join(str(g["seed"]) for g in group)
        draw.text((x + 30, y), f"{method} (seed{'s' if len(group) > 1 else ''} {seeds})",
                  fill="black", font=font)
    for index, (key, title) in enumerate(curves):
        series = [(method, [(r["step"], r[key]) for r in run["records"]
                            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])])
                  for method, group in groups.items() for run in group]
        points = [p for _, line in series for p in line]
        panel_top = legend_height + (index // cols) * height
        box = (70 + (index % cols) * width, panel_top + 24, (index % cols + 1) * width - 16,
               panel_top + height - 44)
        if not points:
            draw.rectangle(box, outline="black")
            draw.text((box[0], box[1] - 16), f"{title}: not logged", fill="black", font=font)
            continue
        steps, values = zip(*points)
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
        to_pixel = draw_axes(draw, font, box, (0, max(steps)), (lo - pad, hi + pad), title,
                             "training iteration")
        for method, line in series:
            xy = [to_pixel(*p) for p in line]
            if len(xy) > 1:
                draw.line(xy, fill=colours[method], width=2)
            for px, py in xy[-1:]:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colours[method])
    image.save(path)


def picture_sheet(runs, path, per_row=3):
    """pictures.png: per method (its lowest seed) the EMA-decoder samples over the test
    reconstructions (top row of each pair: real, bottom: reconstruction), labelled; per_row
    methods side by side, then the next row."""
    groups = by_method(runs)
    font = ImageFont.load_default()
    panels = []
    for method, group in groups.items():
        run = group[0]
        with Image.open(os.path.join(run["folder"], "samples.png")) as samples:
            samples = samples.convert("RGB")
        rec_path = os.path.join(run["folder"], "reconstruction.png")
        scale = max(1, round(400 / samples.width))
        samples = samples.resize((samples.width * scale, samples.height * scale), Image.NEAREST)
        rec = Image.new("RGB", (samples.width, 1), "white")  # a model without an encoder has none
        if os.path.isfile(rec_path):
            with Image.open(rec_path) as image:
                rec = image.convert("RGB").resize(
                    (samples.width, image.height * samples.width // image.width), Image.NEAREST)
        panel = Image.new("RGB", (samples.width + 16, samples.height + rec.height + 64), "white")
        draw = ImageDraw.Draw(panel)
        draw.text((8, 4), f"{method}, seed {run['seed']}", fill="black", font=font)
        draw.text((8, 18), "samples (EMA decoder)", fill="black", font=font)
        panel.paste(samples, (8, 32))
        label = ("test images / reconstructions" if os.path.isfile(rec_path)
                 else "no encoder: no reconstructions")
        draw.text((8, 36 + samples.height), label, fill="black",
                  font=font)
        panel.paste(rec, (8, 50 + samples.height))
        panels.append(panel)
    width, height = max(p.width for p in panels), max(p.height for p in panels)
    columns = min(len(panels), per_row)
    sheet = Image.new("RGB", (columns * width, math.ceil(len(panels) / per_row) * height),
                      "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % per_row) * width, (i // per_row) * height))
    sheet.save(path)


def write_comparison(spec, out_dir):
    """--table: table.md, curves.png, pictures.png of the finished runs in spec, into out_dir."""
    runs = [read_run(folder) for folder in run_folders(spec)]
    os.makedirs(out_dir, exist_ok=True)
    table = comparison_table(runs)
    atomic_write(os.path.join(out_dir, "table.md"), lambda handle: handle.write(table),
                 binary=False)
    comparison_curves(runs, os.path.join(out_dir, "curves.png"))
    picture_sheet(runs, os.path.join(out_dir, "pictures.png"))
    print(table + f"-> {out_dir}/table.md, curves.png, pictures.png ({len(runs)} runs)",
          flush=True)


# --------------------------------------------------------------------------------------------------
# APPENDIX: --bench
# --------------------------------------------------------------------------------------------------
def bench(cfg):
    """cfg.bench timed iterations (after 2 untimed ones) on random images at the config's shapes,
    of the model's last-phase step (avae / avae-s: the adversarial step)."""
    device, amp = setup_device(cfg.device, cfg.bf16)
    image_channels = IMAGE_CHANNELS.get(cfg.dataset, 3)
    shape = (image_channels, cfg.image_size, cfg.image_size)
    seed_everything(cfg.seed)
    nets, opts = make_state(cfg, image_channels, device)
    vae_s_state = (
        new_vae_s_state(4 * cfg.batch_size, cfg.lambda_batches or 4, device)
        if cfg.model in SHARP_MODELS
        else None
    )
    method = step_method(cfg, cfg.epochs - 1)
    images = torch.randint(0, 256, (4 * cfg.batch_size, *shape), dtype=torch.uint8, device=device)
    s, warmup = elbo_scale(shape), 2
    for i in range(warmup + cfg.bench):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        x = to_float(images[(i % 4) * cfg.batch_size:(i % 4 + 1) * cfg.batch_size], device)
        stats = train_step(method, nets, opts, x, cfg, annealing_coefficient(i, 10 ** 6), s, amp,
                           vae_s_state, i)
        update_ema(nets["ema"], unwrap(nets["decoder"]), cfg.ema_decay)
    if device.type == "cuda":
        torch.cuda.synchronize()
        memory = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB"
    else:
        memory = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10:.0f} MiB"
    seconds = (time.perf_counter() - start) / cfg.bench
    losses = " ".join(f"{k} {v.item():.4g}" for k, v in stats.items() if k.startswith("loss"))
    nets_described = (
        "AVAE-S Table I nets"
        if cfg.arch == "avae"
        else f"channels {','.join(map(str, cfg.channels))}"
    )
    print(
        f"bench {cfg.dataset} "
        f"{cfg.model}{'/' + cfg.variant if cfg.model == 'asintrovae' else ''}: batch "
        f"{cfg.batch_size}, {'x'.join(map(str, shape))}, z {cfg.z_dim}, {nets_described}, "
        f"{'bf16' if uses_bf16(cfg.bf16, device) else 'fp32'}, {describe_device(device)}: "
        f"{1000 * seconds:.1f} ms/iteration, {cfg.batch_size / seconds:.1f} img/s, {memory} "
        f"({cfg.bench} iterations; "
        f"{losses})",
        flush=True,
    )


def bench_each_precision(cfg):
    """bench(cfg); --bf16 both: fp32, then bf16, each in a fresh process so that each line's peak
    memory is its own."""
    if cfg.bf16 != "both":
        bench(cfg)
        return
    context = multiprocessing.get_context("spawn")
    for bf16 in ("false", "true"):
        child = context.Process(target=bench, args=(dataclasses.replace(cfg, bf16=bf16),))
        child.start()
        child.join()
        if child.exitcode:
            raise ConfigError(f"the --bf16 {bf16} bench failed (exit code {child.exitcode})")


# --------------------------------------------------------------------------------------------------
# APPENDIX: command line and main()
# --------------------------------------------------------------------------------------------------
def parse_channels(text):
    try:
        channels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 64,128,256, got {text!r}"
        )
    if not channels or min(channels) < 1:
        raise argparse.ArgumentTypeError(f"channels must be positive, got {text!r}")
    return channels


def shown(value):
    """A flag value as it is typed: 64,128,256; true / false; none for an empty text."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value == "" else str(value)


PRESET_FIELDS = {name for row in PRESETS.values() for name in row}


PRESET_COLUMNS = ("image_size", "channels", "z_dim", "batch_size", "epochs", "beta_kl", "beta_rec",
                  "beta_neg", "margin", "hflip")


def presets_text():
    """--help's epilog: each dataset's preset row, and the model preset of introvae."""
    header = ("dataset", "size", "channels", "z", "batch", "epochs", "beta_kl", "beta_rec",
              "beta_neg", "margin", "hflip")
    rows = [header] + [(name, *(shown(row.get(key, getattr(Config, key)))
                                for key in PRESET_COLUMNS))
                       for name, row in PRESETS.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                      for row in rows)
    introvae = ", ".join(f"{key} {value}" for key, value in MODEL_PRESETS["introvae"].items())
    return (f"dataset presets (a flag given overrides its value; folder and npz take the row of\n"
            f"their image size, 28, 32, 128 or 256 px):\n{table}\n--model introvae also sets "
            f"{introvae}.\nA run prints its effective config when it starts.")


def build_parser():
    """One --flag per Config field; only the flags actually given end up in the namespace."""
    summary = " ".join(__doc__.split("\n\n")[0].split())  # the docstring's first paragraph
    parser = OneLineParser(prog="as_introvae.py", description=summary,
                           argument_default=argparse.SUPPRESS,
                           allow_abbrev=False, epilog=presets_text(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parse = {int: int, float: float, str: str, bool: parse_bool, tuple: parse_channels}
    metavars = {bool: "true|false", tuple: "C1,C2,..."}
    for f in dataclasses.fields(Config):
        default = shown(f.default)
        if f.name in PRESET_FIELDS:
            default = f"from the dataset preset (see below); without one {default}"
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=parse[f.type],
            choices=CHOICES.get(f.name),
            metavar=metavars.get(f.type),
            help=f"{f.metadata['help']} (default: {default})",
        )
    return parser


def one_line(error):
    """An error's message as one line (one re-raised from a DataLoader worker has a traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else lines[-1].split(": ", 1)[-1]


def main(argv=None):
    try:
        given = vars(build_parser().parse_args(argv))
    except SystemExit as stop:  # --help (0), or a usage mistake already said in one line (2)
        return stop.code
    try:
        if (given.get("eval") or given.get("bench")) and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ConfigError("--eval and --bench run in one process: start them with python, "
                              "not torchrun")
        if given.get("table"):
            write_comparison(given["table"], given.get("out") or os.path.join("runs", "table"))
        elif given.get("eval"):
            run_evaluation(given)
        elif given.get("bench"):
            bench_each_precision(make_config(given))
        else:
            train(make_config(given))
    except (ConfigError, DataError, CheckpointError, MetricInputError, TrainingDiverged) as error:
        print(f"as_introvae.py: error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
