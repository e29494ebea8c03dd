"""as_introvae.py, pure parts: every loss on tiny tensors against values worked out by hand, the
AS-Distance identity, the annealing schedule, the networks' shapes, the presets, and which weights
each step may touch."""

import gzip
import math

import numpy as np
import pytest
import torch

import as_introvae as asv

pytestmark = pytest.mark.usefixtures("one_thread")

E = math.exp


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# losses, by hand
# --------------------------------------------------------------------------------------------------
def test_sse_is_a_per_sample_sum():
    x = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # (2, 1, 2)
    assert asv.sse(x, torch.zeros_like(x)).tolist() == [5.0, 25.0]


def test_kl_divergence_closed_form():
    # mu = (1, 0), logvar = (0, ln 2): -1/2 [(1 + 0 - 1 - 1) + (1 + ln 2 - 2 - 0)] = 1 - ln(2) / 2
    kl = asv.kl_divergence(t(1.0, 0.0)[None], t(0.0, math.log(2))[None])
    assert kl.item() == pytest.approx(1 - math.log(2) / 2, rel=1e-12)
    assert asv.kl_divergence(torch.zeros(3, 5), torch.zeros(3, 5)).tolist() == [0.0, 0.0, 0.0]


def test_as_distance_one_pair_by_hand():
    # a = N(0, 1), b = N(1, 1), B = D = 1: k_aa = k_bb = 1/sqrt(4 pi), k_ab = exp(-1/4)/sqrt(4 pi)
    mu_a, mu_b, logvar = t(0.0)[None], t(1.0)[None], t(0.0)[None]
    paper = asv.as_distance(mu_a, logvar, mu_b, logvar)
    assert paper.item() == pytest.approx(
        2 * (1 - E(-0.25)) / math.sqrt(4 * math.pi), rel=1e-12
    )  # 0.124797
    official = asv.as_distance(mu_a, logvar, mu_b, logvar, reduction="official_sum")
    assert official.item() == pytest.approx(
        2 * (1 - E(-0.25)) / math.sqrt(2), rel=1e-12
    )  # no 1/sqrt(2 pi)


def test_as_distance_equals_squared_l2_between_batch_mixture_marginals():
    """AS = sum_d integral (p_a,d - p_b,d)^2 du, checked by quadrature; hence AS >= 0 and
    AS(a, a) = 0."""
    gen = torch.Generator().manual_seed(3)

    def uniform(rows, low, high):
        return low + (high - low) * torch.rand(rows, 2, generator=gen, dtype=torch.float64)

    mu_a, mu_b, lv_a, lv_b = (
        uniform(3, -1, 1),
        uniform(4, -1, 1),
        uniform(3, -1, 0),
        uniform(4, -0.5, 0.5),
    )
    u = np.linspace(-15, 15, 300001)

    def mixture(mu, logvar, d):  # the batch's 1-D marginal density in dimension d on the grid u
        var = np.exp(logvar[:, d].numpy())[:, None]
        return (
            np.exp(-((u[None] - mu[:, d].numpy()[:, None]) ** 2) / (2 * var))
            / np.sqrt(2 * np.pi * var)
        ).mean(0)

    def trapezoid(f):
        return float(((f[1:] + f[:-1]) / 2 * np.diff(u)).sum())

    integral = sum(
        trapezoid((mixture(mu_a, lv_a, d) - mixture(mu_b, lv_b, d)) ** 2) for d in range(2)
    )
    paper = asv.as_distance(mu_a, lv_a, mu_b, lv_b).item()
    assert paper == pytest.approx(integral, rel=1e-8)
    assert paper > 0
    assert asv.as_distance(mu_a, lv_a, mu_a, lv_a).item() == 0.0
    # the official reductions are fixed multiples of it when both batches have B rows (here B = 3, D
    # = 2)
    mean = asv.as_distance(mu_a, lv_a, mu_b[:3], lv_b[:3], reduction="official_mean").item()
    total = asv.as_distance(mu_a, lv_a, mu_b[:3], lv_b[:3], reduction="official_sum").item()
    same_b = asv.as_distance(mu_a, lv_a, mu_b[:3], lv_b[:3]).item()
    assert mean == pytest.approx(math.sqrt(2 * math.pi) / 2 * same_b, rel=1e-12)
    assert total == pytest.approx(3 * 3 * 2 * mean, rel=1e-12)
    with pytest.raises(ValueError):
        asv.as_distance(mu_a, lv_a, mu_b, lv_b, reduction="sum")


def test_annealing_coefficient():
    assert [asv.annealing_coefficient(i, 100) for i in (0, 10, 20, 50, 99)] == [
        0.0,
        0.5,
        1.0,
        1.0,
        1.0,
    ]
    assert asv.annealing_coefficient(10, 100, "tanh") == pytest.approx(math.tanh(0.5))  # 0.4621
    assert asv.annealing_coefficient(20, 100, "tanh") == pytest.approx(0.7615941559557649)
    assert asv.annealing_coefficient(100, 100, "tanh") < 1.0


def test_vae_loss():
    # mean(1 * (2, 4) + 0.5 * (1, 3)) = mean(2.5, 5.5) = 4
    assert asv.vae_loss(
        t(2.0, 4.0), t(1.0, 3.0), beta_rec=1.0, beta_kl=0.5
    ).item() == pytest.approx(4.0)


def test_intro_losses():
    # L_E = 0.5 * 2 + 1 * (1 + 0.5 * 0.5 * (relu(10 - 3) + relu(10 - 12))) = 1 + 1 + 1.75
    loss_e = asv.intro_encoder_loss(
        t(2.0), t(1.0), t(3.0), t(12.0), margin=10.0, beta_rec=0.5, beta_kl=1.0, beta_neg=0.5
    )
    assert loss_e.item() == pytest.approx(3.75)
    # the hinge acts on the batch MEAN: kl_rec (5, 15) has mean 10 -> no hinge at all
    loss_e = asv.intro_encoder_loss(
        t(2.0, 2.0),
        t(1.0, 1.0),
        t(5.0, 15.0),
        t(12.0, 12.0),
        margin=10.0,
        beta_rec=0.5,
        beta_kl=1.0,
        beta_neg=0.5,
    )
    assert loss_e.item() == pytest.approx(2.0)
    # L_D = 0.5 * 2 + 0.5 * 1 * (3 + 12)
    assert asv.intro_decoder_loss(
        t(2.0), t(3.0), t(12.0), beta_rec=0.5, beta_kl=1.0
    ).item() == pytest.approx(8.5)


def test_soft_intro_encoder_loss():
    # s = 0.5, all betas 1, alpha 2: 0.5 * (mean(2, 4) + mean(1, 3)) + 0.25 * (mean(e^-1, e^-3) +
    # mean(e^-1, e^-1))
    loss, _, _ = asv.as_intro_encoder_loss(
        t(2.0, 4.0),
        t(1.0, 3.0),
        t(1.0, 3.0),
        t(0.0, 0.0),
        t(0.0, 0.0),
        t(1.0, 1.0),
        as_dist=0.0,
        c=1.0,
        s=0.5,
        beta_rec=1.0,
        beta_kl=1.0,
        beta_neg=1.0,
    )
    assert loss.item() == pytest.approx(2.5 + 0.25 * ((E(-1) + E(-3)) / 2 + E(-1)), rel=1e-12)
    # beta_neg weighs only the KL inside the exponent: exp(-2 * 0.5 * (1 * 0 + 3 * 1)) = e^-3 for
    # the f term
    loss, _, _ = asv.as_intro_encoder_loss(
        t(2.0),
        t(1.0),
        t(1.0),
        t(0.0),
        t(0.0),
        t(1.0),
        as_dist=0.0,
        c=1.0,
        s=0.5,
        beta_rec=1.0,
        beta_kl=1.0,
        beta_neg=3.0,
    )
    assert loss.item() == pytest.approx(1.5 + 0.25 * (E(-1) + E(-3)), rel=1e-12)


def test_soft_intro_decoder_loss():
    # s [1 * 2 + 0.5 * 1 * (1 + 3) + 0.1 * 0.5 * 1 * (4 + 6)] = 0.5 * 4.5
    loss = asv.as_intro_decoder_loss(
        t(2.0),
        t(1.0),
        t(3.0),
        t(4.0),
        t(6.0),
        as_dist=0.0,
        c=1.0,
        s=0.5,
        beta_rec=1.0,
        beta_kl=1.0,
        gamma_r=0.1,
    )
    assert loss.item() == pytest.approx(2.25)


def test_as_intro_encoder_loss():
    # c = 0.5, AS = 2: r exponent -2 * 0.5 * (1 + (0.5 * 0 + 0.5 * 2)) = -2, f exponent -(0 + 0.5 *
    # 1 + 0.5 * 2) = -1.5
    loss, _, _ = asv.as_intro_encoder_loss(
        t(2.0),
        t(1.0),
        t(1.0),
        t(0.0),
        t(0.0),
        t(1.0),
        as_dist=t(2.0)[0],
        c=0.5,
        s=0.5,
        beta_rec=1.0,
        beta_kl=1.0,
        beta_neg=1.0,
    )
    assert loss.item() == pytest.approx(1.5 + 0.25 * (E(-2) + E(-1.5)), rel=1e-12)  # 1.5896
    # c = 1 is Soft-IntroVAE whatever the AS value
    args = (t(2.0, 5.0), t(1.0, 0.5), t(1.0, 3.0), t(0.2, 0.7), t(0.3, 0.1), t(1.0, 2.0))
    betas = dict(s=0.1, beta_rec=1.0, beta_kl=1.0, beta_neg=2.0)
    assert (
        asv.as_intro_encoder_loss(*args, as_dist=t(9.0)[0], c=1.0, **betas)[0].item()
        == asv.as_intro_encoder_loss(*args, as_dist=0.0, c=1.0, **betas)[0].item()
    )


def test_as_intro_decoder_loss():
    # c = 0.5, AS = 4; paper (Eq. 9, AS once per kind): 0.5 * [2 + 0.5 * (0.5 * (1 + 3) + 2 * 0.5 *
    # 4) + 0.5] = 2.75
    args = (t(2.0), t(1.0), t(3.0), t(4.0), t(6.0))
    kwargs = dict(as_dist=t(4.0)[0], c=0.5, s=0.5, beta_rec=1.0, beta_kl=1.0, gamma_r=0.1)
    assert asv.as_intro_decoder_loss(*args, **kwargs).item() == pytest.approx(2.75)
    # official: AS once in all: 0.5 * [2 + 0.5 * (0.5 * 4 + 0.5 * 4) + 0.5] = 2.25
    assert asv.as_intro_decoder_loss(*args, **kwargs, variant="official").item() == pytest.approx(
        2.25
    )
    kwargs["c"] = 1.0
    assert asv.as_intro_decoder_loss(*args, **kwargs).item() == pytest.approx(
        asv.as_intro_decoder_loss(
            *args, as_dist=0.0, c=1.0, s=0.5, beta_rec=1.0, beta_kl=1.0, gamma_r=0.1
        ).item()
    )


def test_losses_by_hand_with_a_batch_and_weights_other_than_1():
    """B > 1 and distinct weights: a sum taken for a batch mean, or a dropped or swapped weight,
    fails."""
    # VAE: mean(0.5 * (1, 2, 6) + 2 * (3, 0, 3)) = mean(6.5, 1, 9) = 5.5
    assert asv.vae_loss(
        t(1.0, 2.0, 6.0), t(3.0, 0.0, 3.0), beta_rec=0.5, beta_kl=2.0
    ).item() == pytest.approx(5.5, rel=1e-12)
    # IntroVAE encoder: 0.5 * 2 + 3 * (3 + 0.4 / 2 * (relu(10 - mean(5, 9)) + relu(10 - mean(1,
    # 3)))) = 16.6
    loss = asv.intro_encoder_loss(
        t(1.0, 3.0),
        t(2.0, 4.0),
        t(5.0, 9.0),
        t(1.0, 3.0),
        margin=10.0,
        beta_rec=0.5,
        beta_kl=3.0,
        beta_neg=0.4,
    )
    assert loss.item() == pytest.approx(16.6, rel=1e-12)
    # IntroVAE decoder: 0.5 * mean(1, 3) + 3 / 2 * (mean(2, 4) + mean(6, 0)) = 1 + 9
    loss = asv.intro_decoder_loss(t(1.0, 3.0), t(2.0, 4.0), t(6.0, 0.0), beta_rec=0.5, beta_kl=3.0)
    assert loss.item() == pytest.approx(10.0, rel=1e-12)
    # Soft / AS encoder, s = 0.5, beta_rec 2, beta_kl 0.5, beta_neg 3: the real part is
    # 0.5 * (2 * mean(1, 3) + 0.5 * mean(2, 4)) = 2.75; exponents -2 s (2 SSE_q + 3 KL_q)
    real = (t(1.0, 3.0), t(2.0, 4.0))
    r, f = (t(0.5, 1.0), t(0.0, 1.0 / 3.0)), (t(0.0, 0.25), t(1.0 / 3.0, 0.0))
    weights = dict(s=0.5, beta_rec=2.0, beta_kl=0.5, beta_neg=3.0)
    loss, exp_r, exp_f = asv.as_intro_encoder_loss(
        *real, *r, *f, as_dist=t(0.0)[0], c=1.0, **weights
    )
    assert loss.item() == pytest.approx(
        2.75 + 0.25 * ((E(-1) + E(-3)) / 2 + (E(-1) + E(-0.5)) / 2), rel=1e-12
    )
    # the exp-terms come back as batch means, for logging
    assert (exp_r.item(), exp_f.item()) == (
        pytest.approx((E(-1) + E(-3)) / 2, rel=1e-12),
        pytest.approx((E(-1) + E(-0.5)) / 2, rel=1e-12),
    )
    # alpha = 4 doubles every exponent and halves the 1 / (2 alpha) in front
    loss, _, _ = asv.as_intro_encoder_loss(
        *real, *r, *f, as_dist=t(0.0)[0], c=1.0, alpha=4.0, **weights
    )
    assert loss.item() == pytest.approx(
        2.75 + 0.125 * ((E(-2) + E(-6)) / 2 + (E(-2) + E(-1)) / 2), rel=1e-12
    )
    # c = 0.5, AS = 1: KL_q -> 0.5 KL_q + 0.5; r exponents -(1 + 1.5), -(2 + 2); f: -(0 + 2), -(0.5
    # + 1.5)
    loss, _, _ = asv.as_intro_encoder_loss(*real, *r, *f, as_dist=t(1.0)[0], c=0.5, **weights)
    assert loss.item() == pytest.approx(2.75 + 0.25 * ((E(-2.5) + E(-4)) / 2 + E(-2)), rel=1e-12)
    # decoder, s = 0.25, beta_rec 2, beta_kl 0.5, gamma_r 0.1, KL_r (2, 4), KL_f (0, 2):
    # s [2 mean(1, 3) + 0.5 / 2 (mean KL_r + mean KL_f) + 0.1 * 2 / 2 (mean(4, 8) + mean(2, 6))] = s
    # (4 + 1 + 1)
    args = (t(1.0, 3.0), t(2.0, 4.0), t(0.0, 2.0), t(4.0, 8.0), t(2.0, 6.0))
    weights = dict(s=0.25, beta_rec=2.0, beta_kl=0.5, gamma_r=0.1)
    assert asv.as_intro_decoder_loss(
        *args, as_dist=t(0.0)[0], c=1.0, **weights
    ).item() == pytest.approx(1.5, rel=1e-12)
    # c = 0.5, AS = 4, paper: 0.25 (0.5 (3 + 1) + 2 * 0.5 * 4) = 1.5 -> s (4 + 1.5 + 1) = 1.625
    assert asv.as_intro_decoder_loss(
        *args, as_dist=t(4.0)[0], c=0.5, **weights
    ).item() == pytest.approx(1.625, rel=1e-12)
    # official, AS once: 0.25 (2 + 0.5 * 4) = 1 -> s (4 + 1 + 1) = 1.5
    assert asv.as_intro_decoder_loss(
        *args, as_dist=t(4.0)[0], c=0.5, variant="official", **weights
    ).item() == pytest.approx(1.5, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image_channels, channels, size, side", [(1, (4, 8), 28, 7), (3, (4, 8, 16), 32, 4)]
)
def test_network_shapes(image_channels, channels, size, side):
    encoder, decoder = asv.build_networks(image_channels, channels, size, z_dim=5)
    assert (
        encoder.fc.in_features == channels[-1] * side * side
    )  # MNIST: 128 x 7 x 7 = 6272 in the preset
    mu, logvar = encoder(torch.rand(2, image_channels, size, size))
    assert mu.shape == logvar.shape == (2, 5) and mu.dtype == torch.float32
    assert decoder(torch.randn(2, 5)).shape == (2, image_channels, size, size)


def test_resblock_skip_is_identity_only_when_channels_match():
    assert isinstance(asv.ResBlock(8, 8).skip, torch.nn.Identity)
    assert isinstance(asv.ResBlock(8, 16).skip, torch.nn.Conv2d)
    assert all(
        m.bias is None for m in asv.ResBlock(8, 16).modules() if isinstance(m, torch.nn.Conv2d)
    )


# --------------------------------------------------------------------------------------------------
# presets and flags
# --------------------------------------------------------------------------------------------------
def test_presets_and_overrides():
    cfg = asv.make_config({"dataset": "mnist"})
    assert (cfg.image_size, cfg.channels, cfg.z_dim, cfg.batch_size, cfg.epochs, cfg.beta_neg) == (
        28,
        (64, 128),
        32,
        128,
        100,
        256.0,
    )
    cfg = asv.make_config({"dataset": "celeba256", "beta_neg": 512.0})
    assert (cfg.channels, cfg.beta_kl, cfg.beta_neg, cfg.margin, cfg.hflip) == (
        (64, 128, 256, 512, 512, 512),
        0.5,
        512.0,
        120.0,
        True,
    )
    cfg = asv.make_config({"dataset": "oxford", "model": "introvae"})
    assert (cfg.z_dim, cfg.beta_rec, cfg.beta_kl, cfg.beta_neg, cfg.margin) == (
        128,
        0.05,
        1.0,
        0.5,
        100.0,
    )
    cfg = asv.make_config({"dataset": "folder", "image_size": 256})
    assert (cfg.z_dim, cfg.beta_neg, len(cfg.channels)) == (256, 1024.0, 6)
    cfg = asv.make_config(
        {"dataset": "folder", "image_size": 64}
    )  # no table row: channels from the size
    assert cfg.channels == (64, 128, 256, 512)


def test_flags_are_checked(capsys):
    parser = asv.build_parser()
    assert vars(parser.parse_args(["--channels", "8,16", "--hflip", "yes", "--lr", "1e-3"])) == {
        "channels": (8, 16),
        "hflip": True,
        "lr": 1e-3,
    }
    for bad in (
        ["--model", "gan"],
        ["--batch-size", "1.5"],
        ["--channels", "8,x"],
        ["--hflip", "maybe"],
        ["--lr"],
        ["--no-such-flag", "1"],
        ["--bat", "8"],
    ):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(bad)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("as_introvae.py: error: "), bad
        assert err.count("\n") == 1 and err.endswith("(see as_introvae.py --help)\n"), err
    with pytest.raises(asv.ConfigError, match="not divisible"):
        asv.make_config({"dataset": "cifar10", "channels": (8, 16, 32, 64, 128, 256)})
    with pytest.raises(asv.ConfigError, match="batch-size"):
        asv.make_config({"dataset": "mnist", "batch_size": 0})


# --------------------------------------------------------------------------------------------------
# training steps
# --------------------------------------------------------------------------------------------------
def tiny(model, variant="paper"):
    cfg = asv.Config(
        model=model, variant=variant, channels=(4, 8), image_size=8, z_dim=3, batch_size=4
    )
    torch.manual_seed(0)
    nets, opts = asv.make_state(cfg, 3, torch.device("cpu"))
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return cfg, nets, opts, x, torch.randn(4, 3, generator=torch.Generator().manual_seed(2))


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a, b))


def no_amp():
    return torch.autocast("cpu", enabled=False)


def encoder_step(nets, opts, x, eps, cfg, c, s):
    """The encoder half of cfg.model's iteration, weights from cfg (Soft-IntroVAE: c = 1)."""
    args = (nets["encoder"], nets["decoder"], opts["encoder"], x, eps)
    betas = dict(beta_rec=cfg.beta_rec, beta_kl=cfg.beta_kl, beta_neg=cfg.beta_neg, amp=no_amp)
    if cfg.model == "introvae":
        return asv.intro_encoder_step(*args, margin=cfg.margin, **betas)
    as_intro = cfg.model == "asintrovae"
    return asv.as_intro_encoder_step(
        *args, c=c if as_intro else 1.0, s=s, as_variant=cfg.variant if as_intro else "none",
        **betas,
    )


def decoder_step(nets, opts, x, z, eps, cfg, c, s):
    args = (nets["encoder"], nets["decoder"], opts["decoder"], x, z, eps)
    betas = dict(beta_rec=cfg.beta_rec, beta_kl=cfg.beta_kl, amp=no_amp)
    if cfg.model == "introvae":
        return asv.intro_decoder_step(*args, **betas)
    as_intro = cfg.model == "asintrovae"
    return asv.as_intro_decoder_step(
        *args, c=c if as_intro else 1.0, s=s, gamma_r=cfg.gamma_r,
        as_variant=cfg.variant if as_intro else "none", **betas,
    )


@pytest.mark.parametrize(
    "model, variant",
    [
        ("asintrovae", "paper"),
        ("asintrovae", "official"),
        ("sintrovae", "paper"),
        ("introvae", "paper"),
    ],
)
def test_encoder_step_leaves_decoder_and_decoder_step_leaves_encoder(model, variant):
    cfg, nets, opts, x, eps = tiny(model, variant)
    enc0, dec0 = params(nets["encoder"]), params(nets["decoder"])
    z, _ = encoder_step(nets, opts, x, eps, cfg, 0.3, 1 / 192)
    assert same(dec0, params(nets["decoder"])) and all(
        p.grad is None for p in nets["decoder"].parameters()
    )
    assert not same(enc0, params(nets["encoder"]))
    enc1, grads1 = params(nets["encoder"]), [p.grad.clone() for p in nets["encoder"].parameters()]
    decoder_step(nets, opts, x, z, eps, cfg, 0.3, 1 / 192)
    assert same(enc1, params(nets["encoder"])) and same(
        grads1, [p.grad for p in nets["encoder"].parameters()]
    )
    assert not same(dec0, params(nets["decoder"]))


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_decoder_step_reuses_z_and_eps_with_the_updated_encoder(variant):
    """The decoder loss equals Eq. 9 evaluated on Dec(z), Dec(eps) and the encoder as it is after
    its own step."""
    cfg, nets, opts, x, eps = tiny("asintrovae", variant)
    c, s = 0.4, 1 / 192
    z, _ = encoder_step(nets, opts, x, eps, cfg, c, s)
    encoder, decoder = nets["encoder"], nets["decoder"]
    torch.manual_seed(5)
    with torch.no_grad():
        fake, rec = decoder(eps), decoder(z)
        mu_r, lv_r = encoder(rec)
        z_r = asv.reparameterize(mu_r, lv_r)
        mu_f, lv_f = encoder(fake)
        z_f = asv.reparameterize(mu_f, lv_f)
        if variant == "official":
            mu_r, lv_r, mu_f, lv_f = (v.tanh() for v in (mu_r, lv_r, mu_f, lv_f))
        as_dist = asv.as_distance(
            mu_r, lv_r, mu_f, lv_f, "official_mean" if variant == "official" else "paper"
        )
        expected = asv.as_intro_decoder_loss(
            asv.sse(x, rec),
            asv.kl_divergence(mu_r, lv_r),
            asv.kl_divergence(mu_f, lv_f),
            asv.sse(rec, decoder(z_r)),
            asv.sse(fake, decoder(z_f)),
            as_dist,
            c=c,
            s=s,
            beta_rec=cfg.beta_rec,
            beta_kl=cfg.beta_kl,
            gamma_r=cfg.gamma_r,
            variant=variant,
        )
    torch.manual_seed(5)
    stats = decoder_step(nets, opts, x, z, eps, cfg, c, s)
    assert stats["loss_d"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_vae_step_trains_both_networks_and_ema_follows_the_decoder():
    cfg, nets, opts, x, _ = tiny("vae")
    enc0, dec0 = params(nets["encoder"]), params(nets["decoder"])
    stats = asv.vae_step(
        nets["encoder"],
        nets["decoder"],
        opts["encoder"],
        opts["decoder"],
        x,
        beta_rec=cfg.beta_rec,
        beta_kl=cfg.beta_kl,
        amp=no_amp,
    )
    assert not same(enc0, params(nets["encoder"])) and not same(dec0, params(nets["decoder"]))
    assert set(stats) == {"loss", "rec", "kl_real"}
    ema0 = params(nets["ema"])
    asv.update_ema(nets["ema"], nets["decoder"], 0.9)
    for old, new, live in zip(ema0, params(nets["ema"]), params(nets["decoder"])):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * live)


def test_image_folder_reads_what_eval_metrics_reads(tmp_path):
    """Training and the metrics see the same images of a folder, subfolders included, in one
    order."""
    from PIL import Image

    import eval_metrics

    for name in ("b.png", "a/z.PNG", "a-b/a.jpg", "notes.txt"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            path.write_text("not an image")
        else:
            Image.new("RGB", (20, 20), (10, 20, 30)).save(
                path, format="PNG" if "png" in name.lower() else "JPEG"
            )
    folder = asv.ImageFolder(str(tmp_path), 16)
    expected = [str(tmp_path / name) for name in ("a/z.PNG", "a-b/a.jpg", "b.png")]
    assert folder.files == eval_metrics.list_images(str(tmp_path)) == expected
    assert folder[0].shape == (3, 16, 16) and folder[0].dtype == torch.uint8
    (tmp_path / "empty").mkdir()
    with pytest.raises(asv.DataError, match="no images"):
        asv.ImageFolder(str(tmp_path / "empty"), 16)


# --------------------------------------------------------------------------------------------------
# MNIST's IDX files read directly (no extraction), and the offline message when they are missing
# --------------------------------------------------------------------------------------------------
def write_idx(path, images, compress):
    """An IDX3 image file: magic 2051, count, height, width (big-endian int32), then the bytes."""
    header = np.array([2051, *images.shape], dtype=">i4").tobytes()
    with (gzip.open if compress else open)(path, "wb") as handle:
        handle.write(header + images.astype(np.uint8).tobytes())


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_files_are_read_as_written(tmp_path, compress):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    suffix = ".gz" if compress else ""
    write_idx(raw / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    loaded = asv.torchvision_images("mnist", str(tmp_path), train=False).images
    assert loaded.shape == (5, 1, 28, 28) and loaded.dtype == torch.uint8
    assert np.array_equal(loaded[:, 0].numpy(), images)
    (raw / f"t10k-images-idx3-ubyte{suffix}").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
    if compress:  # a truncated download: not gzip any more
        (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    with pytest.raises(asv.DataError, match="delete it and download again"):
        asv.torchvision_images("mnist", str(tmp_path), train=False)


def test_missing_mnist_offline_names_the_folder_and_files_and_leaves_nothing(tmp_path, capsys):
    root = tmp_path / "data"
    with pytest.raises(asv.DataError) as caught:
        asv.torchvision_images("mnist", str(root), train=True)
    message = str(caught.value)
    assert str(root / "MNIST" / "raw") in message
    assert all(f in message for f in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    assert not root.exists()  # the failed download's empty folders are gone
    assert "downloading" in capsys.readouterr().out
