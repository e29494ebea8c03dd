"""eval_metrics.py without the Inception: Frechet distance, PSNR / SSIM / MSE, sharpness, 2D KL /
JSD, Progress, image folders and the CLI. Closed forms and hand-worked cases always run; the oracles
(scipy, scikit-image, OpenCV) run where installed; golden values freeze the numbers for CI without
them.

Lines starting with AGREEMENT are the README's measured agreement:
`pytest -q -s tests/test_eval_metrics*.py`.
"""

import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval_metrics as em


def report(metric, oracle, difference):
    print(f"\nAGREEMENT {metric} vs {oracle}: max |diff| = {difference:.3g}")


def random_stats(dim, n, seed, scale=1.0, shift=0.0):
    """mu, sigma of n correlated pool3-like feature rows (full rank when n > dim)."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim)) / math.sqrt(dim)
    features = scale * np.abs(rng.standard_normal((n, dim))) @ mixing + shift
    return features.mean(axis=0), np.cov(features, rowvar=False)


def smooth_images(n, c, h, w, seed):
    """(n, c, h, w) float64 in [0, 1]: upsampled noise, so SSIM sees structure, not only noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, c, max(h // 4, 2), max(w // 4, 2))))
    return torch.nn.functional.interpolate(
        coarse, size=(h, w), mode="bilinear", align_corners=False
    )


def noisy(x, sigma, seed):
    rng = np.random.default_rng(seed)
    return (x + sigma * torch.from_numpy(rng.standard_normal(tuple(x.shape)))).clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["symmetric", "eigvals"])
def test_frechet_closed_forms(method):
    mu, sigma = random_stats(64, 500, seed=0)
    assert abs(em.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9
    shift = np.linspace(-1, 1, 64)
    assert em.frechet_distance(mu, sigma, mu + shift, sigma, method=method) == pytest.approx(
        shift @ shift, abs=1e-9
    )
    # diagonal covariances: ||dmu||^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.linspace(0.1, 3.0, 16), np.linspace(2.0, 0.05, 16)
    mu_a, mu_b = np.zeros(16), np.full(16, 0.5)
    expected = 16 * 0.25 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert em.frechet_distance(mu_a, np.diag(a), mu_b, np.diag(b), method=method) == pytest.approx(
        expected, rel=1e-12
    )
    # singular S1 (no Cholesky factor: the eigh square root): tr sqrt(S1 S2) = 0 + 0 + sqrt(4 * 1)
    singular1, singular2 = np.diag([0.0, 1.0, 4.0]), np.diag([9.0, 0.0, 1.0])
    singular_fid = em.frechet_distance(np.zeros(3), singular1, np.ones(3), singular2, method=method)
    assert singular_fid == pytest.approx(3 + 5 + 10 - 4, abs=1e-12)


def test_frechet_float32_input_is_upcast():
    mu1, sigma1 = random_stats(32, 200, seed=1)
    mu2, sigma2 = random_stats(32, 200, seed=2, scale=1.3)
    as32 = [a.astype(np.float32) for a in (mu1, sigma1, mu2, sigma2)]
    expected = em.frechet_distance(*[a.astype(np.float64) for a in as32])
    assert em.frechet_distance(*as32) == expected


def test_frechet_golden():
    mu1, sigma1 = random_stats(128, 400, seed=3)
    mu2, sigma2 = random_stats(128, 400, seed=4, scale=1.2, shift=0.1)
    assert em.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        222.92502839043613, rel=1e-9
    )
    assert em.frechet_distance(mu1, sigma1, mu2, sigma2, method="eigvals") == pytest.approx(
        222.92502839043613, rel=1e-9
    )


def test_frechet_bad_input():
    mu, sigma = random_stats(8, 50, seed=5)
    with pytest.raises(em.MetricInputError, match="do not match"):
        em.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    bad = sigma.copy()
    bad[0, 0] = np.nan
    with pytest.raises(em.MetricInputError, match="NaN"):
        em.frechet_distance(mu, bad, mu, sigma)
    with pytest.raises(em.MetricInputError, match="unknown Frechet method"):
        em.frechet_distance(mu, sigma, mu, sigma, method="sqrtm")


def test_frechet_vs_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    worst_full, worst_deficient = 0.0, 0.0
    # (D, n1, n2, full rank)
    cases = [(64, 500, 600, True), (256, 1000, 1200, True), (64, 40, 50, False)]
    for dim, n1, n2, full_rank in cases:
        mu1, sigma1 = random_stats(dim, n1, seed=dim + n1)
        mu2, sigma2 = random_stats(dim, n2, seed=dim + n2, scale=1.1, shift=0.05)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        diff = mu1 - mu2
        reference = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)
        for method in ("symmetric", "eigvals"):
            ours = em.frechet_distance(mu1, sigma1, mu2, sigma2, method=method)
            if full_rank:
                assert abs(ours - reference) <= 1e-6 * max(1.0, reference)
                worst_full = max(worst_full, abs(ours - reference) / reference)
            else:
                assert abs(ours - reference) <= 1e-3
                worst_deficient = max(worst_deficient, abs(ours - reference))
    report("Frechet distance (full rank, D 64/256, relative)", "scipy sqrtm", worst_full)
    report(
        "Frechet distance (rank-deficient, D 64, n 40/50, absolute)", "scipy sqrtm", worst_deficient
    )


# --------------------------------------------------------------------------------------------------
# PSNR / MSE
# --------------------------------------------------------------------------------------------------
def test_psnr_mse_known_uniform_error():
    x = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    y = x + torch.tensor([0.1, 0.01], dtype=torch.float64).view(2, 1, 1, 1)
    mse_per, mse_mean = em.mse(x, y)
    np.testing.assert_allclose(mse_per, [0.01, 0.0001], rtol=1e-12)
    assert mse_mean == pytest.approx(0.00505, rel=1e-12)
    psnr_per, psnr_mean = em.psnr(x, y)
    np.testing.assert_allclose(psnr_per, [20.0, 40.0], rtol=1e-12)
    assert psnr_mean == pytest.approx(30.0, rel=1e-12)  # per image, then mean
    # != 30 dB
    assert em.psnr_pooled(x, y) == pytest.approx(10 * math.log10(1 / 0.00505), rel=1e-12)


def test_psnr_identical_images_are_inf_and_excluded_from_mean():
    x = smooth_images(3, 3, 16, 16, seed=0)
    y = x.clone()
    y[1] = (y[1] + 0.1).clamp(0, 1)
    per_image, mean = em.psnr(x, y)
    assert np.isinf(per_image[0]) and np.isinf(per_image[2]) and np.isfinite(per_image[1])
    assert mean == per_image[1]  # the mean is over the finite pairs only
    assert em.psnr(x, x)[1] == math.inf


def test_psnr_data_range_and_clamp():
    x = smooth_images(2, 3, 16, 16, seed=1)
    y = noisy(x, 0.05, seed=2)
    np.testing.assert_allclose(
        em.psnr(255 * x, 255 * y, data_range=255.0)[0], em.psnr(x, y)[0], rtol=1e-12
    )
    # reconstructions are clamped to [0, 1] before scoring (decoders have no output activation)
    overshoot = torch.where(y > 0.9, 1.5, y)
    np.testing.assert_array_equal(
        em.psnr(x, overshoot)[0], em.psnr(x, torch.where(y > 0.9, 1.0, y))[0]
    )
    with pytest.raises(em.MetricInputError, match="outside"):
        em.psnr(2 * x - 1, y)
    with pytest.raises(em.MetricInputError, match="shapes differ"):
        em.mse(x, y[:, :, :8])


def test_psnr_mse_vs_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    x = smooth_images(4, 3, 20, 24, seed=3)
    y = noisy(x, torch.tensor([0.01, 0.05, 0.2, 0.4]).view(4, 1, 1, 1).double(), seed=4)
    xs, ys = x.numpy(), y.numpy()
    reference_psnr = [
        metrics.peak_signal_noise_ratio(xs[i], ys[i], data_range=1.0) for i in range(4)
    ]
    reference_mse = [metrics.mean_squared_error(xs[i], ys[i]) for i in range(4)]
    psnr_diff = np.abs(em.psnr(x, y)[0] - reference_psnr).max()
    mse_diff = np.abs(em.mse(x, y)[0] - reference_mse).max()
    pooled_diff = abs(
        em.psnr_pooled(x, y) - metrics.peak_signal_noise_ratio(xs, ys, data_range=1.0)
    )
    assert psnr_diff <= 1e-10 and mse_diff <= 1e-15 and pooled_diff <= 1e-10
    report("PSNR per image", "skimage peak_signal_noise_ratio", psnr_diff)
    report("PSNR pooled", "skimage on the whole batch", pooled_diff)
    report("MSE per image", "skimage mean_squared_error", mse_diff)


# --------------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------------
def test_ssim_identical_constant_and_window():
    x = smooth_images(2, 3, 16, 16, seed=5)
    np.testing.assert_allclose(em.ssim(x, x)[0], 1.0, atol=1e-14)
    flat = torch.full((1, 1, 12, 12), 0.3, dtype=torch.float64)
    assert em.ssim(flat, flat)[1] == pytest.approx(1.0, abs=1e-14)
    # constant vs constant: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1)
    c1 = 0.01**2
    expected = (2 * 0.3 * 0.6 + c1) / (0.3**2 + 0.6**2 + c1)
    assert em.ssim(flat, 2 * flat)[1] == pytest.approx(expected, rel=1e-12)
    taps, cov_norm = em.ssim_window("gaussian")
    assert (
        taps.numel() == 11
        and cov_norm == 1.0
        and float(taps.sum()) == pytest.approx(1.0, abs=1e-15)
    )
    assert float(taps[5] / taps[4]) == pytest.approx(math.exp(0.5 / 1.5**2), rel=1e-14)


def test_ssim_small_images_rejected():
    x = smooth_images(1, 3, 10, 16, seed=6)
    with pytest.raises(em.MetricInputError, match="at least 11x11"):
        em.ssim(x, x)
    assert em.ssim(x, x, convention="skimage_default")[1] == pytest.approx(1.0)  # 7x7 window fits


def test_ssim_golden():
    x = smooth_images(2, 3, 32, 28, seed=7)
    y = noisy(x, 0.1, seed=8)
    np.testing.assert_allclose(em.ssim(x, y)[0], [0.712925608180818, 0.7466044722136932], rtol=1e-8)
    np.testing.assert_allclose(
        em.ssim(x, y, convention="skimage_default")[0],
        [0.770153325246933, 0.8092643823587041],
        rtol=1e-8,
    )


def test_ssim_torch_is_differentiable_and_keeps_dtype(device):
    """On `device` (ASVAE_TEST_DEVICE): float64 SSIM equals the CPU evaluation's to 1e-12 (the
    same sums in another order), float32 to 1e-5; gradients check out in float64."""
    x_cpu = smooth_images(2, 3, 16, 16, seed=9)
    y_cpu = noisy(x_cpu, 0.1, seed=10)
    x, y = x_cpu.to(device), y_cpu.to(device).requires_grad_(True)
    value = em.ssim_torch(x, y)
    assert value.dtype == torch.float64 and value.shape == (2,) and value.device == device
    np.testing.assert_allclose(value.detach().cpu().numpy(), em.ssim(x_cpu, y_cpu)[0], rtol=1e-12)
    golden = [
        0.7387712226094245,
        0.7715130380177618,
    ]  # frozen; em.ssim matches skimage (test_ssim_vs_skimage)
    np.testing.assert_allclose(value.detach().cpu().numpy(), golden, rtol=1e-10)
    (1 - value).sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    # smallest valid size: few gradcheck forwards
    corner = y[:1, :1, :11, :12].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: em.ssim_torch(x[:1, :1, :11, :12], t), (corner,))
    value32 = em.ssim_torch(x.float(), y.detach().float())
    assert value32.dtype == torch.float32 and value32.device == device
    np.testing.assert_allclose(value32.cpu().numpy(), value.detach().cpu().numpy(), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 11, 11), (3, 28, 28), (3, 48, 40), (1, 64, 64)])
def test_ssim_vs_skimage(shape):
    metrics = pytest.importorskip("skimage.metrics")
    c, h, w = shape
    x = smooth_images(3, c, h, w, seed=h)
    y = torch.stack(
        [
            noisy(x[0], 0.05, 1),
            x[1] * 0.8,
            torch.from_numpy(np.random.default_rng(2).random((c, h, w))),
        ]
    )
    worst = 0.0
    for convention, kwargs in (
        ("gaussian", dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)),
        ("skimage_default", {}),
    ):
        ours = em.ssim(x, y, convention=convention)[0]
        reference = [
            metrics.structural_similarity(
                x[i].permute(1, 2, 0).numpy(),
                y[i].permute(1, 2, 0).numpy(),
                data_range=1.0,
                channel_axis=-1,
                **kwargs,
            )
            for i in range(3)
        ]
        worst = max(worst, np.abs(ours - reference).max())
    assert worst <= 1e-10
    report(
        f"SSIM {c}x{h}x{w} (gaussian and skimage_default)", "skimage structural_similarity", worst
    )


# --------------------------------------------------------------------------------------------------
# Laplacian-variance sharpness
# --------------------------------------------------------------------------------------------------
def test_sharpness_closed_forms():
    flat = torch.full((1, 3, 5, 5), 0.4, dtype=torch.float64)
    assert em.sharpness(flat)[1] == 0.0
    # a vertical step: grey 0 | 1 on a 4x4 grid; the Laplacian is +-255 on the two middle columns,
    # 0 elsewhere
    step = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    step[..., 2:] = 1.0
    # mean 0, half the pixels at +-255
    assert em.sharpness(step)[1] == pytest.approx(255.0**2 / 2, rel=1e-14)
    x = smooth_images(2, 3, 9, 7, seed=11)
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    np.testing.assert_allclose(em.sharpness(grey)[0], em.sharpness(x)[0], rtol=1e-12)
    with pytest.raises(em.MetricInputError, match="2x2"):
        em.sharpness(x[..., :1])


def test_sharpness_golden():
    x = smooth_images(2, 3, 21, 17, seed=12)
    np.testing.assert_allclose(
        em.sharpness(x)[0], [177.53133046560427, 183.85117312387166], rtol=1e-9
    )
    np.testing.assert_allclose(
        em.sharpness(x, opencv_exact=True)[0], [178.92436974789914, 185.28851540616247], rtol=1e-9
    )


def test_sharpness_vs_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(13)
    worst = 0.0
    for h, w in ((2, 2), (37, 53), (64, 64), (5, 31)):
        image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None].double() / 255
        exact = cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()
        ours_exact = em.sharpness(tensor, opencv_exact=True)[1]
        assert ours_exact == pytest.approx(exact, rel=1e-9)
        grey = 255 * (0.299 * tensor[0, 0] + 0.587 * tensor[0, 1] + 0.114 * tensor[0, 2]).numpy()
        ours_float = em.sharpness(tensor)[1]
        reference = cv2.Laplacian(grey, cv2.CV_64F).var()
        assert ours_float == pytest.approx(reference, rel=1e-9)
        worst = max(worst, abs(ours_exact - exact) / exact, abs(ours_float - reference) / reference)
    report("sharpness (relative, float and opencv_exact)", "cv2.Laplacian(CV_64F).var()", worst)


# --------------------------------------------------------------------------------------------------
# histogram KL / JSD
# --------------------------------------------------------------------------------------------------
def cell_points(counts, bins, span):
    """Points at the centres of cells, counts: {(i, j): k} with i along x, j along y."""
    width = 2 * span / bins
    return np.array(
        [
            [-span + (i + 0.5) * width, -span + (j + 0.5) * width]
            for (i, j), k in counts.items()
            for _ in range(k)
        ]
    )


def test_hist_kl_jsd_hand_computed():
    # 2x2 cells of 2x2 on [-2, 2]^2: density = probability / 4; the paper divides sums by bins = 2
    real = cell_points({(0, 0): 3, (1, 1): 1}, bins=2, span=2.0)  # P = [.75, 0, 0, .25]
    fake = cell_points({(0, 0): 2, (0, 1): 2}, bins=2, span=2.0)  # Q = [.5, .5, 0, 0]
    eps = 1e-14
    p = {"00": 0.75 / 4, "11": 0.25 / 4}
    q = {"00": 0.5 / 4, "01": 0.5 / 4}
    kl_paper = (
        p["00"] * (math.log(p["00"]) - math.log(q["00"] + eps))
        + p["11"] * (math.log(p["11"]) - math.log(eps))
    ) / 2
    m = {"00": (p["00"] + q["00"]) / 2, "01": q["01"] / 2, "11": p["11"] / 2}
    kl_m_p = (
        m["00"] * (math.log(m["00"]) - math.log(p["00"] + eps))
        + m["01"] * (math.log(m["01"]) - math.log(eps))
        + m["11"] * (math.log(m["11"]) - math.log(p["11"] + eps))
    )
    kl_m_q = (
        m["00"] * (math.log(m["00"]) - math.log(q["00"] + eps))
        + m["01"] * (math.log(m["01"]) - math.log(q["01"] + eps))
        + m["11"] * (math.log(m["11"]) - math.log(eps))
    )
    kl, jsd = em.hist_kl_jsd(real, fake, bins=2, span=2.0, convention="paper")
    assert kl == pytest.approx(kl_paper, rel=1e-12)
    assert jsd == pytest.approx(0.5 * (kl_m_p + kl_m_q) / 2, rel=1e-12)
    # textbook: probabilities, Q floored at 1e-14, JSD = 0.5 KL(P||M) + 0.5 KL(Q||M)
    kl_t = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / eps)
    jsd_t = 0.5 * (0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.125)) + 0.5 * (
        0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.25)
    )
    kl, jsd = em.hist_kl_jsd(real, fake, bins=2, span=2.0, convention="textbook")
    assert kl == pytest.approx(kl_t, rel=1e-12)
    assert jsd == pytest.approx(jsd_t, rel=1e-12)


def test_hist_kl_jsd_identities():
    rng = np.random.default_rng(14)
    real = rng.uniform(-1.9, 1.9, (500, 2))
    assert em.hist_kl_jsd(real, real.copy(), convention="textbook") == (0.0, 0.0)
    # eps in ln(q + eps)
    assert em.hist_kl_jsd(real, real.copy(), convention="paper") == pytest.approx(
        (0.0, 0.0), abs=1e-10
    )
    # disjoint supports: textbook JSD is exactly ln 2, the paper's reversed "JSD" is far above it
    left, right = rng.uniform(-1.9, -0.1, (400, 2)), rng.uniform(0.1, 1.9, (400, 2))
    assert em.hist_kl_jsd(left, right, convention="textbook")[1] == pytest.approx(
        math.log(2), rel=1e-12
    )
    assert em.hist_kl_jsd(left, right, convention="paper")[1] > 10
    # points outside the square are dropped and the rest renormalised
    far = np.full((100, 2), 5.0)
    assert em.hist_kl_jsd(np.vstack([real, far]), left) == em.hist_kl_jsd(real, left)
    # the paper KL is the probability KL / (bins * cell area) when q covers p (epsilon negligible)
    fake = rng.uniform(-2, 2, (20000, 2))
    coarse_paper = em.hist_kl_jsd(real, fake, bins=10, span=2.0)[0]
    coarse_textbook = em.hist_kl_jsd(real, fake, bins=10, span=2.0, convention="textbook")[0]
    assert coarse_paper == pytest.approx(coarse_textbook / (10 * 0.4**2), rel=1e-10)
    with pytest.warns(em.MetricWarning, match="no generated point"):
        assert all(math.isnan(v) for v in em.hist_kl_jsd(real, far))
    with pytest.raises(em.MetricInputError, match=r"\(N, 2\)"):
        em.hist_kl_jsd(real[:, :1], real)


def test_hist_kl_jsd_textbook_jsd_bounded():
    rng = np.random.default_rng(15)
    for trial in range(5):
        real = rng.normal(0, 0.5, (2000, 2))
        fake = rng.normal(rng.uniform(-1, 1), rng.uniform(0.05, 1.0), (2000, 2))
        kl, jsd = em.hist_kl_jsd(real, fake, convention="textbook")
        assert 0.0 <= jsd <= math.log(2) and kl >= 0.0


def test_hist_kl_jsd_golden():
    def eight_gaussians(n, seed):
        rng = np.random.default_rng(seed)
        angles = np.arange(8) * math.pi / 4
        centres = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return centres[rng.integers(0, 8, n)] + 0.05 * rng.standard_normal((n, 2))

    real, fake = eight_gaussians(5000, 1), eight_gaussians(5000, 2)
    assert em.hist_kl_jsd(real, fake) == pytest.approx(
        (3.101859126663992, 1.6036154417255994), rel=1e-10
    )
    textbook = em.hist_kl_jsd(real, fake, convention="textbook")
    assert textbook == pytest.approx((0.40359383651004044, 0.02392894579875854), rel=1e-10)


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_one_line_with_rate_and_eta_on_a_terminal():
    stream = Terminal()
    bar = em.Progress(10, "work", stream=stream, min_interval=0.0)
    for _ in range(10):
        bar.update()
    bar.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.startswith("\rwork: 1/10")
    assert text.count("\r") == 10  # each count once: close() does not repeat the last one
    assert "10/10 (100%)" in text and "img/s" in text and "ETA 0:00" in text

def test_progress_in_a_file_is_a_line_per_update_each_once():
    stream = io.StringIO()
    with em.Progress(4, "work", stream=stream, min_interval=0.0) as bar:
        for _ in range(4):
            bar.update()
    lines = stream.getvalue().split("\n")
    assert "\r" not in stream.getvalue() and lines[-1] == ""
    assert [line.split(" ")[1] for line in lines[:-1]] == ["1/4", "2/4", "3/4", "4/4"]
    assert em.Progress(4, stream=io.StringIO()).min_interval == 10.0  # a file: every 10 s at most
    quiet = io.StringIO()
    with em.Progress(5, "x", stream=quiet, enabled=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""


# --------------------------------------------------------------------------------------------------
# folders and the command line (recon, sharpness) and their bad input
# --------------------------------------------------------------------------------------------------
def save_images(folder, images, names=None, mode="RGB"):
    """(N, 3, H, W) float in [0, 1] -> 8-bit files in folder (created)."""
    os.makedirs(folder, exist_ok=True)
    names = names or [f"{i:03d}.png" for i in range(len(images))]
    for image, name in zip(images, names):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).convert(mode).save(os.path.join(folder, name))
    return folder


def run_cli(capsys, *argv):
    code = em.main(["--help"] if not argv else list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, needle):
    assert code == 2
    assert (
        err.startswith("eval_metrics.py: error: ")
        and err.count("\n") == 1
        and needle in err
        and "Traceback" not in err
    )


def test_recon_cli_equals_functions(tmp_path, capsys):
    real = smooth_images(3, 3, 24, 20, seed=16)
    rec = noisy(real, 0.05, seed=17)
    real_dir = save_images(str(tmp_path / "real"), real)
    rec_dir = save_images(str(tmp_path / "rec"), rec)
    save_images(real_dir, real[:1], ["same.png"])
    save_images(rec_dir, real[:1], ["same.png"])
    code, out, err = run_cli(capsys, "recon", real_dir, rec_dir, "--progress", "false")
    assert code == 0 and err == ""
    loaded_real = torch.stack([em.load_image(p) for p in em.list_images(real_dir)])
    loaded_rec = torch.stack([em.load_image(p) for p in em.list_images(rec_dir)])
    assert f"{em.psnr(loaded_real, loaded_rec)[1]:14.6f}" in out
    assert f"{em.ssim(loaded_real, loaded_rec)[1]:14.6f}" in out
    assert f"{em.mse(loaded_real, loaded_rec)[1]:14.8f}" in out
    assert "1 identical pairs have PSNR inf" in out


def test_sharpness_cli(tmp_path, capsys):
    images = smooth_images(2, 3, 16, 16, seed=18)
    folder = save_images(str(tmp_path / "s"), images)
    save_images(folder, images[:1], ["grey.png"], mode="L")
    code, out, err = run_cli(capsys, "sharpness", folder, "--progress", "false")
    loaded = [em.load_image(p)[None] for p in em.list_images(folder)]
    values = np.array([em.sharpness(t)[1] for t in loaded])
    assert code == 0 and f"mean {values.mean():.6f}, std {values.std():.6f}" in out


def image_tree(root, relative_paths, seed=30):
    """One 16x16 pattern image per relative path (folders created); returns root as a string."""
    images = smooth_images(len(relative_paths), 3, 16, 16, seed=seed)
    for image, relative in zip(images, relative_paths):
        folder, name = os.path.split(os.path.join(str(root), relative))
        save_images(folder, image[None], [name])
    return str(root)


# Component-wise (pathlib) order: "a/z.png" before "a-b/e.bmp" although "a-" < "a/" as strings.
TREE_SORTED = [
    "A.PNG",
    "a/z.png",
    "a-b/e.bmp",
    "b.png",
    "sub/c.JPEG",
    "sub/deep/d.webp",
    "upper.TIFF",
]


def test_list_images_recursive_sorted_any_case(tmp_path):
    root = image_tree(
        tmp_path / "tree",
        ["upper.TIFF", "sub/deep/d.webp", "b.png", "a-b/e.bmp", "a/z.png", "sub/c.JPEG", "A.PNG"],
    )
    for junk in ("notes.txt", "sub/readme.md", "png", "b.png.bak", "sub/deep/x.png.txt"):
        open(os.path.join(root, junk), "w").close()
    os.makedirs(os.path.join(root, "empty", "deeper"))
    paths = em.list_images(root)
    assert [os.path.relpath(p, root) for p in paths] == TREE_SORTED
    assert all(isinstance(p, str) and p.startswith(root) for p in paths)
    assert em.list_images(root + os.sep) == paths
    # a folder whose name looks like an image is entered, not listed
    image_tree(os.path.join(root, "folder.png"), ["inner.png"])
    relative = [os.path.relpath(p, root) for p in em.list_images(root)]
    assert relative == TREE_SORTED[:4] + ["folder.png/inner.png"] + TREE_SORTED[4:]
    with pytest.raises(em.MetricInputError, match="no images .* or its subfolders"):
        em.list_images(os.path.join(root, "empty"))


def test_training_reads_these_files_of_a_folder(tmp_path):
    """as_introvae.py's --dataset folder reads exactly the images written out below: nested and
    hidden ones, any case of the suffix; not other files, nor a folder named like an image."""
    import as_introvae as asv  # a broken as_introvae.py must fail here, not skip

    root = image_tree(tmp_path / "tree", ["b.png", "a/z.png", "a-b/e.bmp", ".hidden/h.png",
                                          ".dot.PNG"])
    for other in ("a/labels.csv", "notes.txt", "a/z.png.txt"):
        open(os.path.join(root, other), "w").close()
    os.makedirs(os.path.join(root, "folder.png"))
    expected = [".dot.PNG", ".hidden/h.png", "a/z.png", "a-b/e.bmp", "b.png"]
    assert [os.path.relpath(p, root) for p in asv.ImageFolder(root, 16).files] == expected


def test_recon_pairs_nested_folders_by_relative_path(tmp_path, capsys):
    names = ["x/000.png", "y/000.png", "y/z/001.png"]  # the same file name in two subfolders
    real = smooth_images(3, 3, 16, 16, seed=31)
    rec = noisy(real, 0.1, seed=32)
    for folder, images in (("real", real), ("rec", rec)):
        for image, name in zip(images, names):
            where, file_name = os.path.split(str(tmp_path / folder / name))
            save_images(where, image[None], [file_name])
    code, out, err = run_cli(
        capsys, "recon", str(tmp_path / "real"), str(tmp_path / "rec"), "--progress", "false"
    )
    assert code == 0 and err == "" and out.startswith("3 pairs,")
    loaded = [
        torch.stack([em.load_image(str(tmp_path / f / n)) for n in names]) for f in ("real", "rec")
    ]
    assert f"{em.psnr(*loaded)[1]:14.6f}" in out and f"{em.mse(*loaded)[1]:14.8f}" in out
    os.rename(str(tmp_path / "rec" / "y" / "z"), str(tmp_path / "rec" / "y" / "w"))
    code, _, err = run_cli(
        capsys, "recon", str(tmp_path / "real"), str(tmp_path / "rec"), "--progress", "false"
    )
    assert_one_line_error(code, err, f"(2 unmatched, e.g. y/z/001.png only in {tmp_path / 'real'})")


def test_image_loading_grey_rgba_formats(tmp_path):
    rgb = smooth_images(1, 3, 12, 12, seed=19)[0]
    folder = str(tmp_path / "formats")
    for name, mode in (("a.png", "RGB"), ("b.PNG", "RGBA"), ("c.bmp", "RGB"), ("d.webp", "RGB")):
        save_images(folder, rgb[None], [name], mode=mode)
    save_images(folder, rgb[None], ["e.png"], mode="L")
    open(os.path.join(folder, "notes.txt"), "w").close()
    paths = em.list_images(folder)
    assert [os.path.basename(p) for p in paths] == ["a.png", "b.PNG", "c.bmp", "d.webp", "e.png"]
    expected = (
        torch.from_numpy((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        .permute(2, 0, 1)
        .float()
        / 255
    )
    assert torch.equal(em.load_image(paths[0]), expected)
    assert torch.equal(em.load_image(paths[1]), expected)  # alpha dropped
    grey = em.load_image(paths[4])
    assert grey.shape == (3, 12, 12) and torch.equal(grey[0], grey[2])  # grey replicated


def test_bad_input_one_line_exit_2(tmp_path, capsys):
    good = save_images(str(tmp_path / "good"), smooth_images(2, 3, 16, 16, seed=20))
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    assert_one_line_error(
        *run_cli(capsys, "sharpness", str(tmp_path / "missing"))[::2], "no such folder"
    )
    assert_one_line_error(*run_cli(capsys, "recon", empty, good)[::2], "no images")
    broken = save_images(str(tmp_path / "broken"), smooth_images(2, 3, 16, 16, seed=20))
    with open(os.path.join(broken, "001.png"), "wb") as handle:
        handle.write(b"not a png")
    assert_one_line_error(
        *run_cli(capsys, "recon", good, broken, "--progress", "false")[::2], "001.png"
    )
    small = save_images(str(tmp_path / "small"), smooth_images(2, 3, 16, 12, seed=20))
    assert_one_line_error(
        *run_cli(capsys, "recon", good, small, "--progress", "false")[::2], "sizes differ"
    )
    tiny_a = save_images(str(tmp_path / "tiny_a"), smooth_images(1, 3, 10, 10, seed=21))
    tiny_b = save_images(str(tmp_path / "tiny_b"), smooth_images(1, 3, 10, 10, seed=22))
    assert_one_line_error(
        *run_cli(capsys, "recon", tiny_a, tiny_b, "--progress", "false")[::2], "at least 11x11"
    )
    other = save_images(str(tmp_path / "other"), smooth_images(1, 3, 16, 16, seed=23), ["x.png"])
    assert_one_line_error(*run_cli(capsys, "recon", good, other)[::2], "do not pair")


def test_cli_process_exit_code_and_help(capsys):
    script = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval_metrics.py"
    )
    result = subprocess.run(
        [sys.executable, script, "sharpness", "/no/such/dir"], capture_output=True, text=True
    )
    assert (
        result.returncode == 2
        and result.stdout == ""
        and result.stderr == "eval_metrics.py: error: no such folder: /no/such/dir\n"
    )
    for command in ("fid", "stats", "recon", "sharpness"):
        with pytest.raises(SystemExit) as exit_info:
            em.main([command, "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr()[0].startswith(f"usage: eval_metrics.py {command} ")
    with pytest.raises(SystemExit):
        em.main(["--help"])
    assert "Each subcommand has its own help: eval_metrics.py fid --help" in capsys.readouterr()[0]
    with pytest.raises(SystemExit):
        em.main(["fid", "--help"])
    text = " ".join(capsys.readouterr()[0].split())
    assert "A the first image set: a folder of images (read recursively) or a .npz" in text
    assert "B the second image set" in text


def test_boolean_options_take_a_value(tmp_path, capsys):
    folder = save_images(str(tmp_path / "s"), smooth_images(2, 3, 16, 16, seed=24))
    for word, shown in (
        ("false", False),
        ("NO", False),
        ("0", False),
        ("true", True),
        ("on", True),
    ):
        code, out, err = run_cli(capsys, "sharpness", folder, "--progress", word)
        assert code == 0 and "over 2 images" in out and ("sharpness: 2/2" in err) == shown
    for argv, needle in (
        (["--progress", "maybe"], "argument --progress: expected true or false, got 'maybe'"),
        (["--no-progress"], "unrecognized arguments: --no-progress (boolean options take a value"),
        (["--progress"], "argument --progress: expected one argument"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            em.main(["sharpness", folder, *argv])
        err = capsys.readouterr()[1]
        assert exit_info.value.code == 2 and err.startswith("eval_metrics.py: error: ") and err.count("\n") == 1
        assert needle in err and err.endswith("--help)\n"), err
    assert em.parse_bool("Yes") is True and em.parse_bool("OFF") is False


def test_atomic_write_and_stats_file(tmp_path):
    target = str(tmp_path / "stats")
    written = em.save_stats(target, np.arange(3), np.eye(3))  # numpy's rule: '.npz' appended
    assert written == target + ".npz" and sorted(os.listdir(tmp_path)) == ["stats.npz"]
    mu, sigma = em.load_stats(written)
    assert (
        mu.dtype == np.float64
        and np.array_equal(mu, [0, 1, 2])
        and np.array_equal(sigma, np.eye(3))
    )
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(written).st_mode & 0o777 == 0o666 & ~umask

    def fails_halfway(handle):
        handle.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        em.atomic_write(written, fails_halfway)
    assert sorted(os.listdir(tmp_path)) == ["stats.npz"]  # old file intact, no temporary left
    assert np.array_equal(em.load_stats(written)[0], [0, 1, 2])
    em.atomic_write(str(tmp_path / "note.txt"), lambda handle: handle.write(b"new"))
    assert (tmp_path / "note.txt").read_bytes() == b"new"
    with pytest.raises(em.MetricInputError, match="cannot write .*missing/x.npz: No such file"):
        em.save_stats(str(tmp_path / "missing" / "x.npz"), np.zeros(2), np.eye(2))
    with pytest.raises(em.MetricInputError, match="cannot write"):  # a folder is in the way
        em.atomic_write(str(tmp_path), lambda handle: handle.write(b"x"))
    assert sorted(os.listdir(tmp_path)) == ["note.txt", "stats.npz"]


def test_stats_cli_unwritable_output_fails_first(tmp_path, capsys, offline_torch_home):
    folder = save_images(str(tmp_path / "s"), smooth_images(2, 3, 16, 16, seed=25))
    out = str(tmp_path / "no" / "such" / "out.npz")
    # fails before the weights load: offline_torch_home has none, which would be another error
    assert_one_line_error(
        *run_cli(capsys, "stats", folder, out)[::2], f"cannot write {out}: no such folder"
    )
