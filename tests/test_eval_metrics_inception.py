"""eval_metrics.py's FID pipeline against pytorch-fid 0.3.0, offline.

No download: a module fixture fills the FID Inception state dict from a seeded numpy generator,
calibrates BatchNorm on one batch, and saves it as torch hub's cached
pt_inception-2015-12-05-6726825d.pth under a temporary TORCH_HOME; ours and pytorch-fid's both load
that file (pytorch-fid with its own strict load, which also proves the key layout is the same).
Golden values freeze the numbers for CI without pytorch-fid. Images are tiny: every image costs a
full 299x299 forward (~0.15 s on 2 cores).
"""

import copy
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import bench_fid
import eval_metrics as em


# Frozen from this file's seeded weights and images (pytorch-fid agreed at freezing time): features
# of smooth_images(2, 32, 32, seed=1) and (1, 96, 400, seed=3), FIDs of the `folders` fixture.
# Tolerances cover float32 kernels differing between CPUs and thread counts (seen: 4e-5 on single
# elements, 7e-7 on sums). A convention slip moves them far more: pool flavour, count_include_pad or
# align_corners by 2.5-4% on the 32x32 sum, antialias (downsampling only) by 6e-4 on the 96x400 sum.
GOLDEN_FEATURE_SUM = 4384.4548730237875  # 2048-d, both images
GOLDEN_FEATURE_FIRST = [0.277722030878067, 0.7026559710502625, 0.08749127388000488]
GOLDEN_FEATURE_SUM_96x400 = 1113.8239800930023  # 2048-d, smooth_images(1, 96, 400, seed=3)
GOLDEN_SUMS_BY_DEPTH = [71.26153939962387, 259.71704894304276, 946.6527521535754]  # 64, 192, 768-d
GOLDEN_FID_64 = 1.767872957128521  # 66 vs 66 images
GOLDEN_FID_2048 = 523.8992811163838  # 8 vs 8 images


def report(metric, oracle, difference):
    print(f"\nAGREEMENT {metric} vs {oracle}: max |diff| = {difference:.3g}")


def smooth_images(n, h, w, seed):
    """(n, 3, h, w) float32 in [0, 1], upsampled from seeded numpy noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3, 8, 8))).float()
    return torch.nn.functional.interpolate(
        coarse, size=(h, w), mode="bilinear", align_corners=False
    ).clamp(0, 1)


def random_fid_state_dict(seed):
    """FID Inception tensors from a seeded numpy generator, keys visited in sorted order: convs
    N(0, 2 / fan_in), BN gamma U(0.5, 1.5), beta N(0, 0.1), fc N(0, 0.01)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, tensor in sorted(em.InceptionV3FID().state_dict().items()):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
            continue
        if key.endswith("conv.weight"):
            values = rng.normal(0.0, math.sqrt(2.0 / tensor[0].numel()), tensor.shape)
        elif key.endswith("bn.weight"):
            values = rng.uniform(0.5, 1.5, tensor.shape)
        elif key.endswith("bn.bias"):
            values = rng.normal(0.0, 0.1, tensor.shape)
        elif key == "fc.weight":
            values = rng.normal(0.0, 0.01, tensor.shape)
        elif key.endswith("running_var"):
            values = np.ones(tensor.shape)
        else:  # running_mean, fc.bias
            values = np.zeros(tensor.shape)
        state[key] = torch.from_numpy(values).to(tensor.dtype)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Random, BN-calibrated FID weights in a temporary torch hub cache (TORCH_HOME set for the
    module)."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    path = torch_home / "hub" / "checkpoints" / em.FID_WEIGHTS_FILE
    path.parent.mkdir(parents=True)
    model = em.InceptionV3FID()
    model.load_state_dict(random_fid_state_dict(seed=0))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: the running stats become this batch's
            module.reset_running_stats()
    with torch.no_grad():
        model.train()(smooth_images(4, 32, 32, seed=100))
    torch.save(model.state_dict(), path)
    previous = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(torch_home)
    yield str(path)
    if previous is None:
        del os.environ["TORCH_HOME"]
    else:
        os.environ["TORCH_HOME"] = previous


@pytest.fixture(scope="module", autouse=True)
def full_float32():
    """CUDA convolutions in true float32: PyTorch lets cuDNN use TF32 (10-bit mantissa) by default,
    and the golden values and tolerances here are float32 ones. test_tf32_deviation measures what
    the default costs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def ours(weights_file, device):
    with pytest.warns(em.MetricWarning, match="not the official"):
        # weights=None: the torch hub cache, like pytorch-fid
        return em.load_inception(device=device)


@pytest.fixture(scope="module")
def ours64(weights_file, device):
    with pytest.warns(em.MetricWarning):
        return em.load_inception(weights_file, device=device, dims=64)


@pytest.fixture(scope="module")
def ours64_cpu(weights_file):
    """For the plumbing tests that compare features of different batch compositions at 1e-12:
    cuDNN may pick another kernel per batch size."""
    with pytest.warns(em.MetricWarning):
        return em.load_inception(weights_file, dims=64)


def assert_same_features(ours, reference, device):
    """Bit-identical on the CPU (the same kernels on the same batches). On CUDA within 1e-5 of the
    largest feature: two networks may not get the same cuDNN kernels. Returns max |difference|."""
    worst = float(np.abs(np.asarray(ours) - np.asarray(reference)).max())
    if device.type == "cpu":
        assert worst == 0.0
    else:
        assert worst <= 1e-5 * max(1.0, float(np.abs(reference).max()))
    return worst


def save_folder(folder, images, kinds):
    """Images as 8-bit files; kinds cycles through (extension, PIL mode)."""
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        extension, mode = kinds[i % len(kinds)]
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).convert(mode).save(
            os.path.join(folder, f"{i:03d}.{extension}"), quality=90
        )
    return folder


# --------------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------------
def test_state_dict_layout(ours):
    state = ours.state_dict()
    assert len(state) == 566 and not any(key.startswith("AuxLogits") for key in state)
    assert state["fc.weight"].shape == (1008, 2048)
    convs = [m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 94 and all(conv.bias is None for conv in convs)
    assert len(norms) == 94 and all(norm.eps == 1e-3 for norm in norms)
    assert not ours.training


def test_state_dict_keys_equal_pytorch_fid(weights_file):
    inception = pytest.importorskip("pytorch_fid.inception")
    # pytorch-fid's own tree, its own strict load of our file
    fid_net = inception.fid_inception_v3()
    assert set(fid_net.state_dict()) == set(em.InceptionV3FID().state_dict())


def test_features_golden_and_bit_identical_to_pytorch_fid(ours, ours64, device):
    batches = [
        smooth_images(2, 32, 32, seed=1),
        smooth_images(1, 299, 299, seed=2),
        smooth_images(1, 96, 400, seed=3),
    ]
    got = []
    for images in batches:
        with torch.no_grad():
            got.append(
                {
                    dims: f.double().cpu().numpy()
                    for dims, f in ours.features_by_depth(images.to(device), 2048).items()
                }
            )
    np.testing.assert_array_equal(em.inception_features(batches[0], ours), got[0][2048])
    np.testing.assert_array_equal(em.inception_features(batches[0], ours64), got[0][64])
    assert got[0][2048].sum() == pytest.approx(GOLDEN_FEATURE_SUM, rel=1e-4)
    np.testing.assert_allclose(got[0][2048][0, :3], GOLDEN_FEATURE_FIRST, rtol=1e-3)
    # 400 -> 299: no antialias
    assert got[2][2048].sum() == pytest.approx(GOLDEN_FEATURE_SUM_96x400, rel=1e-4)
    np.testing.assert_allclose(
        [got[0][d].sum() for d in (64, 192, 768)], GOLDEN_SUMS_BY_DEPTH, rtol=1e-4
    )

    inception = pytest.importorskip("pytorch_fid.inception")
    reference = inception.InceptionV3([0, 1, 2, 3]).to(device).eval()
    worst = 0.0
    for images, ours_by_depth in zip(batches, got):
        with torch.no_grad():
            blocks = reference(images.to(device))
        for dims, block in zip(em.CHOICES["dims"], blocks):
            pooled = torch.nn.functional.adaptive_avg_pool2d(block, output_size=(1, 1))
            expected = pooled.flatten(1).double().cpu().numpy()
            worst = max(worst, assert_same_features(ours_by_depth[dims], expected, device))
    report(
        f"Inception features on {device.type}, 64/192/768/2048-d, 32x32 / 299x299 / 96x400, "
        "equal batches",
        "pytorch-fid InceptionV3",
        worst,
    )


def test_grey_and_rgba_tensors_match_rgb(ours64):
    rgb = smooth_images(1, 32, 32, seed=4)
    grey = rgb[:, :1]
    np.testing.assert_array_equal(
        em.inception_features(grey, ours64),
        em.inception_features(grey.expand(-1, 3, -1, -1), ours64),
    )
    rgba = torch.cat([rgb, torch.rand(1, 1, 32, 32)], dim=1)
    np.testing.assert_array_equal(
        em.inception_features(rgba, ours64), em.inception_features(rgb, ours64)
    )


def test_eval_mode_always_and_bn_batch_stats(ours, weights_file, device):
    images = smooth_images(2, 32, 32, seed=5)
    expected = em.inception_features(images, ours)
    ours.train()  # a caller's slip: features must still be eval-mode ones
    np.testing.assert_array_equal(em.inception_features(images, ours), expected)
    assert not ours.training

    with pytest.warns(em.MetricWarning):
        train_mode = em.load_inception(weights_file, device=device, bn_batch_stats=True)
    assert train_mode.training
    before = copy.deepcopy(train_mode.state_dict())
    batch_stats = em.inception_features(images, train_mode, batch_size=2)
    # per-batch normalisation changes the features
    assert np.abs(batch_stats - expected).max() > 1e-2
    # a DataLoader's (images, labels): the loader batch IS the BatchNorm batch, whatever batch_size
    # says
    with pytest.warns(em.MetricWarning, match="< 2048"):
        mu, _, n = em.stats_from_batches(
            [(images, torch.zeros(2))], train_mode, batch_size=1, progress=False
        )
    assert n == 2
    np.testing.assert_allclose(mu, batch_stats.mean(axis=0), rtol=0, atol=1e-12)
    for key, tensor in train_mode.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(tensor, before[key]), key  # running statistics never move

    inception = pytest.importorskip("pytorch_fid.inception")
    # Soft-IntroVAE never calls .eval()
    reference_train = inception.InceptionV3([3]).to(device).train()
    with torch.no_grad():
        reference = reference_train(images.to(device))[0].flatten(1).double().cpu().numpy()
    worst = assert_same_features(batch_stats, reference, device)
    report(
        f"bn_batch_stats features on {device.type}", "pytorch-fid InceptionV3 in train mode", worst
    )


def test_tf32_deviation(ours, device):
    """What cuDNN's default TF32 convolutions do to the features (CUDA only; the other tests here
    run in true float32)."""
    if device.type != "cuda":
        pytest.skip("TF32 exists on CUDA only: run with ASVAE_TEST_DEVICE=cuda")
    images = smooth_images(8, 32, 32, seed=40)
    float32 = em.inception_features(images, ours)
    torch.backends.cudnn.allow_tf32 = True
    try:
        tf32 = em.inception_features(images, ours)
    finally:
        torch.backends.cudnn.allow_tf32 = False
    relative = float(np.abs(tf32 - float32).max() / np.abs(float32).max())
    report(
        "Inception features, cuDNN TF32 (PyTorch's default) vs float32, relative to the largest",
        "float32 on the same GPU",
        relative,
    )
    assert relative < 2e-2  # TF32 keeps 10 mantissa bits (~5e-4 per product), over 94 conv layers


@pytest.mark.parametrize("pytorch_fid", ["installed", "missing"])
def test_bench_feature_throughput(weights_file, device, capsys, monkeypatch, pytorch_fid):
    if pytorch_fid == "missing":
        for name in ("pytorch_fid", "pytorch_fid.inception", "pytorch_fid.fid_score"):
            monkeypatch.setitem(sys.modules, name, None)  # every import of it now fails
    else:
        pytest.importorskip("pytorch_fid.inception")
    argv = ["--weights", weights_file, "--device", str(device), "--bench-images", "4"]
    argv += ["--batch-size", "2", "--bench-rounds", "1", "--bench-frechet", "false"]
    assert bench_fid.main(argv) == 0
    out = capsys.readouterr()[0]
    assert out.count("pytorch-fid is not installed") == (pytorch_fid == "missing")
    assert f"device {device}, torch " in out and "4 images of 32x32, batch 2, best of 1" in out
    rates = dict(re.findall(r"features  (\S+) *: +([0-9.]+) images/s", out))
    assert sorted(rates) == (
        ["eval_metrics", "pytorch-fid"] if pytorch_fid == "installed" else ["eval_metrics"]
    )
    assert all(float(rate) > 0 for rate in rates.values()) and "Frechet" not in out
    if pytorch_fid == "installed":
        difference = float(re.search(r"max \|eval_metrics - pytorch-fid\| = (\S+)", out)[1])
        assert difference == 0.0 if device.type == "cpu" else difference <= 1e-4


# --------------------------------------------------------------------------------------------------
# folders, statistics, FID end to end
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two 32x32 sets: 66 each (full rank at 64-d), and 8 each for 2048-d; PNG (RGB, grey, RGBA) vs
    JPEG / WebP / BMP, so decoding is part of the comparison."""
    root = tmp_path_factory.mktemp("fid_folders")
    set_a = smooth_images(66, 32, 32, seed=8)
    set_b = (0.8 * smooth_images(66, 32, 32, seed=9) + 0.1).clamp(0, 1)
    png, other = (
        [("png", "RGB"), ("png", "L"), ("png", "RGBA")],
        [("jpg", "RGB"), ("webp", "RGB"), ("bmp", "RGB")],
    )
    return {
        "a": save_folder(str(root / "a"), set_a, png),
        "b": save_folder(str(root / "b"), set_b, other),
        "a8": save_folder(str(root / "a8"), set_a[:8], png),
        "b8": save_folder(str(root / "b8"), set_b[:8], other),
    }


# scipy >= 1.16 deprecates the sqrtm(disp=) pytorch-fid uses
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fid_end_to_end_vs_pytorch_fid_64d(folders, weights_file, device):
    with pytest.warns(em.MetricWarning) as records:  # unofficial weights, and n < 2048
        fid = em.fid_from_dirs(folders["a"], folders["b"], dims=64, device=str(device))
    assert any("66 images < 2048" in str(record.message) for record in records)
    assert fid == pytest.approx(GOLDEN_FID_64, rel=1e-3)
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    reference = fid_score.calculate_fid_given_paths(
        [folders["a"], folders["b"]], batch_size=50, device=device, dims=64, num_workers=0
    )
    assert abs(fid - reference) <= 1e-3
    report(
        f"FID end to end on {device.type}, 66 vs 66 images, 64-d (full rank)",
        "pytorch_fid calculate_fid_given_paths",
        abs(fid - reference),
    )


def test_stats_cli_and_fid_2048d_vs_pytorch_fid(folders, weights_file, tmp_path, capsys, device):
    stats_a, stats_b = str(tmp_path / "a8.npz"), str(tmp_path / "b8.npz")
    on_device = ["--progress", "false", "--device", str(device)]
    assert em.main(["stats", folders["a8"], stats_a, *on_device]) == 0
    out, err = capsys.readouterr()
    assert "saved mu (2048,) and sigma (2048, 2048) of 8 images" in out
    assert "warning: " in err and "8 images < 2048" in err and "not the official" in err
    assert em.main(["stats", folders["b8"], stats_b, *on_device]) == 0
    capsys.readouterr()
    with np.load(stats_a) as raw:
        assert sorted(raw.files) == ["mu", "sigma"] and raw["sigma"].dtype == np.float64
    assert em.main(["fid", stats_a, stats_b, "--progress", "false"]) == 0
    out = capsys.readouterr()[0]
    assert out.startswith("FID: ") and "pytorch-fid convention, 2048-d" in out
    fid = float(out.split()[1])
    assert fid == pytest.approx(GOLDEN_FID_2048, rel=1e-3)

    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    inception = pytest.importorskip("pytorch_fid.inception")
    model = inception.InceptionV3([3]).to(device)
    worst = 0.0
    for folder, stats in ((folders["a8"], stats_a), (folders["b8"], stats_b)):
        reference = fid_score.compute_statistics_of_path(folder, model, 50, 2048, device, 0)
        worst = max(
            [worst] + [np.abs(a - b).max() for a, b in zip(em.load_stats(stats), reference)]
        )
    assert worst <= 1e-5
    report(
        f"FID statistics mu / sigma on {device.type}, 8 images per set, 2048-d",
        "pytorch_fid compute_statistics_of_path",
        worst,
    )


def test_generator_and_batches_equal_in_memory_stats(ours64_cpu):
    images = smooth_images(10, 32, 32, seed=10)
    expected_mu, expected_sigma = em.feature_stats(em.inception_features(images, ours64_cpu))
    stretched = 1.4 * images - 0.2  # the generator overshoots: clamped to [0, 1] inside

    chunks = iter(stretched.split(4))

    def generate(k):  # called with k = 4, 4, 2
        chunk = next(chunks)
        assert chunk.shape[0] == k
        return chunk

    with pytest.warns(em.MetricWarning, match="10 images < 2048"):
        mu, sigma = em.stats_from_generator(generate, 10, ours64_cpu, batch_size=4, progress=False)
    clamped_mu, clamped_sigma = em.feature_stats(
        em.inception_features(stretched.clamp(0, 1), ours64_cpu)
    )
    np.testing.assert_allclose(mu, clamped_mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, clamped_sigma, rtol=0, atol=1e-12)

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.arange(10)), batch_size=4
    )
    with pytest.warns(em.MetricWarning):
        mu, sigma, n = em.stats_from_batches(loader, ours64_cpu, progress=False)
    assert n == 10
    np.testing.assert_allclose(mu, expected_mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=0, atol=1e-12)
    with pytest.warns(em.MetricWarning):
        mu7, _, n7 = em.stats_from_batches(loader, ours64_cpu, max_images=7, progress=False)
    assert n7 == 7
    np.testing.assert_allclose(
        mu7, em.inception_features(images[:7], ours64_cpu).mean(axis=0), rtol=0, atol=1e-12
    )

    def constant(k):
        return torch.full((k, 3, 16, 16), 100.6 / 255)

    for mode, level in (("round", 101.0), ("truncate", 100.0), ("none", 100.6)):
        with pytest.warns(em.MetricWarning):
            mu, _ = em.stats_from_generator(constant, 2, ours64_cpu, progress=False, quantize=mode)
        expected = em.inception_features(torch.full((1, 3, 16, 16), level / 255), ours64_cpu)[0]
        np.testing.assert_allclose(mu, expected, rtol=0, atol=1e-6)
    with pytest.raises(em.MetricInputError, match="at least 2 images"):
        em.stats_from_batches([images[:1]], ours64_cpu, progress=False)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def assert_cli_error(capsys, argv, needle):
    assert em.main(argv) == 2
    err = capsys.readouterr()[1]
    assert err.startswith("eval_metrics.py: error: ") and err.count("\n") == 1 and needle in err, err


def test_bad_weights_and_folders(weights_file, folders, tmp_path, capsys, monkeypatch):
    wrong_keys = str(tmp_path / "wrong_keys.pth")
    torch.save({"conv.weight": torch.zeros(1)}, wrong_keys)
    assert_cli_error(
        capsys, ["fid", folders["a8"], folders["b8"], "--weights", wrong_keys], "wrong keys"
    )
    corrupt = str(tmp_path / "corrupt.pth")
    with open(corrupt, "wb") as handle:
        handle.write(b"\x00" * 100)
    assert_cli_error(
        capsys,
        ["fid", folders["a8"], folders["b8"], "--weights", corrupt],
        "cannot read Inception weights",
    )
    state = torch.load(weights_file, weights_only=True)
    state["fc.weight"] = torch.zeros(10, 2048)
    wrong_shape = str(tmp_path / "wrong_shape.pth")
    torch.save(state, wrong_shape)
    assert_cli_error(
        capsys,
        ["stats", folders["a8"], str(tmp_path / "x.npz"), "--weights", wrong_shape],
        "do not fit",
    )
    assert_cli_error(
        capsys,
        ["fid", folders["a8"], folders["b8"], "--weights", str(tmp_path / "none.pth")],
        "no such Inception weights file",
    )

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert_cli_error(capsys, ["fid", folders["a8"], folders["b8"]], "--weights PATH")

    one = str(tmp_path / "one")
    save_folder(one, smooth_images(1, 32, 32, seed=11), [("png", "RGB")])
    assert_cli_error(
        capsys, ["fid", one, folders["b8"], "--weights", weights_file], "at least 2 images"
    )
    assert_cli_error(capsys, ["fid", str(tmp_path / "missing"), folders["b8"]], "no such folder")
    stats_64 = str(tmp_path / "s64.npz")
    em.save_stats(stats_64, np.zeros(64), np.eye(64))
    assert_cli_error(
        capsys, ["fid", stats_64, folders["b8"], "--weights", weights_file], "64-d statistics"
    )
    bad_npz = str(tmp_path / "bad.npz")
    np.savez(bad_npz, mean=np.zeros(3))
    assert_cli_error(capsys, ["fid", bad_npz, stats_64], "lacks the keys")
