"""toy2d.py: datasets, schedules, AS-Distance, losses (hand-worked), stepping, batching, gnELBO,
modes."""

import dataclasses
import io
import math

import numpy as np
import pytest
import torch

import toy2d

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# data


def test_8gaussians_centres_radius_and_noise():
    points = toy2d.sample_8gaussians(16000, gen()).double()
    assert points.shape == (16000, 2)
    angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 2 / 1.414 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    nearest = torch.cdist(points, centres).argmin(1)
    residual = points - centres[nearest]
    assert residual.std(0).numpy() == pytest.approx([0.02 / 1.414] * 2, rel=0.03)
    assert residual.mean(0).abs().max() < 1e-3
    share = torch.bincount(nearest, minlength=8).double() / 16000
    assert (share - 1 / 8).abs().max() < 0.015
    assert toy2d.mode_stats(points.numpy(), "8gaussians") == (8, 8, pytest.approx(0.989, abs=0.006))


def test_checkerboard_support_and_squares():
    points = toy2d.sample_checkerboard(8000, gen(1)).numpy()
    assert points.shape == (8000, 2)
    assert np.abs(points).max() <= 4
    modes, n_modes, inside = toy2d.mode_stats(points, "checkerboard")
    assert (modes, n_modes, inside) == (8, 8, 1.0)
    # the 8 black squares of side 2 at (x, y) cells with floor(x/2) = floor(y/2) mod 2, each 1/8 of
    # the mass
    cells = np.floor(points / 2).astype(int)
    assert np.all(cells[:, 0] % 2 == cells[:, 1] % 2)
    _, counts = np.unique(cells[:, 0] * 10 + cells[:, 1], return_counts=True)
    assert len(counts) == 8 and np.abs(counts / 8000 - 1 / 8).max() < 0.02


def test_spiral_and_rings_shapes_and_structure():
    assert toy2d.sample_spiral(7, gen()).shape == (7, 2)
    spiral = toy2d.sample_spiral(10000, gen(2)).numpy()
    assert np.abs(spiral.mean(0)).max() < 0.1  # two opposite arms
    assert np.linalg.norm(spiral, axis=1).max() < (3 * math.pi + 0.75) / 3 + 0.6
    rings = toy2d.sample_rings(10000, gen(3)).numpy()
    assert rings.shape == (10000, 2)
    modes, n_modes, hq = toy2d.mode_stats(rings, "rings")
    assert (modes, n_modes) == (4, 4) and hq > 0.99
    radius = np.linalg.norm(rings, axis=1)
    nearest = np.abs(radius[:, None] - np.array(toy2d.RING_RADII)).argmin(1)
    assert np.abs(np.bincount(nearest) / 10000 - 0.25).max() < 0.02
    assert np.std(radius[nearest == 0] - 3.0) == pytest.approx(0.08, rel=0.1)


@pytest.mark.parametrize("dataset", toy2d.DATASETS)
def test_every_training_batch_is_an_iid_draw(dataset):
    """Each batch of a drawn block looks like the whole data set: its mean lies within 5 standard
    errors of the pooled mean (a sampler returning one arm of the spiral after the other gave
    batch means of 0.9 here)."""
    cfg = toy2d.Config(dataset=dataset, batch_size=512, hidden=8, n_eval=64)
    run = toy2d.RunSpec(dataset, "vae", "C2", 92, 0.5, 0.1, 0.9)
    group = toy2d.Group("vae", [run], cfg, torch.device("cpu"))
    data, _ = group.draw_block(toy2d.BLOCK, 512)  # (50, 1, 512, 2)
    batches = data[:, 0].double()
    pooled = batches.reshape(-1, 2)
    standard_error = pooled.std(0) / math.sqrt(512)
    deviation = (batches.mean(1) - pooled.mean(0)).abs() / standard_error  # (50, 2)
    assert deviation.max() < 5, (dataset, deviation.max())
    # the spread inside every batch is the data set's spread, not one part of it
    ratio = batches.std(1) / pooled.std(0)
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), (dataset, ratio.min(), ratio.max())


def test_spiral_batch_holds_both_arms_in_equal_shares():
    """Per point, the arm is a fair coin: a batch of 512 holds 256 +- 3 sigma of each arm."""
    points = toy2d.sample_spiral(512, gen(4)) * 3
    # the arm through the positive-x start (-cos(a) a > 0 near a = pi) is the negated copy's mirror:
    # classify each noisy point by the nearer of the two noise-free arms
    angle = torch.linspace(0, 3 * math.pi, 4000)
    arm = torch.stack([-torch.cos(angle) * angle, torch.sin(angle) * angle], 1) + 0.25
    d_plus = torch.cdist(points, arm).min(1).values
    d_minus = torch.cdist(points, -arm).min(1).values
    share = (d_plus < d_minus).double().mean().item()
    assert abs(share - 0.5) < 3 * math.sqrt(0.25 / 512)


def test_mode_stats_hand_cases():
    centres = 2 / 1.414 * np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    points = np.repeat(centres, 100, axis=0)
    assert toy2d.mode_stats(points, "8gaussians") == (3, 8, 1.0)
    assert toy2d.mode_stats(np.zeros((50, 2)), "8gaussians") == (0, 8, 0.0)
    # 0.5% of the points on a fourth centre: below the 1% coverage threshold
    few = np.concatenate([points, np.repeat([[0.0, -2 / 1.414]], 1, axis=0)])
    assert toy2d.mode_stats(few, "8gaussians")[0] == 3
    assert all(math.isnan(v) for v in toy2d.mode_stats(points, "spiral"))


# --------------------------------------------------------------------------------------------------
# schedules


def test_annealing_and_learning_rate_schedules():
    T = 30000
    assert [toy2d.annealing_coefficient(t, T, "linear") for t in (0, 3000, 6000, 29999)] == [
        0.0,
        0.5,
        1.0,
        1.0,
    ]
    official = [toy2d.annealing_coefficient(t, T, "tanh") for t in (0, 3000, 6000, 29999)]
    assert official == pytest.approx(
        [0.0, 0.46211715726, 0.76159415596, math.tanh(5 * 29999 / 30000)]
    )
    assert toy2d.schedule(30000) == (2000, (10000, 15000))
    assert toy2d.schedule(3000) == (200, (1000, 1500))
    lrs = [
        toy2d.learning_rate(t, 2e-4, (10000, 15000)) for t in (0, 9999, 10000, 14999, 15000, 29999)
    ]
    assert lrs == pytest.approx([2e-4, 2e-4, 2e-5, 2e-5, 2e-6, 2e-6])


def test_phases_and_predicted_time_closed_form():
    cfg = toy2d.Config()
    assert toy2d.phases(cfg) == [
        ("warm-up", 0, 2000),
        ("AS active", 2000, 6000),
        ("adversarial", 6000, 30000),
    ]
    costs = {"warm-up": 1.0, "AS active": 2.0, "adversarial": 3.0}
    assert toy2d.predicted_seconds(cfg, costs, 0, 30000) == 2000 + 2 * 4000 + 3 * 24000
    assert toy2d.predicted_seconds(cfg, costs, 1000, 7000) == 1000 + 2 * 4000 + 3 * 1000
    assert toy2d.phases(toy2d.Config(schedule="tanh")) == [
        ("warm-up", 0, 2000),
        ("AS active", 2000, 30000),
    ]
    assert toy2d.phases(toy2d.Config(variant="official"))[-1] == ("AS active", 2000, 30000)
    assert toy2d.phases(toy2d.Config(warmup=0))[0] == ("AS active", 0, 6000)
    assert toy2d.schedule(1500) == (100, (500, 750)) and toy2d.schedule(1500, 0)[0] == 0


def test_eta_follows_the_phases_and_the_measured_pace():
    cfg = toy2d.Config()
    costs = {"warm-up": 0.02, "AS active": 0.2, "adversarial": 0.1}
    progress = toy2d.PhaseProgress(cfg, costs, 0, 30000)
    # at the predicted pace, after the warm-up: the AS span and the adversarial rest remain
    assert progress.eta(2000, elapsed=40.0) == pytest.approx(4000 * 0.2 + 24000 * 0.1)
    # twice slower than predicted so far: the rest is expected twice slower too
    assert progress.eta(2000, elapsed=80.0) == pytest.approx(2 * (4000 * 0.2 + 24000 * 0.1))
    resumed = toy2d.PhaseProgress(cfg, costs, 6000, 30000)
    assert resumed.eta(18000, elapsed=1200.0) == pytest.approx(12000 * 0.1)


def test_progress_in_a_file_is_a_line_per_update():
    costs = {"warm-up": 0.02, "AS active": 0.2, "adversarial": 0.1}
    stream = io.StringIO()  # not a terminal
    progress = toy2d.PhaseProgress(toy2d.Config(), costs, 0, 30000, stream=stream, min_interval=0)
    for t in (1000, 4000, 30000):
        progress.update(t)
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    assert [line.split()[2:4] for line in text.splitlines()] == [
        ["1000/30000", "it"], ["4000/30000", "it"], ["30000/30000", "it"]]
    assert "(AS active)" in text.splitlines()[1]
    assert toy2d.PhaseProgress(toy2d.Config(), costs, 0, 10, stream=io.StringIO()).min_interval == 60


def test_annealing_schedule_flag_and_unknown_schedule():
    assert toy2d.annealing_schedule(toy2d.Config()) == "linear"
    assert toy2d.annealing_schedule(toy2d.Config(variant="official")) == "tanh"
    assert toy2d.annealing_schedule(toy2d.Config(schedule="tanh")) == "tanh"
    assert toy2d.annealing_schedule(toy2d.Config(variant="official", schedule="linear")) == "linear"
    with pytest.raises(ValueError, match="schedule"):
        toy2d.annealing_coefficient(10, 100, "cosine")


def test_bf16_autocast_changes_only_the_matmul_precision():
    """--precision bf16: the MLP returns float32 close to the fp32 result (bf16 has 8 bits of
    mantissa), and losses stay float32."""
    params = toy2d.init_mlp([2, 64, 64, 4], [gen(3)])
    x = toy2d.sample_8gaussians(256, gen(4))[None]
    exact = toy2d.mlp(params, x)
    with toy2d.autocast(torch.device("cpu"), "bf16"):
        low = toy2d.mlp(params, x)
    assert low.dtype == torch.float32
    assert not torch.equal(low, exact)
    assert (low - exact).abs().max() < 0.05 * exact.abs().max()
    with toy2d.autocast(torch.device("cpu"), "fp32"):
        assert torch.equal(toy2d.mlp(params, x), exact)


def test_combo_mappings():
    assert toy2d.combo_betas("C1", "8gaussians", "closest") == (0.3, 0.1, 0.9)
    assert toy2d.combo_betas("C1", "8gaussians", "literal") == (0.3, 0.9, 0.1)
    assert toy2d.combo_betas("C3", "rings", "literal") == (0.7, 0.9, 0.2)
    assert toy2d.combo_betas("tuned", "checkerboard", "literal") == (0.1, 0.2, 0.2)


# --------------------------------------------------------------------------------------------------
# AS-Distance


def mixture_marginal(u, mu, logvar):
    """(1/B) sum_i N(u; mu_i, v_i) for one latent dimension, u (U,), mu, logvar (B,)."""
    var = np.exp(logvar)
    return np.mean(np.exp(-((u[:, None] - mu) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var), axis=1)


def test_as_distance_equals_integrated_squared_difference_of_marginals():
    rng = np.random.default_rng(0)
    B, D = 5, 3
    mu_a, mu_b = rng.normal(size=(B, D)), rng.normal(0.5, 1.5, size=(B, D))
    lv_a, lv_b = rng.normal(0, 0.5, size=(B, D)), rng.normal(-0.5, 0.5, size=(B, D))
    u = np.linspace(-25, 25, 400001)

    def trapezoid(f):  # the trapezoid rule on the uniform grid u (np.trapezoid needs numpy >= 2)
        return (u[1] - u[0]) * (f.sum() - 0.5 * (f[0] + f[-1]))

    expected = sum(
        trapezoid(
            (
                mixture_marginal(u, mu_a[:, d], lv_a[:, d])
                - mixture_marginal(u, mu_b[:, d], lv_b[:, d])
            )
            ** 2
        )
        for d in range(D)
    )
    t = [torch.tensor(v) for v in (mu_a, lv_a, mu_b, lv_b)]
    got = toy2d.as_distance(*t).item()
    assert got == pytest.approx(expected, rel=1e-8)
    # the official reductions (no 2 pi): sum over B*B*D = sqrt(2 pi) B^2 * paper; mean = sqrt(2 pi)
    # / D * paper
    got_sum = toy2d.as_distance(*t, reduction="official_sum").item()
    got_mean = toy2d.as_distance(*t, reduction="official_mean").item()
    assert got_sum == pytest.approx(math.sqrt(2 * math.pi) * B * B * expected, rel=1e-8)
    assert got_mean == pytest.approx(math.sqrt(2 * math.pi) / D * expected, rel=1e-8)


def test_joint_kernel_is_the_integrated_squared_difference_over_the_plane():
    """--kernel joint: AS = the integral over R^2 of (p_a - p_b)^2 of the two batch mixtures of
    2D Gaussians, by quadrature on a grid; also in a stacked batch, and computed relative to the
    largest log-kernel (the same value with the means shifted far from 0)."""
    rng = np.random.default_rng(1)
    B = 4
    mu_a, mu_b = rng.normal(size=(B, 2)), rng.normal(0.5, 1.2, size=(B, 2))
    lv_a, lv_b = rng.normal(0, 0.4, size=(B, 2)), rng.normal(-0.4, 0.4, size=(B, 2))
    u = np.linspace(-12, 12, 2401)
    uu, vv = np.meshgrid(u, u, indexing="ij")

    def mixture(mu, logvar):  # (1/B) sum_i N(u; mu_i, diag v_i) on the grid
        var = np.exp(logvar)[:, None, None, :]
        d = np.stack([uu, vv], -1)[None] - mu[:, None, None, :]
        log_p = (-(d**2) / (2 * var) - 0.5 * np.log(2 * np.pi * var)).sum(-1)
        return np.exp(log_p).mean(0)

    step = u[1] - u[0]
    expected = ((mixture(mu_a, lv_a) - mixture(mu_b, lv_b)) ** 2).sum() * step**2
    t = [torch.tensor(v) for v in (mu_a, lv_a, mu_b, lv_b)]
    joint = toy2d.as_distance(*t, kernel="joint")
    assert joint.item() == pytest.approx(expected, rel=1e-6)
    marginal = toy2d.as_distance(*t).item()
    assert abs(marginal - joint.item()) > 1e-3 * joint.item()  # a different distance
    stacked = toy2d.as_distance(*(torch.stack([v, v]) for v in t), kernel="joint")
    assert stacked.shape == (2,) and torch.allclose(stacked, joint.expand(2), rtol=1e-12)
    shifted = toy2d.as_distance(t[0] + 50, t[1], t[2] + 50, t[3], kernel="joint")
    assert shifted.item() == pytest.approx(joint.item(), rel=1e-9)
    with pytest.raises(ValueError, match="kernel"):
        toy2d.as_distance(*t, reduction="official_sum", kernel="joint")



@pytest.mark.parametrize(
    "reduction, kernel",
    [("paper", "marginal"), ("official_sum", "marginal"), ("official_mean", "marginal"),
     ("paper", "joint")],
)
@pytest.mark.parametrize("lead", [(), (3,)])  # one batch; three stacked runs
@pytest.mark.parametrize("elements", [7, 40, 1 << 16])  # a row per block, uneven blocks, one
def test_fused_as_distance_equals_the_formula_and_its_autograd(
    reduction, kernel, lead, elements, monkeypatch, device
):
    """as_distance_fused against as_distance (autograd through the formula), float64: the value
    and the gradient w.r.t. all four inputs under a per-run weighting of the output, batches of
    different sizes, blocks of one row up to all rows (CUDA: one block); a gradient for some
    inputs only; no graph under no_grad."""
    monkeypatch.setattr(toy2d.FusedASDistance, "ELEMENTS", elements)
    g = gen(11)
    shapes = [(*lead, 9, 2), (*lead, 9, 2), (*lead, 6, 2), (*lead, 6, 2)]
    scales = (1.0, 0.7, 1.5, 0.7)
    t = [(torch.randn(s, generator=g, dtype=torch.float64) * k) for s, k in zip(shapes, scales)]
    t[2] = t[2] + 0.8
    t = [v.to(device) for v in t]
    weights = torch.randn(lead, generator=g, dtype=torch.float64).to(device)
    kwargs = {"reduction": reduction, "kernel": kernel}
    plain_in = [v.clone().requires_grad_() for v in t]
    fused_in = [v.clone().requires_grad_() for v in t]
    plain = toy2d.as_distance(*plain_in, **kwargs)
    fused = toy2d.as_distance_fused(*fused_in, **kwargs)
    assert fused.shape == plain.shape == lead
    assert torch.allclose(fused, plain, rtol=1e-12, atol=0)
    expected = torch.autograd.grad((plain * weights).sum(), plain_in, retain_graph=True)
    got = torch.autograd.grad((fused * weights).sum(), fused_in)
    for mine, ref in zip(got, expected):
        assert torch.allclose(mine, ref, rtol=1e-10, atol=1e-15)
    some = [t[0].clone().requires_grad_(), t[1], t[2], t[3].clone().requires_grad_()]
    part = toy2d.as_distance_fused(*some, **kwargs).sum()
    got_some = torch.autograd.grad(part, [some[0], some[3]])
    expected_all = torch.autograd.grad(plain.sum(), [plain_in[0], plain_in[3]])
    for mine, ref in zip(got_some, expected_all):
        assert torch.allclose(mine, ref, rtol=1e-10, atol=1e-15)
    with torch.no_grad():
        value = toy2d.as_distance_fused(*fused_in, **kwargs)
    assert not value.requires_grad and torch.allclose(value, plain, rtol=1e-12, atol=0)


def test_fused_as_distance_is_zero_on_itself_and_rejects_what_the_formula_rejects():
    mu, logvar = torch.randn(2, 33, 2, generator=gen(3), dtype=torch.float64).unbind(0)
    assert toy2d.as_distance_fused(mu, logvar, mu, logvar).abs().item() < 1e-15
    with pytest.raises(ValueError, match="kernel"):
        toy2d.as_distance_fused(mu, logvar, mu, logvar, reduction="official_sum", kernel="joint")
    with pytest.raises(ValueError, match="reduction"):
        toy2d.as_distance_fused(mu, logvar, mu, logvar, reduction="sum")

def test_as_distance_rejects_an_unknown_reduction():
    mu = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="reduction"):
        toy2d.as_distance(mu, mu, mu, mu, reduction="sum")


def test_as_distance_zero_on_itself_nonnegative_and_batched():
    torch.manual_seed(0)
    mu = torch.randn(7, 16, 2, dtype=torch.float64)
    logvar = torch.randn(7, 16, 2, dtype=torch.float64)
    assert torch.allclose(
        toy2d.as_distance(mu, logvar, mu, logvar), torch.zeros(7, dtype=torch.float64), atol=1e-14
    )
    other_mu, other_lv = (
        torch.randn(7, 16, 2, dtype=torch.float64),
        torch.randn(7, 16, 2, dtype=torch.float64),
    )
    stacked = toy2d.as_distance(mu, logvar, other_mu, other_lv)
    assert stacked.shape == (7,) and (stacked > 0).all()
    single = toy2d.as_distance(mu[3], logvar[3], other_mu[3], other_lv[3])
    assert single.item() == pytest.approx(stacked[3].item(), rel=1e-12)
    # a pair of identical single Gaussians at distance 0 vs two far apart: 2 * 1/sqrt(4 pi v) per
    # dimension
    far = toy2d.as_distance(
        torch.zeros(1, 1), torch.zeros(1, 1), torch.full((1, 1), 100.0), torch.zeros(1, 1)
    )
    assert far.item() == pytest.approx(2 / math.sqrt(4 * math.pi), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# losses


def T(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_sse_and_kl_by_hand():
    assert toy2d.sse(T([1.0, 0.0], [0.0, 1.0]), T([1.0, 0.0], [0.0, 0.0])).tolist() == [0.0, 1.0]
    kl = toy2d.kl_divergence(
        T([0.0, 0.0], [1.0, 0.0], [0.0, 0.0]), T([0.0, 0.0], [0.0, 0.0], [math.log(2), 0.0])
    )
    assert kl.tolist() == pytest.approx([0.0, 0.5, 0.5 * (1 - math.log(2))])


def test_vae_and_introvae_losses_by_hand():
    sse_real, kl_real = T(0.0, 1.0), T(0.0, 0.5)
    # 0.5 * [0, 1] + 2 * [0, 0.5] = [0, 1.5] -> 0.75
    assert toy2d.vae_loss(sse_real, kl_real, beta_rec=0.5, beta_kl=2.0).item() == pytest.approx(
        0.75
    )
    # B = 3: 0.5 * [0, 1, 2] + 2 * [1, 0, 0.5] = [2, 0.5, 2] -> mean 1.5 (a sum would give 4.5)
    loss = toy2d.vae_loss(T(0.0, 1.0, 2.0), T(1.0, 0.0, 0.5), beta_rec=0.5, beta_kl=2.0)
    assert loss.item() == pytest.approx(1.5)
    kl_r, kl_f = T(1.0, 3.0), T(4.0, 6.0)  # batch means 2 and 5; margin 3 -> hinges 1 and 0
    # 0.5 * 0.5 + 2 * (0.25 + 0.5 * 1 * (1 + 0)) = 1.75
    hp = dict(margin=3.0, beta_rec=0.5, beta_kl=2.0, beta_neg=1.0)
    assert toy2d.intro_encoder_loss(sse_real, kl_real, kl_r, kl_f, **hp).item() == pytest.approx(
        1.75
    )
    # beta_neg 0.5: 0.25 + 2 * (0.25 + 0.25 * 1) = 1.25
    hp["beta_neg"] = 0.5
    assert toy2d.intro_encoder_loss(sse_real, kl_real, kl_r, kl_f, **hp).item() == pytest.approx(
        1.25
    )
    # 0.5 * 0.5 + 0.5 * 2 * (2 + 5) = 7.25
    dec = toy2d.intro_decoder_loss(sse_real, kl_r, kl_f, beta_rec=0.5, beta_kl=2.0)
    assert dec.item() == pytest.approx(7.25)


def test_soft_and_as_losses_by_hand():
    e = math.e
    args = dict(
        rec_err=T(0.0, 1.0),
        kl_real=T(0.0, 0.5),
        rec_err_r=T(1.0, 0.0),
        kl_r=T(0.0, 1.0),
        rec_err_f=T(0.0, 2.0),
        kl_f=T(1.0, 1.0),
        beta_rec=1.0,
        beta_kl=1.0,
        beta_neg=1.0,
        s=0.5,
    )
    # c = 1 (Soft-IntroVAE): 0.5 * (0.5 + 0.25) + 0.25 * (mean[e^-1, e^-1] + mean[e^-1, e^-3])
    soft, exp_r, exp_f = toy2d.as_intro_encoder_loss(as_dist=123.0, c=1.0, **args)
    assert soft.item() == pytest.approx(0.375 + 0.375 / e + 0.125 / e**3)
    assert (exp_r.item(), exp_f.item()) == pytest.approx((1 / e, 0.5 / e + 0.5 / e**3))
    # c = 0.5, AS = 2: exponents r [2, 1.5], f [1.5, 3.5]
    mixed = toy2d.as_intro_encoder_loss(as_dist=2.0, c=0.5, **args)[0].item()
    assert mixed == pytest.approx(0.375 + 0.125 * (e**-2 + 2 * e**-1.5 + e**-3.5))
    # weights other than 1 (beta_rec 0.5, beta_kl 2, beta_neg 0.25), c = 0.5, AS = 2:
    # real term s * (0.5 [0, 1] + 2 [0, 0.5]) = [0, 0.75]; ELBO_r = [0.75, 0.375], ELBO_f = [0.375,
    # 1.375]
    args.update(beta_rec=0.5, beta_kl=2.0, beta_neg=0.25)
    weighted = toy2d.as_intro_encoder_loss(as_dist=2.0, c=0.5, **args)[0].item()
    assert weighted == pytest.approx(0.375 + 0.125 * (e**-0.75 + 2 * e**-0.375 + e**-1.375))
    dec = dict(
        rec_err=T(0.0, 1.0),
        kl_r=T(0.0, 1.0),
        kl_f=T(1.0, 1.0),
        rec_err_rr=T(2.0, 0.0),
        rec_err_rf=T(0.0, 4.0),
        beta_rec=1.0,
        beta_kl=1.0,
        gamma_r=0.1,
        s=0.5,
    )
    # paper (Eq. 9, AS once per q = r, f): 0.5 * (0.5 + 0.5 * (0.5 * (0.5 + 1) + 2 * 0.5 * 2) + 0.1
    # * 0.5 * (1 + 2))
    assert toy2d.as_intro_decoder_loss(as_dist=2.0, c=0.5, **dec).item() == pytest.approx(1.0125)
    # official (AS once in all): 0.5 * (0.5 + 0.5 * (0.5 * (0.5 + 1) + 0.5 * 2) + 0.15) = 0.7625
    official = toy2d.as_intro_decoder_loss(as_dist=2.0, c=0.5, variant="official", **dec)
    assert official.item() == pytest.approx(0.7625)
    # c = 1 (Soft-IntroVAE), either variant: 0.5 * (0.5 + 0.5 * 1.5 + 0.15) = 0.7
    assert toy2d.as_intro_decoder_loss(as_dist=2.0, c=1.0, **dec).item() == pytest.approx(0.7)
    # weights other than 1 (beta_rec 0.5, beta_kl 2): per sample
    # 0.5 * (0.5 [0, 1] + (0.5 [1, 2] + 2 (1 - c) AS) + 0.025 [2, 4]) = [1.275, 1.8] -> 1.5375
    dec.update(beta_rec=0.5, beta_kl=2.0)
    assert toy2d.as_intro_decoder_loss(as_dist=2.0, c=0.5, **dec).item() == pytest.approx(1.5375)
    # official, AS once: 0.5 * ([0, 0.5] + [1.5, 2] + [0.05, 0.1]) = [0.775, 1.3] -> 1.0375
    official = toy2d.as_intro_decoder_loss(as_dist=2.0, c=0.5, variant="official", **dec)
    assert official.item() == pytest.approx(1.0375)


def test_losses_keep_runs_apart():
    """Stacked (R, B) inputs with (R, 1) betas give each run its own loss, as if computed alone."""
    torch.manual_seed(1)
    per = [torch.rand(3, 4, dtype=torch.float64) for _ in range(6)]
    names = ("beta_rec", "beta_kl", "beta_neg")
    betas = {k: torch.rand(3, 1, dtype=torch.float64) for k in names}
    as_dist = torch.rand(3, 1, dtype=torch.float64)
    stacked = toy2d.as_intro_encoder_loss(*per, as_dist, c=0.3, s=0.5, **betas)[0]
    for r in range(3):
        alone = toy2d.as_intro_encoder_loss(
            *(p[r] for p in per),
            as_dist[r, 0].item(),
            c=0.3,
            s=0.5,
            **{k: b[r, 0].item() for k, b in betas.items()},
        )[0]
        assert stacked[r].item() == pytest.approx(alone.item(), rel=1e-12)
    hinge = toy2d.intro_encoder_loss(per[0], per[1], per[2], per[3], margin=1.0, **betas)
    alone = toy2d.intro_encoder_loss(
        per[0][2],
        per[1][2],
        per[2][2],
        per[3][2],
        margin=1.0,
        **{k: b[2, 0].item() for k, b in betas.items()},
    )
    assert hinge.shape == (3,) and hinge[2].item() == pytest.approx(alone.item(), rel=1e-12)


def test_loss_weights_are_keyword_only():
    """A swapped pair of weights cannot run silently: every scalar weight must be named."""
    x = T(0.0, 1.0)
    with pytest.raises(TypeError):
        toy2d.vae_loss(x, x, 0.5, 2.0)
    with pytest.raises(TypeError):
        toy2d.as_intro_encoder_loss(x, x, x, x, x, x, 0.0, 1.0, 0.5, 1.0, 1.0, 1.0)
    with pytest.raises(TypeError):
        toy2d.as_intro_decoder_loss(x, x, x, x, x, 0.0, 1.0, 0.5, 1.0, 1.0, 0.1)


# --------------------------------------------------------------------------------------------------
# steps


def torch_mlp(params):
    """The same network as toy2d.mlp on run 0, built from nn.Linear (an independent reference)."""
    layers = []
    for i in range(len(params) // 2):
        linear = torch.nn.Linear(params[2 * i].shape[1], params[2 * i].shape[2])
        with torch.no_grad():
            linear.weight.copy_(params[2 * i][0].T)
            linear.bias.copy_(params[2 * i + 1][0, 0])
        layers += [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def reference_introspective_step(
    enc, dec, x, noise, beta_rec, beta_kl, beta_neg, gamma_r, c, variant, kernel="marginal"
):
    """Soft-IntroVAE / AS-IntroVAE iteration written the official way: requires_grad toggling,
    .backward()."""
    eps_z, eps_p, eps_r, eps_f, eps_rr, eps_ff = noise
    opt_e, opt_d = (
        torch.optim.Adam(enc.parameters(), lr=1e-3),
        torch.optim.Adam(dec.parameters(), lr=1e-3),
    )
    s = 0.5

    def enc_fn(v):
        return enc(v).chunk(2, -1)

    def squash(*vs):
        return [torch.tanh(v) for v in vs] if variant == "official" else list(vs)

    dec.requires_grad_(False)
    fake = dec(eps_p)
    mu, lv = enc_fn(x)
    z = mu + torch.exp(0.5 * lv) * eps_z
    rec = dec(z)
    mu_r, lv_r = enc_fn(rec.detach())
    rr = dec(mu_r + torch.exp(0.5 * lv_r) * eps_r)
    mu_f, lv_f = enc_fn(fake.detach())
    rf = dec(mu_f + torch.exp(0.5 * lv_f) * eps_f)
    kl = toy2d.kl_divergence
    as_e = 0.0
    if variant != "none":
        as_e = toy2d.as_distance(
            *squash(mu_r, lv_r, mu_f, lv_f),
            reduction="paper" if variant == "paper" else "official_sum",
            kernel=kernel,
        )
    elbo_r = beta_rec * ((rec - rr) ** 2).sum(1) + beta_neg * (c * kl(mu_r, lv_r) + (1 - c) * as_e)
    elbo_f = beta_rec * ((fake - rf) ** 2).sum(1) + beta_neg * (c * kl(mu_f, lv_f) + (1 - c) * as_e)
    loss_e = s * (
        beta_rec * ((x - rec) ** 2).sum(1).mean() + beta_kl * kl(mu, lv).mean()
    ) + 0.25 * (torch.exp(-2 * s * elbo_r).mean() + torch.exp(-2 * s * elbo_f).mean())
    opt_e.zero_grad()
    loss_e.backward()
    opt_e.step()
    dec.requires_grad_(True)
    enc.requires_grad_(False)
    rec = dec(z.detach())
    fake = dec(eps_p)
    mu_r, lv_r = enc_fn(rec)
    rr = dec((mu_r + torch.exp(0.5 * lv_r) * eps_rr).detach())
    mu_f, lv_f = enc_fn(fake)
    rf = dec((mu_f + torch.exp(0.5 * lv_f) * eps_ff).detach())
    mu_r, lv_r, mu_f, lv_f = squash(mu_r, lv_r, mu_f, lv_f)
    as_d = 0.0
    if (
        variant != "none"
    ):  # Eq. 9 sums (1 - c) AS over r and f (paper); the released code adds it once
        as_d = toy2d.as_distance(
            mu_r, lv_r, mu_f, lv_f, reduction="paper" if variant == "paper" else "official_mean",
            kernel=kernel,
        )
        as_d = as_d * (2 if variant == "paper" else 1)
    loss_d = s * (
        beta_rec * ((x - rec) ** 2).sum(1).mean()
        + 0.5 * beta_kl * (c * (kl(mu_r, lv_r).mean() + kl(mu_f, lv_f).mean()) + (1 - c) * as_d)
        + gamma_r
        * 0.5
        * beta_rec
        * (((rec.detach() - rr) ** 2).sum(1).mean() + ((fake.detach() - rf) ** 2).sum(1).mean())
    )
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    enc.requires_grad_(True)
    return loss_e.detach(), loss_d.detach()


def linear_tensors(module, attr):
    """(weight^T, bias) of each nn.Linear, or their .grad, in toy2d's flat [W0, b0, ...] order."""
    out = []
    for layer in module:
        if isinstance(layer, torch.nn.Linear):
            weight, bias = getattr(layer.weight, attr), getattr(layer.bias, attr)
            out += [weight.detach().T, bias.detach()]
    return out


def tiny_pair(seed=5):
    gens = [gen(seed)]
    enc = [p.double().requires_grad_() for p in toy2d.init_mlp([2, 8, 8, 4], gens)]
    dec = [p.double().requires_grad_() for p in toy2d.init_mlp([2, 8, 8, 2], gens)]
    return enc, dec, torch_mlp(enc).double(), torch_mlp(dec).double()


def assert_steps_agree(enc, dec, ref_enc, ref_dec, ours, theirs):
    """Returned losses, the gradient of every parameter (left in .grad by each network's own
    update) and the parameters after the step, all to float64 rounding."""
    assert torch.allclose(ours[0][0], theirs[0], rtol=1e-12, atol=0)
    assert torch.allclose(ours[1][0], theirs[1], rtol=1e-12, atol=0)
    for mine, ref in zip(
        enc + dec, linear_tensors(ref_enc, "grad") + linear_tensors(ref_dec, "grad")
    ):
        assert torch.allclose(mine.grad[0], ref.reshape(mine.shape[1:]), rtol=1e-9, atol=1e-15)
    for mine, ref in zip(
        enc + dec, linear_tensors(ref_enc, "data") + linear_tensors(ref_dec, "data")
    ):
        assert torch.allclose(mine[0].detach(), ref.reshape(mine.shape[1:]), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "c, variant, kernel",
    [(1.0, "none", "marginal"), (0.4, "paper", "marginal"), (0.4, "official", "marginal"),
     (0.4, "paper", "joint")],
)
@pytest.mark.parametrize("fused", [True, False])
def test_introspective_step_matches_reference(c, variant, kernel, fused):
    enc, dec, ref_enc, ref_dec = tiny_pair()
    x = toy2d.sample_8gaussians(16, gen(6)).double()
    noise = torch.randn(6, 16, 2, generator=gen(7), dtype=torch.float64)
    opt_enc, opt_dec = torch.optim.Adam(enc, lr=1e-3), torch.optim.Adam(dec, lr=1e-3)
    ours = toy2d.step_introspective(
        enc,
        dec,
        opt_enc,
        opt_dec,
        x[None],
        noise[:, None],
        c=c,
        s=0.5,
        beta_rec=0.2,
        beta_kl=0.3,
        beta_neg=0.9,
        gamma_r=0.05,
        as_variant=variant,
        kernel=kernel,
        fused=fused,
    )
    theirs = reference_introspective_step(
        ref_enc, ref_dec, x, noise, 0.2, 0.3, 0.9, 0.05, c, variant, kernel
    )
    assert_steps_agree(enc, dec, ref_enc, ref_dec, ours, theirs)


def reference_introvae_step(enc, dec, x, noise, margin, beta_rec, beta_kl, beta_neg):
    """IntroVAE iteration written the usual way (requires_grad toggling, .backward())."""
    eps_z, eps_p = noise[0], noise[1]
    opt_e, opt_d = (
        torch.optim.Adam(enc.parameters(), lr=1e-3),
        torch.optim.Adam(dec.parameters(), lr=1e-3),
    )
    kl = toy2d.kl_divergence

    def enc_fn(v):
        return enc(v).chunk(2, -1)

    dec.requires_grad_(False)
    mu, lv = enc_fn(x)
    z = mu + torch.exp(0.5 * lv) * eps_z
    rec = dec(z)
    fake = dec(eps_p)
    kl_r, kl_f = kl(*enc_fn(rec.detach())), kl(*enc_fn(fake.detach()))
    hinges = torch.relu(margin - kl_r.mean()) + torch.relu(margin - kl_f.mean())
    loss_e = beta_rec * ((x - rec) ** 2).sum(1).mean() + beta_kl * (
        kl(mu, lv).mean() + 0.5 * beta_neg * hinges
    )
    opt_e.zero_grad()
    loss_e.backward()
    opt_e.step()
    dec.requires_grad_(True)
    enc.requires_grad_(False)
    rec = dec(z.detach())
    fake = dec(eps_p)
    loss_d = beta_rec * ((x - rec) ** 2).sum(1).mean() + 0.5 * beta_kl * (
        kl(*enc_fn(rec)).mean() + kl(*enc_fn(fake)).mean()
    )
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    enc.requires_grad_(True)
    return loss_e.detach(), loss_d.detach()


@pytest.mark.parametrize("margin", [0.0, 50.0])  # hinges off / on
def test_introvae_step_matches_reference(margin):
    enc, dec, ref_enc, ref_dec = tiny_pair(seed=8)
    x = toy2d.sample_8gaussians(16, gen(6)).double()
    noise = torch.randn(6, 16, 2, generator=gen(7), dtype=torch.float64)
    opt_enc, opt_dec = torch.optim.Adam(enc, lr=1e-3), torch.optim.Adam(dec, lr=1e-3)
    ours = toy2d.step_introvae(
        enc,
        dec,
        opt_enc,
        opt_dec,
        x[None],
        noise[:, None],
        margin=margin,
        beta_rec=0.2,
        beta_kl=0.3,
        beta_neg=0.9,
    )
    theirs = reference_introvae_step(ref_enc, ref_dec, x, noise, margin, 0.2, 0.3, 0.9)
    assert_steps_agree(enc, dec, ref_enc, ref_dec, ours, theirs)


def test_vae_step_gradient_is_the_joint_loss_gradient():
    enc, dec, ref_enc, ref_dec = tiny_pair(seed=9)
    x = toy2d.sample_8gaussians(16, gen(6)).double()
    noise = torch.randn(6, 16, 2, generator=gen(7), dtype=torch.float64)
    opt_enc, opt_dec = torch.optim.Adam(enc, lr=1e-3), torch.optim.Adam(dec, lr=1e-3)
    ours = toy2d.step_vae(
        enc, dec, opt_enc, opt_dec, x[None], noise[:, None], beta_rec=0.2, beta_kl=0.3
    )
    mu, lv = ref_enc(x).chunk(2, -1)
    rec = ref_dec(mu + torch.exp(0.5 * lv) * noise[0])
    loss = (0.2 * ((x - rec) ** 2).sum(1) + 0.3 * toy2d.kl_divergence(mu, lv)).mean()
    loss.backward()
    for mine, ref in zip(
        enc + dec, linear_tensors(ref_enc, "grad") + linear_tensors(ref_dec, "grad")
    ):
        assert torch.allclose(mine.grad[0], ref.reshape(mine.shape[1:]), rtol=1e-9, atol=1e-15)
    assert torch.allclose(ours[0][0], loss.detach(), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------------
# batching


def tiny_config(**kw):
    base = dict(
        iters=30, batch_size=16, hidden=8, variant="official", seeds="1,2", n_eval=64, grid=16
    )
    base.update(kw)
    return toy2d.Config(**base)


def run_specs(cfg):
    return [
        dataclasses.replace(r, dataset=d)
        for r, d in zip(
            toy2d.build_runs(cfg), ["8gaussians", "rings", "checkerboard", "spiral"] * 20
        )
    ]


def test_runs_side_by_side_equal_runs_alone_and_nan_stays_in_its_run():
    cfg = tiny_config(combo="all")
    runs = run_specs(cfg)
    assert len(runs) == 24
    groups = toy2d.build_groups(runs, cfg, torch.device("cpu"))
    with torch.no_grad():  # run 0 of the AS group diverges at once; its neighbours must not notice
        groups[3].enc[0][0, 0, 0] = float("nan")
    toy2d.train(groups, cfg, 0, 8)
    assert groups[3].first_bad.tolist()[0] == 0 and (groups[3].first_bad[1:] == -1).all()
    for g in groups:
        for index in (1, len(g.runs) - 1):
            alone = toy2d.build_groups([g.runs[index]], cfg, torch.device("cpu"))[0]
            toy2d.train([alone], cfg, 0, 8)
            for p_side, p_alone in zip(g.enc + g.dec, alone.enc + alone.dec):
                assert torch.allclose(p_side[index], p_alone[0], atol=2e-5), (g.method, index)


def test_graph_iteration_equals_eager_across_every_span(device):
    """The static-buffer iteration (captured as CUDA graphs on a GPU, run eagerly on a CPU) trains
    like the eager one through warm-up, AS-active and three lr spans; c, the warm-up branch and the
    lr must be refilled or recaptured per span, or a group drifts."""
    cfg = tiny_config(iters=60, variant="paper", methods="vae,introvae,sintrovae,asintrovae")
    spans = toy2d.phases(cfg), toy2d.schedule(cfg.iters, cfg.warmup)
    assert spans == (
        [("warm-up", 0, 4), ("AS active", 4, 12), ("adversarial", 12, 60)],
        (4, (20, 30)),
    )
    runs = toy2d.build_runs(cfg)
    eager = toy2d.build_groups(runs, cfg, device)
    graphed = toy2d.build_groups(runs, cfg, device, graphs=True)
    toy2d.train(eager, cfg, 0, 60)
    toy2d.train(graphed, cfg, 0, 60, graphs=True)
    for g_e, g_g in zip(eager, graphed):
        for p_e, p_g in zip(g_e.enc + g_e.dec, g_g.enc + g_g.dec):
            assert torch.allclose(p_e, p_g, rtol=1e-4, atol=1e-6), g_e.method
        assert (g_g.first_bad == -1).all()


def test_graph_iteration_records_the_first_non_finite_iteration(device):
    """A NaN batch at t = 10 (inside the AS-active span, past the capture on a GPU) is recorded on
    the device for that run only."""
    cfg = tiny_config(iters=60, variant="paper", methods="asintrovae")
    group = toy2d.build_groups(toy2d.build_runs(cfg), cfg, device, graphs=True)[0]
    draw = group.draw_block

    def poisoned(k, batch_size):
        data, noise = draw(k, batch_size)
        data[10, 0, 0, 0] = float("nan")
        return data, noise

    group.draw_block = poisoned
    toy2d.train([group], cfg, 0, 16, graphs=True)
    assert group.first_bad.tolist() == [10, -1]


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    cfg = tiny_config(iters=60, variant="paper", seeds="3")
    runs = toy2d.build_runs(cfg)
    straight = toy2d.build_groups(runs, cfg, torch.device("cpu"))
    toy2d.train(straight, cfg, 0, 60)
    first = toy2d.build_groups(runs, cfg, torch.device("cpu"))
    path = str(tmp_path / "checkpoint.pt")
    toy2d.train(first, cfg, 0, toy2d.BLOCK, ckpt_path=path)
    state = torch.load(path, weights_only=True)
    assert state["iteration"] == toy2d.BLOCK and state["config"] == toy2d.checkpoint_config(cfg)
    resumed = toy2d.build_groups(runs, cfg, torch.device("cpu"))
    for g, saved in zip(resumed, state["groups"]):
        g.load(saved)
    toy2d.train(resumed, cfg, toy2d.BLOCK, 60)
    for g_a, g_b in zip(straight, resumed):
        for p_a, p_b in zip(g_a.enc + g_a.dec, g_b.enc + g_b.dec):
            assert torch.equal(p_a, p_b)


# --------------------------------------------------------------------------------------------------
# evaluation


def zero_networks(last_bias=(0.0, 0.0), hidden=4):
    enc = [torch.zeros(1, a, b) for a, b in ((2, hidden), (hidden, 4))]
    enc = [enc[0], torch.zeros(1, 1, hidden), enc[1], torch.zeros(1, 1, 4)]
    dec = [
        torch.zeros(1, 2, hidden),
        torch.zeros(1, 1, hidden),
        torch.zeros(1, hidden, 2),
        torch.tensor([[list(last_bias)]]),
    ]
    return enc, dec


def test_gnelbo_normalisation_closed_form():
    """Zero networks: mu = logvar = 0 (KL = 0) and Dec = 0, so L(x) = ||x||^2 and gnELBO has a
    closed form."""
    enc, dec = zero_networks()
    real = toy2d.sample_8gaussians(300, gen(8)).view(1, 300, 2)
    gnelbo, density = toy2d.grid_evaluation(enc, dec, torch.tensor([2.0]), real, 32, 32)
    axis = np.linspace(-2, 2, 32)
    grid_sum = 2 * 32 * np.sum(axis**2)
    loss_real = (real.double() ** 2).sum(-1).numpy()[0]
    assert gnelbo[0] == pytest.approx(loss_real.mean() / (grid_sum + loss_real.sum()), rel=1e-6)
    assert density.shape == (1, 32, 32)
    assert density[0, 0, 0] == pytest.approx(math.exp(-8.0), rel=1e-5)  # corner (-2, 2)


def test_density_orientation_and_pooling():
    """Dec = (1, 0.5) everywhere: exp(-L) peaks at x = 1, y = 0.5, i.e. row 3 (from y = +2),
    column 6."""
    enc, dec = zero_networks(last_bias=(1.0, 0.5))
    real = torch.zeros(1, 10, 2)
    _, density = toy2d.grid_evaluation(enc, dec, torch.tensor([2.0]), real, 9, 9)
    assert np.unravel_index(density[0].argmax(), (9, 9)) == (3, 6)
    _, pooled = toy2d.grid_evaluation(enc, dec, torch.tensor([2.0]), real, 16, 4)
    _, full = toy2d.grid_evaluation(enc, dec, torch.tensor([2.0]), real, 16, 16)
    assert np.allclose(pooled[0], full[0].reshape(4, 4, 4, 4).mean((1, 3)), atol=1e-6)


def test_jet_colormap_ends():
    colours = toy2d.jet(np.array([[0.0, 0.5, 1.0]]))
    assert colours[0, 0].tolist() == [0, 0, 127] and colours[0, 2].tolist() == [127, 0, 0]
    assert colours[0, 1].tolist() == [127, 255, 127]
