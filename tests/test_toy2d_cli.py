"""toy2d.py through its command line: a tiny full run, resume, and one-line rejection of bad
flags."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

import toy2d as toy2d_module
from helpers import ROOT, run_script

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--iters", "12", "--batch-size", "32", "--hidden", "16", "--n-eval", "300", "--grid", "64"]
KEYS = {
    "dataset",
    "method",
    "combo",
    "variant",
    "seed",
    "iters",
    "kl_paper",
    "jsd_paper",
    "kl",
    "jsd",
    "gnelbo",
    "modes",
    "hq_fraction",
    "seconds",
}


def toy2d(*args):
    return run_script("toy2d.py", args, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy2d") / "run"
    result = toy2d("--combo", "C2", *TINY, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_smoke_run_writes_results_samples_and_pngs(smoke):
    out, result = smoke
    records = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in records] == ["vae", "introvae", "sintrovae", "asintrovae"]
    for r in records:
        assert KEYS <= set(r)
        assert (r["dataset"], r["combo"], r["variant"], r["seed"], r["iters"]) == (
            "8gaussians",
            "C2",
            "paper",
            92,
            12,
        )
        assert (r["beta_kl"], r["beta_rec"], r["beta_neg"]) == (0.5, 0.1, 0.9)
        assert r["kl_paper"] >= 0 and 0 <= r["jsd"] <= np.log(2) + 1e-9 and 0 < r["gnelbo"] < 1
        assert 0 <= r["modes"] <= 8 and 0 <= r["hq_fraction"] <= 1
        tag = f"8gaussians_{r['method']}_C2_92"
        samples = np.load(out / f"samples_{tag}.npy")
        assert samples.shape == (300, 2) and np.isfinite(samples).all()
        for kind in ("scatter", "density"):
            with Image.open(out / f"{kind}_{tag}.png") as image:
                assert image.mode == "RGB" and min(image.size) > 64
    with Image.open(out / "overview_8gaussians_92.png") as image:
        assert image.width > 4 * 64 and image.height > 64  # 1 row (C2) x 4 columns
    table = result.stdout.splitlines()
    assert any(line.startswith("8gaussians   AS-IntroVAE C2") for line in table)
    assert "ms/iteration" not in result.stdout


def test_rerun_of_a_finished_run_says_done_and_evaluates_again_only_without_its_table(
    smoke, capsys
):
    out, _ = smoke
    before = json.loads((out / "results.json").read_text())
    stamp = (out / "results.json").stat().st_mtime_ns
    assert toy2d_module.main(["--combo", "C2", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "already done" in printed and "| AS-IntroVAE |" in printed
    assert (out / "results.json").stat().st_mtime_ns == stamp  # nothing evaluated again
    (out / "table.md").unlink()
    assert toy2d_module.main(["--combo", "C2", *TINY, "--out", str(out)]) == 0
    assert "at iteration 12" in capsys.readouterr().out
    after = json.loads((out / "results.json").read_text())
    for a, b in zip(before, after):
        assert a["kl_paper"] == b["kl_paper"] and a["gnelbo"] == b["gnelbo"]


def test_checkpoints_fall_every_tenth_of_the_run_unless_asked():
    def interval(*args):
        return toy2d_module.checkpoint_interval(toy2d_module.parse_config(list(args)))

    assert interval("--iters", "1500") == 150 and interval("--iters", "30000") == 2000
    assert interval("--iters", "120") == 50  # at least one data block
    assert interval("--iters", "1500", "--ckpt-every", "700") == 700


def test_a_short_default_run_killed_mid_training_resumes(tmp_path):
    """The real command, killed (SIGKILL) as soon as its first checkpoint exists, then typed
    again: it resumes from an iteration inside the run, without --ckpt-every."""
    args = ["--combo", "C2", "--methods", "vae", "--iters", "4000", "--batch-size", "8",
            "--hidden", "8", "--n-eval", "200", "--grid", "32", "--out", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "toy2d.py"), *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert checkpoint.exists() and not (tmp_path / "run" / "results.json").exists()
    result = run_script("toy2d.py", args, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    resumed_at = int(result.stdout.split("at iteration ")[1].split()[0])
    assert resumed_at % 400 == 0 and 0 < resumed_at < 4000  # a tenth of --iters


def test_checkpoint_from_other_flags_is_refused(smoke, capsys):
    out, _ = smoke
    assert toy2d_module.main(["--combo", "C1", *TINY, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "other flags" in lines[0]


def test_trace_table_and_coverage(smoke):
    """Coverage is recorded at every block end of --trace-every (and at the end); the record at
    t = iters is the final evaluation itself (same points, same histogram)."""
    out, _ = smoke
    records = json.loads((out / "results.json").read_text())
    for r in records:
        assert [e["t"] for e in r["trace"]] == [12]  # trace_every 1000 > iters: only the end
        assert r["trace"][-1]["modes"] == r["modes"]
        assert r["trace"][-1]["kl_paper"] == pytest.approx(round(r["kl_paper"], 3), abs=1e-12)
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith(
        "| dataset | combo | method | setting | seeds | KL ours | KL published | JSD ours |"
    )
    as_row = next(line for line in table if "| AS-IntroVAE |" in line)
    assert "| 12 it | 1 |" in as_row  # one seed, 12 iterations instead of the protocol's 30000
    assert "| 1.3 (at 30000 it) |" in as_row and "| 4.4 (at 30000 it) |" in as_row  # Table 1, C2
    with Image.open(out / "coverage.png") as image:
        assert image.width > 300 and image.height > 150


def test_killed_run_resumes_mid_training_and_ends_as_an_unbroken_run(tmp_path, monkeypatch, capsys):
    """A kill after the first checkpoint (iteration 50 of 150), then the same command: the
    resumed run trains 100 more iterations and ends bit-identical to a run never stopped."""
    args = [
        "--combo",
        "C2",
        "--methods",
        "sintrovae,asintrovae",
        "--iters",
        "150",
        "--batch-size",
        "16",
        "--hidden",
        "8",
        "--n-eval",
        "200",
        "--grid",
        "32",
        "--trace-every",
        "50",
        "--ckpt-every",
        "50",
    ]
    assert toy2d_module.main(args + ["--out", str(tmp_path / "straight")]) == 0
    real_train = toy2d_module.train

    def killed_after_first_checkpoint(groups, cfg, start, stop, *rest, **kw):
        real_train(groups, cfg, start, 50, *rest, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(toy2d_module, "train", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        toy2d_module.main(args + ["--out", str(tmp_path / "killed")])
    monkeypatch.setattr(toy2d_module, "train", real_train)
    capsys.readouterr()
    assert toy2d_module.main(args + ["--out", str(tmp_path / "killed")]) == 0
    assert "resuming from" in capsys.readouterr().out
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    for a, b in zip(straight, resumed):
        assert [e["t"] for e in b["trace"]] == [50, 100, 150]
        for key in ("kl_paper", "jsd_paper", "gnelbo", "modes", "trace"):
            assert a[key] == b[key], key


def test_default_folder_is_named_from_the_flags(tmp_path, monkeypatch, capsys):
    """Without --out the same command finds its own folder again; other flags get another one."""
    monkeypatch.chdir(tmp_path)
    args = [
        "--combo",
        "C2",
        "--methods",
        "asintrovae",
        "--iters",
        "50",
        "--batch-size",
        "16",
        "--hidden",
        "8",
        "--n-eval",
        "100",
        "--grid",
        "16",
        "--trace-every",
        "50",
    ]
    assert toy2d_module.main(args) == 0
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("toy2d_8gaussians_C2_s92_50_")
    capsys.readouterr()
    assert toy2d_module.main(args) == 0
    assert f"already done: {os.path.join('runs', folders[0].name)}" in capsys.readouterr().out
    assert toy2d_module.main(args + ["--warmup", "0"]) == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2
    cfg = toy2d_module.parse_config(args + ["--ckpt-every", "100", "--device", "cpu"])
    assert toy2d_module.default_out_dir(cfg) == os.path.join("runs", folders[0].name)


def test_until_stops_early_and_the_same_command_finishes(tmp_path, capsys):
    args = [
        "--combo",
        "C2",
        "--methods",
        "asintrovae",
        "--iters",
        "100",
        "--batch-size",
        "16",
        "--hidden",
        "8",
        "--n-eval",
        "100",
        "--grid",
        "16",
        "--trace-every",
        "50",
        "--out",
        str(tmp_path / "run"),
    ]
    assert toy2d_module.main(args + ["--until", "50"]) == 0
    out = capsys.readouterr().out
    assert "t=50:" in out and "stopped at iteration 50 of 100" in out
    assert not (tmp_path / "run" / "results.json").exists()
    assert toy2d_module.main(args) == 0
    assert "at iteration 50" in capsys.readouterr().out
    records = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [e["t"] for e in records[0]["trace"]] == [50, 100]


def test_table_combines_finished_runs_with_the_seed_spread(smoke, tmp_path, capsys):
    out, _ = smoke
    records = json.loads((out / "results.json").read_text())
    other = tmp_path / "seed93"
    other.mkdir()
    shifted = [dict(r, seed=93, kl_paper=r["kl_paper"] + 2.0) for r in records]
    (other / "results.json").write_text(json.dumps(shifted))
    for r in records:
        tag = f"8gaussians_{r['method']}_C2"
        (other / f"scatter_{tag}_93.png").write_bytes((out / f"scatter_{tag}_92.png").read_bytes())
    assert toy2d_module.main(["--table", f"{out},{other}", "--out", str(tmp_path / "all")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "| VAE |" in line)
    kl = records[0]["kl_paper"]
    # two seeds, kl and kl + 2: mean kl + 1, sample std sqrt(2)
    assert f"| 2 | {kl + 1:.2f} ± {2**0.5:.2f} | 220.3 (at 30000 it) |" in row
    assert (tmp_path / "all" / "table.md").exists() and (tmp_path / "all" / "coverage.png").exists()
    assert (tmp_path / "all" / "overview_8gaussians_93.png").exists()
    assert toy2d_module.main(["--table", str(tmp_path / "missing")]) == 2
    assert "results.json does not exist" in capsys.readouterr().err


def test_overview_gives_each_setting_of_a_combo_its_own_labelled_row(smoke, tmp_path):
    out, _ = smoke
    records = json.loads((out / "results.json").read_text())
    with Image.open(out / f"scatter_{toy2d_module.run_tag(records[0])}.png") as image:
        cell_w, cell_h = image.size
    mixed = records + [dict(r, precision="bf16") for r in records]
    toy2d_module.write_overviews(mixed, str(tmp_path), [str(out)] * len(mixed))
    assert os.listdir(tmp_path) == ["overview_8gaussians_92.png"]
    with Image.open(tmp_path / "overview_8gaussians_92.png") as image:
        assert image.size == (4 * cell_w, 16 + 2 * (14 + cell_h))  # rows "C2: protocol", "C2: bf16"
        label_band = np.asarray(image)[16 + 14 + cell_h : 16 + 14 + cell_h + 14, :80]
        assert (label_band != 255).any()  # the second row's label is drawn
    toy2d_module.write_overviews(records, str(tmp_path), [str(out)] * len(records))
    with Image.open(tmp_path / "overview_8gaussians_92.png") as image:
        assert image.size == (4 * cell_w, 16 + cell_h)  # one setting: no label bands


def test_bad_flag_through_the_real_command_line():
    result = toy2d("--combo", "C4")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "toy2d.py: error: argument --combo: invalid choice"
    )


@pytest.mark.parametrize(
    "args, word",
    [
        (["--dataset", "moons"], "--dataset"),
        (["--methods", "vae,gan"], "--methods"),
        (["--seeds", "1,x"], "--seeds"),
        (["--iters", "ten"], "--iters"),
        (["--variant", "Paper"], "--variant"),
        (["--comb", "C1"], "--comb"),
        (["--grid", "1000"], "--grid"),
        (["--iters", "0"], "--iters"),
        (["--trace-every", "70"], "--trace-every"),
        (["--warmup", "-5"], "--warmup"),
        (["--precision", "fp16"], "--precision"),
        (["--schedule", "cosine"], "--schedule"),
        (["--graphs", "yes"], "--graphs"),
        (["--device", "cpu", "--graphs", "on"], "--graphs on needs a CUDA device"),
    ]
    + (
        []
        if torch.cuda.is_available()
        else [
            (["--device", "cuda"], "CUDA is not available"),
            (["--graphs", "on"], "--graphs on needs a CUDA device"),
        ]
    ),
)
def test_bad_flags_get_one_line_and_exit_2(args, word, capsys):
    with pytest.raises(SystemExit) as stop:
        toy2d_module.main(args)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], lines


def test_bench_prints_ms_per_iteration_and_writes_nothing(tmp_path, capsys):
    args = [
        "--bench",
        "2",
        "--methods",
        "sintrovae,asintrovae",
        "--batch-size",
        "16",
        "--hidden",
        "8",
    ]
    assert toy2d_module.main(args + ["--out", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "2 runs side by side (sintrovae x1, asintrovae x1)" in out and "ms/iteration" in out
    assert not (tmp_path / "none").exists()


def test_kernel_and_as_distance_flags_reach_the_runs_and_keep_default_folders(
    tmp_path, capsys, monkeypatch
):
    marginal = toy2d_module.parse_config(["--combo", "C2"])
    joint = toy2d_module.parse_config(["--combo", "C2", "--kernel", "joint"])
    assert "kernel" not in toy2d_module.checkpoint_config(marginal)  # earlier folders still fit
    assert toy2d_module.checkpoint_config(joint)["kernel"] == "joint"
    assert toy2d_module.default_out_dir(marginal) != toy2d_module.default_out_dir(joint)
    plain = toy2d_module.parse_config(["--combo", "C2", "--as-distance", "plain"])
    assert toy2d_module.default_out_dir(plain) == toy2d_module.default_out_dir(marginal)  # rounding
    for kernel, implementation in (("marginal", "fused"), ("joint", "fused"), ("joint", "plain")):
        seen = []
        for name in ("as_distance", "as_distance_fused"):

            def spy(*args, real=getattr(toy2d_module, name), name=name, **kwargs):
                seen.append((name, kwargs.get("kernel", "marginal")))
                return real(*args, **kwargs)

            monkeypatch.setattr(toy2d_module, name, spy)
        out = tmp_path / f"{kernel}_{implementation}"
        args = ["--combo", "C2", "--methods", "asintrovae", *TINY, "--kernel", kernel]
        args += ["--as-distance", implementation, "--out", str(out)]
        assert toy2d_module.main(args) == 0
        expected = "as_distance_fused" if implementation == "fused" else "as_distance"
        assert seen and set(seen) == {(expected, kernel)}  # the AS-active iterations, both steps
        record = json.loads((out / "results.json").read_text())[0]
        assert (record["kernel"], record["as_distance"]) == (kernel, implementation)
        monkeypatch.undo()
    assert "joint kernel" in capsys.readouterr().out  # the table's setting column


def test_a_corrupt_checkpoint_is_one_line_saying_what_to_do(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"\x00torn" * 50)
    assert toy2d_module.main(["--combo", "C2", *TINY, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("toy2d.py: error: cannot read checkpoint "), err
    assert err[0].endswith("corrupt or not a checkpoint; delete it to start over, or pass "
                           "another --out") and len(err[0]) < 250


def test_overview_is_wide_enough_for_its_header():
    panel = Image.new("RGB", (40, 30), "white")
    header = "8gaussians, seed 93, protocol (30000 iterations), mapping closest"
    sheet = toy2d_module.draw_overview([[panel]], header)
    text_w = ImageFont.load_default().getlength(header)
    assert sheet.width >= 4 + text_w and sheet.height == 16 + 30
    ink_columns = np.nonzero((np.asarray(sheet)[:16] != 255).any(axis=(0, 2)))[0]
    assert ink_columns.max() > 40 + 100  # the header runs past the single panel
    wide = toy2d_module.draw_overview([[panel] * 20], "short")
    assert wide.size == (20 * 40, 16 + 30)  # panels, not the header, set a wide sheet
