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
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import eval_metrics as em


def report(metric, oracle, difference):
    print(f"\nAGREEMENT {metric} vs {oracle}: max |diff| = {difference:.3g}")


def smooth_images(n, h, w, seed):
    """(n, 3, h, w) float32 in [0, 1], upsampled from seeded numpy noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3, 8, 8))).float()
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


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
    """Random, BN-calibrated FID weights in a temporary torch hub cache (TORCH_HOME set for the module)."""
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
        model.train()(smooth_images(8, 32, 32, seed=100))
    torch.save(model.state_dict(), path)
    previous = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(torch_home)
    yield str(path)
    if previous is None:
        del os.environ["TORCH_HOME"]
    else:
        os.environ["TORCH_HOME"] = previous


@pytest.fixture(scope="module")
def ours(weights_file):
    with pytest.warns(em.MetricWarning, match="not the official"):
        return em.load_inception()  # weights=None: the torch hub cache, like pytorch-fid


@pytest.fixture(scope="module")
def reference(weights_file):
    inception = pytest.importorskip("pytorch_fid.inception")
    return inception.InceptionV3([0, 1, 2, 3]).eval()  # loads the cached file with strict=True


def reference_features(model, images, dims):
    """pytorch-fid's get_activations step for one batch: its block output, average-pooled, float64."""
    block = model(images)[em.CHOICES["dims"].index(dims)]
    if block.shape[2] != 1 or block.shape[3] != 1:
        block = torch.nn.functional.adaptive_avg_pool2d(block, output_size=(1, 1))
    return block.flatten(1).double().numpy()


def save_folder(folder, images, kinds):
    """Images as 8-bit files; kinds cycles through (extension, PIL mode)."""
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        extension, mode = kinds[i % len(kinds)]
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).convert(mode).save(os.path.join(folder, f"{i:03d}.{extension}"), quality=90)
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
    fid_net = inception.fid_inception_v3()  # pytorch-fid's own tree, its own strict load of our file
    assert set(fid_net.state_dict()) == set(em.InceptionV3FID().state_dict())


def test_features_bit_identical_to_pytorch_fid(ours, reference, weights_file):
    batches = [smooth_images(3, 32, 32, seed=1), smooth_images(1, 299, 299, seed=2), smooth_images(2, 96, 128, seed=3)]
    worst = 0.0
    for dims in em.CHOICES["dims"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", em.MetricWarning)
            model = ours if dims == 2048 else em.load_inception(weights_file, dims=dims)
        for images in batches:
            with torch.no_grad():
                expected = reference_features(reference, images, dims)
            got = em.inception_features(images, model)
            assert got.shape == (images.shape[0], dims) and got.dtype == np.float64
            worst = max(worst, np.abs(got - expected).max())
    assert worst == 0.0
    report("Inception features, 64/192/768/2048-d, equal batches", "pytorch-fid InceptionV3", worst)


def test_grey_and_rgba_tensors_match_rgb(ours):
    rgb = smooth_images(2, 32, 32, seed=4)
    grey = rgb[:, :1]
    np.testing.assert_array_equal(em.inception_features(grey, ours), em.inception_features(grey.expand(-1, 3, -1, -1), ours))
    rgba = torch.cat([rgb, torch.rand(2, 1, 32, 32)], dim=1)
    np.testing.assert_array_equal(em.inception_features(rgba, ours), em.inception_features(rgb, ours))


def test_always_eval_mode_unless_bn_batch_stats(ours, weights_file):
    images = smooth_images(4, 32, 32, seed=5)
    expected = em.inception_features(images, ours)
    ours.train()  # a caller's slip: features must still be eval-mode ones
    np.testing.assert_array_equal(em.inception_features(images, ours), expected)
    assert not ours.training
    with pytest.warns(em.MetricWarning):
        train_mode = em.load_inception(weights_file, bn_batch_stats=True)
    assert train_mode.training
    before = copy.deepcopy(train_mode.state_dict())
    batch_stats = em.inception_features(images, train_mode, batch_size=4)
    assert np.abs(batch_stats - expected).max() > 1e-2  # per-batch normalisation changes the features
    for key, tensor in train_mode.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(tensor, before[key]), key  # running statistics never move


def test_bn_batch_stats_equals_pytorch_fid_train_mode(weights_file):
    inception = pytest.importorskip("pytorch_fid.inception")
    reference_train = inception.InceptionV3([3]).train()  # Soft-IntroVAE never calls .eval()
    with pytest.warns(em.MetricWarning):
        model = em.load_inception(weights_file, bn_batch_stats=True)
    images = smooth_images(4, 32, 32, seed=6)
    with torch.no_grad():
        expected = reference_train(images)[0].flatten(1).double().numpy()
    batches = [(images, torch.zeros(4))]  # a DataLoader's (images, labels): the loader batch is the BN batch
    with pytest.warns(em.MetricWarning, match="< 2048"):
        mu, sigma, n = em.stats_from_batches(batches, model, batch_size=2, progress=False)
    got = em.inception_features(images, model, batch_size=4)
    assert np.abs(got - expected).max() == 0.0 and n == 4
    np.testing.assert_allclose(mu, expected.mean(axis=0), rtol=0, atol=1e-12)
    report("bn_batch_stats features", "pytorch-fid InceptionV3 in train mode", np.abs(got - expected).max())


def test_golden_features(ours):
    features = em.inception_features(smooth_images(3, 32, 32, seed=7), ours)
    assert features.sum() == pytest.approx(2268.2392578125, rel=1e-4)
    np.testing.assert_allclose(features[0, :3], [0.3312857449054718, 0.44722461700439453, 0.1706005036830902], rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# folders, statistics, FID end to end
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two 32x32 sets in mixed formats: 70 each (full rank at 64-d) and their first 12 (for 2048-d)."""
    root = tmp_path_factory.mktemp("fid_folders")
    set_a = smooth_images(70, 32, 32, seed=8)
    set_b = (0.8 * smooth_images(70, 32, 32, seed=9) + 0.1).clamp(0, 1)
    return {
        "a": save_folder(str(root / "a"), set_a, [("png", "RGB"), ("png", "L"), ("png", "RGBA")]),
        "b": save_folder(str(root / "b"), set_b, [("jpg", "RGB"), ("webp", "RGB"), ("bmp", "RGB")]),
        "a12": save_folder(str(root / "a12"), set_a[:12], [("png", "RGB"), ("png", "L")]),
        "b12": save_folder(str(root / "b12"), set_b[:12], [("jpg", "RGB"), ("bmp", "RGB")]),
    }


def test_fid_end_to_end_vs_pytorch_fid_64d(folders, weights_file):
    with pytest.warns(em.MetricWarning):
        fid = em.fid_from_dirs(folders["a"], folders["b"], dims=64)
    assert fid == pytest.approx(0.6585049781799316, rel=1e-3)
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    reference = fid_score.calculate_fid_given_paths([folders["a"], folders["b"]], batch_size=50, device="cpu",
                                                    dims=64, num_workers=0)
    assert abs(fid - reference) <= 1e-3
    report("FID end to end, 70 vs 70 images, 64-d (full rank)", "pytorch_fid calculate_fid_given_paths", abs(fid - reference))


def test_stats_cli_and_fid_2048d_vs_pytorch_fid(folders, weights_file, tmp_path, capsys):
    stats_a = str(tmp_path / "a12.npz")
    assert em.main(["stats", folders["a12"], stats_a, "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "saved mu (2048,) and sigma (2048, 2048) of 12 images" in out
    assert "warning: " in err and "12 images < 2048" in err and "not the official" in err
    mu_a, sigma_a = em.load_stats(stats_a)
    with np.load(stats_a) as raw:
        assert sorted(raw.files) == ["mu", "sigma"] and raw["sigma"].dtype == np.float64
    assert em.main(["fid", stats_a, folders["b12"], "--no-progress"]) == 0
    out_npz = capsys.readouterr()[0]
    assert em.main(["fid", folders["a12"], folders["b12"], "--no-progress"]) == 0
    out_dirs = capsys.readouterr()[0]
    assert out_npz == out_dirs and out_dirs.startswith("FID: ") and "2048-d" in out_dirs
    fid = float(out_dirs.split()[1])
    assert fid == pytest.approx(3.1290550231933594, rel=1e-3)

    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    inception = pytest.importorskip("pytorch_fid.inception")
    model = inception.InceptionV3([3])
    ref_a = fid_score.compute_statistics_of_path(folders["a12"], model, 50, 2048, "cpu", 0)
    ref_b = fid_score.compute_statistics_of_path(folders["b12"], model, 50, 2048, "cpu", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.MetricWarning)
        ours = em.load_inception()
    mu_b, sigma_b, _ = em.stats_from_path(folders["b12"], ours, progress=False)
    stat_diff = max(np.abs(mu_a - ref_a[0]).max(), np.abs(sigma_a - ref_a[1]).max(),
                    np.abs(mu_b - ref_b[0]).max(), np.abs(sigma_b - ref_b[1]).max())
    assert stat_diff <= 1e-5
    # pytorch-fid's scipy sqrtm at 2048-d takes tens of seconds and fails on 12 images; our Frechet
    # distance is checked against scipy in test_eval_metrics.py, here on its own statistics
    fid_reference_stats = em.frechet_distance(*ref_a, *ref_b)
    assert abs(fid - fid_reference_stats) <= 1e-3 * max(1.0, fid)
    report("FID statistics mu / sigma, 12 images, 2048-d", "pytorch_fid compute_statistics_of_path", stat_diff)


def test_generator_and_batches_equal_in_memory_stats(weights_file):
    with pytest.warns(em.MetricWarning):
        model = em.load_inception(weights_file, dims=64)
    images = smooth_images(10, 32, 32, seed=10)
    expected_mu, expected_sigma = em.feature_stats(em.inception_features(images, model))
    stretched = 1.4 * images - 0.2  # the generator overshoots: clamped to [0, 1] inside

    def generate(k, position=[0]):
        start, position[0] = position[0], position[0] + k
        return stretched[start:start + k]

    with pytest.warns(em.MetricWarning, match="10 images < 2048"):
        mu, sigma = em.stats_from_generator(generate, 10, model, batch_size=4, progress=False)
    clamped_mu, clamped_sigma = em.feature_stats(em.inception_features(stretched.clamp(0, 1), model))
    np.testing.assert_allclose(mu, clamped_mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, clamped_sigma, rtol=0, atol=1e-12)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(10)), batch_size=4)
    with pytest.warns(em.MetricWarning):
        mu, sigma, n = em.stats_from_batches(loader, model, progress=False)
    assert n == 10
    np.testing.assert_allclose(mu, expected_mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=0, atol=1e-12)
    with pytest.warns(em.MetricWarning):
        mu7, _, n7 = em.stats_from_batches(loader, model, max_images=7, progress=False)
    assert n7 == 7
    np.testing.assert_allclose(mu7, em.inception_features(images[:7], model).mean(axis=0), rtol=0, atol=1e-12)

    def constant(k):
        return torch.full((k, 3, 16, 16), 100.4 / 255)

    for mode, level in (("round", 100.0), ("truncate", 100.0), ("none", 100.4)):
        with pytest.warns(em.MetricWarning):
            mu, _ = em.stats_from_generator(constant, 2, model, progress=False, quantize=mode)
        expected = em.inception_features(torch.full((1, 3, 16, 16), level / 255), model)[0]
        np.testing.assert_allclose(mu, expected, rtol=0, atol=1e-6)
    with pytest.raises(em.MetricInputError, match="at least 2 images"):
        em.stats_from_batches([images[:1]], model, progress=False)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def assert_cli_error(capsys, argv, needle):
    assert em.main(argv) == 2
    err = capsys.readouterr()[1]
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_bad_weights_and_folders(weights_file, folders, tmp_path, capsys, monkeypatch):
    wrong_keys = str(tmp_path / "wrong_keys.pth")
    torch.save({"conv.weight": torch.zeros(1)}, wrong_keys)
    assert_cli_error(capsys, ["fid", folders["a12"], folders["b12"], "--weights", wrong_keys], "wrong keys")
    corrupt = str(tmp_path / "corrupt.pth")
    with open(corrupt, "wb") as handle:
        handle.write(b"\x00" * 100)
    assert_cli_error(capsys, ["fid", folders["a12"], folders["b12"], "--weights", corrupt], "cannot read Inception weights")
    state = torch.load(weights_file, weights_only=True)
    state["fc.weight"] = torch.zeros(10, 2048)
    wrong_shape = str(tmp_path / "wrong_shape.pth")
    torch.save(state, wrong_shape)
    assert_cli_error(capsys, ["stats", folders["a12"], str(tmp_path / "x.npz"), "--weights", wrong_shape], "do not fit")
    assert_cli_error(capsys, ["fid", folders["a12"], folders["b12"], "--weights", str(tmp_path / "none.pth")],
                     "no such Inception weights file")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert_cli_error(capsys, ["fid", folders["a12"], folders["b12"]], "--weights PATH")

    one = str(tmp_path / "one")
    save_folder(one, smooth_images(1, 32, 32, seed=11), [("png", "RGB")])
    assert_cli_error(capsys, ["fid", one, folders["b12"], "--weights", weights_file], "at least 2 images")
    assert_cli_error(capsys, ["fid", str(tmp_path / "missing"), folders["b12"]], "no such folder")
    stats_64 = str(tmp_path / "s64.npz")
    em.save_stats(stats_64, np.zeros(64), np.eye(64))
    assert_cli_error(capsys, ["fid", stats_64, folders["b12"], "--weights", weights_file], "do not match")
    bad_npz = str(tmp_path / "bad.npz")
    np.savez(bad_npz, mean=np.zeros(3))
    assert_cli_error(capsys, ["fid", bad_npz, stats_64], "lacks the keys")
