"""as_introvae.py's AVAE-S models end to end on tiny generated 32 px data (the Gabor bank needs 17
px): one smoke run per model through the command line, resume equality across the lambda probe and
the pretrain -> adversarial boundary, --eval with FID at the four Inception depths (random weights),
and bad input ending in one line."""

import json

import numpy as np
import pytest
import torch

import as_introvae as asv
import eval_metrics
from helpers import assert_identical, npz_run_flags, pattern_images, run_script

pytestmark = pytest.mark.usefixtures("one_thread", "offline_torch_home")

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    np.savez(folder / "train.npz", images=pattern_images(24, 0, SIZE))  # 3 batches of 8 per epoch
    np.savez(folder / "test.npz", images=pattern_images(10, 1, SIZE))
    np.savez(folder / "train25.npz", images=pattern_images(25, 0, SIZE))  # ends on a batch of 1
    return folder


def tiny_flags(data, out, *extra):
    return npz_run_flags(data, out, *extra, every=3)


def run_cli(args, cwd):
    return run_script("as_introvae.py", args, cwd)


# --------------------------------------------------------------------------------------------------
# one smoke run per model through the command line
# --------------------------------------------------------------------------------------------------
SMOKE = {
    "vae-s": ["--epochs", "2", "--lambda-batches", "2"],
    "avae": ["--pretrain-epochs", "1", "--adv-epochs", "1"],
    "avae-s": [
        "--pretrain-epochs",
        "1",
        "--adv-epochs",
        "1",
        "--lambda-batches",
        "2",
        "--arch",
        "avae",
    ],
}


@pytest.mark.parametrize("model", list(SMOKE))
def test_smoke_run_per_model(data, tmp_path, model):
    out = tmp_path / "run"
    result = run_cli(tiny_flags(data, out, "--model", model, *SMOKE[model]), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"new run {out}: {model}") and "T = 6, stop at 6" in lines[0]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # a record per step, then the reconstruction record at T = 6
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 6] and "eval_psnr" in records[-1]
    records = records[:-1]  # the training records
    assert all(np.isfinite(v) for r in records for k, v in r.items() if k.startswith("loss"))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    results = json.loads((out / "results.json").read_text())
    rec = results["reconstruction"]
    assert rec["images"] == 10 and 0 < rec["cosine"] <= 1 and 0 < rec["mse"] < 1
    assert (
        "65025" in results["sharpness"]["note"]
        and results["sharpness"]["reconstructed"]["mean"] > 0
    )
    if (
        model in asv.SHARP_MODELS
    ):  # the lambdas froze after 2 batches, said once, and train every later batch
        terms = {f"term_{name}" for name in asv.REC_TERMS}
        assert terms | {"tc", "loss", "rec", "kl_real"} <= set(records[0])
        frozen = state["avae_s"]["rec_weights"]
        assert (
            state["avae_s"]["term_count"] == 2
            and frozen["mse"] == 1.0
            and results["avae_s"]["rec_weights"] == frozen
        )
        assert (
            sum(
                line.startswith("AVAE-S Eq. 5 lambdas, frozen after 2 probe batches")
                for line in lines
            )
            == 1
        )
        for r in records[:2]:  # probe: trained on the SSE alone
            assert r["rec"] == pytest.approx(r["term_mse"], rel=1e-6)
        r = records[2]
        assert r["rec"] == pytest.approx(
            sum(frozen[name] * r[f"term_{name}"] for name in asv.REC_TERMS), rel=1e-5
        )
    if (
        model in asv.ADVERSARIAL_MODELS
    ):  # epoch 1 pre-trains, epoch 2 fine-tunes against the discriminator
        gates = {"loss_dis", "loss_adv", "disc_acc", "train_disc", "use_adv"}
        assert not gates & set(records[2]) and gates <= set(records[3])
        assert all(
            0 <= r[k] <= 1 for r in records[3:] for k in ("disc_acc", "train_disc", "use_adv")
        )
        assert {"disc"} <= set(state["nets"]) and {"disc"} <= set(state["opts"])
        assert state["avae_s"]["phase"] == results["avae_s"]["phase"] == "adversarial"
    if model == "avae-s":
        assert (
            results["arch"] == "avae" and "fc_logvar.weight" in state["nets"]["encoder"]
        )  # Table I nets


# --------------------------------------------------------------------------------------------------
# resume across the lambda probe and the pretrain -> adversarial boundary, exactly
# --------------------------------------------------------------------------------------------------
def test_resume_equals_one_go_across_probe_and_phase(data, tmp_path, capsys):
    flags = [
        "--model",
        "avae-s",
        "--pretrain-epochs",
        "1",
        "--adv-epochs",
        "1",
        "--lambda-batches",
        "2",
        "--hflip",
        "1",
    ]
    assert asv.main(tiny_flags(data, tmp_path / "one_go", *flags)) == 0
    assert (
        asv.main(tiny_flags(data, tmp_path / "resumed", "--max-iters", "1", *flags)) == 0
    )  # mid-probe
    middle = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["avae_s"]
    assert (middle["term_count"], middle["rec_weights"], middle["phase"]) == (1, None, "pretrain")
    assert (
        asv.main(tiny_flags(data, tmp_path / "resumed", "--max-iters", "4", *flags)) == 0
    )  # into the adversarial
    capsys.readouterr()
    assert asv.main(tiny_flags(data, tmp_path / "resumed", *flags)) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    checkpoint = tmp_path / "resumed" / "checkpoint.pt"
    assert first_line == f"resuming from {checkpoint} at step 4 of 6 (phase adversarial)"
    one = torch.load(tmp_path / "one_go" / "checkpoint.pt", weights_only=True)
    two = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert one["step"] == two["step"] == 6
    for part in ("nets", "opts", "rng", "avae_s"):
        assert_identical(one[part], two[part], part)

    def log(run):
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in lines]

    assert log("one_go") == log("resumed")


# --------------------------------------------------------------------------------------------------
# --eval: FID at the four depths (random Inception weights)
# --------------------------------------------------------------------------------------------------
def test_eval_reports_fid_at_four_depths(data, tmp_path, capsys):
    flags = ["--model", "avae", "--pretrain-epochs", "1", "--adv-epochs", "1", "--max-iters", "4"]
    assert asv.main(tiny_flags(data, tmp_path / "run", *flags)) == 0
    weights = tmp_path / "inception.pt"
    torch.manual_seed(0)
    torch.save(eval_metrics.InceptionV3FID().state_dict(), weights)
    capsys.readouterr()
    with pytest.warns(eval_metrics.MetricWarning):
        code = asv.main(
            [
                "--eval",
                str(tmp_path / "run" / "checkpoint.pt"),
                "--fid-weights",
                str(weights),
                "--fid-samples",
                "4",
                "--eval-images",
                "10",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
    assert code == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    fid = results["fid"]
    assert fid["value"] == fid["fid_2048"] and fid["generated"] == fid["reference_images"] == 4
    assert all(np.isfinite(fid[f"fid_{d}"]) and fid[f"fid_{d}"] >= 0 for d in (64, 192, 768, 2048))
    assert "only fid_2048 (= value) is comparable across papers" in fid["note"]
    assert results["avae_s"] == {"phase": "adversarial"} and results["step"] == 4
    assert "only 2048-d is comparable across papers" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# bad input: one line, exit 2
# --------------------------------------------------------------------------------------------------
BAD_INPUTS = {
    "epochs with avae": (
        lambda data, tmp: tiny_flags(data, tmp, "--model", "avae", "--epochs", "3"),
        "--epochs does not",
    ),
    "Table I at 28 px": (
        lambda data, tmp: ["--dataset", "mnist", "--arch", "avae"],
        "divisible by 16",
    ),
    "Gabor larger than the image": (
        lambda data, tmp: [
            "--dataset",
            "mnist",
            "--model",
            "vae-s",
            "--image-size",
            "16",
            "--channels",
            "8",
        ],
        "at least 17 px",
    ),
    "last batch of 1": (
        lambda data, tmp: tiny_flags(
            data, tmp, "--model", "vae-s", "--data-root", str(data / "train25.npz")
        ),
        "ends on a batch of 1",
    ),
    "unknown estimator": (lambda data, tmp: ["--tc-estimator", "mine"], "invalid choice"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, data, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    assert asv.main(make_args(data, tmp_path / "r")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("as_introvae.py: error: ") and message in err[0], err
