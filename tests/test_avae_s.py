"""as_introvae.py, the AVAE-S parts (Naderi et al.; equation numbers are the AVAE-S paper's): every
term of Eq. 5-7 and 10-11 on tiny tensors against hand-worked values, the lambda rule and its probe,
Algorithm 1's gates inside the adversarial step, the Table I networks, the presets, cosine
similarity and FID at four depths."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import as_introvae as asv
import eval_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def step_image(height, width, first_bright_col):
    """(1, 1, H, W) float64: 0 left of first_bright_col, 1 from it on (a vertical dark-to-bright
    edge)."""
    image = torch.zeros(1, 1, height, width, dtype=F64)
    image[..., first_bright_col:] = 1.0
    return image


# --------------------------------------------------------------------------------------------------
# Eq. 5: MAE, MSE (= sse), 1 - SSIM
# --------------------------------------------------------------------------------------------------
def test_mae_and_mse_are_per_sample_sums():
    x = torch.zeros(2, 1, 2, 2, dtype=F64)
    rec = torch.zeros(2, 1, 2, 2, dtype=F64)
    rec[0, 0] = torch.tensor([[1.0, -2.0], [0.0, 0.5]])
    assert asv.loss_mae(x, rec).tolist() == [3.5, 0.0]
    assert asv.reconstruction_terms(
        torch.zeros(2, 1, 17, 17, dtype=F64), F.pad(rec, (0, 15, 0, 15)), asv.gabor_kernels()
    )["mse"].tolist() == [5.25, 0.0]  # L_MSE is sse()


def test_1_ssim_of_constant_images_is_the_luminance_formula():
    # Constant images: contrast and structure factors are C2 / C2 = 1, SSIM = (2ab + C1) / (a^2 +
    # b^2 + C1).
    a, b, c1 = 0.5, 0.25, 0.01**2
    x = torch.full((2, 1, 12, 12), a, dtype=F64)
    rec = torch.full((2, 1, 12, 12), b, dtype=F64)
    rec[1] = a
    expected = 1.0 - (2 * a * b + c1) / (a * a + b * b + c1)
    assert torch.allclose(
        asv.loss_1_ssim(x, rec), torch.tensor([expected, 0.0], dtype=F64), atol=1e-12
    )


def test_1_ssim_is_the_evaluation_ssim_and_differentiable():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, dtype=F64, generator=gen)
    rec = torch.rand(2, 3, 16, 16, dtype=F64, generator=gen, requires_grad=True)
    per_image, _ = eval_metrics.ssim(
        x, rec.detach()
    )  # the metric results.json reports (in range: no clamp)
    np.testing.assert_allclose(
        1.0 - asv.loss_1_ssim(x, rec).detach().numpy(), per_image, rtol=0, atol=1e-14
    )
    asv.loss_1_ssim(x, rec).sum().backward()
    assert torch.isfinite(rec.grad).all() and rec.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Eq. 6: Sobel
# --------------------------------------------------------------------------------------------------
def test_sobel_responses_of_a_step_image():
    # Columns 0-2 dark, 3-4 bright; valid output 3x3. The window at output column j covers columns
    # j..j+2:
    # j = 0 sees no edge, j = 1, 2 see 0|1 transitions weighted (1 + 2 + 1) = 4. No vertical change:
    # G_y = 0.
    edges = asv.sobel_edges(step_image(5, 5, 3))
    assert edges.shape == (1, 2, 3, 3)
    assert edges[0, 0].tolist() == [[0.0, 4.0, 4.0]] * 3
    assert edges[0, 1].abs().max() == 0
    edges_t = asv.sobel_edges(
        step_image(5, 5, 3).transpose(-1, -2)
    )  # a horizontal step swaps the two maps
    assert edges_t[0, 1].tolist() == [[0.0, 0.0, 0.0], [4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
    assert edges_t[0, 0].abs().max() == 0


def test_sobel_loss_is_per_channel_squared_error():
    step = step_image(5, 5, 3)
    assert asv.loss_sobel(step, torch.zeros_like(step)).tolist() == [6 * 16.0]  # six 4s, squared
    two_channels = torch.cat([torch.zeros_like(step), step], dim=1)  # the edge only in channel 1
    edges = asv.sobel_edges(two_channels)
    assert edges[0, :2].abs().max() == 0 and edges[0, 2].tolist() == [[0.0, 4.0, 4.0]] * 3
    assert asv.loss_sobel(two_channels, torch.zeros_like(two_channels)).tolist() == [6 * 16.0]
    assert asv.loss_sobel(step, step).tolist() == [0.0]


# --------------------------------------------------------------------------------------------------
# Eq. 7: Gabor
# --------------------------------------------------------------------------------------------------
def test_gabor_bank_layout():
    bank = asv.gabor_kernels()
    assert [tuple(k.shape) for k in bank] == [
        (8, 1, 9, 9),
        (8, 1, asv.GABOR_MAX_KERNEL, asv.GABOR_MAX_KERNEL),
    ]
    for scale in bank:
        assert scale.sum(dim=(1, 2, 3)).abs().max() < 1e-15  # zero-sum: flat regions respond 0
        # theta = 90 deg is theta = 0 transposed; 135 deg is 45 deg mirrored left-right (the mirror
        # maps u' of one
        # onto u' of the other and only flips v', where the envelope is even)
        assert torch.allclose(scale[4:6], scale[0:2].transpose(-1, -2), atol=1e-15)
        assert torch.allclose(scale[6:8], scale[2:4].flip(-1), atol=1e-15)


def test_gabor_responses_of_a_step_image():
    # 9x9 image, bright from column 5 on: the single valid output is centred on column 4, so kernel
    # offsets
    # u = 1..4 see 1. lam = 4, sigma = 2, gamma = 1, radius 4; S = sum_{u=-4..4} exp(-u^2 / 8), per
    # row.
    # Odd, theta 0: sum_{u=1..4} exp(-u^2/8) sin(pi u/2) * S / S^2 = (e^{-1/8} - e^{-9/8}) / S.
    # Even, theta 0: (-e^{-1/2} + e^{-2}) / S minus 36 times the kernel's mean (1 + 2(-e^{-1/2} +
    # e^{-2})) / (81 S).
    s = sum(math.exp(-u * u / 8) for u in range(-4, 5))
    odd = (math.exp(-1 / 8) - math.exp(-9 / 8)) / s
    even = (-math.exp(-1 / 2) + math.exp(-2)) / s - 36 * (
        1 + 2 * (-math.exp(-1 / 2) + math.exp(-2))
    ) / (81 * s)
    response = asv.gabor_responses(step_image(9, 9, 5), asv.gabor_kernels(wavelengths=(4.0,)))[0]
    assert response.shape == (1, 8, 1, 1)
    assert response[0, 1, 0, 0].item() == pytest.approx(odd, abs=1e-14)
    assert response[0, 0, 0, 0].item() == pytest.approx(even, abs=1e-14)
    assert odd == pytest.approx(0.1138916, abs=1e-7)
    assert (
        abs(response[0, 5, 0, 0].item()) < 1e-15
    )  # theta = 90 deg: every kernel column sums to 0, blind here


def test_gabor_loss_zero_linear_and_blind_to_brightness():
    gen = torch.Generator().manual_seed(0)
    kernels = asv.gabor_kernels()
    x, y = (
        torch.rand(2, 3, 20, 20, dtype=F64, generator=gen),
        torch.rand(2, 3, 20, 20, dtype=F64, generator=gen),
    )
    assert asv.loss_gabor(x, x, kernels).abs().max() == 0
    assert torch.allclose(
        asv.loss_gabor(x, y, kernels),
        asv.loss_gabor(x - y, torch.zeros_like(x), kernels),
        rtol=1e-12,
    )
    assert (
        asv.loss_gabor(x, x + 0.3, kernels).abs().max() < 1e-20
    )  # brightness shifts are not texture
    with pytest.raises(ValueError, match="larger than"):
        asv.gabor_responses(torch.zeros(1, 1, 16, 16), kernels)


# --------------------------------------------------------------------------------------------------
# Eq. 5's weights: the lambda rule and its probe
# --------------------------------------------------------------------------------------------------
def test_balance_weights_paper_example_and_equal_scale():
    assert asv.balance_weights({"mae": 30.0, "mse": 900.0}) == {
        "mae": 30.0,
        "mse": 1.0,
    }  # Sec. III's example
    means = {"mae": 40.0, "mse": 20.0, "1-ssim": 0.5, "sobel": 160.0, "gabor": 8.0}
    weights = asv.balance_weights(means)
    assert weights == {"mae": 0.5, "mse": 1.0, "1-ssim": 40.0, "sobel": 0.125, "gabor": 2.5}
    assert all(weights[k] * means[k] == 20.0 for k in means)


@pytest.mark.parametrize(
    "means, message",
    [
        ({"mae": 1.0}, "reference"),
        ({"mse": 1.0, "gabor": 0.0}, "gabor"),
        ({"mse": float("nan")}, "mse"),
        ({"mse": 1.0, "sobel": -2.0}, "sobel"),
    ],
)
def test_balance_weights_rejects_bad_means(means, message):
    with pytest.raises(ValueError, match=message):
        asv.balance_weights(means)


def test_reconstruction_terms_and_weighted_sum():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 20, 20, dtype=F64, generator=gen)
    rec = torch.rand(3, 1, 20, 20, dtype=F64, generator=gen).requires_grad_()
    terms = asv.reconstruction_terms(x, rec, asv.gabor_kernels())
    assert tuple(terms) == asv.REC_TERMS and all(t.shape == (3,) for t in terms.values())
    only_mse = {name: float(name == "mse") for name in asv.REC_TERMS}
    assert torch.equal(
        asv.loss_rec(terms, only_mse), asv.sse(x, rec)
    )  # = the vae baseline's reconstruction
    weights = asv.balance_weights({name: float(t.detach().mean()) for name, t in terms.items()})
    weighted = {name: weights[name] * float(terms[name].detach().mean()) for name in asv.REC_TERMS}
    assert all(v == pytest.approx(weighted["mse"], rel=1e-12) for v in weighted.values())
    assert asv.loss_rec(terms, weights).mean().item() == pytest.approx(
        5 * weighted["mse"], rel=1e-12
    )
    asv.loss_rec(terms, weights).sum().backward()
    assert torch.isfinite(rec.grad).all()
    with pytest.raises(ValueError, match="different"):
        asv.loss_rec(terms, {"mse": 1.0})


def test_probe_trains_on_sse_then_freezes_the_lambdas():
    state = asv.new_vae_s_state(dataset_size=100, probe_batches=2, device=torch.device("cpu"))
    only_mse = {name: float(name == "mse") for name in asv.REC_TERMS}

    def terms(scale):  # batch means: mae 2s, mse 4s, 1-ssim s/4, sobel 8s, gabor s
        return {
            name: torch.tensor([0.5, 1.5]) * scale * factor
            for name, factor in zip(asv.REC_TERMS, (2.0, 4.0, 0.25, 8.0, 1.0))
        }

    assert asv.probe_rec_weights(state, terms(1.0)) == only_mse and state["rec_weights"] is None
    assert (
        asv.probe_rec_weights(state, terms(3.0)) == only_mse
    )  # the probe's last batch still trains on SSE
    # means over the two batches: mae 4, mse 8, 1-ssim 0.5, sobel 16, gabor 2 -> lambda = 8 / mean
    frozen = {"mae": 2.0, "mse": 1.0, "1-ssim": 16.0, "sobel": 0.5, "gabor": 4.0}
    assert state["rec_weights"] == frozen and state["term_count"] == 2
    assert asv.probe_rec_weights(state, terms(100.0)) == frozen and state["term_count"] == 2
    flat = asv.new_vae_s_state(100, 1, torch.device("cpu"))
    with pytest.raises(asv.TrainingDiverged, match="sobel"):  # flat images have no edges to balance
        asv.probe_rec_weights(flat, {**terms(1.0), "sobel": torch.zeros(2)})


# --------------------------------------------------------------------------------------------------
# Eq. 10: total correlation
# --------------------------------------------------------------------------------------------------
def test_total_correlation_hand_worked_two_points():
    # M = N = 2, D = 2, z = mu = [[0,0],[1,1]], unit variances. MSS weights are 1/2 each (exact: M =
    # N):
    # q(z_1) = (c^2 + c^2 e^{-1}) / 2, q(z_1d) = (c + c e^{-1/2}) / 2, c = (2 pi)^{-1/2}; the same
    # for z_2, so
    # TC = log(2 (1 + e^{-1}) / (1 + e^{-1/2})^2). MWS weights 1/(NM) = 1/4 add (D - 1) log 2.
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    expected = math.log(2 * (1 + math.exp(-1)) / (1 + math.exp(-0.5)) ** 2)
    assert expected == pytest.approx(0.0582549, abs=1e-7)
    assert asv.total_correlation(z, z, torch.zeros_like(z), 2).item() == pytest.approx(
        expected, abs=1e-14
    )
    assert asv.total_correlation(z, z, torch.zeros_like(z), 2, "mws").item() == pytest.approx(
        expected + math.log(2), abs=1e-14
    )


def test_total_correlation_collapsed_posteriors():
    # Every posterior N(0, I): q(z) = N(0, I) factorises, the true TC is 0. MSS is exact; MWS
    # returns (D-1) log N.
    z = torch.randn(16, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros_like(z)
    assert abs(asv.total_correlation(z, zeros, zeros, 1000).item()) < 1e-12
    assert asv.total_correlation(z, zeros, zeros, 1000, "mws").item() == pytest.approx(
        4 * math.log(1000), abs=1e-10
    )


def test_total_correlation_independent_vs_duplicated_latents():
    gen = torch.Generator().manual_seed(0)
    batch, dim = 512, 4
    # independent: mu ~ N(0, I), unit posteriors -> q(z) = N(0, 2I), TC = 0
    mu = torch.randn(batch, dim, generator=gen, dtype=F64)
    z = mu + torch.randn(batch, dim, generator=gen, dtype=F64)
    tc_independent = asv.total_correlation(z, mu, torch.zeros_like(mu), 60000).item()
    # duplicated: one factor copied to every dimension, posterior std 0.1 -> q(z) = N(0, 11^T + 0.01
    # I),
    # Gaussian TC = 0.5 (sum_d log Sigma_dd - log det Sigma), det = 0.01^{D-1} (0.01 + D)
    s = torch.randn(batch, 1, generator=gen, dtype=F64).repeat(1, dim)
    z_dup = s + 0.1 * torch.randn(batch, dim, generator=gen, dtype=F64)
    tc_duplicated = asv.total_correlation(
        z_dup, s, torch.full_like(s, math.log(0.01)), 60000
    ).item()
    tc_gaussian = 0.5 * (dim * math.log(1.01) - ((dim - 1) * math.log(0.01) + math.log(0.01 + dim)))
    assert abs(tc_independent) < 0.05
    assert tc_gaussian == pytest.approx(6.2333, abs=1e-4)
    assert abs(tc_duplicated - tc_gaussian) < 0.6


def test_total_correlation_gradient_and_bad_input():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(8, 3, generator=gen).requires_grad_()
    logvar = torch.zeros(8, 3, requires_grad=True)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(8, 3, generator=gen)
    asv.total_correlation(z, mu, logvar, 100).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()
    with pytest.raises(ValueError, match="batch size"):
        asv.total_correlation(z[:1], mu[:1], logvar[:1], 100)
    with pytest.raises(ValueError, match="dataset size"):
        asv.total_correlation(z, mu, logvar, 4)
    with pytest.raises(ValueError, match="estimator"):
        asv.total_correlation(z, mu, logvar, 100, "mwx")


def test_vae_s_loss():
    # mean(2 * (1, 3) + 0.5 * (2, 4)) + 3 * 0.25 = mean(3, 8) + 0.75
    loss = asv.vae_s_loss(
        torch.tensor([1.0, 3.0]),
        torch.tensor([2.0, 4.0]),
        torch.tensor(0.25),
        beta_rec=2.0,
        beta_kl=0.5,
        beta_tc=3.0,
    )
    assert loss.item() == pytest.approx(6.25)


# --------------------------------------------------------------------------------------------------
# Eq. 11-12, Algorithm 1
# --------------------------------------------------------------------------------------------------
def test_discriminator_and_adversarial_losses_hand_worked():
    ln3 = math.log(3.0)  # sigmoid(ln 3) = 0.75
    real = torch.tensor([0.0, ln3], dtype=F64)
    rec = torch.tensor([0.0, -ln3], dtype=F64)
    assert torch.allclose(
        asv.loss_dis(real, rec),
        torch.tensor([2 * math.log(2), -2 * math.log(0.75)], dtype=F64),
        atol=1e-15,
    )
    assert asv.loss_adv(torch.tensor([ln3], dtype=F64)).item() == pytest.approx(
        math.log(0.25), abs=1e-15
    )
    assert asv.loss_adv(torch.tensor([ln3], dtype=F64), "nonsaturating").item() == pytest.approx(
        -math.log(0.75), abs=1e-15
    )
    big = torch.tensor([100.0])
    assert asv.loss_dis(big, -big).item() == pytest.approx(0.0, abs=1e-40)
    assert asv.loss_adv(-big, "nonsaturating").item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="form"):
        asv.loss_adv(big, "wgan")


@pytest.mark.parametrize("form", ["minimax", "nonsaturating"])
def test_adversarial_term_pushes_reconstructions_towards_real(form):
    # Algorithm 1's literal "+ log Dis(X~)" would have a positive gradient here; both our forms are
    # negative.
    logits_rec = torch.tensor([-2.0, 0.0, 2.0], requires_grad=True)
    asv.loss_adv(logits_rec, form).sum().backward()
    assert (logits_rec.grad < 0).all()


def test_discriminator_accuracy_and_gates():
    real = torch.tensor([1.0, -1.0, 2.0])
    rec = torch.tensor([-1.0, -3.0, 0.0])  # a zero logit counts as wrong
    assert asv.discriminator_accuracy(real, rec) == pytest.approx(4 / 6)
    table = {
        0.4: (True, False),
        0.5: (True, False),
        0.6: (True, True),
        0.7: (False, True),
        0.95: (False, True),
    }
    for accuracy, gates in table.items():
        assert asv.adversarial_gates(accuracy) == gates
    assert asv.adversarial_gates(0.7, disc_train_below=1.01, adv_use_above=-0.01) == (True, True)


class FixedLogits(nn.Module):
    """A stand-in discriminator: fixed logits for the real and rec images, in the interleaved
    order the step feeds them (asv.interleave), plus one trainable offset."""

    def __init__(self, real, rec):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))
        self.register_buffer("pattern", asv.interleave(torch.tensor(real), torch.tensor(rec)))

    def forward(self, x):  # (2B, ...) -> (2B,); 0 * x keeps the graph through the images
        return self.pattern + self.offset + 0.0 * x.flatten(1).sum(dim=1)


def no_amp():
    return torch.autocast("cpu", enabled=False)


def tiny_adversarial(model, real, rec):
    cfg = asv.Config(
        model=model,
        channels=(4, 8),
        image_size=20,
        z_dim=3,
        batch_size=4,
        pretrain_epochs=0,
        adv_epochs=1,
        epochs=1,
        beta_adv=2.0,
    )
    torch.manual_seed(0)
    nets, opts = asv.make_state(cfg, 1, torch.device("cpu"))
    nets["disc"] = FixedLogits(real, rec)
    opts["disc"] = torch.optim.SGD(nets["disc"].parameters(), lr=0.5)
    state = asv.new_vae_s_state(100, 1, torch.device("cpu")) if model == "avae-s" else None
    x = torch.rand(4, 1, 20, 20, generator=torch.Generator().manual_seed(1))
    return cfg, nets, opts, state, x


# (real logits, rec logits, discriminator steps, adversarial term): a real logit is right when > 0,
# a rec one when < 0
GATE_CASES = {
    "acc 0.5: disc steps, no adversarial term": (
        [1.0, 1.0, -1.0, -1.0],
        [1.0, 1.0, -1.0, -1.0],
        True,
        False,
    ),
    "acc 0.625: both": ([1.0, 1.0, 1.0, -1.0], [1.0, -1.0, -1.0, 1.0], True, True),
    "acc 1: adversarial term only": ([1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0], False, True),
}


@pytest.mark.parametrize("model", ["avae", "avae-s"])
@pytest.mark.parametrize("case", list(GATE_CASES))
def test_adversarial_step_gates(model, case):
    real, rec, train_disc, use_adv = GATE_CASES[case]
    cfg, nets, opts, state, x = tiny_adversarial(model, real, rec)
    encoder0 = [p.detach().clone() for p in nets["encoder"].parameters()]
    torch.manual_seed(
        7
    )  # L_VAE as the step computes it: the same noise, a twin of the (1-batch) probe
    with torch.no_grad():
        twin = None if state is None else asv.new_vae_s_state(100, 1, torch.device("cpu"))
        if twin is None:
            l_vae, _, _ = asv.vae_objective(
                nets["encoder"],
                nets["decoder"],
                x,
                beta_rec=cfg.beta_rec,
                beta_kl=cfg.beta_kl,
                amp=no_amp,
            )
        else:
            l_vae, _, _ = asv.vae_s_objective(
                nets["encoder"],
                nets["decoder"],
                x,
                twin,
                beta_rec=cfg.beta_rec,
                beta_kl=cfg.beta_kl,
                beta_tc=cfg.beta_tc,
                tc_estimator=cfg.tc_estimator,
                amp=no_amp,
            )
    torch.manual_seed(7)
    stats = asv.train_step(model, nets, opts, x, cfg, 0.0, 1.0, no_amp, state)
    offset = nets["disc"].offset.item()
    accuracy = (sum(v > 0 for v in real) + sum(v < 0 for v in rec)) / 8
    assert stats["disc_acc"].item() == accuracy
    assert (stats["train_disc"].item(), stats["use_adv"].item()) == (
        float(train_disc),
        float(use_adv),
    )
    # the discriminator steps exactly when its gate is open: BCE gradient d/d offset =
    # mean(-sig(-l_real) + sig(l_rec))
    grad = (-torch.sigmoid(-torch.tensor(real)) + torch.sigmoid(torch.tensor(rec))).mean().item()
    assert offset == pytest.approx(-0.5 * grad if train_disc else 0.0, abs=1e-7)
    assert stats["loss_dis"].item() == pytest.approx(
        asv.loss_dis(torch.tensor(real), torch.tensor(rec)).mean().item()
    )
    # the VAE always steps (DEVIATION from Algorithm 1), with beta_adv * log(1 - Dis(rec)) only when
    # its gate is open,
    # under the discriminator AFTER its step
    adversarial = asv.loss_adv(torch.tensor(rec) + offset).mean().item()
    assert stats["loss"].item() == pytest.approx(
        l_vae.item() + (2.0 * adversarial if use_adv else 0.0), rel=1e-6
    )
    assert not all(torch.equal(a, b) for a, b in zip(encoder0, nets["encoder"].parameters()))


def test_step_method_follows_the_phases():
    cfg = asv.make_config(
        {"dataset": "mnist", "model": "avae", "pretrain_epochs": 2, "adv_epochs": 1}
    )
    assert cfg.epochs == 3
    assert [asv.step_method(cfg, epoch) for epoch in range(3)] == ["vae", "vae", "avae"]
    cfg = asv.make_config(
        {"dataset": "mnist", "model": "avae-s", "pretrain_epochs": 1, "adv_epochs": 1}
    )
    assert [asv.step_method(cfg, epoch) for epoch in range(2)] == [
        "vae-s",
        "avae-s",
    ]  # both with the VAE-S loss
    assert asv.step_method(asv.make_config({"dataset": "mnist", "model": "vae-s"}), 5) == "vae-s"
    assert asv.step_method(asv.make_config({"dataset": "mnist", "model": "vae"}), 5) == "vae"


# --------------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------------
def test_shared_discriminator_is_the_encoder_with_max_pooling():
    torch.manual_seed(0)
    disc = asv.Discriminator(1, (8, 16), 28)
    encoder = asv.Encoder(1, (8, 16), 28, 5)
    pools = [type(m) for m in disc.conv if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    assert pools == [nn.MaxPool2d, nn.MaxPool2d]
    assert [type(m) for m in disc.conv if not isinstance(m, nn.MaxPool2d)] == [
        type(m) for m in encoder.conv if not isinstance(m, nn.AvgPool2d)
    ]
    assert disc.fc.in_features == 16 * 7 * 7 and disc.fc.out_features == 1
    x = torch.rand(3, 1, 28, 28, requires_grad=True)
    logits = disc(x)
    assert logits.shape == (3,)
    logits.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_table_one_network_shapes_and_parameter_counts():
    torch.manual_seed(0)
    encoder, decoder = asv.build_networks(3, (64,), 96, 32, arch="avae")
    disc = asv.build_discriminator(3, (64,), 96, arch="avae")
    assert (type(encoder), type(decoder), type(disc)) == (
        asv.AVAEEncoder,
        asv.AVAEDecoder,
        asv.AVAEDiscriminator,
    )
    x = torch.rand(2, 3, 96, 96)
    mu, logvar = encoder(x)
    assert mu.shape == logvar.shape == (2, 32)
    out = decoder(mu)
    assert out.shape == (2, 3, 96, 96) and out.min() > 0 and out.max() < 1  # sigmoid output
    assert disc(x).shape == (2,)
    widths = (24, 48, 96, 192)
    # encoder by hand: per width a 3x3 and a 4x4 stride-2 conv (no bias), each + BN (2 per channel);
    # FC 192*6*6 -> 48 + BN; two heads 48 -> 32 with bias
    convs = sum(c_in * w * 9 + w * w * 16 for c_in, w in zip((3,) + widths[:-1], widths))
    assert sum(p.numel() for p in encoder.parameters()) == convs + 4 * sum(
        widths
    ) + 6912 * 48 + 96 + 2 * (48 * 32 + 32)
    assert (
        sum(
            isinstance(m, nn.Conv2d) and m.stride == (2, 2) and m.kernel_size == (4, 4)
            for m in encoder.modules()
        )
        == 4
    )
    # decoder: FC 32 -> 48 + BN, FC 48 -> 6912 + BN; conv pairs 192,192 | 96,96 | 48,48 | 24,24 +
    # BN; 1x1 to 3 with bias
    ins, outs = (192, 192, 192, 96, 96, 48, 48, 24), (192, 192, 96, 96, 48, 48, 24, 24)
    dec_convs = sum(i * o * 9 + 2 * o for i, o in zip(ins, outs))
    assert (
        sum(p.numel() for p in decoder.parameters())
        == 32 * 48 + 96 + 48 * 6912 + 2 * 6912 + dec_convs + 24 * 3 + 3
    )
    ups = [m for m in decoder.modules() if isinstance(m, nn.Upsample)]
    assert len(ups) == 4 and all(m.mode == "nearest" for m in ups)
    # discriminator: the stride-2 convs replaced by max pooling
    assert sum(isinstance(m, nn.MaxPool2d) for m in disc.modules()) == 4
    assert not any(isinstance(m, nn.Conv2d) and m.stride != (1, 1) for m in disc.modules())
    assert asv.AVAEDecoder(1, 32, 8)(torch.randn(2, 8)).shape == (
        2,
        1,
        32,
        32,
    )  # 32 px: a 2x2 bottleneck


# --------------------------------------------------------------------------------------------------
# presets and flags
# --------------------------------------------------------------------------------------------------
def test_avae_presets_and_flags():
    cfg = asv.make_config({"dataset": "celeba96", "model": "avae-s"})
    assert (
        cfg.image_size,
        cfg.arch,
        cfg.z_dim,
        cfg.batch_size,
        cfg.pretrain_epochs,
        cfg.adv_epochs,
        cfg.epochs,
        cfg.beta_kl,
        cfg.hflip,
    ) == (96, "avae", 32, 32, 100, 50, 150, 1.0, False)
    assert asv.run_name(cfg) == "celeba96_avae-s_tableI_s0"
    cfg = asv.make_config({"dataset": "celeba96", "arch": "resnet", "model": "vae-s"})
    assert (cfg.channels, cfg.epochs, cfg.tc_estimator, cfg.adv_loss, cfg.lambda_batches) == (
        (64, 128, 256, 512, 512),
        150,
        "mss",
        "minimax",
        0,
    )
    cfg = asv.make_config(
        {"dataset": "mnist", "model": "avae", "pretrain_epochs": 3, "adv_epochs": 0}
    )
    assert (cfg.arch, cfg.epochs, cfg.disc_train_below, cfg.adv_use_above, cfg.beta_adv) == (
        "resnet",
        3,
        0.7,
        0.5,
        1.0,
    )
    parsed = vars(
        asv.build_parser().parse_args(
            [
                "--model",
                "avae-s",
                "--arch",
                "avae",
                "--tc-estimator",
                "mws",
                "--adv-loss",
                "nonsaturating",
                "--disc-train-below",
                "1.01",
            ]
        )
    )
    assert parsed == {
        "model": "avae-s",
        "arch": "avae",
        "tc_estimator": "mws",
        "adv_loss": "nonsaturating",
        "disc_train_below": 1.01,
    }
    for bad in (
        ["--arch", "vgg"],
        ["--tc-estimator", "hsic"],
        ["--adv-loss", "wgan"],
        ["--model", "avae_s"],
    ):
        with pytest.raises(SystemExit) as stop:  # one line on stderr, exit code 2
            asv.build_parser().parse_args(bad)
        assert stop.value.code == 2, bad


@pytest.mark.parametrize(
    "given, message",
    [
        ({"dataset": "mnist", "model": "avae", "epochs": 5}, "--epochs does not apply"),
        ({"dataset": "mnist", "model": "avae", "pretrain_epochs": 0, "adv_epochs": 0}, ">= 1"),
        ({"dataset": "mnist", "arch": "avae"}, "divisible by 16"),
        (
            {"dataset": "folder", "image_size": 16, "channels": (8, 16), "model": "vae-s"},
            "at least 17 px",
        ),
        ({"dataset": "mnist", "model": "vae-s", "num_vae": 1}, "--num-vae"),
        ({"dataset": "mnist", "model": "avae-s", "batch_size": 1}, "at least 2"),
        ({"dataset": "mnist", "model": "avae", "lambda_batches": -1}, "lambda-batches"),
    ],
)
def test_avae_config_errors(given, message):
    with pytest.raises(asv.ConfigError, match=message):
        asv.make_config(given)


# --------------------------------------------------------------------------------------------------
# evaluation: cosine similarity, FID at four depths
# --------------------------------------------------------------------------------------------------
def test_cosine_similarity_hand_worked_and_against_torch():
    x = torch.tensor([[1.0, 0, 0, 0], [1, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]).view(4, 1, 2, 2)
    y = torch.tensor([[1.0, 1, 0, 0], [2, 4, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]]).view(
        4, 1, 2, 2
    )
    per_image, mean = asv.cosine_similarity(x, y)
    assert per_image.dtype == np.float64
    np.testing.assert_allclose(per_image, [1 / math.sqrt(2), 1.0, 0.0, 0.0], rtol=0, atol=1e-15)
    assert mean == pytest.approx((1 / math.sqrt(2) + 1.0) / 4, abs=1e-15)
    with pytest.raises(ValueError, match="shapes differ"):
        asv.cosine_similarity(x, y[:, :, :1])
    gen = torch.Generator().manual_seed(0)
    a, b = (
        torch.rand(5, 3, 8, 8, dtype=F64, generator=gen),
        torch.rand(5, 3, 8, 8, dtype=F64, generator=gen),
    )
    np.testing.assert_allclose(
        asv.cosine_similarity(a, b)[0],
        F.cosine_similarity(a.flatten(1), b.flatten(1)).numpy(),
        rtol=0,
        atol=1e-14,
    )


def test_inception_all_depths_is_each_depth_side_by_side():
    """One pass gives eval_metrics' features at 64 / 192 / 768 / 2048, in that order (random
    Inception weights)."""
    torch.manual_seed(0)
    inception = eval_metrics.InceptionV3FID().eval()
    images = torch.rand(2, 3, 16, 16)
    wrapped = asv.InceptionAllDepths(inception)
    joint = eval_metrics.inception_features(images, wrapped)  # what the streaming statistics see
    assert joint.shape == (2, 3072) and wrapped.dims == 3072
    start = 0
    for depth in asv.FID_DEPTHS:
        single = eval_metrics.InceptionV3FID(dims=depth)
        single.load_state_dict(inception.state_dict())
        np.testing.assert_array_equal(
            joint[:, start : start + depth], eval_metrics.inception_features(images, single.eval())
        )
        start += depth


def test_fid_by_depth_equals_fid_of_each_block():
    rng = np.random.default_rng(0)
    depths = (2, 3, 4)
    real, fake = (
        rng.normal(size=(40, 9)),
        rng.normal(0.5, 2.0, size=(30, 9)) @ rng.normal(size=(9, 9)),
    )
    mu_real, sigma_real = eval_metrics.feature_stats(real)
    mu_fake, sigma_fake = eval_metrics.feature_stats(fake)
    fids = asv.fid_by_depth(mu_real, sigma_real, mu_fake, sigma_fake, depths)
    assert list(fids) == ["fid_2", "fid_3", "fid_4"]
    for (name, value), block in zip(fids.items(), (slice(0, 2), slice(2, 5), slice(5, 9))):
        expected = eval_metrics.frechet_distance(
            *eval_metrics.feature_stats(real[:, block]), *eval_metrics.feature_stats(fake[:, block])
        )
        assert value == pytest.approx(expected, rel=1e-10) and value > 0


# --------------------------------------------------------------------------------------------------
# the discriminator's [x, rec] batch does not depend on how many GPUs split it
# --------------------------------------------------------------------------------------------------
def concatenated(real, rec):  # the former layout, [x, rec]: on 2 GPUs one replica got only x
    return torch.cat([real, rec])


def split_halves(logits):
    return logits.chunk(2)


@pytest.mark.parametrize("model", ["avae", "avae-s"])
def test_interleaved_discriminator_batch_equals_the_concatenated_one_on_one_device(
    model, monkeypatch
):
    """On one device BatchNorm's statistics ignore the order of the batch: the step with the
    interleaved [x, rec] gives the losses and gradients of the step with [x; rec] concatenated."""
    cfg = asv.Config(
        model=model,
        channels=(4, 8),
        image_size=20,
        z_dim=3,
        batch_size=6,
        pretrain_epochs=0,
        adv_epochs=1,
        epochs=1,
        disc_train_below=1.1,
        adv_use_above=-0.1,
    )  # both gates open: every term and gradient counts
    torch.manual_seed(0)
    nets, opts = asv.make_state(cfg, 1, torch.device("cpu"))
    twin_nets, twin_opts = copy.deepcopy(nets), copy.deepcopy(opts)
    for name, opt in twin_opts.items():  # the twin optimisers must drive the twin networks
        opt.param_groups[0]["params"] = list(twin_nets[name].parameters())
    x = torch.rand(6, 1, 20, 20, generator=torch.Generator().manual_seed(1))
    grads = {}

    def run(nets_, opts_):
        state = asv.new_vae_s_state(100, 1, torch.device("cpu")) if model == "avae-s" else None
        torch.manual_seed(7)
        stats = asv.train_step(model, nets_, opts_, x, cfg, 0.0, 1.0, no_amp, state)
        return stats, {
            f"{n}.{k}": p.detach().clone()
            for n in ("encoder", "decoder", "disc")
            for k, p in nets_[n].named_parameters()
        }

    stats, grads["interleaved"] = run(nets, opts)
    monkeypatch.setattr(asv, "interleave", concatenated)
    monkeypatch.setattr(asv, "split_pairs", split_halves)
    twin_stats, grads["concatenated"] = run(twin_nets, twin_opts)
    for key in ("loss", "loss_dis", "loss_adv", "disc_acc"):
        assert stats[key].item() == pytest.approx(twin_stats[key].item(), rel=1e-5), key
    for name, after in grads["interleaved"].items():  # the parameters after one Adam step
        torch.testing.assert_close(after, grads["concatenated"][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gpus", [1, 2, 3, 4])
def test_every_data_parallel_chunk_holds_real_images_and_reconstructions(gpus):
    """nn.DataParallel scatters along dim 0 in chunks of ceil(2B / gpus): with the interleaved
    batch each chunk holds as many real images as reconstructions (one more of one kind when the
    chunk is odd); the concatenated batch gave one GPU only real images at 2 GPUs."""
    batch = 12
    real, rec = torch.zeros(batch, 1), torch.ones(batch, 1)  # 0 marks a real image, 1 a rec
    for chunk in asv.interleave(real, rec).chunk(gpus):
        assert abs(2 * int(chunk.sum()) - chunk.shape[0]) <= 1
    assert concatenated(real, rec).chunk(2)[0].sum() == 0  # the old layout's one-class replica
    logits = torch.arange(2 * batch, dtype=torch.float32)
    real_logits, rec_logits = asv.split_pairs(logits)
    assert torch.equal(asv.interleave(real_logits, rec_logits), logits)
