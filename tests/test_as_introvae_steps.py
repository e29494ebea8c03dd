"""as_introvae.py's training steps against an independent re-computation on a tiny network.

Each step (VAE, IntroVAE, Soft-IntroVAE, AS-IntroVAE paper and official, VAE-S, AVAE, AVAE-S) runs
once on 4 images of 3 x 8 x 8 (20 x 20 for the AVAE-S terms); the same forward passes are then
written out here from the equations, with the same noise (the same seed, draws in the same order),
and the loss and the gradient of EVERY parameter must agree. The weights are all different from 1
and from each other and c is strictly between 0 and 1, so a dropped weight, a swapped pair, a sum
for a mean, a missing detach or a wrong pair of posteriors changes a number these tests compare.
Also: s = 1 / (C H W) and c reach the step, and the plain-VAE warm-up covers exactly num_vae epochs.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import as_introvae as asv
from helpers import pattern_images

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = dict(beta_rec=1.3, beta_kl=0.7, beta_neg=0.9, gamma_r=0.3, margin=10.0)
C, S = (
    0.4,
    1.0 / 192,
)  # 0 < c < 1 so that both the KL and the AS-Distance count; s = 1 / (3 * 8 * 8)
GRAD_RTOL = 1e-4  # float32 networks; any rescaling or missing term is far above it


def no_amp():
    return torch.autocast("cpu", enabled=False)


def tiny(model, variant="paper", size=8, **extra):
    cfg = asv.Config(
        model=model,
        variant=variant,
        channels=(4, 8),
        image_size=size,
        z_dim=3,
        batch_size=4,
        **{**WEIGHTS, **extra},
    )
    torch.manual_seed(0)
    nets, opts = asv.make_state(cfg, 3, torch.device("cpu"))
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    return cfg, nets, opts, x, eps


# --------------------------------------------------------------------------------------------------
# the reference: the equations written out again, independently of as_introvae's loss functions
# --------------------------------------------------------------------------------------------------
def ref_sse(a, b):  # (B, ...) -> (B,)
    return ((a - b) ** 2).reshape(a.shape[0], -1).sum(1)


def ref_kl(mu, logvar):  # KL(N(mu, e^logvar) || N(0, I)), (B, D) -> (B,)
    return 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).sum(1)


def ref_sample(mu, logvar):  # the same draw as the step's reparameterisation
    return mu + (0.5 * logvar).exp() * torch.randn_like(mu)


def ref_as_distance(mu_a, logvar_a, mu_b, logvar_b, reduce):
    """sum over pairs (a, a), (b, b), (a, b) with weights 1, 1, -2 of the Gaussian product kernel,
    per dimension d; reduce "paper": mean over pairs, sum over d; "sum" / "mean": the released
    code's kernel without 1 / sqrt(2 pi), summed / averaged over all B * B * D terms."""

    def term(mu_1, logvar_1, mu_2, logvar_2):
        var = logvar_1.exp()[:, None, :] + logvar_2.exp()[None, :, :]  # (B, B, D)
        diff = mu_1[:, None, :] - mu_2[None, :, :]
        if reduce == "paper":
            return (
                (torch.exp(-(diff**2) / (2 * var)) / torch.sqrt(2 * math.pi * var))
                .mean((0, 1))
                .sum()
            )
        kernel = torch.exp(-(diff**2) / (2 * var)) / torch.sqrt(var)
        return kernel.sum() if reduce == "sum" else kernel.mean()

    return (
        term(mu_a, logvar_a, mu_a, logvar_a)
        + term(mu_b, logvar_b, mu_b, logvar_b)
        - 2 * term(mu_a, logvar_a, mu_b, logvar_b)
    )


def grads(loss, module):
    return torch.autograd.grad(loss, list(module.parameters()), retain_graph=True)


def assert_grads(module, expected, what):
    """module's .grad (left by the step) equals the reference gradient, parameter by parameter."""
    for (name, param), want in zip(module.named_parameters(), expected):
        assert param.grad is not None, f"{what}: no gradient for {name}"
        scale = want.abs().max().item()
        torch.testing.assert_close(
            param.grad,
            want,
            rtol=GRAD_RTOL,
            atol=GRAD_RTOL * scale + 1e-12,
            msg=lambda m: f"{what} {name}: {m}",
        )


def ref_soft_encoder(encoder, decoder, x, eps, c, variant, use_as):
    """Soft-IntroVAE / AS-IntroVAE encoder loss and its exp-terms (Eq. 9, Soft-IntroVAE Eq. 4)."""
    w = WEIGHTS
    fake = decoder(eps)
    mu, logvar = encoder(x)
    z = ref_sample(mu, logvar)
    rec = decoder(z)
    mu_r, logvar_r = encoder(rec.detach())
    rec_rec = decoder(ref_sample(mu_r, logvar_r))
    mu_f, logvar_f = encoder(fake.detach())
    rec_fake = decoder(ref_sample(mu_f, logvar_f))
    kl_r, kl_f = ref_kl(mu_r, logvar_r), ref_kl(mu_f, logvar_f)
    if use_as:
        if variant == "official":
            dist = ref_as_distance(
                mu_r.tanh(), logvar_r.tanh(), mu_f.tanh(), logvar_f.tanh(), "sum"
            )
        else:
            dist = ref_as_distance(mu_r, logvar_r, mu_f, logvar_f, "paper")
        kl_r, kl_f = c * kl_r + (1 - c) * dist, c * kl_f + (1 - c) * dist
    exp_r = torch.exp(-2.0 * S * (w["beta_rec"] * ref_sse(rec, rec_rec) + w["beta_neg"] * kl_r))
    exp_f = torch.exp(-2.0 * S * (w["beta_rec"] * ref_sse(fake, rec_fake) + w["beta_neg"] * kl_f))
    real = w["beta_rec"] * ref_sse(x, rec).mean() + w["beta_kl"] * ref_kl(mu, logvar).mean()
    loss = S * real + 0.25 * (exp_r.mean() + exp_f.mean())
    return loss, z, exp_r.mean(), exp_f.mean()


def ref_soft_decoder(encoder, decoder, x, z, eps, c, variant, use_as):
    w = WEIGHTS
    fake = decoder(eps)
    rec = decoder(z)
    mu_r, logvar_r = encoder(rec)
    z_r = ref_sample(mu_r, logvar_r)
    mu_f, logvar_f = encoder(fake)
    z_f = ref_sample(mu_f, logvar_f)
    rec_rec, rec_fake = decoder(z_r.detach()), decoder(z_f.detach())
    if variant == "official":
        mu_r, logvar_r, mu_f, logvar_f = (v.tanh() for v in (mu_r, logvar_r, mu_f, logvar_f))
    adversarial = (
        0.5 * w["beta_kl"] * (ref_kl(mu_r, logvar_r).mean() + ref_kl(mu_f, logvar_f).mean())
    )
    if use_as:
        reduce, count = ("mean", 1.0) if variant == "official" else ("paper", 2.0)
        dist = ref_as_distance(mu_r, logvar_r, mu_f, logvar_f, reduce)
        adversarial = c * adversarial + 0.5 * w["beta_kl"] * count * (1 - c) * dist
    rerec = ref_sse(rec.detach(), rec_rec).mean() + ref_sse(fake.detach(), rec_fake).mean()
    return S * (
        w["beta_rec"] * ref_sse(x, rec).mean()
        + adversarial
        + 0.5 * w["gamma_r"] * w["beta_rec"] * rerec
    )


def ref_intro_encoder(encoder, decoder, x, eps):
    w = WEIGHTS
    fake = decoder(eps)
    mu, logvar = encoder(x)
    z = ref_sample(mu, logvar)
    rec = decoder(z)
    kl_rec = ref_kl(*encoder(rec.detach())).mean()
    kl_fake = ref_kl(*encoder(fake.detach())).mean()
    hinges = F.relu(w["margin"] - kl_rec) + F.relu(w["margin"] - kl_fake)
    loss = w["beta_rec"] * ref_sse(x, rec).mean() + w["beta_kl"] * (
        ref_kl(mu, logvar).mean() + 0.5 * w["beta_neg"] * hinges
    )
    return loss, z


def ref_intro_decoder(encoder, decoder, x, z, eps):
    w = WEIGHTS
    rec, fake = decoder(z), decoder(eps)
    kls = ref_kl(*encoder(rec)).mean() + ref_kl(*encoder(fake)).mean()
    return w["beta_rec"] * ref_sse(x, rec).mean() + 0.5 * w["beta_kl"] * kls


# --------------------------------------------------------------------------------------------------
# calls of the steps under test (the only place that knows their signatures)
# --------------------------------------------------------------------------------------------------
def encoder_step(model, variant, nets, opts, x, eps, cfg, c, s):
    args = (nets["encoder"], nets["decoder"], opts["encoder"], x, eps)
    betas = dict(beta_rec=cfg.beta_rec, beta_kl=cfg.beta_kl, beta_neg=cfg.beta_neg, amp=no_amp)
    if model == "introvae":
        return asv.intro_encoder_step(*args, margin=cfg.margin, **betas)
    variant, c = (variant, c) if model == "asintrovae" else ("none", 1.0)  # Soft-IntroVAE: c = 1
    return asv.as_intro_encoder_step(*args, c=c, s=s, as_variant=variant, **betas)


def decoder_step(model, variant, nets, opts, x, z, eps, cfg, c, s):
    args = (nets["encoder"], nets["decoder"], opts["decoder"], x, z, eps)
    betas = dict(beta_rec=cfg.beta_rec, beta_kl=cfg.beta_kl, amp=no_amp)
    if model == "introvae":
        return asv.intro_decoder_step(*args, **betas)
    variant, c = (variant, c) if model == "asintrovae" else ("none", 1.0)
    return asv.as_intro_decoder_step(
        *args, c=c, s=s, gamma_r=cfg.gamma_r, as_variant=variant, **betas
    )


def vae_step(nets, opts, x, cfg, vae_s_state=None):
    return asv.train_step(
        "vae" if vae_s_state is None else "vae-s", nets, opts, x, cfg, C, S, no_amp, vae_s_state
    )


def adversarial_step(nets, opts, x, cfg, vae_s_state=None):
    return asv.train_step(cfg.model, nets, opts, x, cfg, C, S, no_amp, vae_s_state)


# --------------------------------------------------------------------------------------------------
# the introspective steps: loss and every gradient, encoder step then decoder step
# --------------------------------------------------------------------------------------------------
METHODS = [
    ("asintrovae", "paper"),
    ("asintrovae", "official"),
    ("sintrovae", "paper"),
    ("introvae", "paper"),
]


@pytest.mark.parametrize("model, variant", METHODS)
def test_encoder_step_loss_and_gradients_match_the_equations(model, variant):
    cfg, nets, opts, x, eps = tiny(model, variant)
    twin = copy.deepcopy({k: nets[k] for k in ("encoder", "decoder")})
    torch.manual_seed(11)
    z, stats = encoder_step(model, variant, nets, opts, x, eps, cfg, C, S)
    torch.manual_seed(11)
    if model == "introvae":
        loss, z_ref = ref_intro_encoder(twin["encoder"], twin["decoder"], x, eps)
    else:
        loss, z_ref, exp_r, exp_f = ref_soft_encoder(
            twin["encoder"], twin["decoder"], x, eps, C, variant, use_as=model == "asintrovae"
        )
        # the exp-terms really weigh in (not vanished, not saturated) and are what is logged
        assert 1e-3 < exp_r.item() < 0.999 and 1e-3 < exp_f.item() < 0.999
        assert stats["exp_elbo_rec"].item() == pytest.approx(exp_r.item(), rel=1e-5)
        assert stats["exp_elbo_fake"].item() == pytest.approx(exp_f.item(), rel=1e-5)
    assert stats["loss_e"].item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=1e-7)
    assert_grads(nets["encoder"], grads(loss, twin["encoder"]), "encoder")
    assert all(p.grad is None for p in nets["decoder"].parameters())


@pytest.mark.parametrize("model, variant", METHODS)
def test_decoder_step_loss_and_gradients_match_the_equations(model, variant):
    cfg, nets, opts, x, eps = tiny(model, variant)
    torch.manual_seed(11)
    z, _ = encoder_step(model, variant, nets, opts, x, eps, cfg, C, S)
    twin = copy.deepcopy({k: nets[k] for k in ("encoder", "decoder")})  # the encoder after its step
    encoder_grads = [p.grad.clone() for p in nets["encoder"].parameters()]
    torch.manual_seed(12)
    stats = decoder_step(model, variant, nets, opts, x, z, eps, cfg, C, S)
    torch.manual_seed(12)
    twin["encoder"].requires_grad_(False)
    twin["decoder"].requires_grad_(True)
    if model == "introvae":
        loss = ref_intro_decoder(twin["encoder"], twin["decoder"], x, z.detach(), eps)
    else:
        loss = ref_soft_decoder(
            twin["encoder"],
            twin["decoder"],
            x,
            z.detach(),
            eps,
            C,
            variant,
            use_as=model == "asintrovae",
        )
    assert stats["loss_d"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert_grads(nets["decoder"], grads(loss, twin["decoder"]), "decoder")
    for param, before in zip(nets["encoder"].parameters(), encoder_grads):
        assert torch.equal(param.grad, before)  # the decoder step leaves the encoder alone


def test_sintrovae_is_asintrovae_at_c_1_whatever_the_schedule_says():
    losses = {}
    for model, c in (("sintrovae", 0.2), ("sintrovae", 0.9), ("asintrovae", 1.0)):
        cfg, nets, opts, x, _ = tiny(model)
        torch.manual_seed(11)
        stats = asv.train_step(model, nets, opts, x, cfg, c, S, no_amp)
        losses[model, c] = (stats["loss_e"].item(), stats["loss_d"].item())
    assert losses["sintrovae", 0.2] == losses["sintrovae", 0.9]
    assert losses["asintrovae", 1.0] == pytest.approx(losses["sintrovae", 0.2], rel=1e-6)
    cfg, nets, opts, x, eps = tiny("sintrovae")
    with pytest.raises(ValueError, match="c = 1"):
        asv.as_intro_encoder_step(
            nets["encoder"],
            nets["decoder"],
            opts["encoder"],
            x,
            eps,
            c=0.5,
            s=S,
            beta_rec=1.0,
            beta_kl=1.0,
            beta_neg=1.0,
            as_variant="none",
            amp=no_amp,
        )


def test_vae_step_loss_and_gradients_match_the_equations():
    cfg, nets, opts, x, _ = tiny("vae")
    twin = copy.deepcopy({k: nets[k] for k in ("encoder", "decoder")})
    torch.manual_seed(11)
    stats = vae_step(nets, opts, x, cfg)
    torch.manual_seed(11)
    mu, logvar = twin["encoder"](x)
    rec = twin["decoder"](ref_sample(mu, logvar))
    loss = (WEIGHTS["beta_rec"] * ref_sse(x, rec) + WEIGHTS["beta_kl"] * ref_kl(mu, logvar)).mean()
    assert stats["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    for name in ("encoder", "decoder"):
        assert_grads(nets[name], grads(loss, twin[name]), name)


# --------------------------------------------------------------------------------------------------
# AVAE-S: VAE-S's loss (AVAE-S Eq. 11), the adversarial step of AVAE / AVAE-S (Algorithm 1)
# --------------------------------------------------------------------------------------------------
FROZEN_LAMBDAS = {"mae": 0.3, "mse": 1.0, "1-ssim": 40.0, "sobel": 0.2, "gabor": 2.5}


def ref_vae_s_loss(encoder, decoder, x, lambdas, beta_tc, dataset_size):
    """AVAE-S Eq. 11's L_VAE from the five Eq. 5 terms (each checked by hand in test_avae_s.py)."""
    mu, logvar = encoder(x)
    z = ref_sample(mu, logvar)
    rec = decoder(z)
    terms = asv.reconstruction_terms(x, rec, asv.gabor_kernels())
    rec_loss = sum(lambdas[name] * terms[name] for name in terms)
    tc = asv.total_correlation(z, mu, logvar, dataset_size, "mss")
    return (
        WEIGHTS["beta_rec"] * rec_loss + WEIGHTS["beta_kl"] * ref_kl(mu, logvar)
    ).mean() + beta_tc * tc, rec


@pytest.mark.parametrize("probing", [True, False])
def test_vae_s_step_loss_and_gradients_match_the_equations(probing):
    cfg, nets, opts, x, _ = tiny("vae-s", size=20, beta_tc=1.7)
    state = asv.new_vae_s_state(100, 2, torch.device("cpu"))
    if not probing:
        state["rec_weights"] = dict(FROZEN_LAMBDAS)
    lambdas = {name: float(name == "mse") for name in asv.REC_TERMS} if probing else FROZEN_LAMBDAS
    twin = copy.deepcopy({k: nets[k] for k in ("encoder", "decoder")})
    torch.manual_seed(11)
    stats = vae_step(nets, opts, x, cfg, state)
    torch.manual_seed(11)
    loss, _ = ref_vae_s_loss(twin["encoder"], twin["decoder"], x, lambdas, 1.7, 100)
    assert stats["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    for name in ("encoder", "decoder"):
        assert_grads(nets[name], grads(loss, twin[name]), name)


@pytest.mark.parametrize("model", ["avae", "avae-s"])
def test_adversarial_step_loss_and_gradients_match_the_equations(model):
    """Both gates open (thresholds outside [0, 1]): the discriminator steps on its BCE, then the VAE
    on L_VAE + beta_adv log(1 - Dis(rec)) under the discriminator as updated."""
    cfg, nets, opts, x, _ = tiny(
        model,
        size=20,
        beta_tc=1.7,
        beta_adv=2.3,
        disc_train_below=1.01,
        adv_use_above=-0.01,
        pretrain_epochs=0,
        adv_epochs=1,
        epochs=1,
    )
    state = None
    if model == "avae-s":
        state = asv.new_vae_s_state(100, 2, torch.device("cpu"))
        state["rec_weights"] = dict(FROZEN_LAMBDAS)
    twin = copy.deepcopy({k: nets[k] for k in ("encoder", "decoder", "disc")})
    torch.manual_seed(11)
    stats = adversarial_step(nets, opts, x, cfg, state)
    torch.manual_seed(11)
    if model == "avae":
        mu, logvar = twin["encoder"](x)
        rec = twin["decoder"](ref_sample(mu, logvar))
        loss_vae = (
            WEIGHTS["beta_rec"] * ref_sse(x, rec) + WEIGHTS["beta_kl"] * ref_kl(mu, logvar)
        ).mean()
    else:
        loss_vae, rec = ref_vae_s_loss(
            twin["encoder"], twin["decoder"], x, FROZEN_LAMBDAS, 1.7, 100
        )
    logits = twin["disc"](torch.cat([x, rec.detach()]))
    loss_dis = (F.softplus(-logits[:4]) + F.softplus(logits[4:])).mean()
    disc_grads = grads(loss_dis, twin["disc"])
    disc_opt = torch.optim.Adam(twin["disc"].parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    for param, grad in zip(twin["disc"].parameters(), disc_grads):
        param.grad = grad
    disc_opt.step()
    twin["disc"].requires_grad_(False)
    logits_rec = twin["disc"](torch.cat([x, rec]))[4:]
    loss = loss_vae + 2.3 * torch.log(1 - torch.sigmoid(logits_rec)).mean()
    assert stats["loss_dis"].item() == pytest.approx(loss_dis.item(), rel=1e-6)
    assert stats["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert_grads(nets["disc"], disc_grads, "disc")
    for name in ("encoder", "decoder"):
        assert_grads(nets[name], grads(loss, twin[name]), name)


# --------------------------------------------------------------------------------------------------
# what train() hands the steps: s = 1 / (C H W), c = annealing_coefficient(t, T), the warm-up
# --------------------------------------------------------------------------------------------------
def spy_on_steps(monkeypatch):
    """Record (step name, c, s) of every step train() takes (None: the step takes no c or s)."""
    calls = []
    for name in ("vae_step", "as_intro_step"):
        step = getattr(asv, name)

        def spy(*args, _step=step, _name=name, **kwargs):
            calls.append((_name, kwargs.get("c"), kwargs.get("s")))
            return _step(*args, **kwargs)

        monkeypatch.setattr(asv, name, spy)
    return calls


@pytest.mark.parametrize("variant, schedule", [("paper", "linear"), ("official", "tanh")])
def test_train_hands_s_c_and_the_warm_up_to_the_steps(tmp_path, monkeypatch, variant, schedule):
    np.savez(tmp_path / "train.npz", images=pattern_images(20, 0))  # 3 x 16 x 16, 3 batches of <= 8
    calls = spy_on_steps(monkeypatch)
    out = tmp_path / "run"
    flags = [
        "--dataset",
        "npz",
        "--data-root",
        str(tmp_path / "train.npz"),
        "--channels",
        "8,16",
        "--z-dim",
        "4",
        "--batch-size",
        "8",
        "--epochs",
        "3",
        "--num-vae",
        "1",
        "--variant",
        variant,
        "--log-every",
        "1",
        "--fid-samples",
        "0",
        "--eval-images",
        "8",
        "--num-workers",
        "0",
        "--out",
        str(out),
    ]
    assert asv.main(flags) == 0
    s = 1.0 / (3 * 16 * 16)
    assert json.loads((out / "config.json").read_text())["derived"]["s"] == s
    total = 3 * 3  # T: 3 iterations per epoch (the last one of 4 images) times 3 epochs
    names = [name for name, _, _ in calls]
    assert names == ["vae_step"] * 3 + ["as_intro_step"] * 6  # num_vae = 1 epoch of warm-up
    assert all(c is None and step_s is None for _, c, step_s in calls[:3])  # Eq. 1, no s
    for t, (_, c, step_s) in enumerate(calls[3:], start=3):
        assert step_s == s and c == asv.annealing_coefficient(t, total, schedule)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    records = [r for r in records if "img_per_s" in r]  # not the reconstruction record at T
    assert ["loss_e" in r for r in records] == [False] * 3 + [True] * 6
    assert all("loss" in r for r in records[:3])


# --------------------------------------------------------------------------------------------------
# the NaN / inf check: watched on the device, read back only at log intervals, exact first step
# --------------------------------------------------------------------------------------------------
def test_a_planted_nan_names_its_step_though_read_back_only_at_the_log(tmp_path, monkeypatch):
    """Steps 5 and 6 return a NaN loss, the log is read every 4 steps: the error comes at the
    read-back after step 8 but names step 5, and no checkpoint holds the diverged weights."""
    np.savez(tmp_path / "train.npz", images=pattern_images(20, 0))
    real_train_step, calls = asv.train_step, []

    def planted(*args, **kwargs):
        stats = real_train_step(*args, **kwargs)
        calls.append(len(calls) + 1)
        if calls[-1] in (5, 6):
            stats["loss"] = torch.tensor(float("nan"))
        return stats

    monkeypatch.setattr(asv, "train_step", planted)
    reads = []
    real_raise = asv.FiniteWatch.raise_if_diverged
    monkeypatch.setattr(asv.FiniteWatch, "raise_if_diverged",
                        lambda self, path: (reads.append(len(calls)), real_raise(self, path))[1])
    flags = ["--dataset", "npz", "--data-root", str(tmp_path / "train.npz"), "--model", "vae",
             "--channels", "8,16", "--z-dim", "4", "--batch-size", "8", "--epochs", "5",
             "--log-every", "4", "--ckpt-every", "4", "--img-every", "100", "--fid-samples", "0",
             "--num-workers", "0", "--out", str(tmp_path / "run")]
    with pytest.raises(asv.TrainingDiverged, match=r"non-finite loss at step 5 \(loss nan\); "
                       r"last good checkpoint: .* \(step 4\)"):
        asv.train(asv.make_config(vars(asv.build_parser().parse_args(flags))))
    assert reads == [4, 8] and len(calls) == 8  # two read-backs, not one per step
    log_lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log_lines]
    assert [r["step"] for r in records] == [4]
    assert asv.load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["step"] == 4


# --------------------------------------------------------------------------------------------------
# --bf16 true on the CPU: the networks in bf16, the losses as in fp32
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, variant", [("asintrovae", "paper"), ("sintrovae", "paper")])
def test_cpu_bf16_step_matches_fp32_and_its_gradients_are_finite(model, variant):
    """One train_step under setup_device("cpu", "true")'s amp: the convolutions really run in
    bf16, the losses stay float32 and within bf16's rounding of the fp32 step on the same weights
    and noise, and every parameter gets a finite gradient."""
    runs = {}
    for bf16 in ("false", "true"):
        cfg, nets, opts, x, _ = tiny(model, variant, size=16)
        device, amp = asv.setup_device("cpu", bf16)
        conv_dtypes = []
        first_conv = next(m for m in nets["encoder"].modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda m, i, out: conv_dtypes.append(out.dtype))
        torch.manual_seed(11)
        stats = asv.train_step(model, nets, opts, x, cfg, C, S, amp)
        runs[bf16] = stats, nets, set(conv_dtypes)
    (fp32, _, fp32_dtypes), (bf16, nets, bf16_dtypes) = runs["false"], runs["true"]
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    # measured: losses and rec within 0.2 %, the KLs (sums of few latent terms) within 1.5 %
    for name, rel in (("loss_e", 1e-2), ("loss_d", 1e-2), ("rec", 1e-2), ("kl_real", 3e-2),
                      ("kl_fake", 3e-2)):
        assert bf16[name].dtype == torch.float32, name
        assert bf16[name].item() == pytest.approx(fp32[name].item(), rel=rel), name
    for part in ("encoder", "decoder"):
        for name, param in nets[part].named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{part} {name}"
