"""Speed of eval_metrics.py's FID pipeline next to pytorch-fid's (a benchmark, not a test: it needs
the test-only package pytorch-fid for the reference half and prints figures).

    python tests/bench_fid.py                      # CPU, 50 random images, best of 3 rounds
    python tests/bench_fid.py --device cuda --bench-images 500 --batch-size 100
    python tests/bench_fid.py --weights pt_inception-2015-12-05-6726825d.pth --bench-frechet false

Feature throughput (images/s, model forward only) of both Inceptions on the same random images and
the same weights file (random weights when no FID weights file is at hand: speed does not depend
on the values), their largest feature difference, and the 2048-d Frechet distance's time.
"""

import dataclasses
import math
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_metrics as em  # noqa: E402  (the project's root, wherever this is run from)


@dataclasses.dataclass
class BenchConfig:
    weights: str = em.option("", "Inception weights file; default: torch hub cache, else random")
    device: str = em.option("cpu", "torch device, e.g. cpu or cuda")
    batch_size: int = em.option(50, "images per Inception forward")
    bench_images: int = em.option(50, "images pushed through each Inception")
    bench_size: int = em.option(32, "side of the random test images (resized to 299 inside)")
    bench_rounds: int = em.option(3, "timed rounds per extractor, alternating; the best counts")
    bench_frechet: bool = em.option(True, "also time the 2048-d Frechet distance (tens of s)")


def run_bench(cfg):
    """Feature throughput (images/s, model forward only, tensors in) and Frechet time at
    2048-d, ours next to pytorch-fid's on the same random images and the same weights file (random
    weights when no FID weights file is available: speed does not depend on the values). Rounds
    alternate between the two; the best round of each is reported (other load on the machine only
    ever slows a round). Returns {"features": {name: images/s}, "frechet": {name: seconds}}."""
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance
        from pytorch_fid.inception import InceptionV3
    except ImportError:
        InceptionV3 = calculate_frechet_distance = None
        print("pytorch-fid is not installed (pip install pytorch-fid==0.3.0): no reference timing")
    torch.manual_seed(0)
    images = torch.rand(cfg.bench_images, 3, cfg.bench_size, cfg.bench_size)  # (N, 3, S, S)
    print(
        f"device {cfg.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{cfg.bench_images} images of {cfg.bench_size}x{cfg.bench_size}, batch {cfg.batch_size}, "
        f"best of {cfg.bench_rounds} rounds"
    )
    with tempfile.TemporaryDirectory() as torch_home:
        weights = cfg.weights or em.default_weights_path()
        if not os.path.isfile(weights):
            print("no FID weights file: timing random weights")
            weights = os.path.join(torch_home, "hub", "checkpoints", em.FID_WEIGHTS_FILE)
            os.makedirs(os.path.dirname(weights))
            torch.save(em.InceptionV3FID().state_dict(), weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", em.MetricWarning)
            model = em.load_inception(weights, cfg.device)
        extractors = {
            "eval_metrics": lambda batch: em.inception_features(
                batch, model, cfg.batch_size, cfg.device
            )
        }
        if InceptionV3 is not None:
            extractors["pytorch-fid"] = _pytorch_fid_extractor(
                InceptionV3, weights, torch_home, cfg
            )
        best, features = {name: math.inf for name in extractors}, {}
        for name, extract in extractors.items():
            # warm-up: oneDNN / cuDNN pick kernels for this batch shape
            extract(images[: cfg.batch_size])
        for _ in range(cfg.bench_rounds):
            for name, extract in extractors.items():
                start = time.perf_counter()
                # ends with a copy to the host: the device has finished
                features[name] = extract(images)
                best[name] = min(best[name], time.perf_counter() - start)
        result = {
            "features": {name: cfg.bench_images / best[name] for name in extractors},
            "frechet": {},
        }
        for name in extractors:
            print(f"features  {name:12s}: {result['features'][name]:8.2f} images/s")
        if "pytorch-fid" in features:
            difference = np.abs(features["eval_metrics"] - features["pytorch-fid"]).max()
            print(f"features  max |eval_metrics - pytorch-fid| = {difference:.3g}")
    if not cfg.bench_frechet:
        return result
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((2048, 2048)) / 45.0
    feats_a = np.abs(rng.standard_normal((4096, 2048))) @ mixing  # pool3-like, full rank
    feats_b = 1.1 * np.abs(rng.standard_normal((4096, 2048))) @ mixing + 0.05
    (mu_a, sigma_a), (mu_b, sigma_b) = em.feature_stats(feats_a), em.feature_stats(feats_b)
    for method in ("symmetric", "eigvals"):
        start = time.perf_counter()
        fid = em.frechet_distance(mu_a, sigma_a, mu_b, sigma_b, method=method)
        seconds = result["frechet"][f"eval_metrics {method}"] = time.perf_counter() - start
        print(f"Frechet 2048-d  eval_metrics {method:9s}: {seconds:7.2f} s  (FID {fid:.10f})")
    if calculate_frechet_distance is not None:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            fid = calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
        seconds = result["frechet"]["pytorch-fid"] = time.perf_counter() - start
        print(f"Frechet 2048-d  pytorch-fid (scipy sqrtm): {seconds:7.2f} s  (FID {fid:.10f})")
    return result


def _pytorch_fid_extractor(InceptionV3, weights, torch_home, cfg):
    """pytorch-fid's InceptionV3([3]) on the same weights file, as images -> (N, 2048) features.
    It reads weights only from torch hub's cache, hence the TORCH_HOME swap."""
    cache = os.path.join(torch_home, "hub", "checkpoints", em.FID_WEIGHTS_FILE)
    if os.path.abspath(weights) != os.path.abspath(cache):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        os.symlink(os.path.abspath(weights), cache)
    previous = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = torch_home
    try:
        reference = InceptionV3([3]).to(cfg.device).eval()
    finally:
        if previous is None:
            del os.environ["TORCH_HOME"]
        else:
            os.environ["TORCH_HOME"] = previous

    def extract(images):
        features = np.empty((images.shape[0], 2048))
        with torch.no_grad():
            for first in range(0, images.shape[0], cfg.batch_size):
                batch = images[first : first + cfg.batch_size].to(cfg.device)
                features[first : first + batch.shape[0]] = (
                    reference(batch)[0].flatten(1).cpu().numpy()
                )
        return features

    return extract


def main(argv=None):
    parser = em.OneLineParser(prog="bench_fid.py", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(BenchConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default,
                            type=em.parse_bool if f.type is bool else f.type,
                            help=f"{f.metadata['help']} (default: {f.default})")
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    if min(cfg.batch_size, cfg.bench_images, cfg.bench_size, cfg.bench_rounds) < 1:
        parser.error("--batch-size and the --bench-* values must be positive")
    run_bench(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
