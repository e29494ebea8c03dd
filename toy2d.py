"""The AS-IntroVAE paper's 2D experiments (Table 1, Fig. 3, supplement Table 1), all four methods.

Trains VAE, IntroVAE, Soft-IntroVAE and AS-IntroVAE on the 2D toy sets with Soft-IntroVAE's 2D
protocol (30 000 iterations, 2 000 of them a plain-VAE warm-up, batch 512, Adam 2e-4 with lr x0.1 at
10 000 and 15 000), every selected run SIDE BY SIDE in one program: the runs' MLP weights are
stacked as (R, in, out) tensors and trained with batched matmuls, one group per method. Runs never
mix: each has its own weights, data stream, noise and Adam moments.

    python toy2d.py --combo C2                               # Table 1, column C2: 4 methods
    python toy2d.py --combo C2 --seeds 92,93,94              # three seeds side by side
    python toy2d.py --combo all                              # Table 1 and the Fig. 3-like overview
    python toy2d.py --dataset checkerboard --combo all       # the supplement's checkerboard table
    python toy2d.py --dataset all --combo tuned              # Soft-IntroVAE's Table 2 setting
    python toy2d.py --dataset all --combo all                # 48 runs: 4 sets x 4 methods x C1-C3
    python toy2d.py --combo C2 --precision bf16              # bf16 autocast matmuls
    python toy2d.py --combo C2 --methods asintrovae --warmup 0          # ablation: no VAE warm-up
    python toy2d.py --combo C2 --methods asintrovae --schedule tanh     # tanh annealing
    python toy2d.py --combo C2 --methods sintrovae --mapping literal    # the other reading of C1-C3
    python toy2d.py --combo C2 --methods asintrovae --kernel joint      # Eq. 8's joint 2D kernel
    python toy2d.py --combo C2 --as-distance plain           # autograd through the AS formula
    python toy2d.py --combo all --iters 1500                 # quick version (the schedule scales)
    python toy2d.py --bench 20 --dataset all --combo all     # ms/iteration per phase
    python toy2d.py --dataset all --combo all --seeds 92,93,94 --device cuda  # 144 runs, graphs

Outputs in --out (default runs/toy2d_<dataset>_<combo>_s<seeds>_<iters>_<hash of the flags>, so the
same command finds its own folder): results.json (every run, with its coverage trace), table.md
(mean +- std over seeds beside the paper's values), samples_<tag>.npy, scatter_<tag>.png,
density_<tag>.png, overview_<dataset>_<seed>.png, coverage.png, checkpoint.pt. A killed run resumes
from checkpoint.pt when the same command is typed again.

Glossary (paper symbol -> Config field -> default):
    beta_kl, beta_rec, beta_neg -> --combo / --mapping -> C2 = (0.5, 0.1, 0.9)
    s (scale of the ELBO in the exponent) -> fixed, 1 / input dimension = 0.5
    alpha (exponent factor) -> fixed, 2
    gamma_r (weight of the generated samples' reconstruction) -> --gamma-r -> 1e-8
    m (IntroVAE hinge margin) -> --margin -> 8
    c (annealing coefficient, Eq. 9) -> --schedule -> min(5t/T, 1) (tanh(5t/T): --variant official)
    T (iterations of the run) -> --iters -> 30000
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from eval_metrics import OneLineParser, atomic_write, format_seconds, hist_kl_jsd, option

# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    dataset: str = option("8gaussians", "8gaussians | checkerboard | spiral | rings | all")
    combo: str = option("C2", "C1 | C2 | C3 | all | tuned (Soft-IntroVAE's per-dataset betas)")
    methods: str = option("vae,introvae,sintrovae,asintrovae", "comma list of methods to train")
    variant: str = option("paper", "AS-IntroVAE: paper (Eq. 7-9 literally) | official (released)")
    kernel: str = option(
        "marginal",
        "AS-Distance kernel: marginal (a 1-D kernel per latent dimension, summed; as the released "
        "code) | joint (Eq. 8's n-dimensional overlap, the product over dimensions)",
    )
    as_distance: str = option(
        "fused",
        "AS-Distance implementation: fused (as_distance_fused: one cache-blocked pass, closed-form "
        "gradient) | plain (as_distance: autograd through the formula); same value to rounding",
    )
    mapping: str = option(
        "closest", "C1-C3 as (kl, rec, neg): closest | as (kl, neg, rec): literal"
    )
    schedule: str = option(
        "auto", "annealing of c: auto (linear; tanh if official) | linear | tanh"
    )
    iters: int = option(30000, "iterations incl. the warm-up; lr x0.1 at iters/3 and iters/2")
    warmup: int = option(-1, "plain-VAE warm-up iterations; -1 = 2000 of 30000, scaled with iters")
    seeds: str = option("92", "comma list of seeds; one run per (dataset, method, combo, seed)")
    batch_size: int = option(512, "points per iteration, drawn fresh from the data distribution")
    hidden: int = option(256, "width of the 4 hidden layers of encoder and decoder")
    lr: float = option(2e-4, "Adam learning rate of both networks before the steps")
    margin: float = option(8.0, "IntroVAE's hinge margin m (best of 0.5, 2, 8 in a C2 sweep)")
    gamma_r: float = option(1e-8, "weight of the generated samples' reconstruction (decoder)")
    precision: str = option("fp32", "fp32 | bf16 (autocast of the matmuls; losses in fp32)")
    n_eval: int = option(5000, "generated and real points for KL / JSD / modes")
    grid: int = option(1024, "gnELBO and density grid is grid x grid over [-R, R]^2")
    trace_every: int = option(1000, "iterations between coverage records (a multiple of 50)")
    out: str = option("", "output folder; empty = runs/toy2d_<...>_<hash of the flags>")
    device: str = option("auto", "auto (cuda when present) | cpu | cuda | cuda:N")
    graphs: str = option(
        "auto", "CUDA graphs, one captured iteration per span: auto (on with CUDA) | on | off"
    )
    ckpt_every: int = option(
        0,
        "iterations between checkpoints (at data block ends, every 50); 0: a tenth of --iters, "
        "at most 2000, so that every run can resume",
    )
    until: int = option(
        0, ">0: stop after this iteration (checkpointed); rerun without it to finish"
    )
    bench: int = option(0, ">0: time this many iterations per phase, print ms/it, write nothing")
    table: str = option("", "comma list of run folders: their combined table (and PNGs in --out)")


CHOICES = {
    "dataset": ("8gaussians", "checkerboard", "spiral", "rings", "all"),
    "combo": ("C1", "C2", "C3", "all", "tuned"),
    "variant": ("paper", "official"),
    "kernel": ("marginal", "joint"),
    "as_distance": ("fused", "plain"),
    "mapping": ("closest", "literal"),
    "schedule": ("auto", "linear", "tanh"),
    "precision": ("fp32", "bf16"),
    "graphs": ("auto", "on", "off"),
}
METHODS = ("vae", "introvae", "sintrovae", "asintrovae")
METHOD_NAMES = {
    "vae": "VAE",
    "introvae": "IntroVAE",
    "sintrovae": "S-IntroVAE",
    "asintrovae": "AS-IntroVAE",
}
DATASETS = CHOICES["dataset"][:-1]
# Per-dataset plot / histogram half-range R and Soft-IntroVAE's tuned (beta_kl, beta_rec, beta_neg).
DATASET_PRESETS = {
    "8gaussians": {"span": 2.0, "tuned": (0.3, 0.2, 0.9)},
    "checkerboard": {"span": 4.0, "tuned": (0.1, 0.2, 0.2)},
    "spiral": {"span": 4.0, "tuned": (0.5, 0.2, 1.0)},
    "rings": {"span": 4.0, "tuned": (0.2, 0.2, 1.0)},
}
# The paper's combos as printed (sec. 5.2): weights of the real ELBO, fake KL, fake reconstruction.
COMBOS = {"C1": (0.3, 0.1, 0.9), "C2": (0.5, 0.1, 0.9), "C3": (0.7, 0.2, 0.9)}
# Published paper-convention KL / JSD (gnELBO in 1e-7 units) per (dataset, combo) and method:
# AS-IntroVAE Table 1 (8 Gaussians), its supplement's Table 1 (checkerboard; IntroVAE: NaN there)
# and Soft-IntroVAE Table 2 (tuned betas, mean of 5 seeds; AS-IntroVAE not run there).
PAPER = {
    ("8gaussians", "C1"): {"kl": (220.2, 192.4, 50.2, 3.4), "jsd": (110.1, 56.0, 16.9, 5.6)},
    ("8gaussians", "C2"): {"kl": (220.3, 191.1, 136.5, 1.3), "jsd": (110.0, 68.0, 36.6, 4.4)},
    ("8gaussians", "C3"): {"kl": (220.2, 64.0, 46.2, 2.0), "jsd": (109.8, 53.0, 9.6, 7.1)},
    ("checkerboard", "C1"): {"kl": (22.1, None, 20.7, 20.4), "jsd": (10.8, None, 9.6, 9.6)},
    ("checkerboard", "C2"): {"kl": (21.2, None, 21.0, 20.6), "jsd": (9.9, None, 10.0, 9.6)},
    ("checkerboard", "C3"): {"kl": (21.7, None, 21.2, 20.9), "jsd": (10.7, None, 10.3, 9.9)},
    ("8gaussians", "tuned"): {
        "kl": (6.72, 2.53, 1.25, None),
        "jsd": (16.04, 1.67, 0.96, None),
        "gnelbo": (7.42, 1.29, 1.25, None),
    },
    ("spiral", "tuned"): {
        "kl": (9.8, 8.38, 8.13, None),
        "jsd": (4.89, 3.58, 3.37, None),
        "gnelbo": (6.19, 5.87, 5.21, None),
    },
    ("checkerboard", "tuned"): {
        "kl": (20.91, 19.03, 20.27, None),
        "jsd": (9.78, 9.07, 9.06, None),
        "gnelbo": (8.53, 8.54, 4.47, None),
    },
    ("rings", "tuned"): {
        "kl": (13.16, 10.21, 9.18, None),
        "jsd": (7.26, 4.24, 4.13, None),
        "gnelbo": (6.4, 7.25, 6.3, None),
    },
}
BLOCK = 50  # iterations of data and noise drawn per generator call (checkpoints fall on block ends)
X_DIM = 2  # input dimension; s = 1 / X_DIM
Z_DIM = 2  # latent dimension


def combo_betas(combo, dataset, mapping):
    """(beta_kl, beta_rec, beta_neg) of a combo. "closest" reads (a, b, c) as (beta_kl, beta_rec,
    beta_neg), which puts C1 next to Soft-IntroVAE's tuned 8-Gaussians betas (0.3, 0.2, 0.9);
    "literal" follows the paper's words (real ELBO, fake KL, fake reconstruction) =
    (beta_kl, beta_neg, beta_rec)."""
    if combo == "tuned":
        return DATASET_PRESETS[dataset]["tuned"]
    a, b, c = COMBOS[combo]
    return (a, b, c) if mapping == "closest" else (a, c, b)


def schedule(iters, warmup=-1):
    """Warm-up length and lr milestones: the protocol's 2000 / (10000, 15000) of 30000, scaled with
    iters; warmup >= 0 overrides the warm-up length."""
    warmup = round(iters * 2000 / 30000) if warmup < 0 else warmup
    return warmup, (round(iters / 3), round(iters / 2))


def annealing_schedule(cfg):
    """The annealing of c actually used: --schedule, where "auto" follows --variant."""
    if cfg.schedule != "auto":
        return cfg.schedule
    # OFFICIAL: the released code anneals with tanh(5 t / T).
    return "tanh" if cfg.variant == "official" else "linear"


def learning_rate(t, base_lr, milestones):
    """lr at iteration t (0-based): x0.1 at each milestone reached (MultiStepLR, per iteration)."""
    return base_lr * 0.1 ** sum(t >= m for m in milestones)


# --------------------------------------------------------------------------------------------------
# Data: each sampler draws n i.i.d. points (n, 2) from its own torch.Generator, on the CPU, so any
# slice of a draw (one training batch of a block) is itself an i.i.d. sample of the data set.


def sample_8gaussians(n, gen):
    """Each point: one of 8 centres at radius 2 (angles k*45 deg) uniformly, + N(0, 0.02^2 I) noise,
    the whole point divided by 1.414."""
    angle = torch.randint(0, 8, (n,), generator=gen).float() * (math.pi / 4)
    centre = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return (centre + 0.02 * torch.randn(n, 2, generator=gen)) / 1.414


def sample_checkerboard(n, gen):
    """Each point: x1 ~ U(-2, 2), x2 = U(0, 1) - 2*Bernoulli(1/2) + (floor(x1) mod 2), both times 2:
    8 squares in [-4, 4]^2."""
    x1 = torch.rand(n, generator=gen) * 4 - 2
    x2 = torch.rand(n, generator=gen) - 2 * torch.randint(0, 2, (n,), generator=gen).float()
    x2 = x2 + torch.remainder(torch.floor(x1), 2)
    return torch.stack([x1, x2], 1) * 2


def sample_spiral(n, gen):
    """Each point: angle a = sqrt(U)*3*pi on arm (-cos(a)*a + U'/2, sin(a)*a + U''/2), negated with
    probability 1/2 (the other arm), /3, + 0.1 N(0, I)."""
    angle = torch.sqrt(torch.rand(n, generator=gen)) * (540 * 2 * math.pi / 360)
    arm_x = -torch.cos(angle) * angle + 0.5 * torch.rand(n, generator=gen)
    arm_y = torch.sin(angle) * angle + 0.5 * torch.rand(n, generator=gen)
    sign = 1 - 2 * torch.randint(0, 2, (n, 1), generator=gen).float()  # which arm, per point
    return sign * torch.stack([arm_x, arm_y], 1) / 3 + 0.1 * torch.randn(n, 2, generator=gen)


RING_RADII = (3.0, 2.25, 1.5, 0.75)


def sample_rings(n, gen):
    """n//4 equally spaced points on circles of radius 3, 2.25, 1.5 and the rest on 0.75; each point
    drawn from those uniformly with replacement; + N(0, 0.08^2 I) noise."""
    counts = [n // 4] * 3 + [n - 3 * (n // 4)]
    circles = []
    for radius, k in zip(RING_RADII, counts):
        angle = torch.linspace(0, 2 * math.pi, k + 1)[:-1]
        circles.append(radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1))
    points = torch.cat(circles)[torch.randint(0, n, (n,), generator=gen)]
    return points + 0.08 * torch.randn(n, 2, generator=gen)


SAMPLERS = {
    "8gaussians": sample_8gaussians,
    "checkerboard": sample_checkerboard,
    "spiral": sample_spiral,
    "rings": sample_rings,
}

# --------------------------------------------------------------------------------------------------
# Model: R independent MLPs evaluated together. A network is a flat list [W0, b0, W1, b1, ...] with
# W: (R, in, out) and b: (R, 1, out); activations are (R, N, features).


def init_mlp(sizes, gens):
    """PyTorch's default Linear init (U(-1/sqrt(in), 1/sqrt(in)) for weight and bias), one generator
    per run."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1 / math.sqrt(fan_in)
        weight = torch.stack(
            [(torch.rand(fan_in, fan_out, generator=g) * 2 - 1) * bound for g in gens]
        )
        bias = torch.stack([(torch.rand(1, fan_out, generator=g) * 2 - 1) * bound for g in gens])
        params += [weight, bias]
    return params


def mlp(params, x):
    """x: (R, N, in) -> (R, N, out) float32 (bf16 matmuls under autocast); ReLU between layers."""
    n_layers = len(params) // 2
    for layer in range(n_layers):
        x = torch.baddbmm(params[2 * layer + 1], x, params[2 * layer])
        if layer < n_layers - 1:
            x = torch.relu(x)
    return x.float() if x.dtype == torch.bfloat16 else x  # losses always see fp32 (or fp64)


def encode(enc, x):
    """q(z|x) = N(mu, exp(logvar)): (R, N, 2) -> mu (R, N, z), logvar (R, N, z)."""
    return mlp(enc, x).chunk(2, dim=-1)


def reparameterize(mu, logvar, eps):
    """z = mu + exp(logvar / 2) * eps with the given standard-normal eps (same shape as mu)."""
    return mu + torch.exp(0.5 * logvar) * eps


# --------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors. Per-sample inputs are (..., B); weights broadcast against them
# ((R, 1) for stacked runs, floats for one run); every loss returns one value per run (...,).
# The bodies from kl_divergence to as_intro_decoder_loss are identical in as_introvae.py.


def sse(x, y):
    """Per-sample SUM of squared errors over coordinates: (..., B, P) -> (..., B)."""
    return ((x - y) ** 2).sum(-1)


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


class FusedASDistance(torch.autograd.Function):
    """as_distance computed in one pass over the pairs, with its closed-form gradient: the same
    arguments and value (to float rounding), tested against as_distance, the readable reference.
    A's rows meet b's a block of rows at a time, so the (rows, B', D) temporaries stay in a CPU's
    cache, and each block adds its share of the value and of the gradient w.r.t. every input:
    backward only scales what forward summed. With d = mu_1,i - mu_2,j, V = v_1,i + v_2,j,
    q = d^2 / V and k = exp(-q / 2) / sqrt(2 pi V) (one dimension):
        dk/dmu_1,i = -k d / V,  dk/dmu_2,j = k d / V,  dk/dV = k (q - 1) / (2 V),  dV/dlogvar = v;
    the joint kernel's k_ij = prod_d k_d has the same factors per dimension, times k_ij. A batch's
    term with itself takes the rows' side of the gradient twice (k symmetric, d antisymmetric).
    Use through as_distance_fused; not twice differentiable."""

    ELEMENTS = 1 << 16  # elements of a temporary per block on a CPU (256 KiB in float32)

    @staticmethod
    def forward(ctx, mu_a, logvar_a, mu_b, logvar_b, reduction, kernel):
        want_grad = any(ctx.needs_input_grad[:4])
        var_a, var_b = torch.exp(logvar_a), torch.exp(logvar_b)
        n_a, n_b, dims = mu_a.shape[-2], mu_b.shape[-2], mu_a.shape[-1]
        top = None
        if kernel == "joint":
            # Cauchy-Schwarz, k(a_i, b_j) <= sqrt(k(a_i, a_i) k(b_j, b_j)): the largest log k of
            # the three terms is on a diagonal (d = 0), as_distance's stabiliser found in O(B).
            def log_diagonal(var):
                return (-0.5 * torch.log(2 * math.pi * (var + var))).sum(-1).amax(-1)

            top = torch.maximum(log_diagonal(var_a), log_diagonal(var_b))
            scale, weights = top.exp(), (1 / n_a**2, 1 / n_b**2, -2 / (n_a * n_b))
        elif reduction == "paper":
            scale, weights = 1 / math.sqrt(2 * math.pi), (1 / n_a**2, 1 / n_b**2, -2 / (n_a * n_b))
        elif reduction == "official_sum":
            # OFFICIAL: no 1/sqrt(2 pi); the encoder step sums, the decoder step averages.
            scale, weights = 1.0, (1.0, 1.0, -2.0)
        else:
            scale = 1.0
            weights = (1 / (n_a**2 * dims), 1 / (n_b**2 * dims), -2 / (n_a * n_b * dims))
        terms = ((mu_a, var_a, mu_a, var_a), (mu_b, var_b, mu_b, var_b), (mu_a, var_a, mu_b, var_b))
        sums = [FusedASDistance.pair_sums(*t, top, want_grad, i < 2) for i, t in enumerate(terms)]
        value = sum(w * total for w, (total, _, _) in zip(weights, sums))
        if want_grad:
            (_, g_aa, _), (_, g_bb, _), (_, g_ab, g_ba) = sums
            w_aa, w_bb, w_ab = weights
            grads = (
                2 * w_aa * g_aa[0] + w_ab * g_ab[0],  # d/dmu_a
                (2 * w_aa * g_aa[1] + w_ab * g_ab[1]) * var_a,  # d/dlogvar_a
                2 * w_bb * g_bb[0] + w_ab * g_ba[0],
                (2 * w_bb * g_bb[1] + w_ab * g_ba[1]) * var_b,
            )
            ctx.save_for_backward(*(g * _column(scale) for g in grads))
        return value * scale

    @staticmethod
    def pair_sums(mu_1, var_1, mu_2, var_2, top, want_grad, same):
        """Over all pairs (i, j), and dimensions unless joint: the sum of k without its 1/sqrt(2 pi)
        (joint: of exp(log k_ij - top)), (...,); with want_grad, its gradients w.r.t. mu_1, var_1
        (summed over j) and mu_2, var_2 (summed over i), (..., B, D) each. same: batch 2 is batch
        1, so the pairs i > j are the pairs i < j mirrored: each block of rows meets only the
        columns from its own first row on, the rest counted twice, and the gradient w.r.t. batch 1
        is the sum of the four."""
        n_1, n_2, dims = mu_1.shape[-2], mu_2.shape[-2], mu_1.shape[-1]
        per_row = mu_1.shape[:-2].numel() * n_2 * dims
        rows = n_1 if mu_1.is_cuda else max(1, FusedASDistance.ELEMENTS // per_row)
        total, g_mu_1, g_var_1 = 0.0, [], []
        g_mu_2, g_var_2 = torch.zeros_like(mu_2), torch.zeros_like(var_2)
        for start in range(0, n_1, rows):
            block = slice(start, start + rows)
            first = start if same else 0  # columns first.. meet this block of rows
            own = rows if same else 0  # of those, the block's own rows: pairs both ways already
            cols = slice(first, None)
            d = mu_1[..., block, None, :] - mu_2[..., None, cols, :]  # (..., rows, B2', D)
            root_inv = torch.rsqrt(var_1[..., block, None, :] + var_2[..., None, cols, :])
            u = d.mul_(root_inv)  # d / sqrt(V)
            q = u * u
            if top is None:
                k = torch.exp(q * -0.5).mul_(root_inv)
            else:
                log_k = (torch.log(root_inv) - 0.5 * q).sum(-1, keepdim=True)
                log_k = log_k - (0.5 * dims * math.log(2 * math.pi) + _column(top)[..., None])
                k = torch.exp(log_k)
            dims_summed = (-3, -2, -1)  # (joint: k is (..., rows, B2', 1))
            total = total + k.sum(dims_summed)
            if same:
                total = total + k[..., own:, :].sum(dims_summed)
            if not want_grad:
                continue
            k_d = u.mul_(root_inv).mul_(k)  # k d / V = -dk/dmu_1 = dk/dmu_2
            k_v = q.sub_(1).mul_(root_inv).mul_(root_inv).mul_(k).mul_(0.5)  # dk/dV
            g_mu_1.append(-k_d.sum(-2))
            g_var_1.append(k_v.sum(-2))
            g_mu_2[..., first + own:, :] += k_d[..., own:, :].sum(-3)
            g_var_2[..., first + own:, :] += k_v[..., own:, :].sum(-3)
        if not want_grad:
            return total, None, None
        g_1 = (torch.cat(g_mu_1, -2), torch.cat(g_var_1, -2))
        if same:
            return total, (g_1[0] + g_mu_2, g_1[1] + g_var_2), None
        return total, g_1, (g_mu_2, g_var_2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):
        scale = _column(grad_value)
        return (*(g * scale for g in ctx.saved_tensors), None, None)


def _column(value):
    """A per-batch value (...,) as (..., 1, 1), to scale (..., B, D) gradients; floats pass."""
    return value[..., None, None] if torch.is_tensor(value) else value


def as_distance_fused(mu_a, logvar_a, mu_b, logvar_b, reduction="paper", kernel="marginal"):
    """as_distance (Eq. 7-8, same arguments, shapes and value) by FusedASDistance: one pass over
    the B*B' pairs in cache-sized blocks and a closed-form gradient, on a CPU about 3 times
    cheaper than autograd through the formula (B = 512, D = 2, forward and backward)."""
    check_as_distance_arguments(reduction, kernel)
    return FusedASDistance.apply(mu_a, logvar_a, mu_b, logvar_b, reduction, kernel)


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
# Training steps: one per method, each on a group of R stacked runs. x: (R, B, 2); noise:
# (6, R, B, z), of which a step uses what it needs; betas (R, 1). Each returns the per-run losses
# (R,) of its two updates (non-finite values mark a diverged run).


def optimizer_step(params, loss, *optimizers, retain_graph=False):
    """Gradient of the summed per-run losses w.r.t. params only (any other network stays frozen),
    left in .grad, then a step of each optimizer. Runs have disjoint weights, so the sum's gradient
    is each run's own gradient; Adam is elementwise."""
    grads = torch.autograd.grad(loss.sum(), params, retain_graph=retain_graph)
    for param, grad in zip(params, grads):
        param.grad = grad
    for optimizer in optimizers:
        optimizer.step()


def step_vae(encoder, decoder, opt_encoder, opt_decoder, x, noise, *, beta_rec, beta_kl):
    """Plain VAE step (also the warm-up of every method): both networks, one joint loss, no s."""
    mu, logvar = encode(encoder, x)
    rec = mlp(decoder, reparameterize(mu, logvar, noise[0]))
    loss = vae_loss(sse(x, rec), kl_divergence(mu, logvar), beta_rec=beta_rec, beta_kl=beta_kl)
    optimizer_step(encoder + decoder, loss, opt_encoder, opt_decoder)
    return loss.detach(), loss.detach()


def step_introvae(
    encoder, decoder, opt_encoder, opt_decoder, x, noise, *, margin, beta_rec, beta_kl, beta_neg
):
    """IntroVAE (Huang et al.): encoder step with the margin hinges, then the decoder step through
    the updated encoder, on the same z and prior noise."""
    eps_z, eps_p = noise[0], noise[1]
    # ALGO LOGIC: encoder step (decoder frozen)
    mu, logvar = encode(encoder, x)
    z = reparameterize(mu, logvar, eps_z)
    # The decoder is unchanged until its own step, so rec and fake (and their graphs) serve both
    # steps: the decoder step's gradient reaches only the decoder's weights, as with z.detach().
    rec = mlp(decoder, z)
    fake = mlp(decoder, eps_p)
    mu_r, logvar_r = encode(encoder, rec.detach())
    mu_f, logvar_f = encode(encoder, fake.detach())
    rec_err = sse(x, rec)
    loss_e = intro_encoder_loss(
        rec_err,
        kl_divergence(mu, logvar),
        kl_divergence(mu_r, logvar_r),
        kl_divergence(mu_f, logvar_f),
        margin=margin,
        beta_rec=beta_rec,
        beta_kl=beta_kl,
        beta_neg=beta_neg,
    )
    optimizer_step(encoder, loss_e, opt_encoder, retain_graph=True)
    # ALGO LOGIC: decoder step (encoder frozen, as just updated)
    mu_r, logvar_r = encode(encoder, rec)
    mu_f, logvar_f = encode(encoder, fake)
    loss_d = intro_decoder_loss(
        rec_err,
        kl_divergence(mu_r, logvar_r),
        kl_divergence(mu_f, logvar_f),
        beta_rec=beta_rec,
        beta_kl=beta_kl,
    )
    optimizer_step(decoder, loss_d, opt_decoder)
    return loss_e.detach(), loss_d.detach()


def step_introspective(
    encoder, decoder, opt_encoder, opt_decoder, x, noise, *, c, s, beta_rec, beta_kl, beta_neg,
    gamma_r, as_variant, kernel="marginal", fused=True
):
    """AS-IntroVAE (c from annealing_coefficient, as_variant "paper" | "official") or
    Soft-IntroVAE (as_variant "none": no AS-Distance, c = 1): the encoder step of Eq. 9, then the
    decoder step. fused: the AS-Distance by as_distance_fused (else as_distance, autograd through
    the formula). The image steps of as_introvae.py compute the same; they run the decoder's
    forwards again in the decoder step instead of keeping the encoder step's graph
    (retain_graph), which for images costs more memory than the forwards cost time."""
    if as_variant == "none" and not (c == 1.0 and not torch.is_tensor(c)):
        raise ValueError(f"Soft-IntroVAE is Eq. 9 at c = 1, got c = {c}")
    eps_z, eps_p, eps_r, eps_f, eps_rr, eps_ff = noise
    # c is a float, or (CUDA graphs) a 0-dim tensor refilled every replay while c < 1.
    use_as = as_variant != "none" and (torch.is_tensor(c) or c < 1.0)
    official = as_variant == "official"
    distance = as_distance_fused if fused else as_distance
    # ALGO LOGIC: encoder step (decoder frozen)
    mu, logvar = encode(encoder, x)
    z = reparameterize(mu, logvar, eps_z)
    # The decoder is unchanged until its own step, so rec and fake (and their graphs) serve both
    # steps: the decoder step's gradient reaches only the decoder's weights, as with z.detach().
    rec = mlp(decoder, z)
    fake = mlp(decoder, eps_p)
    mu_r, logvar_r = encode(encoder, rec.detach())
    rr = mlp(decoder, reparameterize(mu_r, logvar_r, eps_r))
    mu_f, logvar_f = encode(encoder, fake.detach())
    rf = mlp(decoder, reparameterize(mu_f, logvar_f, eps_f))
    as_enc = 0.0
    if use_as and official:
        # OFFICIAL: tanh on mu, logvar of E(rec), E(fake) before the AS-Distance (not the KLs here).
        squashed = (torch.tanh(v) for v in (mu_r, logvar_r, mu_f, logvar_f))
        as_enc = distance(*squashed, reduction="official_sum").unsqueeze(-1)  # (R, 1)
    elif use_as:
        # E(rec) vs E(fake)
        as_enc = distance(mu_r, logvar_r, mu_f, logvar_f, kernel=kernel).unsqueeze(-1)
    rec_err = sse(x, rec)
    # rec is NOT detached in SSE(rec, rr): that gradient reaches the encoder through z.
    loss_e, _, _ = as_intro_encoder_loss(
        rec_err,
        kl_divergence(mu, logvar),
        sse(rec, rr),
        kl_divergence(mu_r, logvar_r),
        sse(fake, rf),
        kl_divergence(mu_f, logvar_f),
        as_enc,
        c=c,
        s=s,
        beta_rec=beta_rec,
        beta_kl=beta_kl,
        beta_neg=beta_neg,
    )
    optimizer_step(encoder, loss_e, opt_encoder, retain_graph=True)
    # ALGO LOGIC: decoder step (encoder frozen, as just updated)
    mu_r, logvar_r = encode(encoder, rec)
    rr = mlp(decoder, reparameterize(mu_r, logvar_r, eps_rr).detach())
    mu_f, logvar_f = encode(encoder, fake)
    rf = mlp(decoder, reparameterize(mu_f, logvar_f, eps_ff).detach())
    if official:
        # OFFICIAL: tanh on mu, logvar of E(rec), E(fake) before the decoder's KLs and AS-Distance.
        mu_r, logvar_r, mu_f, logvar_f = (torch.tanh(v) for v in (mu_r, logvar_r, mu_f, logvar_f))
    as_dec = 0.0
    if use_as:
        reduction = "official_mean" if official else "paper"
        as_dec = distance(mu_r, logvar_r, mu_f, logvar_f, reduction=reduction,
                          kernel=kernel).unsqueeze(-1)
    loss_d = as_intro_decoder_loss(
        rec_err,
        kl_divergence(mu_r, logvar_r),
        kl_divergence(mu_f, logvar_f),
        sse(rec.detach(), rr),
        sse(fake.detach(), rf),
        as_dec,
        c=c,
        s=s,
        beta_rec=beta_rec,
        beta_kl=beta_kl,
        gamma_r=gamma_r,
        variant="official" if official else "paper",
    )
    optimizer_step(decoder, loss_d, opt_decoder)
    return loss_e.detach(), loss_d.detach()


# --------------------------------------------------------------------------------------------------
# Runs and groups of stacked runs


@dataclass
class RunSpec:
    dataset: str
    method: str
    combo: str
    seed: int
    beta_kl: float
    beta_rec: float
    beta_neg: float

    @property
    def tag(self):
        return f"{self.dataset}_{self.method}_{self.combo}_{self.seed}"


class Group:
    """The runs of one method, stacked: weights, Adam states, per-run generators and weights, and
    the coverage trace (modes and paper-KL every trace_every iterations)."""

    def __init__(self, method, runs, cfg, device, capturable=False):
        self.method, self.runs, self.device = method, runs, device
        self.gens_model = [torch.Generator().manual_seed(3 * r.seed) for r in runs]  # init + noise
        self.gens_data = [torch.Generator().manual_seed(3 * r.seed + 1) for r in runs]  # data
        sizes_enc = [X_DIM] + [cfg.hidden] * 4 + [2 * Z_DIM]
        sizes_dec = [Z_DIM] + [cfg.hidden] * 4 + [X_DIM]
        self.enc = [p.to(device).requires_grad_() for p in init_mlp(sizes_enc, self.gens_model)]
        self.dec = [p.to(device).requires_grad_() for p in init_mlp(sizes_dec, self.gens_model)]
        # capturable: Adam keeps its step counts on the device, as a CUDA graph needs.
        self.opt_enc = torch.optim.Adam(self.enc, lr=cfg.lr, capturable=capturable)
        self.opt_dec = torch.optim.Adam(self.dec, lr=cfg.lr, capturable=capturable)

        def column(values):
            return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(-1)  # (R, 1)

        self.betas = {
            "beta_kl": column([r.beta_kl for r in runs]),
            "beta_rec": column([r.beta_rec for r in runs]),
            "beta_neg": column([r.beta_neg for r in runs]),
        }
        self.margin, self.gamma_r, self.s = cfg.margin, cfg.gamma_r, 1.0 / X_DIM
        self.kernel, self.fused = cfg.kernel, cfg.as_distance == "fused"
        self.first_bad = torch.full((len(runs),), -1, dtype=torch.long, device=device)
        # Coverage probes: fixed prior draws and real points from their own generators, so tracing
        # never touches the training streams.
        gens = [torch.Generator().manual_seed(3 * r.seed + 2) for r in runs]
        # Drawn as evaluate() draws them, so the record at t = iters equals the final metrics.
        self.trace_real = [SAMPLERS[r.dataset](cfg.n_eval, g).numpy() for r, g in zip(runs, gens)]
        for run, g in zip(runs, gens):
            SAMPLERS[run.dataset](12800, g)
        self.trace_z = torch.stack([torch.randn(cfg.n_eval, Z_DIM, generator=g) for g in gens])
        self.trace = []  # [{"t": t, "modes": [R], "kl_paper": [R]}, ...]

    def draw_block(self, k, batch_size):
        """k iterations of data (k, R, B, 2) and noise (k, 6, R, B, z), each run from its own
        generators."""
        data = torch.stack(
            [
                SAMPLERS[r.dataset](k * batch_size, g).view(k, batch_size, X_DIM)
                for r, g in zip(self.runs, self.gens_data)
            ],
            1,
        )
        noise = torch.stack(
            [torch.randn(k, 6, batch_size, Z_DIM, generator=g) for g in self.gens_model], 2
        )
        return data.to(self.device), noise.to(self.device)

    def set_lr(self, lr):
        for opt in (self.opt_enc, self.opt_dec):
            for param_group in opt.param_groups:
                param_group["lr"] = lr

    def step(self, t, x, noise, warming_up, c, variant):
        """Iteration t (an int, or a 0-dim device tensor under CUDA graphs) of every run; the
        plain-VAE step while warming_up. State changes in place, so a captured graph replays it."""
        nets = (self.enc, self.dec, self.opt_enc, self.opt_dec, x, noise)
        b = self.betas
        if self.method == "vae" or warming_up:
            losses = step_vae(*nets, beta_rec=b["beta_rec"], beta_kl=b["beta_kl"])
        elif self.method == "introvae":
            losses = step_introvae(*nets, margin=self.margin, **b)
        else:
            losses = step_introspective(
                *nets,
                c=1.0 if self.method == "sintrovae" else c,
                s=self.s,
                gamma_r=self.gamma_r,
                kernel=self.kernel,
                fused=self.fused,
                as_variant="none" if self.method == "sintrovae" else variant,
                **b,
            )
        bad = ~(torch.isfinite(losses[0]) & torch.isfinite(losses[1]))
        self.first_bad.copy_(torch.where((self.first_bad < 0) & bad, t, self.first_bad))

    @torch.no_grad()
    def record_coverage(self, t):
        """Modes covered and paper-convention KL of cfg.n_eval generated points, per run."""
        fake = mlp(self.dec, self.trace_z.to(self.device)).cpu().numpy()
        modes, kls = [], []
        for run, real, points in zip(self.runs, self.trace_real, fake):
            if not np.isfinite(points).all():
                modes.append(None)
                kls.append(None)
                continue
            span = DATASET_PRESETS[run.dataset]["span"]
            with warnings.catch_warnings():  # a collapse outside the square is a result here
                warnings.simplefilter("ignore")
                kl = hist_kl_jsd(real, points, bins=100, span=span, convention="paper")[0]
            covered = mode_stats(points, run.dataset)[0]
            modes.append(None if isinstance(covered, float) else covered)
            kls.append(None if math.isnan(kl) else round(kl, 3))
        self.trace.append({"t": t, "modes": modes, "kl_paper": kls})

    def state(self):
        return {
            "method": self.method,
            "tags": [r.tag for r in self.runs],
            "enc": [p.detach().cpu() for p in self.enc],
            "dec": [p.detach().cpu() for p in self.dec],
            "opt_enc": self.opt_enc.state_dict(),
            "opt_dec": self.opt_dec.state_dict(),
            "gens_model": [g.get_state() for g in self.gens_model],
            "gens_data": [g.get_state() for g in self.gens_data],
            "first_bad": self.first_bad.cpu(),
            "trace": self.trace,
        }

    def load(self, state):
        with torch.no_grad():
            for param, saved in zip(self.enc + self.dec, state["enc"] + state["dec"]):
                param.copy_(saved)
        self.opt_enc.load_state_dict(state["opt_enc"])
        self.opt_dec.load_state_dict(state["opt_dec"])
        gens = self.gens_model + self.gens_data
        for gen, saved in zip(gens, state["gens_model"] + state["gens_data"]):
            gen.set_state(saved)
        self.first_bad = state["first_bad"].to(self.device)
        self.trace = state["trace"]


def build_runs(cfg):
    datasets = DATASETS if cfg.dataset == "all" else (cfg.dataset,)
    combos = tuple(COMBOS) if cfg.combo == "all" else (cfg.combo,)
    methods = [m for m in METHODS if m in cfg.methods.split(",")]
    seeds = [int(s) for s in cfg.seeds.split(",")]
    return [
        RunSpec(d, m, c, seed, *combo_betas(c, d, cfg.mapping))
        for d in datasets
        for c in combos
        for m in methods
        for seed in seeds
    ]


def build_groups(runs, cfg, device, graphs=False):
    """One Group per method present; graphs: for Stepper(graphs=True) (capturable Adam on CUDA)."""
    capturable = graphs and device.type == "cuda"
    return [
        Group(m, [r for r in runs if r.method == m], cfg, device, capturable=capturable)
        for m in METHODS
        if any(r.method == m for r in runs)
    ]


# --------------------------------------------------------------------------------------------------
# Loop


def autocast(device, precision, cache=True):
    """bf16 autocast of the matmuls for --precision bf16; a no-op context for fp32."""
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=cache
    )


def checkpoint_config(cfg):
    """The fields a resumed run must share with the run that wrote the checkpoint."""
    # Like the device, the AS-Distance's implementation changes rounding, not the experiment.
    skip = ("out", "device", "graphs", "as_distance", "bench", "ckpt_every", "until", "table")
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    if config["kernel"] == "marginal":  # the default: earlier runs' folders and checkpoints fit
        del config["kernel"]
    return config


def default_out_dir(cfg):
    """runs/toy2d_<dataset>_<combo>_s<seeds>_<iters>_<8 hex digits of the flags>: one folder per set
    of flags, so the same command resumes in its own folder."""
    flags = json.dumps(checkpoint_config(cfg), sort_keys=True)
    digest = hashlib.sha256(flags.encode()).hexdigest()[:8]
    seeds = cfg.seeds.replace(",", "-")
    return os.path.join("runs", f"toy2d_{cfg.dataset}_{cfg.combo}_s{seeds}_{cfg.iters}_{digest}")


def save_checkpoint(path, groups, cfg, iteration, train_seconds):
    state = {
        "config": checkpoint_config(cfg),
        "iteration": iteration,
        "train_seconds": train_seconds,
        "groups": [g.state() for g in groups],
    }
    atomic_write(path, lambda handle: torch.save(state, handle))


def phases(cfg):
    """The run's phases as (name, start, stop): VAE warm-up, AS-Distance active (c < 1), and the
    adversarial rest. Only AS-IntroVAE steps differ between the last two."""
    warmup, _ = schedule(cfg.iters, cfg.warmup)
    warmup = min(warmup, cfg.iters)
    as_end = cfg.iters if annealing_schedule(cfg) == "tanh" else math.ceil(cfg.iters / 5)
    as_end = min(max(as_end, warmup), cfg.iters)
    spans = [
        ("warm-up", 0, warmup),
        ("AS active", warmup, as_end),
        ("adversarial", as_end, cfg.iters),
    ]
    return [p for p in spans if p[2] > p[1]]


def phase_of(spans, t):
    """The name of the phase of phases(cfg) (spans) that iteration t falls in ("done" after)."""
    return next((name for name, a, b in spans if a <= t < b), "done")


def untimed_iterations(warm, graphs):
    """Untimed iterations before a phase's timing: `warm`, and with graphs at least those before
    and at the capture."""
    return max(warm, Stepper.EAGER_BEFORE_CAPTURE + 1) if graphs else warm


class Stepper:
    """Iteration t of every group side by side. Eager (graphs=False): each step with float c and
    lr, as written. graphs=True: the iteration reads its data, noise, c and t from static device
    buffers, and on CUDA one iteration is captured as a CUDA graph per span of iterations that
    share the learning rate and the phase (so every Python branch and every lr is fixed inside the
    graph) and replayed for the rest of the span: no host sync, and per iteration two copies per
    group and two fills instead of about a thousand kernel launches. On a CPU, graphs=True runs
    the same static-buffer iteration eagerly (what the tests check against the eager path)."""

    EAGER_BEFORE_CAPTURE = 2  # real iterations run eagerly first: Adam's state, cuBLAS, autograd

    def __init__(self, groups, cfg, graphs=False):
        self.groups, self.cfg, self.graphs = groups, cfg, graphs
        self.device = groups[0].device
        self.warmup, self.milestones = schedule(cfg.iters, cfg.warmup)
        self.anneal = annealing_schedule(cfg)
        self.phases = phases(cfg)  # looked up every iteration with graphs
        self.capture = graphs and self.device.type == "cuda"
        if self.capture:
            torch.cuda.set_device(self.device)  # graphs capture on the current device's streams
        self.span, self.graph, self.eager_left = None, None, 0
        if graphs:
            self.xs = [
                torch.zeros(len(g.runs), cfg.batch_size, X_DIM, device=self.device) for g in groups
            ]  # (R, B, 2) each
            self.noises = [
                torch.zeros(6, len(g.runs), cfg.batch_size, Z_DIM, device=self.device)
                for g in groups
            ]  # (6, R, B, z) each
            self.c = torch.zeros((), device=self.device)
            self.t = torch.zeros((), dtype=torch.long, device=self.device)

    def step(self, t, xs, noises):
        """Iteration t; xs[i], noises[i]: group i's batch (R, B, 2) and noise (6, R, B, z)."""
        lr = learning_rate(t, self.cfg.lr, self.milestones)
        c = annealing_coefficient(t, self.cfg.iters, self.anneal)
        if not self.graphs:
            for g in self.groups:
                g.set_lr(lr)
            self.iteration(t, xs, noises, t < self.warmup, c)
            return
        span = (lr, phase_of(self.phases, t))
        if span != self.span:  # a new span: new lr and branches, so a new graph
            self.span, self.graph, self.eager_left = span, None, self.EAGER_BEFORE_CAPTURE
            for g in self.groups:
                g.set_lr(lr)
        for buffer, value in zip(self.xs + self.noises, list(xs) + list(noises)):
            buffer.copy_(value, non_blocking=True)
        self.c.fill_(c)
        self.t.fill_(t)
        if self.graph is not None:
            self.graph.replay()
        elif not self.capture:
            self.static_iteration(span[1])
        elif self.eager_left > 0:
            self.eager_left -= 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.static_iteration(span[1])
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_iteration(span[1])
            self.graph.replay()  # capture records the iteration without running it

    def static_iteration(self, phase):
        """One iteration on the static buffers; c is the buffer only while the AS-Distance is
        active (elsewhere it is 1, or unused in the warm-up)."""
        c = self.c if phase == "AS active" else 1.0
        self.iteration(self.t, self.xs, self.noises, phase == "warm-up", c)

    def iteration(self, t, xs, noises, warming_up, c):
        # autocast's cache of cast weights must be off inside a CUDA graph capture.
        with autocast(self.device, self.cfg.precision, cache=not self.graphs):
            for g, x, noise in zip(self.groups, xs, noises):
                g.step(t, x, noise, warming_up, c, self.cfg.variant)


def checkpoint_interval(cfg):
    """Iterations between checkpoints: --ckpt-every, or a tenth of --iters (at most 2000, at
    least one block of 50)."""
    return cfg.ckpt_every or min(2000, max(BLOCK, cfg.iters // 10))


def train(groups, cfg, start, stop, ckpt_path=None, train_seconds=0.0, progress=None, graphs=False):
    """Iterations start..stop-1 of every group, side by side, with coverage records every
    cfg.trace_every iterations. Returns the wall seconds spent (cumulative)."""
    stepper = Stepper(groups, cfg, graphs)
    t, t_ckpt, tic = start, start, time.time()
    while t < stop:
        k = min(BLOCK, stop - t)
        blocks = [g.draw_block(k, cfg.batch_size) for g in groups]
        for i in range(k):
            stepper.step(t, [data[i] for data, _ in blocks], [noise[i] for _, noise in blocks])
            t += 1
        if t % cfg.trace_every == 0 or t == cfg.iters:
            for g in groups:
                g.record_coverage(t)
        if progress is not None:
            progress.update(t)
        if ckpt_path and (t - t_ckpt >= checkpoint_interval(cfg) or t == stop):
            save_checkpoint(ckpt_path, groups, cfg, t, train_seconds + time.time() - tic)
            t_ckpt = t
    return train_seconds + time.time() - tic


def phase_costs(groups, cfg, n_iters, warm=2, graphs=False):
    """Measured seconds per iteration of all groups together in each phase of the run, as two
    dicts {phase name: seconds}: wall time and this process's CPU time (which other load on a
    shared CPU disturbs less). From n_iters timed steps after untimed_iterations(warm, graphs)
    untimed ones, on the given groups (their weights move: pass fresh copies when the run must
    not notice)."""
    device = groups[0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warm = untimed_iterations(warm, graphs)
    stepper = Stepper(groups, cfg, graphs)
    blocks = [g.draw_block(1, cfg.batch_size) for g in groups]
    xs, noises = [data[0] for data, _ in blocks], [noise[0] for _, noise in blocks]
    costs, cpu_costs = {}, {}
    for name, begin, end in phases(cfg):
        for i in range(warm + n_iters):
            if i == warm:
                sync()
                tic, tic_cpu = time.perf_counter(), time.process_time()
            stepper.step(begin, xs, noises)
        sync()
        costs[name] = (time.perf_counter() - tic) / n_iters
        cpu_costs[name] = (time.process_time() - tic_cpu) / n_iters
    return costs, cpu_costs


def predicted_seconds(cfg, costs, begin, end):
    """Seconds for iterations begin..end-1 from the per-phase costs."""
    return sum(costs[name] * max(0, min(end, b) - max(begin, a)) for name, a, b in phases(cfg))


class PhaseProgress:
    """Iteration, phase, rate and an ETA from the per-phase costs, rescaled by how fast the run has
    actually gone so far, on stderr: one line rewritten with '\\r' on a terminal, a line per
    update (at most one a minute) when redirected to a file or a pipe."""

    def __init__(self, cfg, costs, start, stop, stream=None, min_interval=None):
        self.cfg, self.costs, self.start, self.stop = cfg, costs, start, stop
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        if min_interval is None:
            min_interval = 1.0 if self.terminal else 60.0
        self.tic, self.last, self.min_interval, self.printed = time.time(), 0.0, min_interval, False

    def eta(self, t, elapsed):
        """Seconds left after iteration t: the predicted cost of t..stop, times how much slower
        (or faster) than predicted start..t went."""
        expected = predicted_seconds(self.cfg, self.costs, self.start, t)
        scale = elapsed / expected if expected > 0 else 1.0
        return scale * predicted_seconds(self.cfg, self.costs, t, self.stop)

    def update(self, t):
        now = time.time()
        if now - self.last < self.min_interval and t < self.stop:
            return
        self.last, elapsed = now, now - self.tic
        eta = self.eta(t, elapsed)
        phase = phase_of(phases(self.cfg), t)
        rate = (t - self.start) / max(elapsed, 1e-9)
        line = (f"toy2d train: {t}/{self.stop} it ({phase}) {rate:.1f} it/s, "
                f"elapsed {format_seconds(elapsed)}, ETA {format_seconds(eta)}")
        self.stream.write(f"\r{line}  " if self.terminal else f"{line}\n")
        self.stream.flush()
        self.printed = True

    def close(self):
        if self.printed and self.terminal:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------------
# Evaluation


def gnelbo_loss(enc, dec, x):
    """Soft-IntroVAE's evaluation energy L(x) = KL(q(z|x) || N(0, I)) + ||x - Dec(mu(x))||^2
    (weights 1, z = mu)."""
    mu, logvar = encode(enc, x)
    return kl_divergence(mu, logvar) + sse(x, mlp(dec, mu))


@torch.no_grad()
def grid_evaluation(enc, dec, spans, real, grid, pooled):
    """gnELBO = mean_j L(x_j) / (sum_grid L + sum_j L(x_j)) over real samples x_j (R, N, 2) and the
    grid x grid points of linspace(-R, R) per run (float64 sums), and exp(-L) on the grid
    average-pooled to pooled x pooled (image orientation: row 0 = top = +R, column 0 = -R).
    Evaluated in chunks of grid rows."""
    n_runs, device = real.shape[0], real.device
    axis = torch.linspace(-1, 1, grid, device=device)
    pool = grid // pooled
    rows = max(pool, (2**18 // (n_runs * grid)) // pool * pool)
    grid_sum = torch.zeros(n_runs, dtype=torch.float64, device=device)
    density = torch.zeros(n_runs, grid, pooled, device=device)  # (R, x index, pooled y)
    for i0 in range(0, grid, rows):
        xs = axis[i0 : i0 + rows]
        unit = torch.stack(torch.meshgrid(xs, axis, indexing="ij"), -1).reshape(1, -1, 2)
        loss = gnelbo_loss(enc, dec, unit * spans.view(-1, 1, 1))  # (R, rows*grid)
        grid_sum += loss.double().sum(-1)
        density[:, i0 : i0 + len(xs)] = (
            torch.exp(-loss).view(n_runs, len(xs), pooled, pool).mean(-1)
        )
    loss_real = gnelbo_loss(enc, dec, real).double()
    gnelbo = loss_real.mean(-1) / (grid_sum + loss_real.sum(-1))
    density = density.view(n_runs, pooled, pool, pooled).mean(2)  # (R, x, y)
    return gnelbo.cpu().numpy(), density.transpose(1, 2).flip(1).cpu().numpy()


def mode_stats(points, dataset):
    """(modes covered, modes in the dataset, high-quality fraction) of generated points (N, 2).
    8gaussians: a centre is covered when >= 1% of the points lie within 0.1 of it; high quality =
    within 3 noise-sigmas (3*0.02/1.414) of some centre. checkerboard: a square is covered with
    >= 1% of the points inside it; high quality = inside the support. rings: a circle is covered
    with >= 1% of the points within 3 sigma (0.24) of it; high quality = within 3 sigma of some
    circle. spiral: not defined (nan)."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if dataset == "8gaussians":
        angle = np.arange(8) * np.pi / 4
        centres = 2 / 1.414 * np.stack([np.cos(angle), np.sin(angle)], 1)
        dist = np.linalg.norm(points[:, None] - centres[None], axis=-1)  # (N, 8)
        covered = int(((dist < 0.1).sum(0) >= 0.01 * n).sum())
        return covered, 8, float((dist.min(1) < 3 * 0.02 / 1.414).mean())
    if dataset == "checkerboard":
        half = points / 2
        inside = (np.abs(half) < 2).all(1) & (np.floor(half[:, 0]) % 2 == np.floor(half[:, 1]) % 2)
        square = (np.floor(half[:, 0]) + 2) * 4 + (np.floor(half[:, 1]) + 2)
        counts = np.bincount(square[inside].astype(int), minlength=16)
        return int((counts >= 0.01 * n).sum()), 8, float(inside.mean())
    if dataset == "rings":
        radius = np.linalg.norm(points, axis=1)
        gap = np.abs(radius[:, None] - np.array(RING_RADII)[None])  # (N, 4)
        covered = int(((gap < 3 * 0.08).sum(0) >= 0.01 * n).sum())
        return covered, 4, float((gap.min(1) < 3 * 0.08).mean())
    return float("nan"), float("nan"), float("nan")


def evaluate(groups, cfg, out_dir, train_seconds, failures):
    """Metrics, samples and PNGs of every run; returns the results.json records."""
    records = []
    for g in groups:
        tic = time.time()
        n_runs, device = len(g.runs), g.device
        gens = [torch.Generator().manual_seed(3 * r.seed + 2) for r in g.runs]
        real_hist = [SAMPLERS[r.dataset](cfg.n_eval, gen).numpy() for r, gen in zip(g.runs, gens)]
        real_elbo = torch.stack([SAMPLERS[r.dataset](12800, gen) for r, gen in zip(g.runs, gens)])
        z = torch.stack([torch.randn(cfg.n_eval, Z_DIM, generator=gen) for gen in gens]).to(device)
        spans = torch.tensor([DATASET_PRESETS[r.dataset]["span"] for r in g.runs], device=device)
        with torch.no_grad():
            fake = mlp(g.dec, z).cpu().numpy()
        pooled = min(256, cfg.grid)
        gnelbo, density = grid_evaluation(
            g.enc, g.dec, spans, real_elbo.to(device), cfg.grid, pooled
        )
        seconds = (time.time() - tic) / n_runs
        for i, run in enumerate(g.runs):
            tic = time.time()
            span = DATASET_PRESETS[run.dataset]["span"]
            np.save(os.path.join(out_dir, f"samples_{run.tag}.npy"), fake[i])
            record = {
                "dataset": run.dataset,
                "method": run.method,
                "combo": run.combo,
                "variant": cfg.variant,
                "kernel": cfg.kernel,
                "as_distance": cfg.as_distance,
                "mapping": cfg.mapping,
                "schedule": annealing_schedule(cfg),
                "warmup": schedule(cfg.iters, cfg.warmup)[0],
                "precision": cfg.precision,
                "seed": run.seed,
                "iters": cfg.iters,
                "beta_kl": run.beta_kl,
                "beta_rec": run.beta_rec,
                "beta_neg": run.beta_neg,
            }
            if run.method == "introvae":
                record["margin"] = cfg.margin
            if run.tag in failures:
                record.update(
                    kl_paper=None,
                    jsd_paper=None,
                    kl=None,
                    jsd=None,
                    gnelbo=None,
                    modes=None,
                    hq_fraction=None,
                    diverged_at=failures[run.tag],
                )
            else:
                kl_paper, jsd_paper = hist_kl_jsd(
                    real_hist[i], fake[i], bins=100, span=span, convention="paper"
                )
                kl, jsd = hist_kl_jsd(
                    real_hist[i], fake[i], bins=100, span=span, convention="textbook"
                )
                modes, n_modes, hq = mode_stats(fake[i], run.dataset)
                values = dict(
                    kl_paper=kl_paper,
                    jsd_paper=jsd_paper,
                    kl=kl,
                    jsd=jsd,
                    gnelbo=gnelbo[i],
                    modes=modes,
                    n_modes=n_modes,
                    hq_fraction=hq,
                )
                # JSON has no NaN: undefined values (nothing inside the square, spiral modes): null
                record.update(
                    {
                        k: None if math.isnan(v) else (v if isinstance(v, int) else float(v))
                        for k, v in values.items()
                    }
                )
            record["trace"] = [
                {"t": e["t"], "modes": e["modes"][i], "kl_paper": e["kl_paper"][i]} for e in g.trace
            ]
            kl_text = "n/a" if record.get("kl_paper") is None else f"{record['kl_paper']:.1f}"
            modes_text = ("-" if record.get("modes") is None
                          else f"{record['modes']}/{record['n_modes']}")
            title = (
                f"{METHOD_NAMES[run.method]}, {run.combo} "
                f"({run.beta_kl:g}, {run.beta_rec:g}, {run.beta_neg:g})\n"
                f"KL {kl_text}, modes {modes_text}"
            )
            scatter = draw_scatter(fake[i], span, title, real=real_hist[i])
            scatter.save(os.path.join(out_dir, f"scatter_{run.tag}.png"))
            draw_density(density[i], span, title).save(
                os.path.join(out_dir, f"density_{run.tag}.png")
            )
            record["train_seconds_shared"] = round(train_seconds, 1)
            record["seconds"] = round(train_seconds + seconds + time.time() - tic, 1)
            records.append(record)
    return records


# --------------------------------------------------------------------------------------------------
# Pictures (Pillow only)


def jet(values):
    """A jet-like colour map: values in [0, 1] (H, W) -> uint8 (H, W, 3), dark blue - cyan -
    yellow - dark red."""
    v = np.clip(values, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (rgb * 255).astype(np.uint8)


def frame_panel(body, span, title, right=8):
    """Put an (H, W, 3) uint8 picture of [-span, span]^2 in a frame with a title (one or two lines)
    and axis labels; `right` px of white margin for a colour bar."""
    font = ImageFont.load_default()
    height, width = body.shape[:2]
    left, top, bottom = 30, 6 + 12 * len(title.split("\n")), 16
    panel = Image.new("RGB", (left + width + right, top + height + bottom), "white")
    panel.paste(Image.fromarray(body), (left, top))
    draw = ImageDraw.Draw(panel)
    draw.rectangle([left - 1, top - 1, left + width, top + height], outline="black")
    draw.multiline_text((left, 3), title, fill="black", font=font, spacing=2)
    for frac, label in ((0.0, f"{-span:g}"), (0.5, "0"), (1.0, f"{span:g}")):
        x = left + frac * (width - 1)
        draw.line([x, top + height, x, top + height + 3], fill="black")
        draw.text((x - 3 * len(label), top + height + 4), label, fill="black", font=font)
        y = top + (1 - frac) * (height - 1)
        draw.line([left - 4, y, left - 1, y], fill="black")
        draw.text((left - 6 - 6 * len(label), y - 5), label, fill="black", font=font)
    return panel


def paint_points(body, points, span, colour, thick):
    """Dots of (N, 2) points on an (S, S, 3) picture of [-span, span]^2 (outside points skipped)."""
    size = body.shape[0]
    points = points[np.isfinite(points).all(1)]
    col = np.round((points[:, 0] + span) / (2 * span) * (size - 1)).astype(int)
    row = np.round((span - points[:, 1]) / (2 * span) * (size - 1)).astype(int)
    offsets = ((0, 0), (0, 1), (1, 0), (1, 1)) if thick else ((0, 0),)
    for d_row, d_col in offsets:
        r, c = row + d_row, col + d_col
        keep = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        body[r[keep], c[keep]] = colour


def draw_scatter(points, span, title, size=220, real=None):
    """Generated points as green dots on [-span, span]^2, over real points (if given) in light grey,
    so a collapse onto a few modes shows against where the modes are."""
    body = np.full((size, size, 3), 255, dtype=np.uint8)
    if real is not None:
        paint_points(body, np.asarray(real), span, (200, 200, 200), thick=False)
    paint_points(body, np.asarray(points), span, (0, 140, 0), thick=True)
    return frame_panel(body, span, title)


def draw_density(density, span, title):
    """exp(-L) on the grid (image orientation), scaled to its maximum, in the jet colour map, with
    a colour bar from 0 to 1 (of the maximum) on the right."""
    peak = density.max() if np.isfinite(density).all() and density.max() > 0 else 1.0
    panel = frame_panel(jet(density / peak), span, title, right=64)
    size, font = density.shape[0], ImageFont.load_default()
    bar = jet(np.linspace(1, 0, size)[:, None].repeat(12, 1))  # (size, 12, 3), 1 at the top
    top, x = panel.height - 16 - size, panel.width - 56
    panel.paste(Image.fromarray(bar), (x, top))
    draw = ImageDraw.Draw(panel)
    draw.rectangle([x - 1, top - 1, x + 12, top + size], outline="black")
    for frac, label in ((0.0, "1"), (1.0, "0")):
        draw.text((x + 16, top + frac * (size - 1) - 5), label, fill="black", font=font)
    draw.text((x + 16, top + size // 2 - 12), "exp(-L)\n/ max", fill="black", font=font)
    return panel


def draw_overview(panels, header, row_labels=None):
    """Panels as a grid (rows: combos, columns: methods) under a header, each row under its label
    if given; missing cells white."""
    n_rows, n_cols = len(panels), len(panels[0])
    cell_w = max(p.width for row in panels for p in row if p is not None)
    cell_h = max(p.height for row in panels for p in row if p is not None)
    band = 0 if row_labels is None else 14
    font = ImageFont.load_default()
    # a one-column sheet would otherwise cut its header short
    header_w = 8 + math.ceil(font.getlength(header))
    width = max(n_cols * cell_w, header_w)
    sheet = Image.new("RGB", (width, 16 + n_rows * (band + cell_h)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), header, fill="black", font=font)
    for i, row in enumerate(panels):
        top = 16 + i * (band + cell_h)
        if row_labels is not None:
            draw.text((4, top + 1), row_labels[i], fill=(0, 0, 160), font=font)
        for j, panel in enumerate(row):
            if panel is not None:
                sheet.paste(panel, (j * cell_w, top + band))
    return sheet


def run_tag(record):
    return f"{record['dataset']}_{record['method']}_{record['combo']}_{record['seed']}"


def setting(record):
    """The run's departures from the 2D protocol, e.g. "warm-up 0, tanh" ("protocol" if none)."""
    iters = record["iters"]
    parts = [
        f"{iters} it" if iters != 30000 else "",
        "official" if record["variant"] == "official" else "",
        "joint kernel" if record.get("kernel") == "joint" else "",
        f"warm-up {record['warmup']}" if record["warmup"] != schedule(iters)[0] else "",
        (
            f"{record['schedule']} c"
            if record["schedule"] != ("tanh" if record["variant"] == "official" else "linear")
            else ""
        ),
        "literal" if record["mapping"] != "closest" and record["combo"] in COMBOS else "",
        record["precision"] if record["precision"] != "fp32" else "",
    ]
    return ", ".join(p for p in parts if p) or "protocol"


def write_overviews(records, out_dir, folders=None):
    """overview_<dataset>_<seed>.png, laid out like the paper's Fig. 3 (rows: combos, columns:
    methods), from the scatter PNGs (in folders[i] for records[i], else in out_dir). Runs of one
    combo under different settings (e.g. fp32 and bf16) get a row each, labelled with it."""
    folders = folders or [out_dir] * len(records)
    for dataset, seed in dict.fromkeys((r["dataset"], r["seed"]) for r in records):
        mine = [
            (r, (r["combo"], setting(r)), folder)
            for r, folder in zip(records, folders)
            if (r["dataset"], r["seed"]) == (dataset, seed)
        ]
        rows = list(dict.fromkeys(row for _, row, _ in mine))
        methods = list(dict.fromkeys(r["method"] for r, _, _ in mine))
        panels = [[None] * len(methods) for _ in rows]
        for r, row, folder in mine:
            path = os.path.join(folder, f"scatter_{run_tag(r)}.png")
            panels[rows.index(row)][methods.index(r["method"])] = Image.open(path)
        labels = [f"{combo}: {label}" for combo, label in rows]
        one_setting = len({label for _, label in rows}) == 1
        first = mine[0][0]
        label = rows[0][1] if one_setting else "setting per row"
        header = (
            f"{dataset}, seed {seed}, {label}"
            f"{' (30000 iterations)' if label == 'protocol' else ''}, mapping {first['mapping']}; "
            "rows: combos (beta_kl, beta_rec, beta_neg), columns: methods; grey: data, green: "
            "samples; KL in the paper's convention"
        )
        sheet = draw_overview(panels, header, row_labels=None if one_setting else labels)
        sheet.save(os.path.join(out_dir, f"overview_{dataset}_{seed}.png"))


def draw_coverage_panel(record, width=300, height=150, kl_top=None):
    """Modes covered (blue, left scale 0..n_modes) and paper-KL (red, right scale 0..kl_top, by
    default the run's own maximum) against iteration; warm-up shaded grey, the AS-Distance's
    active span (AS-IntroVAE) shaded yellow."""
    cfg = Config(
        iters=record["iters"],
        warmup=record["warmup"],
        schedule=record["schedule"],
        variant=record["variant"],
    )
    font = ImageFont.load_default()
    left, top, right, bottom = 28, 16, 34, 14
    panel = Image.new("RGB", (left + width + right, top + height + bottom), "white")
    draw = ImageDraw.Draw(panel)

    def x_of(t):
        return left + t / cfg.iters * (width - 1)

    for name, a, b in phases(cfg):
        if name == "warm-up" or (name == "AS active" and record["method"] == "asintrovae"):
            fill = (225, 225, 225) if name == "warm-up" else (255, 245, 190)
            draw.rectangle([x_of(a), top, x_of(b), top + height - 1], fill=fill)
    draw.rectangle([left - 1, top - 1, left + width, top + height], outline="black")
    n_modes = record.get("n_modes") or {"rings": 4}.get(record["dataset"], 8)
    trace = record["trace"]
    kl_top = kl_top or coverage_kl_top([record])
    for key, scale, colour in (("modes", n_modes, (0, 60, 200)), ("kl_paper", kl_top, (200, 0, 0))):
        points = [
            (x_of(e["t"]), top + (1 - e[key] / scale) * (height - 1))
            for e in trace
            if e[key] is not None
        ]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    title = f"{METHOD_NAMES[record['method']]} {record['combo']} seed {record['seed']}"
    draw.text((left, 2), f"{title} ({setting(record)})", fill="black", font=font)
    draw.text((2, top - 4), f"{n_modes}", fill=(0, 60, 200), font=font)
    draw.text((2, top + height - 10), "0", fill=(0, 60, 200), font=font)
    draw.text((left + width + 3, top - 4), f"{kl_top:.0f}", fill=(200, 0, 0), font=font)
    draw.text((left + width + 3, top + height - 10), "0", fill=(200, 0, 0), font=font)
    for k in range(5):  # x ticks at quarters of the run
        t = cfg.iters * k // 4
        draw.line([x_of(t), top + height, x_of(t), top + height + 3], fill="black")
        text = f"{t}" if k < 4 else f"{t} it"
        draw.text((x_of(t) - 3 * len(text) * (k > 0), top + height + 3), text, fill="black",
                  font=font)
    return panel


def coverage_kl_top(records):
    """The top of the KL axis shared by coverage panels: 5 % above the largest KL traced."""
    kls = [e["kl_paper"] for r in records for e in r["trace"] if e["kl_paper"] is not None]
    return max(kls) * 1.05 if kls and max(kls) > 0 else 1.0


def write_coverage(records, out_dir, per_row=4):
    """coverage.png: one panel per run (modes and paper-KL against iteration)."""
    kl_top = coverage_kl_top(records)  # one scale, so the panels compare by eye
    panels = [draw_coverage_panel(r, kl_top=kl_top) for r in records if r["trace"]]
    if not panels:
        return
    rows = [panels[i : i + per_row] for i in range(0, len(panels), per_row)]
    rows[-1] += [None] * (per_row - len(rows[-1]))
    header = (
        f"coverage: modes (blue, left axis) and KL in the paper's convention (red, right axis, 0 "
        f"to {kl_top:.0f} in every panel) against iteration; grey: warm-up, yellow: AS active"
    )
    draw_overview(rows, header).save(os.path.join(out_dir, "coverage.png"))


# --------------------------------------------------------------------------------------------------
# Tables


def spread(values):
    """'mean +- std' (sample std over seeds; the mean alone for one value; NaN if none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "NaN"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def format_table(records):
    """One line per run."""

    def num(value, fmt):
        return "NaN" if value is None else format(value, fmt)

    lines = [
        "KL ours / JSD ours: in the paper's convention (its Table 1's scale); textbook: the true "
        "divergences; gnELBO in units of 1e-7",
        f"{'dataset':<12} {'method':<11} {'combo':<5} {'seed':>4} {'KL ours':>9} "
        f"{'JSD ours':>10} {'KL textbook':>11} {'JSD textbook':>12} {'gnELBO':>7} {'modes':>5} "
        f"{'hq':>5} {'seconds':>8}"
    ]
    for r in records:
        modes = "-" if r.get("modes") is None else f"{r['modes']}/{r['n_modes']}"
        lines.append(
            f"{r['dataset']:<12} {METHOD_NAMES[r['method']]:<11} {r['combo']:<5} {r['seed']:>4} "
            f"{num(r['kl_paper'], '9.2f')} {num(r['jsd_paper'], '10.2f')} "
            f"{num(r['kl'], '11.3f')} {num(r['jsd'], '12.3f')} "
            f"{num(None if r['gnelbo'] is None else 1e7 * r['gnelbo'], '7.3f')} {modes:>5} "
            f"{num(r['hq_fraction'], '5.2f')} {r['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def format_trace(groups):
    """The coverage trace of every run so far: one line per run, 'modes/paper-KL' per record."""
    lines = []
    for g in groups:
        for i, run in enumerate(g.runs):
            cells = [f"t={e['t']}: {e['modes'][i]}/{e['kl_paper'][i]}" for e in g.trace]
            lines.append(f"{run.tag} (modes/paper-KL): " + ", ".join(cells))
    return "\n".join(lines)


def format_seed_table(records):
    """Markdown: per (dataset, combo, method, setting) mean +- std over seeds of paper-KL,
    paper-JSD, gnELBO (1e-7 units) and modes, each beside the published value of that cell ('-'
    where none; the paper ran the protocol setting only, which a shorter run's cells say)."""

    def published(key, dataset, combo, method, iters):
        value = PAPER.get((dataset, combo), {}).get(key, (None,) * 4)[METHODS.index(method)]
        if value is None:
            return "NaN" if key == "kl" and dataset == "checkerboard" and combo != "tuned" else "-"
        return f"{value:g}" + (" (at 30000 it)" if iters != 30000 else "")

    lines = [
        "| dataset | combo | method | setting | seeds | KL ours | KL published | JSD ours "
        "| JSD published | gnELBO ours (1e-7) | gnELBO published (1e-7) | modes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r["dataset"], r["combo"], r["method"], setting(r)) for r in records)
    for dataset, combo, method, label in keys:
        cell = (dataset, combo, method)
        mine = [
            r
            for r in records
            if (r["dataset"], r["combo"], r["method"], setting(r)) == (*cell, label)
        ]
        gnelbo = [None if r["gnelbo"] is None else 1e7 * r["gnelbo"] for r in mine]
        modes = [r["modes"] for r in mine if r["modes"] is not None]
        n_modes = next((r["n_modes"] for r in mine if r.get("n_modes")), None)
        mode_text = "-" if not modes else f"{', '.join(map(str, modes))} of {n_modes}"
        cell = (*cell, mine[0]["iters"])
        lines.append(
            f"| {dataset} | {combo} | {METHOD_NAMES[method]} | {label} | {len(mine)} "
            f"| {spread([r['kl_paper'] for r in mine])} | {published('kl', *cell)} "
            f"| {spread([r['jsd_paper'] for r in mine])} | {published('jsd', *cell)} "
            f"| {spread(gnelbo)} | {published('gnelbo', *cell)} | {mode_text} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# main


def parse_config(argv):
    parser = OneLineParser(
        prog="toy2d.py",
        description="AS-IntroVAE paper's 2D experiments (see the module docstring).",
        allow_abbrev=False,
    )
    for f in dataclasses.fields(Config):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            choices=CHOICES.get(f.name),
            help=f"{f.metadata['help']} (default {f.default!r})",
        )
    cfg = Config(**vars(parser.parse_args(argv)))
    methods = cfg.methods.split(",")
    if any(m not in METHODS for m in methods):
        parser.error(f"--methods {cfg.methods!r}: use a comma list of {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {cfg.seeds!r}: use a comma list of integers")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds {cfg.seeds!r}: seeds must be distinct and >= 0")
    for name in ("iters", "batch_size", "hidden", "n_eval", "grid", "trace_every"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.ckpt_every < 0:
        parser.error("--ckpt-every must be >= 0 (0: a tenth of --iters)")
    if cfg.trace_every % BLOCK:
        parser.error(f"--trace-every {cfg.trace_every}: use a multiple of {BLOCK}")
    if cfg.kernel == "joint" and cfg.variant == "official":
        parser.error("--kernel joint is Eq. 8 read literally; --variant official keeps the "
                     "released code's marginal kernel")
    if cfg.warmup < -1:
        parser.error(f"--warmup {cfg.warmup}: use -1 (the protocol's share) or a count >= 0")
    if cfg.bench < 0 or cfg.lr <= 0 or cfg.margin < 0 or cfg.gamma_r < 0:
        parser.error("--bench, --margin and --gamma-r must be >= 0 and --lr > 0")
    if cfg.grid % min(256, cfg.grid):
        parser.error(f"--grid {cfg.grid}: use a multiple of 256 (or a value below 256)")
    cuda_n = cfg.device.startswith("cuda:") and cfg.device[5:].isdigit()
    if not (cfg.device in ("auto", "cpu", "cuda") or cuda_n):
        parser.error(f"--device {cfg.device!r}: use auto, cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {cfg.device}: CUDA is not available on this machine")
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.graphs == "on" and not cuda:
        parser.error("--graphs on needs a CUDA device (CUDA graphs); use auto or off")
    return cfg


def describe_costs(costs, unit="ms/it"):
    return ", ".join(f"{name} {1000 * sec:.1f} {unit}" for name, sec in costs.items())


def collect(folders, out_dir):
    """The seed table of finished runs in several folders (each with results.json), and, with an
    output folder, that table.md, the overviews and coverage.png of all of them together."""
    records, sources = [], []
    for folder in folders:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--table: {path} does not exist (is that run finished?)")
        with open(path) as fh:
            found = json.load(fh)
        records += found
        sources += [folder] * len(found)
    table = format_seed_table(records)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write(os.path.join(out_dir, "table.md"), lambda handle: handle.write(table + "\n"),
                     binary=False)
        write_overviews(records, out_dir, sources)
        write_coverage(records, out_dir)
    return table


def main(argv=None):
    cfg = parse_config(argv)
    if cfg.table:
        try:
            print(collect(cfg.table.split(","), cfg.out))
        except FileNotFoundError as err:
            print(f"toy2d.py: error: {err}", file=sys.stderr)
            return 2
        return 0
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    graphs = device.type == "cuda" and cfg.graphs != "off"
    runs = build_runs(cfg)
    groups = build_groups(runs, cfg, device, graphs)
    layout = ", ".join(f"{g.method} x{len(g.runs)}" for g in groups)
    if cfg.bench:
        costs, cpu_costs = phase_costs(groups, cfg, cfg.bench, graphs=graphs)
        total = predicted_seconds(cfg, costs, 0, cfg.iters)
        print(
            f"{len(runs)} runs side by side ({layout}), batch {cfg.batch_size}, {device}, "
            f"{cfg.precision}, {'CUDA graphs' if graphs else 'eager'}, "
            f"AS-Distance {cfg.as_distance}, {torch.get_num_threads()} threads: "
            f"wall {describe_costs(costs, 'ms/iteration')}; process CPU "
            f"{describe_costs(cpu_costs, 'ms/iteration')} (mean of {cfg.bench} after "
            f"{untimed_iterations(2, graphs)} untimed); "
            f"projected {cfg.iters} iterations: {format_seconds(total)} wall, "
            f"{format_seconds(predicted_seconds(cfg, cpu_costs, 0, cfg.iters))} CPU"
        )
        return 0

    out_dir = cfg.out or default_out_dir(cfg)
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    start, train_seconds = 0, 0.0
    if os.path.exists(ckpt_path):
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or foreign file: say so in one line
            print(f"toy2d.py: error: cannot read checkpoint {ckpt_path} ({type(err).__name__}): "
                  "corrupt or not a checkpoint; delete it to start over, or pass another --out",
                  file=sys.stderr)
            return 2
        if ckpt.get("config") != checkpoint_config(cfg):
            print(
                f"toy2d.py: error: {ckpt_path} was written with other flags; use another --out",
                file=sys.stderr,
            )
            return 2
        start, train_seconds = ckpt["iteration"], ckpt["train_seconds"]
        table_path = os.path.join(out_dir, "table.md")  # written after results.json
        if start >= cfg.iters and os.path.exists(table_path):
            with open(table_path) as fh:
                print(fh.read().rstrip())
            print(f"already done: {out_dir} holds the finished run (delete its table.md to "
                  "evaluate again, or pass another --out)")
            return 0
        for g, state in zip(groups, ckpt["groups"]):
            g.load(state)
        print(f"resuming from {ckpt_path} at iteration {start}")

    print(
        f"{len(runs)} runs side by side ({layout}) on {device}"
        f"{' with CUDA graphs' if graphs else ''}, {cfg.iters} iterations -> {out_dir}"
    )
    stop = min(cfg.until, cfg.iters) if cfg.until else cfg.iters
    if start < stop:
        fresh = build_groups(runs, cfg, device, graphs)
        costs, _ = phase_costs(fresh, cfg, n_iters=3, warm=1, graphs=graphs)
        expected = predicted_seconds(cfg, costs, start, stop)
        print(f"expected training time {format_seconds(expected)} ({describe_costs(costs)})")
        progress = PhaseProgress(cfg, costs, start, stop)
        train_seconds = train(
            groups, cfg, start, stop, ckpt_path, train_seconds, progress, graphs=graphs
        )
        progress.close()
    if stop < cfg.iters:
        print(format_trace(groups))
        print(
            f"stopped at iteration {stop} of {cfg.iters}; the same command without --until finishes"
        )
        return 0

    failures = {}
    for g in groups:
        for run, bad in zip(g.runs, g.first_bad.tolist()):
            if bad >= 0:
                failures[run.tag] = bad
                print(f"{run.tag}: non-finite loss from iteration {bad}; its metrics are NaN")
    records = evaluate(groups, cfg, out_dir, train_seconds, failures)
    write_overviews(records, out_dir)
    write_coverage(records, out_dir)
    atomic_write(os.path.join(out_dir, "results.json"),
                 lambda handle: json.dump(records, handle, indent=1), binary=False)
    table = format_seed_table(records)
    # table.md last: its presence says the run is done (a retyped command then just prints it)
    atomic_write(os.path.join(out_dir, "table.md"), lambda handle: handle.write(table + "\n"),
                 binary=False)
    print(format_table(records))
    print(table)
    print(f"results in {out_dir} (trained {train_seconds:.0f} s for all {len(runs)} runs together)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
