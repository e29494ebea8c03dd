"""The AS-IntroVAE paper's 2D experiments (Table 1, Fig. 3, supplement Table 4), all four methods.

Trains VAE, IntroVAE, Soft-IntroVAE and AS-IntroVAE on the 2D toy sets with Soft-IntroVAE's protocol
(../shared/spec/algorithm.md, "The 2D toy protocol"), every selected run SIDE BY SIDE in one program:
the runs' MLP weights are stacked as (R, in, out) tensors and trained with batched matmuls, one
group per method. Runs never mix: each has its own weights, data stream, noise and Adam moments.

    python toy2d.py --combo C2                                  # Table 1, column C2: 4 methods, 8 Gaussians
    python toy2d.py --combo all                                 # Table 1 and the Fig. 3-like overview
    python toy2d.py --dataset checkerboard --combo all          # supplement Table 4
    python toy2d.py --dataset all --combo all                   # 48 runs: 4 datasets x 4 methods x C1-C3
    python toy2d.py --combo all --iters 1500                    # CPU quick version, ~10-16 min (schedule scales)
    python toy2d.py --combo C2 --methods sintrovae --mapping literal   # the other reading of C1-C3
    python toy2d.py --bench 50 --dataset all --combo all        # ms per iteration, 48 runs side by side

Outputs in --out (default runs/toy2d-<timestamp>/): results.json, samples_<dataset>_<method>_<combo>_<seed>.npy
(the generated points the metrics used), scatter_*.png, density_*.png, overview_<dataset>_<seed>.png,
checkpoint.pt (a killed run resumes from it when started again with the same --out and flags).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from eval_metrics import Progress, hist_kl_jsd

# ----------------------------------------------------------------------------------------------------
# Config


def option(default, help):
    """A Config field with its one-line doc, which argparse shows in --help."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    dataset: str = option("8gaussians", "8gaussians | checkerboard | spiral | rings | all")
    combo: str = option("C2", "C1 | C2 | C3 | all | tuned (Soft-IntroVAE's per-dataset betas)")
    methods: str = option("vae,introvae,sintrovae,asintrovae", "comma list of the methods to train")
    variant: str = option("paper", "AS-IntroVAE: paper (eq. 7-9 literally) | official (the released code)")
    mapping: str = option("closest", "C1-C3 as (beta_kl, beta_rec, beta_neg): closest | as (kl, neg, rec): literal")
    iters: int = option(30000, "iterations incl. the VAE warm-up (iters/15) and lr x0.1 at iters/3, iters/2")
    seeds: str = option("92", "comma list of seeds; each seed is one run per (dataset, method, combo)")
    batch_size: int = option(512, "points per iteration, drawn fresh from the data distribution")
    hidden: int = option(256, "width of the 4 hidden layers of encoder and decoder")
    lr: float = option(2e-4, "Adam learning rate of both networks before the steps")
    margin: float = option(8.0, "IntroVAE's hinge margin m for 2D (best of 0.5, 2, 8 in the README's sweep)")
    gamma_r: float = option(1e-8, "weight of the generated samples' reconstruction in the decoder loss")
    n_eval: int = option(5000, "generated and real points for KL / JSD / modes")
    grid: int = option(1024, "gnELBO and density grid is grid x grid over [-R, R]^2")
    out: str = option("", "output folder; empty = runs/toy2d-<timestamp>")
    device: str = option("auto", "auto (cuda when present) | cpu | cuda | cuda:N")
    ckpt_every: int = option(2000, "iterations between checkpoints (rounded to whole data blocks)")
    bench: int = option(0, ">0: time this many post-warm-up iterations, print ms/iteration, write nothing")


CHOICES = {
    "dataset": ("8gaussians", "checkerboard", "spiral", "rings", "all"),
    "combo": ("C1", "C2", "C3", "all", "tuned"),
    "variant": ("paper", "official"),
    "mapping": ("closest", "literal"),
}
METHODS = ("vae", "introvae", "sintrovae", "asintrovae")
METHOD_NAMES = {"vae": "VAE", "introvae": "IntroVAE", "sintrovae": "S-IntroVAE", "asintrovae": "AS-IntroVAE"}
DATASETS = CHOICES["dataset"][:-1]
# Per-dataset presets: plot / histogram half-range R and Soft-IntroVAE's tuned (beta_kl, beta_rec, beta_neg).
DATASET_PRESETS = {
    "8gaussians": {"span": 2.0, "tuned": (0.3, 0.2, 0.9)},
    "checkerboard": {"span": 4.0, "tuned": (0.1, 0.2, 0.2)},
    "spiral": {"span": 4.0, "tuned": (0.5, 0.2, 1.0)},
    "rings": {"span": 4.0, "tuned": (0.2, 0.2, 1.0)},
}
# The paper's combos as printed (sec. 5.2): weight of the real ELBO, of the fake KL, of the fake reconstruction.
COMBOS = {"C1": (0.3, 0.1, 0.9), "C2": (0.5, 0.1, 0.9), "C3": (0.7, 0.2, 0.9)}
BLOCK = 50  # iterations of data and noise drawn per generator call (checkpoints fall on block ends)
X_DIM = 2  # input dimension; s = 1 / X_DIM
Z_DIM = 2  # latent dimension


def combo_betas(combo, dataset, mapping):
    """(beta_kl, beta_rec, beta_neg) of a combo. "closest" reads (a, b, c) as (beta_kl, beta_rec, beta_neg),
    which puts C1 next to Soft-IntroVAE's tuned 8-Gaussians betas (0.3, 0.2, 0.9); "literal" follows the
    paper's words (real ELBO, fake KL, fake reconstruction) = (beta_kl, beta_neg, beta_rec)."""
    if combo == "tuned":
        return DATASET_PRESETS[dataset]["tuned"]
    a, b, c = COMBOS[combo]
    return (a, b, c) if mapping == "closest" else (a, c, b)


def schedule(iters):
    """Warm-up length and lr milestones: the protocol's 2000 / (10000, 15000) of 30000, scaled with iters."""
    return round(iters * 2000 / 30000), (round(iters / 3), round(iters / 2))


def learning_rate(t, base_lr, milestones):
    """lr at iteration t (0-based): x0.1 at each milestone reached (MultiStepLR stepped per iteration)."""
    return base_lr * 0.1 ** sum(t >= m for m in milestones)


# ----------------------------------------------------------------------------------------------------
# Data: each sampler draws n points (n, 2) from its own torch.Generator, on the CPU.


def sample_8gaussians(n, gen):
    """8 centres at radius 2, angles k*45 deg, noise std 0.02, the whole point divided by 1.414."""
    angle = torch.randint(0, 8, (n,), generator=gen).float() * (math.pi / 4)
    centre = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return (centre + 0.02 * torch.randn(n, 2, generator=gen)) / 1.414


def sample_checkerboard(n, gen):
    """x1 ~ U(-2, 2), x2 = U(0, 1) - 2*Bernoulli(1/2) + (floor(x1) mod 2), both times 2: 8 squares in [-4, 4]^2."""
    x1 = torch.rand(n, generator=gen) * 4 - 2
    x2 = torch.rand(n, generator=gen) - 2 * torch.randint(0, 2, (n,), generator=gen).float()
    x2 = x2 + torch.remainder(torch.floor(x1), 2)
    return torch.stack([x1, x2], 1) * 2


def sample_spiral(n, gen):
    """Two arms: angle sqrt(U)*3*pi, arm (-cos(a)*a + U'/2, sin(a)*a + U''/2) and its negative, /3, + 0.1 N(0, I)."""
    half = (n + 1) // 2
    angle = torch.sqrt(torch.rand(half, generator=gen)) * (540 * 2 * math.pi / 360)
    arm_x = -torch.cos(angle) * angle + 0.5 * torch.rand(half, generator=gen)
    arm_y = torch.sin(angle) * angle + 0.5 * torch.rand(half, generator=gen)
    arm = torch.stack([arm_x, arm_y], 1)
    return torch.cat([arm, -arm])[:n] / 3 + 0.1 * torch.randn(n, 2, generator=gen)


RING_RADII = (3.0, 2.25, 1.5, 0.75)


def sample_rings(n, gen):
    """n//4 equally spaced points on circles of radius 3, 2.25, 1.5 and the rest on 0.75; resampled with
    replacement; + N(0, 0.08^2) noise."""
    counts = [n // 4] * 3 + [n - 3 * (n // 4)]
    circles = []
    for radius, k in zip(RING_RADII, counts):
        angle = torch.linspace(0, 2 * math.pi, k + 1)[:-1]
        circles.append(radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1))
    points = torch.cat(circles)[torch.randint(0, n, (n,), generator=gen)]
    return points + 0.08 * torch.randn(n, 2, generator=gen)


SAMPLERS = {"8gaussians": sample_8gaussians, "checkerboard": sample_checkerboard,
            "spiral": sample_spiral, "rings": sample_rings}

# ----------------------------------------------------------------------------------------------------
# Model: R independent MLPs evaluated together. A network is a flat list [W0, b0, W1, b1, ...] with
# W: (R, in, out) and b: (R, 1, out); activations are (R, N, features).


def init_mlp(sizes, gens):
    """PyTorch's default Linear init (U(-1/sqrt(in), 1/sqrt(in)) for weight and bias), one generator per run."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1 / math.sqrt(fan_in)
        weight = torch.stack([(torch.rand(fan_in, fan_out, generator=g) * 2 - 1) * bound for g in gens])
        bias = torch.stack([(torch.rand(1, fan_out, generator=g) * 2 - 1) * bound for g in gens])
        params += [weight, bias]
    return params


def mlp(params, x):
    """x: (R, N, in) -> (R, N, out); ReLU between layers, none after the last."""
    n_layers = len(params) // 2
    for layer in range(n_layers):
        x = torch.baddbmm(params[2 * layer + 1], x, params[2 * layer])
        if layer < n_layers - 1:
            x = torch.relu(x)
    return x


def encode(enc, x):
    """q(z|x) = N(mu, exp(logvar)): (R, N, 2) -> mu (R, N, z), logvar (R, N, z)."""
    return mlp(enc, x).chunk(2, dim=-1)


def reparameterize(mu, logvar, eps):
    return mu + torch.exp(0.5 * logvar) * eps


# ----------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors. Per-sample inputs are (..., B); betas broadcast against them
# ((R, 1) for stacked runs, floats for one run); every loss returns one value per run (...,).


def sse(x, y):
    """Per-sample SUM of squared errors over coordinates: (..., B, P) -> (..., B)."""
    return ((x - y) ** 2).sum(-1)


def kl_divergence(mu, logvar):
    """Eq. 2 for q = N(mu, exp(logvar)), p = N(0, I): KL_i = -1/2 sum_d (1 + logvar - exp(logvar) - mu^2).
    (..., B, D) -> (..., B)."""
    return -0.5 * (1 + logvar - torch.exp(logvar) - mu ** 2).sum(-1)


def vae_loss(rec_err, kl, beta_rec, beta_kl):
    """The negative beta-ELBO of Eq. 1: L = mean_i (beta_rec * SSE_i + beta_kl * KL_i), without s.
    Also the warm-up loss of the introspective methods."""
    return (beta_rec * rec_err + beta_kl * kl).mean(-1)


def intro_encoder_loss(rec_err, kl_real, kl_rec, kl_fake, margin, beta_rec, beta_kl, beta_neg):
    """IntroVAE encoder, Eq. 3 with Huang et al.'s weighting, the hinges on batch-mean KLs:
    L_E = beta_rec mean SSE(x, rec)
          + beta_kl [mean KL_real + beta_neg/2 (relu(m - mean KL_rec) + relu(m - mean KL_fake))]."""
    hinges = torch.relu(margin - kl_rec.mean(-1, keepdim=True)) + torch.relu(margin - kl_fake.mean(-1, keepdim=True))
    return (beta_rec * rec_err + beta_kl * (kl_real + 0.5 * beta_neg * hinges)).mean(-1)


def intro_decoder_loss(rec_err, kl_rec, kl_fake, beta_rec, beta_kl):
    """IntroVAE decoder, Eq. 3: L_D = beta_rec mean SSE(x, rec) + beta_kl/2 (mean KL_rec + mean KL_fake),
    the KLs from the encoder as updated this iteration."""
    return (beta_rec * rec_err + 0.5 * beta_kl * (kl_rec + kl_fake)).mean(-1)


def as_intro_encoder_loss(rec_err, kl_real, rec_err_r, kl_r, rec_err_f, kl_f, as_dist, c, s, beta_rec, beta_kl,
                          beta_neg, alpha=2.0):
    """AS-IntroVAE encoder, Eq. 9; with c = 1 it is Soft-IntroVAE's encoder, Eq. 4 (its Algorithm 1):
    L_E = s (beta_rec mean SSE(x, rec) + beta_kl mean KL_real)
          + 1/(2 alpha) sum_{q=r,f} mean_i exp(-alpha s (beta_rec SSE_q,i + beta_neg (c KL_q,i + (1 - c) AS)))
    SSE_r = SSE(rec, Dec(z_r)), KL_r = KL(E(rec)); likewise f for the generated samples; AS: one value per run."""
    elbo_r = beta_rec * rec_err_r + beta_neg * (c * kl_r + (1 - c) * as_dist)
    elbo_f = beta_rec * rec_err_f + beta_neg * (c * kl_f + (1 - c) * as_dist)
    per_sample = (s * (beta_rec * rec_err + beta_kl * kl_real)
                  + (0.5 / alpha) * (torch.exp(-alpha * s * elbo_r) + torch.exp(-alpha * s * elbo_f)))
    return per_sample.mean(-1)


def as_intro_decoder_loss(rec_err, kl_r, kl_f, rec_err_rr, rec_err_rf, as_dist, c, s, beta_rec, beta_kl, gamma_r,
                          variant="paper"):
    """AS-IntroVAE decoder, Eq. 9 (each KL_q replaced by c KL_q + (1 - c) AS, q = r, f); with c = 1 it is
    Soft-IntroVAE's decoder, Eq. 4 (its Algorithm 1):
    L_D = s [beta_rec mean SSE(x, rec) + beta_kl/2 (c (mean KL_r + mean KL_f) + 2 (1 - c) AS)
             + gamma_r beta_rec/2 (mean SSE(rec, rr) + mean SSE(fake, rf))]
    variant "official": AS counted once, beta_kl/2 (c (KL_r + KL_f) + (1 - c) AS), as the released code."""
    as_terms = 2 * (1 - c) * as_dist
    if variant == "official":
        # DEVIATION: Eq. 9 sums (1 - c) D over q = r, g (so AS twice; as_introvae.py reads it the same way);
        # the released code, and the spec's formula, add it once.
        as_terms = 0.5 * as_terms
    per_sample = s * (beta_rec * rec_err + 0.5 * beta_kl * (c * (kl_r + kl_f) + as_terms)
                      + gamma_r * 0.5 * beta_rec * (rec_err_rr + rec_err_rf))
    return per_sample.mean(-1)


def as_distance(mu_a, logvar_a, mu_b, logvar_b, reduction="paper"):
    """AS-Distance, Eq. 7 with the Gaussian-overlap kernel of Eq. 8, per latent dimension d:
    k_d(a_i, b_j) = exp(-(mu_a,id - mu_b,jd)^2 / (2 (v_a,id + v_b,jd))) / sqrt(2 pi (v_a,id + v_b,jd)),  v = exp(logvar)
    AS = sum_d [mean_ij k_d(a_i, a_j) + mean_ij k_d(b_i, b_j) - 2 mean_ij k_d(a_i, b_j)], all B*B pairs,
       = sum_d integral (p_a,d(u) - p_b,d(u))^2 du, p_.,d the batch mixture's marginal: >= 0, 0 when a = b.
    reduction "official_sum" / "official_mean": the released code's kernel without 1/sqrt(2 pi) and the SUM / MEAN
    over all B*B*D terms (its encoder / decoder step). Inputs (..., B, D); returns (...,), one value per batch."""
    def kernel_reduced(mu_1, var_1, mu_2, var_2):
        var = var_1.unsqueeze(-2) + var_2.unsqueeze(-3)  # (..., B, B, D)
        k = torch.exp(-(mu_1.unsqueeze(-2) - mu_2.unsqueeze(-3)) ** 2 / (2 * var))
        if reduction == "paper":
            return (k / torch.sqrt(2 * math.pi * var)).mean((-3, -2)).sum(-1)
        # DEVIATION: released code drops 1/sqrt(2 pi) and sums (encoder) / averages (decoder) all B*B*D terms.
        k = k / torch.sqrt(var)
        return k.sum((-3, -2, -1)) if reduction == "official_sum" else k.mean((-3, -2, -1))

    if reduction not in ("paper", "official_sum", "official_mean"):
        raise ValueError(f"reduction must be paper, official_sum or official_mean, got {reduction!r}")
    var_a, var_b = torch.exp(logvar_a), torch.exp(logvar_b)
    return (kernel_reduced(mu_a, var_a, mu_a, var_a) + kernel_reduced(mu_b, var_b, mu_b, var_b)
            - 2 * kernel_reduced(mu_a, var_a, mu_b, var_b))


def annealing_coefficient(t, total, schedule="linear"):
    """Eq. 9: c = min(5 t / T, 1), t = iteration from 0, T = iterations of the whole run; schedule "tanh":
    c = tanh(5 t / T), what the released code computes (0.76 at T/5, never exactly 1)."""
    if schedule == "tanh":
        # DEVIATION: released code's get_coef(mode='tanh'); the paper states the linear schedule.
        return math.tanh(5 * t / total)
    return min(5 * t / total, 1.0)


# ----------------------------------------------------------------------------------------------------
# Training steps: one per method, each on a group of R stacked runs. x: (R, B, 2); noise: (6, R, B, z),
# of which a step uses what it needs; hp: per-run betas (R, 1) and the shared scalars. Returns the
# per-run losses (R,) of the step (non-finite values mark a diverged run).


def adam_step(params, loss, *optimizers):
    """Gradient of the summed per-run losses w.r.t. params only (any other network stays frozen), then a step of
    each optimizer. Runs have disjoint weights, so the sum's gradient is each run's own gradient; Adam is
    elementwise."""
    grads = torch.autograd.grad(loss.sum(), params)
    for param, grad in zip(params, grads):
        param.grad = grad
    for optimizer in optimizers:
        optimizer.step()


def step_vae(enc, dec, opt_enc, opt_dec, x, noise, hp):
    """Plain VAE step (also the warm-up of every method): both networks, one joint loss, no s."""
    mu, logvar = encode(enc, x)
    rec = mlp(dec, reparameterize(mu, logvar, noise[0]))
    loss = vae_loss(sse(x, rec), kl_divergence(mu, logvar), hp["beta_rec"], hp["beta_kl"])
    adam_step(enc + dec, loss, opt_enc, opt_dec)
    return loss.detach(), loss.detach()


def step_introvae(enc, dec, opt_enc, opt_dec, x, noise, hp):
    """IntroVAE (Huang et al.): encoder step with the margin hinges, then decoder step through the updated encoder."""
    eps_z, eps_p = noise[0], noise[1]
    # ALGO LOGIC: encoder step (decoder frozen)
    mu, logvar = encode(enc, x)
    z = reparameterize(mu, logvar, eps_z)
    rec = mlp(dec, z)
    with torch.no_grad():
        fake = mlp(dec, eps_p)
    mu_r, logvar_r = encode(enc, rec.detach())
    mu_f, logvar_f = encode(enc, fake)
    loss_e = intro_encoder_loss(sse(x, rec), kl_divergence(mu, logvar), kl_divergence(mu_r, logvar_r),
                                kl_divergence(mu_f, logvar_f), hp["margin"], hp["beta_rec"], hp["beta_kl"],
                                hp["beta_neg"])
    adam_step(enc, loss_e, opt_enc)
    # ALGO LOGIC: decoder step (encoder frozen, as just updated); same z and eps_p
    rec = mlp(dec, z.detach())
    fake = mlp(dec, eps_p)
    mu_r, logvar_r = encode(enc, rec)
    mu_f, logvar_f = encode(enc, fake)
    loss_d = intro_decoder_loss(sse(x, rec), kl_divergence(mu_r, logvar_r), kl_divergence(mu_f, logvar_f),
                                hp["beta_rec"], hp["beta_kl"])
    adam_step(dec, loss_d, opt_dec)
    return loss_e.detach(), loss_d.detach()


def step_introspective(enc, dec, opt_enc, opt_dec, x, noise, hp, c, variant):
    """Soft-IntroVAE (c = 1, variant None) or AS-IntroVAE (c from annealing_coefficient, variant paper|official)."""
    eps_z, eps_p, eps_r, eps_f, eps_rr, eps_ff = noise
    use_as = variant is not None and c < 1.0
    official = variant == "official"
    # ALGO LOGIC: encoder step (decoder frozen)
    mu, logvar = encode(enc, x)
    z = reparameterize(mu, logvar, eps_z)
    rec = mlp(dec, z)
    with torch.no_grad():
        fake = mlp(dec, eps_p)
    mu_r, logvar_r = encode(enc, rec.detach())
    rr = mlp(dec, reparameterize(mu_r, logvar_r, eps_r))
    mu_f, logvar_f = encode(enc, fake)
    rf = mlp(dec, reparameterize(mu_f, logvar_f, eps_f))
    as_enc = 0.0
    if use_as and official:
        # DEVIATION: released code squashes mu, logvar with tanh before the AS-Distance (not before the KLs here).
        as_enc = as_distance(torch.tanh(mu_r), torch.tanh(logvar_r), torch.tanh(mu_f), torch.tanh(logvar_f),
                             reduction="official_sum").unsqueeze(-1)
    elif use_as:
        as_enc = as_distance(mu_r, logvar_r, mu_f, logvar_f).unsqueeze(-1)
    # rec is NOT detached in SSE(rec, rr): that gradient reaches the encoder through z (Soft-IntroVAE does this).
    loss_e = as_intro_encoder_loss(sse(x, rec), kl_divergence(mu, logvar), sse(rec, rr),
                                   kl_divergence(mu_r, logvar_r), sse(fake, rf), kl_divergence(mu_f, logvar_f),
                                   as_enc, c, hp["s"], hp["beta_rec"], hp["beta_kl"], hp["beta_neg"])
    adam_step(enc, loss_e, opt_enc)
    # ALGO LOGIC: decoder step (encoder frozen, as just updated); same z and eps_p
    rec = mlp(dec, z.detach())
    fake = mlp(dec, eps_p)
    mu_r, logvar_r = encode(enc, rec)
    rr = mlp(dec, reparameterize(mu_r, logvar_r, eps_rr).detach())
    mu_f, logvar_f = encode(enc, fake)
    rf = mlp(dec, reparameterize(mu_f, logvar_f, eps_ff).detach())
    if official:
        # DEVIATION: released code squashes mu, logvar with tanh before the decoder's KLs and the AS-Distance.
        mu_r, logvar_r, mu_f, logvar_f = (torch.tanh(v) for v in (mu_r, logvar_r, mu_f, logvar_f))
    as_dec = 0.0
    if use_as:
        as_dec = as_distance(mu_r, logvar_r, mu_f, logvar_f,
                             reduction="official_mean" if official else "paper").unsqueeze(-1)
    loss_d = as_intro_decoder_loss(sse(x, rec), kl_divergence(mu_r, logvar_r), kl_divergence(mu_f, logvar_f),
                                   sse(rec.detach(), rr), sse(fake.detach(), rf), as_dec, c, hp["s"],
                                   hp["beta_rec"], hp["beta_kl"], hp["gamma_r"], "official" if official else "paper")
    adam_step(dec, loss_d, opt_dec)
    return loss_e.detach(), loss_d.detach()


# ----------------------------------------------------------------------------------------------------
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
    """The runs of one method, stacked: weights, Adam states, per-run generators and hyperparameters."""

    def __init__(self, method, runs, cfg, device):
        self.method, self.runs = method, runs
        self.gens_model = [torch.Generator().manual_seed(3 * r.seed) for r in runs]  # init + training noise
        self.gens_data = [torch.Generator().manual_seed(3 * r.seed + 1) for r in runs]  # training data
        sizes_enc = [X_DIM] + [cfg.hidden] * 4 + [2 * Z_DIM]
        sizes_dec = [Z_DIM] + [cfg.hidden] * 4 + [X_DIM]
        self.enc = [p.to(device).requires_grad_() for p in init_mlp(sizes_enc, self.gens_model)]
        self.dec = [p.to(device).requires_grad_() for p in init_mlp(sizes_dec, self.gens_model)]
        self.opt_enc = torch.optim.Adam(self.enc, lr=cfg.lr)
        self.opt_dec = torch.optim.Adam(self.dec, lr=cfg.lr)

        def column(values):
            return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(-1)  # (R, 1)

        self.hp = {"beta_kl": column([r.beta_kl for r in runs]), "beta_rec": column([r.beta_rec for r in runs]),
                   "beta_neg": column([r.beta_neg for r in runs]), "margin": cfg.margin,
                   "gamma_r": cfg.gamma_r, "s": 1.0 / X_DIM}
        self.first_bad = torch.full((len(runs),), -1, dtype=torch.long, device=device)  # first non-finite iter
        self.device = device

    def draw_block(self, k, batch_size):
        """k iterations of data (k, R, B, 2) and noise (k, 6, R, B, z), each run from its own generators."""
        data = torch.stack([SAMPLERS[r.dataset](k * batch_size, g).view(k, batch_size, X_DIM)
                            for r, g in zip(self.runs, self.gens_data)], 1)
        noise = torch.stack([torch.randn(k, 6, batch_size, Z_DIM, generator=g) for g in self.gens_model], 2)
        return data.to(self.device), noise.to(self.device)

    def set_lr(self, lr):
        for opt in (self.opt_enc, self.opt_dec):
            for param_group in opt.param_groups:
                param_group["lr"] = lr

    def step(self, t, x, noise, warmup, c, variant):
        if self.method == "vae" or t < warmup:
            losses = step_vae(self.enc, self.dec, self.opt_enc, self.opt_dec, x, noise, self.hp)
        elif self.method == "introvae":
            losses = step_introvae(self.enc, self.dec, self.opt_enc, self.opt_dec, x, noise, self.hp)
        elif self.method == "sintrovae":
            losses = step_introspective(self.enc, self.dec, self.opt_enc, self.opt_dec, x, noise, self.hp, 1.0, None)
        else:
            losses = step_introspective(self.enc, self.dec, self.opt_enc, self.opt_dec, x, noise, self.hp, c,
                                        variant)
        bad = ~(torch.isfinite(losses[0]) & torch.isfinite(losses[1]))
        self.first_bad = torch.where((self.first_bad < 0) & bad, torch.full_like(self.first_bad, t), self.first_bad)

    def state(self):
        return {"method": self.method, "tags": [r.tag for r in self.runs],
                "enc": [p.detach().cpu() for p in self.enc], "dec": [p.detach().cpu() for p in self.dec],
                "opt_enc": self.opt_enc.state_dict(), "opt_dec": self.opt_dec.state_dict(),
                "gens_model": [g.get_state() for g in self.gens_model],
                "gens_data": [g.get_state() for g in self.gens_data], "first_bad": self.first_bad.cpu()}

    def load(self, state):
        with torch.no_grad():
            for param, saved in zip(self.enc + self.dec, state["enc"] + state["dec"]):
                param.copy_(saved)
        self.opt_enc.load_state_dict(state["opt_enc"])
        self.opt_dec.load_state_dict(state["opt_dec"])
        for gen, saved in zip(self.gens_model + self.gens_data, state["gens_model"] + state["gens_data"]):
            gen.set_state(saved)
        self.first_bad = state["first_bad"].to(self.device)


def build_runs(cfg):
    datasets = DATASETS if cfg.dataset == "all" else (cfg.dataset,)
    combos = tuple(COMBOS) if cfg.combo == "all" else (cfg.combo,)
    methods = [m for m in METHODS if m in cfg.methods.split(",")]
    seeds = [int(s) for s in cfg.seeds.split(",")]
    return [RunSpec(d, m, c, seed, *combo_betas(c, d, cfg.mapping))
            for d in datasets for c in combos for m in methods for seed in seeds]


def build_groups(runs, cfg, device):
    return [Group(m, [r for r in runs if r.method == m], cfg, device)
            for m in METHODS if any(r.method == m for r in runs)]


# ----------------------------------------------------------------------------------------------------
# Loop


def checkpoint_config(cfg):
    """The fields a resumed run must share with the run that wrote the checkpoint."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "device", "bench")}


def save_checkpoint(path, groups, cfg, iteration, train_seconds):
    """Atomic: write a temporary file, then rename over the old checkpoint."""
    tmp = path + ".tmp"
    torch.save({"config": checkpoint_config(cfg), "iteration": iteration, "train_seconds": train_seconds,
                "groups": [g.state() for g in groups]}, tmp)
    os.replace(tmp, path)


def train(groups, cfg, start, stop, ckpt_path=None, train_seconds=0.0, progress=None):
    """Iterations start..stop-1 of every group, side by side. Returns the wall seconds spent (cumulative)."""
    warmup, milestones = schedule(cfg.iters)
    t, t_ckpt, tic = start, start, time.time()
    while t < stop:
        k = min(BLOCK, stop - t)
        blocks = [g.draw_block(k, cfg.batch_size) for g in groups]
        for i in range(k):
            lr = learning_rate(t, cfg.lr, milestones)
            c = annealing_coefficient(t, cfg.iters, "tanh" if cfg.variant == "official" else "linear")
            for g, (data, noise) in zip(groups, blocks):
                g.set_lr(lr)
                g.step(t, data[i], noise[i], warmup, c, cfg.variant)
            t += 1
        if progress is not None:
            progress.update(k)
        if ckpt_path and (t - t_ckpt >= cfg.ckpt_every or t == stop):
            save_checkpoint(ckpt_path, groups, cfg, t, train_seconds + time.time() - tic)
            t_ckpt = t
    return train_seconds + time.time() - tic


def benchmark(groups, cfg, n_iters):
    """Wall and process-CPU ms per iteration of the post-warm-up (adversarial) step of all groups together.
    On a shared CPU the wall time depends on the other load; the CPU time much less so."""
    warmup, _ = schedule(cfg.iters)
    sync = torch.cuda.synchronize if groups[0].device.type == "cuda" else (lambda: None)
    blocks = [g.draw_block(1, cfg.batch_size) for g in groups]
    for i in range(5 + n_iters):
        if i == 5:
            sync()
            tic, tic_cpu = time.perf_counter(), time.process_time()
        c = annealing_coefficient(warmup + i, cfg.iters, "tanh" if cfg.variant == "official" else "linear")
        for g, (data, noise) in zip(groups, blocks):
            g.step(warmup + i, data[0], noise[0], warmup, c, cfg.variant)
    sync()
    return 1000 * (time.perf_counter() - tic) / n_iters, 1000 * (time.process_time() - tic_cpu) / n_iters


# ----------------------------------------------------------------------------------------------------
# Evaluation


def gnelbo_loss(enc, dec, x):
    """Soft-IntroVAE's evaluation energy L(x) = KL(q(z|x) || N(0, I)) + ||x - Dec(mu(x))||^2 (weights 1, z = mu)."""
    mu, logvar = encode(enc, x)
    return kl_divergence(mu, logvar) + sse(x, mlp(dec, mu))


@torch.no_grad()
def grid_evaluation(enc, dec, spans, real, grid, pooled):
    """gnELBO = mean_j L(x_j) / (sum_grid L + sum_j L(x_j)) over real samples x_j (R, N, 2) and the grid x grid
    points of linspace(-R, R) per run (float64 sums), and exp(-L) on the grid average-pooled to pooled x pooled
    (image orientation: row 0 = top = +R, column 0 = -R). Evaluated in chunks of grid rows."""
    n_runs, device = real.shape[0], real.device
    axis = torch.linspace(-1, 1, grid, device=device)
    pool = grid // pooled
    rows = max(pool, (2 ** 18 // (n_runs * grid)) // pool * pool)
    grid_sum = torch.zeros(n_runs, dtype=torch.float64, device=device)
    density = torch.zeros(n_runs, grid, pooled, device=device)  # (R, x index, pooled y)
    for i0 in range(0, grid, rows):
        xs = axis[i0:i0 + rows]
        unit = torch.stack(torch.meshgrid(xs, axis, indexing="ij"), -1).reshape(1, -1, 2)
        loss = gnelbo_loss(enc, dec, unit * spans.view(-1, 1, 1))  # (R, rows*grid)
        grid_sum += loss.double().sum(-1)
        density[:, i0:i0 + len(xs)] = torch.exp(-loss).view(n_runs, len(xs), pooled, pool).mean(-1)
    loss_real = gnelbo_loss(enc, dec, real).double()
    gnelbo = loss_real.mean(-1) / (grid_sum + loss_real.sum(-1))
    density = density.view(n_runs, pooled, pool, pooled).mean(2)  # (R, x, y)
    return gnelbo.cpu().numpy(), density.transpose(1, 2).flip(1).cpu().numpy()


def mode_stats(points, dataset):
    """(modes covered, modes in the dataset, high-quality fraction) of generated points (N, 2).
    8gaussians: a centre is covered when >= 1% of the points lie within 0.1 of it; high quality = within
    3 noise-sigmas (3*0.02/1.414) of some centre. checkerboard: a square is covered with >= 1% of the points
    inside it; high quality = inside the support. rings: a circle is covered with >= 1% of the points within
    3 sigma (0.24) of it; high quality = within 3 sigma of some circle. spiral: not defined (nan)."""
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
        gap = np.abs(np.linalg.norm(points, axis=1)[:, None] - np.array(RING_RADII)[None])  # (N, 4)
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
        real_elbo = torch.stack([SAMPLERS[r.dataset](12800, gen) for r, gen in zip(g.runs, gens)]).to(device)
        z = torch.stack([torch.randn(cfg.n_eval, Z_DIM, generator=gen) for gen in gens]).to(device)
        spans = torch.tensor([DATASET_PRESETS[r.dataset]["span"] for r in g.runs], device=device)
        with torch.no_grad():
            fake = mlp(g.dec, z).cpu().numpy()
        gnelbo, density = grid_evaluation(g.enc, g.dec, spans, real_elbo, cfg.grid, min(256, cfg.grid))
        seconds = (time.time() - tic) / n_runs
        for i, run in enumerate(g.runs):
            tic = time.time()
            span = DATASET_PRESETS[run.dataset]["span"]
            np.save(os.path.join(out_dir, f"samples_{run.tag}.npy"), fake[i])
            record = {"dataset": run.dataset, "method": run.method, "combo": run.combo, "variant": cfg.variant,
                      "mapping": cfg.mapping, "seed": run.seed, "iters": cfg.iters, "beta_kl": run.beta_kl,
                      "beta_rec": run.beta_rec, "beta_neg": run.beta_neg}
            if run.method == "introvae":
                record["margin"] = cfg.margin
            if run.tag in failures:
                record.update(kl_paper=None, jsd_paper=None, kl=None, jsd=None, gnelbo=None, modes=None,
                              hq_fraction=None, diverged_at=failures[run.tag])
            else:
                kl_paper, jsd_paper = hist_kl_jsd(real_hist[i], fake[i], bins=100, span=span, convention="paper")
                kl, jsd = hist_kl_jsd(real_hist[i], fake[i], bins=100, span=span, convention="textbook")
                modes, n_modes, hq = mode_stats(fake[i], run.dataset)
                values = dict(kl_paper=kl_paper, jsd_paper=jsd_paper, kl=kl, jsd=jsd, gnelbo=gnelbo[i], modes=modes,
                              n_modes=n_modes, hq_fraction=hq)
                # JSON has no NaN: undefined values (no point inside the square, spiral modes) become null
                record.update({k: None if math.isnan(v) else (v if isinstance(v, int) else float(v))
                               for k, v in values.items()})
            title = f"{METHOD_NAMES[run.method]}, {run.combo} ({run.beta_kl:g}, {run.beta_rec:g}, {run.beta_neg:g})"
            draw_scatter(fake[i], span, title).save(os.path.join(out_dir, f"scatter_{run.tag}.png"))
            draw_density(density[i], span, title).save(os.path.join(out_dir, f"density_{run.tag}.png"))
            record["train_seconds_shared"] = round(train_seconds, 1)
            record["seconds"] = round(train_seconds + seconds + time.time() - tic, 1)
            records.append(record)
    return records


# ----------------------------------------------------------------------------------------------------
# Pictures (Pillow only)


def jet(values):
    """A jet-like colour map: values in [0, 1] (H, W) -> uint8 (H, W, 3), dark blue - cyan - yellow - dark red."""
    v = np.clip(values, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (rgb * 255).astype(np.uint8)


def frame_panel(body, span, title):
    """Put an (H, W, 3) uint8 picture of [-span, span]^2 in a frame with a title and axis-range labels."""
    font = ImageFont.load_default()
    height, width = body.shape[:2]
    left, top, bottom, right = 30, 18, 16, 8
    panel = Image.new("RGB", (left + width + right, top + height + bottom), "white")
    panel.paste(Image.fromarray(body), (left, top))
    draw = ImageDraw.Draw(panel)
    draw.rectangle([left - 1, top - 1, left + width, top + height], outline="black")
    draw.text((left, 3), title, fill="black", font=font)
    for frac, label in ((0.0, f"{-span:g}"), (0.5, "0"), (1.0, f"{span:g}")):
        x = left + frac * (width - 1)
        draw.line([x, top + height, x, top + height + 3], fill="black")
        draw.text((x - 3 * len(label), top + height + 4), label, fill="black", font=font)
        y = top + (1 - frac) * (height - 1)
        draw.line([left - 4, y, left - 1, y], fill="black")
        draw.text((left - 6 - 6 * len(label), y - 5), label, fill="black", font=font)
    return panel


def draw_scatter(points, span, title, size=220):
    """Generated points as green dots on [-span, span]^2 (points outside are not drawn)."""
    body = np.full((size, size, 3), 255, dtype=np.uint8)
    points = points[np.isfinite(points).all(1)]
    col = np.round((points[:, 0] + span) / (2 * span) * (size - 1)).astype(int)
    row = np.round((span - points[:, 1]) / (2 * span) * (size - 1)).astype(int)
    for d_row, d_col in ((0, 0), (0, 1), (1, 0), (1, 1)):
        r, c = row + d_row, col + d_col
        keep = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        body[r[keep], c[keep]] = (0, 140, 0)
    return frame_panel(body, span, title)


def draw_density(density, span, title):
    """exp(-L) on the grid (image orientation), scaled to its maximum, in the jet colour map."""
    peak = density.max() if np.isfinite(density).all() and density.max() > 0 else 1.0
    return frame_panel(jet(density / peak), span, title)


def draw_overview(panels, header):
    """Panels as a grid (rows: combos, columns: methods) under a header line; missing cells stay white."""
    n_rows, n_cols = len(panels), len(panels[0])
    cell_w = max(p.width for row in panels for p in row if p is not None)
    cell_h = max(p.height for row in panels for p in row if p is not None)
    sheet = Image.new("RGB", (n_cols * cell_w, 16 + n_rows * cell_h), "white")
    ImageDraw.Draw(sheet).text((4, 2), header, fill="black", font=ImageFont.load_default())
    for i, row in enumerate(panels):
        for j, panel in enumerate(row):
            if panel is not None:
                sheet.paste(panel, (j * cell_w, 16 + i * cell_h))
    return sheet


def write_overviews(records, cfg, out_dir):
    """overview_<dataset>_<seed>.png, laid out like the paper's Fig. 3, from the scatter PNGs."""
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        for seed in dict.fromkeys(r["seed"] for r in records):
            mine = [r for r in records if r["dataset"] == dataset and r["seed"] == seed]
            combos = list(dict.fromkeys(r["combo"] for r in mine))
            methods = list(dict.fromkeys(r["method"] for r in mine))
            panels = [[None] * len(methods) for _ in combos]
            for r in mine:
                tag = f"{r['dataset']}_{r['method']}_{r['combo']}_{r['seed']}"
                panels[combos.index(r["combo"])][methods.index(r["method"])] = Image.open(
                    os.path.join(out_dir, f"scatter_{tag}.png"))
            header = (f"{dataset}, seed {seed}, {cfg.iters} iterations, mapping {cfg.mapping}, "
                      f"AS variant {cfg.variant}; rows: combos, columns: methods")
            draw_overview(panels, header).save(os.path.join(out_dir, f"overview_{dataset}_{seed}.png"))


def format_table(records):
    def num(value, fmt):
        return "NaN" if value is None else format(value, fmt)

    lines = [f"{'dataset':<12} {'method':<11} {'combo':<5} {'seed':>4} {'KL(paper)':>9} {'JSD(paper)':>10} "
             f"{'KL':>7} {'JSD':>6} {'gnELBO':>9} {'modes':>5} {'hq':>5} {'seconds':>8}"]
    for r in records:
        modes = "-" if r.get("modes") is None else f"{r['modes']}/{r['n_modes']}"
        lines.append(f"{r['dataset']:<12} {METHOD_NAMES[r['method']]:<11} {r['combo']:<5} {r['seed']:>4} "
                     f"{num(r['kl_paper'], '9.2f')} {num(r['jsd_paper'], '10.2f')} {num(r['kl'], '7.3f')} "
                     f"{num(r['jsd'], '6.3f')} {num(r['gnelbo'], '9.2e')} {modes:>5} "
                     f"{num(r['hq_fraction'], '5.2f')} {r['seconds']:>8.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# main


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"toy2d.py: error: {message}\n")
        sys.exit(2)


def parse_config(argv):
    parser = OneLineParser(description="AS-IntroVAE paper's 2D experiments (see the module docstring).",
                           allow_abbrev=False)
    for f in dataclasses.fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            choices=CHOICES.get(f.name), help=f"{f.metadata['help']} (default {f.default!r})")
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
    for name in ("iters", "batch_size", "hidden", "n_eval", "grid", "ckpt_every"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.bench < 0 or cfg.lr <= 0 or cfg.margin < 0 or cfg.gamma_r < 0:
        parser.error("--bench, --margin and --gamma-r must be >= 0 and --lr > 0")
    if cfg.grid % min(256, cfg.grid):
        parser.error(f"--grid {cfg.grid}: use a multiple of 256 (or a value below 256)")
    if not (cfg.device in ("auto", "cpu", "cuda") or (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit())):
        parser.error(f"--device {cfg.device!r}: use auto, cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {cfg.device}: CUDA is not available on this machine")
    return cfg


def main(argv=None):
    cfg = parse_config(argv)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    runs = build_runs(cfg)
    groups = build_groups(runs, cfg, device)
    if cfg.bench:
        wall_ms, cpu_ms = benchmark(groups, cfg, cfg.bench)
        print(f"{len(runs)} runs side by side ({', '.join(g.method + ' x' + str(len(g.runs)) for g in groups)}), "
              f"batch {cfg.batch_size}, {device}, {torch.get_num_threads()} threads: {wall_ms:.1f} ms/iteration "
              f"wall, {cpu_ms:.1f} ms/iteration process CPU (post-warm-up step, mean of {cfg.bench} after 5 untimed)")
        return 0

    out_dir = cfg.out or os.path.join("runs", time.strftime("toy2d-%Y%m%d-%H%M%S"))
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    start, train_seconds = 0, 0.0
    if os.path.exists(ckpt_path):
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or foreign file: say so in one line
            print(f"toy2d.py: error: cannot read checkpoint {ckpt_path}: {err}", file=sys.stderr)
            return 2
        if ckpt.get("config") != checkpoint_config(cfg):
            print(f"toy2d.py: error: {ckpt_path} was written with other flags; use another --out", file=sys.stderr)
            return 2
        for g, state in zip(groups, ckpt["groups"]):
            g.load(state)
        start, train_seconds = ckpt["iteration"], ckpt["train_seconds"]
        print(f"resuming from {ckpt_path} at iteration {start}")

    print(f"{len(runs)} runs side by side on {device}, {cfg.iters} iterations -> {out_dir}")
    progress = Progress(cfg.iters - start, "toy2d train", unit="it") if start < cfg.iters else None
    train_seconds = train(groups, cfg, start, cfg.iters, ckpt_path, train_seconds, progress)
    if progress is not None:
        progress.close()

    failures = {}
    for g in groups:
        for run, bad in zip(g.runs, g.first_bad.tolist()):
            if bad >= 0:
                failures[run.tag] = bad
                print(f"{run.tag}: non-finite loss from iteration {bad}; its metrics are NaN")
    records = evaluate(groups, cfg, out_dir, train_seconds, failures)
    write_overviews(records, cfg, out_dir)
    with open(os.path.join(out_dir, "results.json.tmp"), "w") as fh:
        json.dump(records, fh, indent=1)
    os.replace(os.path.join(out_dir, "results.json.tmp"), os.path.join(out_dir, "results.json"))
    print(format_table(records))
    print(f"results in {out_dir} (trained {train_seconds:.0f} s for all {len(runs)} runs together)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
