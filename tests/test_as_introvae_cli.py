"""as_introvae.py end to end on tiny generated data: one smoke run per model through the command
line, resume equality (N steps in one go == k steps + resume + N - k steps, bit for bit), --eval
with an Inception (random weights), and every kind of bad input ending in one line and exit 2."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import as_introvae as asv
import eval_metrics
from helpers import assert_identical, npz_run_flags, pattern_images, run_script

pytestmark = pytest.mark.usefixtures("one_thread", "offline_torch_home")


def tiny_flags(data, out, *extra):
    return npz_run_flags(data, out, "--epochs", "3", *extra, every=2)


def run_cli(args, cwd):
    return run_script("as_introvae.py", args, cwd)


# --------------------------------------------------------------------------------------------------
# one smoke run per model through the command line
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, extra",
    [
        ("asintrovae", ["--fid-samples", "8"]),
        ("asintrovae", ["--variant", "official"]),
        ("sintrovae", ["--num-vae", "1"]),
        ("introvae", []),
        ("vae", []),
    ],
)
def test_smoke_run_per_model(data, tmp_path, model, extra):
    out = tmp_path / "run"
    result = run_cli(tiny_flags(data, out, "--model", model, "--max-iters", "4", *extra), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(f"new run {out}: {model}")
    config = result.stdout.split("\nconfig: ")[1].split(")\n")[0].replace("\n  ", " ")
    assert f"--model {model} " in config and "--channels 8,16 --z-dim 4 --batch-size 8" in config
    for name in (
        "config.json",
        "log.jsonl",
        "curves.png",
        "grid_0000002.png",
        "grid_0000004.png",
        "checkpoint.pt",
        "results.json",
        "samples.png",
        "interpolation.png",
        "reconstruction.png",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # no reconstruction record before 1000
    loss_keys = {"loss"} if model == "vae" else {"loss_e", "loss_d", "kl_rec", "kl_fake", "kl_diff"}
    assert loss_keys <= set(records[-1]) and "img_per_s" in records[-1]
    if model == "asintrovae":
        assert {"as_dist", "c", "exp_elbo_rec", "exp_elbo_fake"} <= set(records[-1])
        # T = 3 iterations/epoch * 3 epochs = 9; c is logged for the last step of each record (t =
        # step - 1)
        schedule = "tanh" if "official" in extra else "linear"
        assert [r["c"] for r in records] == [
            asv.annealing_coefficient(r["step"] - 1, 9, schedule) for r in records
        ]
    results = json.loads((out / "results.json").read_text())
    rec = results["reconstruction"]
    assert (
        rec["split"] == "test"
        and rec["images"] == 12
        and 0 < rec["mse"] < 1
        and 0 < rec["psnr"] < 60
    )
    assert results["step"] == 4 and results["bn_mode"] == "train"
    with Image.open(out / "samples.png") as grid:
        assert grid.size == (8 * 18 + 2, 8 * 18 + 2)  # 8 x 8 images of 16 px, 2 px padding
    if (
        "--fid-samples" in extra
    ):  # no weights offline: one line on how to provide them, the rest still ran
        assert results["fid"]["value"] is None and "--fid-weights" in results["fid"]["note"]
        assert (
            sum(
                "FID skipped" in line and "(--fid-weights PATH)" in line
                and "--weights" not in line.replace("--fid-weights", "")
                for line in result.stdout.splitlines()
            )
            == 1
        )


def test_help_shows_the_presets_and_defaults_as_typed(capsys):
    assert asv.main(["--help"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "--z-dim Z_DIM latent size D (default: from the dataset preset (see below); without " \
        "one 128)" in flat
    assert "--hflip true|false" in flat and "--channels C1,C2,..." in flat
    assert "--fid-weights FID_WEIGHTS" in flat and "(default: none)" in flat
    mnist = next(line for line in text.splitlines() if line.startswith("  mnist "))
    assert mnist.split() == ["mnist", "28", "64,128", "32", "128", "100", "1.0", "1.0", "256.0",
                             "10.0", "false"]


def test_folder_dataset_and_real_cli_exit_code(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(pattern_images(6, 2, size=20)):  # resized to --image-size 16
        Image.fromarray(image).save(folder / f"{i}.png")
    out = tmp_path / "run"
    args = [
        "--dataset",
        "folder",
        "--data-root",
        str(folder),
        "--image-size",
        "16",
        "--channels",
        "8,16",
        "--z-dim",
        "4",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--model",
        "vae",
        "--fid-samples",
        "0",
        "--num-workers",
        "0",
        "--out",
        str(out),
    ]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert (
        results["reconstruction"]["split"].startswith("train")
        and results["reconstruction"]["images"] == 6
    )
    result = run_cli(["--dataset", "folder", "--data-root", str(tmp_path / "nowhere")], tmp_path)
    assert (
        result.returncode == 2
        and result.stderr.strip().count("\n") == 0
        and "does not exist" in result.stderr
    )


# --------------------------------------------------------------------------------------------------
# resume: N steps in one go == k steps + resume + N - k steps, exactly
# --------------------------------------------------------------------------------------------------
def test_resume_equals_one_go(data, tmp_path, capsys):
    flags = ["--hflip", "1", "--ckpt-every", "3"]  # hflip draws from the training RNG every step
    assert asv.main(tiny_flags(data, tmp_path / "one_go", "--max-iters", "7", *flags)) == 0
    assert (
        asv.main(tiny_flags(data, tmp_path / "resumed", "--max-iters", "4", *flags)) == 0
    )  # k = 4: mid-epoch 2
    with open(
        tmp_path / "resumed" / "log.jsonl", "a"
    ) as log_file:  # as if killed after logging step 5, before its checkpoint
        log_file.write(json.dumps({"step": 5, "epoch": 2, "loss_e": 0.0}) + "\n")
    capsys.readouterr()
    assert asv.main(tiny_flags(data, tmp_path / "resumed", "--max-iters", "7", *flags)) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    c_at_4 = asv.annealing_coefficient(4, 9)
    checkpoint = tmp_path / "resumed" / "checkpoint.pt"
    assert first_line == f"resuming from {checkpoint} at step 4 of 9 (c = {c_at_4:.6f})"

    one = torch.load(tmp_path / "one_go" / "checkpoint.pt", weights_only=True)
    two = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert (
        one["step"] == two["step"] == 7 and one["epoch"] == two["epoch"] == 2
    )  # 3 iterations per epoch
    for part in ("nets", "opts", "rng"):
        assert_identical(one[part], two[part], part)

    def log(run):
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in lines]

    assert log("one_go") == log("resumed")  # nothing lost, nothing logged twice
    assert (
        json.loads((tmp_path / "one_go" / "results.json").read_text())["reconstruction"]
        == json.loads((tmp_path / "resumed" / "results.json").read_text())["reconstruction"]
    )


# --------------------------------------------------------------------------------------------------
# --eval alone, with a (random-weight) FID Inception
# --------------------------------------------------------------------------------------------------
def test_eval_checkpoint_with_fid(data, tmp_path, capsys):
    assert asv.main(tiny_flags(data, tmp_path / "run", "--max-iters", "2")) == 0
    weights = tmp_path / "inception.pt"
    torch.save(eval_metrics.InceptionV3FID().state_dict(), weights)
    out = tmp_path / "eval"
    with pytest.warns(eval_metrics.MetricWarning):
        code = asv.main(
            [
                "--eval",
                str(tmp_path / "run" / "checkpoint.pt"),
                "--fid-weights",
                str(weights),
                "--fid-samples",
                "5",
                "--eval-images",
                "8",
                "--out",
                str(out),
            ]
        )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert np.isfinite(results["fid"]["value"]) and results["fid"]["value"] >= 0
    assert results["fid"]["reference_images"] == 5 and results["fid"]["generated"] == 5
    assert results["reconstruction"]["images"] == 8 and results["step"] == 2
    assert (out / "samples.png").is_file() and (out / "interpolation.png").is_file()


# --------------------------------------------------------------------------------------------------
# bad input: one line, exit 2
# --------------------------------------------------------------------------------------------------
def bad_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(pattern_images(1, 0)[0]).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png at all")
    return [
        "--dataset",
        "folder",
        "--data-root",
        str(folder),
        "--image-size",
        "16",
        "--channels",
        "8,16",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--out",
        str(tmp_path / "r"),
    ]


def corrupt_checkpoint(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"\x00garbage" * 100)
    return ["--eval", str(path)]


def foreign_checkpoint(tmp_path):
    torch.save({"model": torch.zeros(2)}, tmp_path / "other.pt")
    return ["--eval", str(tmp_path / "other.pt")]


def empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return ["--dataset", "folder", "--data-root", str(tmp_path / "empty")]


BAD_INPUTS = {
    "unknown dataset": (lambda tmp, data: ["--dataset", "imagenet"], "invalid choice"),
    "mistyped value": (lambda tmp, data: ["--batch-size", "sixty"], "invalid int value"),
    "unknown flag": (lambda tmp, data: ["--learning-rate", "1"], "unrecognized arguments"),
    "missing folder": (
        lambda tmp, data: ["--dataset", "oxford", "--data-root", str(tmp / "none")],
        "does not exist",
    ),
    "empty folder": (lambda tmp, data: empty_folder(tmp), "no images"),
    "unreadable image": (lambda tmp, data: bad_folder(tmp), "unreadable image"),
    "missing npz": (
        lambda tmp, data: ["--dataset", "npz", "--data-root", str(tmp / "x.npz")],
        "no such .npz",
    ),
    "wrong size": (
        lambda tmp, data: tiny_flags(data, tmp / "r", "--image-size", "32"),
        "this run expects",
    ),
    "corrupt checkpoint": (
        lambda tmp, data: corrupt_checkpoint(tmp),
        "(UnpicklingError): corrupt or not a checkpoint; delete it to start the run over",
    ),
    "foreign checkpoint": (
        lambda tmp, data: foreign_checkpoint(tmp),
        "not an as_introvae.py checkpoint",
    ),
    "bf16 both outside the bench": (
        lambda tmp, data: tiny_flags(data, tmp / "r", "--bf16", "both"),
        "--bf16 both times both precisions with --bench",
    ),
    "table of nothing": (lambda tmp, data: ["--table", str(tmp / "none")], "is not a folder"),
    "NaN loss": (
        lambda tmp, data: tiny_flags(data, tmp / "r", "--lr", "1e30"),
        "non-finite loss at step 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, data, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    assert asv.main(make_args(tmp_path, data)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("as_introvae.py: error: ") and message in err[0], err


def test_mismatched_checkpoint_on_resume(data, tmp_path, capsys):
    assert asv.main(tiny_flags(data, tmp_path / "run", "--max-iters", "1")) == 0
    capsys.readouterr()
    assert asv.main(tiny_flags(data, tmp_path / "run", "--max-iters", "2", "--z-dim", "5")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was made with --z-dim 4, this command has 5" in err[0]


# --------------------------------------------------------------------------------------------------
# the reconstruction record during training, and --table over finished runs
# --------------------------------------------------------------------------------------------------
def test_reconstruction_record_is_the_final_evaluation_and_leaves_training_alone(data, tmp_path):
    """--recon-every 4 logs PSNR / SSIM / MSE at steps 4, 8 and T = 9; at T it equals
    results.json's score of the same 12 test images, and a run without records trains the same
    weights, optimiser state and RNG bit for bit (the record draws nothing and restores
    BatchNorm's running averages)."""
    for name, every in (("with", "4"), ("without", "0")):
        flags = tiny_flags(data, tmp_path / name, "--recon-every", every, "--recon-images", "12")
        assert asv.main(flags) == 0
    lines = (tmp_path / "with" / "log.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "eval_psnr" in r]
    assert [(r["step"], r["eval_images"]) for r in records] == [(4, 12), (8, 12), (9, 12)]
    assert records[0]["eval_mse"] != records[1]["eval_mse"]
    final = json.loads((tmp_path / "with" / "results.json").read_text())["reconstruction"]
    assert final["images"] == 12
    for key in ("psnr", "ssim", "mse"):
        assert records[-1][f"eval_{key}"] == pytest.approx(final[key], rel=1e-12), key
    assert "eval_psnr" not in (tmp_path / "without" / "log.jsonl").read_text()
    one, two = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
                for name in ("with", "without"))
    for part in ("nets", "opts", "rng"):
        assert_identical(one[part], two[part], part)
    assert asv.main(["--table", f"{tmp_path / 'with'},{tmp_path / 'without'}",
                     "--out", str(tmp_path / "table")]) == 0
    assert {"table.md", "curves.png", "pictures.png"} <= {p.name for p in
                                                        (tmp_path / "table").iterdir()}


def fake_run(folder, model, seed, psnr, ssim, mse, variant="paper"):
    """A finished run folder as training leaves it, with the given final scores."""
    folder.mkdir(parents=True)
    config = {"model": model, "variant": variant, "dataset": "mnist", "seed": seed}
    (folder / "config.json").write_text(json.dumps(config))
    results = {"step": 300, "reconstruction": {"psnr": psnr, "ssim": ssim, "mse": mse,
                                               "images": 10000}}
    (folder / "results.json").write_text(json.dumps(results))
    records = [{"step": 100 * k, "kl_real": 10.0 + k + seed, "img_per_s": 1.0} for k in (1, 2, 3)]
    records += [{"step": 150 * k, "eval_psnr": psnr - 3 + k, "eval_ssim": ssim,
                 "eval_mse": mse, "eval_images": 100} for k in (1, 2)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, size in (("samples.png", (242, 242)), ("reconstruction.png", (482, 62))):
        Image.new("RGB", size, (seed * 40, 0, 0)).save(folder / name)


def test_table_means_and_sample_spread_over_seeds_beside_the_paper(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs / "as_s0", "asintrovae", 0, 21.5, 0.9, 0.0072)
    fake_run(runs / "s_s1", "sintrovae", 1, 21.0, 0.8, 0.010)
    fake_run(runs / "s_s0", "sintrovae", 0, 19.0, 0.6, 0.014)
    fake_run(runs / "vae_s0", "vae", 0, 18.0, 0.5, 0.02)
    fake_run(runs / "official_s0", "asintrovae", 0, 17.0, 0.4, 0.03, variant="official")
    (runs / "unfinished").mkdir()  # no results.json: not a run of the table
    assert asv.main(["--table", str(runs), "--out", str(tmp_path / "t")]) == 0
    rows = (tmp_path / "t" / "table.md").read_text().split("\n\n")[0].splitlines()[2:]
    # S-IntroVAE: mean of 19 and 21 is 20, sample std sqrt(2) = 1.414; 0.6, 0.8 -> 0.7 ± 0.141
    assert rows == [
        "| VAE | 0 | 18.000 | 0.500 | 0.0200 |  |",
        "| S-IntroVAE | 0,1 | 20.000 ± 1.414 | 0.700 ± 0.141 | 0.0120 ± 0.0028 "
        "| 20.282 / 0.885 / 0.011 |",
        "| AS-IntroVAE | 0 | 21.500 | 0.900 | 0.0072 | 21.014 / 0.898 / 0.009 |",
        "| AS-IntroVAE (official) | 0 | 17.000 | 0.400 | 0.0300 |  |",
    ]
    with Image.open(tmp_path / "t" / "pictures.png") as sheet:
        # four methods, three a row: 242 px samples doubled to 484, a 16 px margin; reconstructions
        # 482 -> 484 wide
        assert sheet.size == (3 * (484 + 16), 2 * (484 + 62 + 64))
        assert sheet.getpixel((8 + 100, 32 + 100)) == (0, 0, 0)  # VAE seed 0's picture
    with Image.open(tmp_path / "t" / "curves.png") as curves:
        assert curves.size == (2 * 460, 24 + 16 * 2 + 2 * 300)


def test_retyping_a_finished_run_says_done_and_evaluates_nothing(data, tmp_path, capsys):
    flags = tiny_flags(data, tmp_path / "run", "--max-iters", "2")
    assert asv.main(flags) == 0
    stamp = (tmp_path / "run" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert asv.main(flags) == 0
    out = capsys.readouterr().out
    assert f"already done: {tmp_path / 'run'} holds the run trained to step 2" in out
    assert (tmp_path / "run" / "results.json").stat().st_mtime_ns == stamp
    (tmp_path / "run" / "results.json").unlink()  # outputs missing: evaluated again
    assert asv.main(flags) == 0 and (tmp_path / "run" / "results.json").exists()
