"""as_introvae.py under torchrun on the CPU: 2 gloo ranks of tiny networks.

After a few steps the weights are identical on both ranks; the gradient each optimiser steps with
is the mean of the ranks' own gradients, computed here independently; the AS-Distance over the
gathered batch has the gradient of the one-process loss; a 2-rank run stopped early and rerun
under the same command ends bit-identical to an unbroken 2-rank run; launch problems are one line.
Every process has a timeout, so a hang fails the test instead of blocking CI.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import as_introvae as asv
import eval_metrics
from helpers import ROOT, assert_identical, pattern_images

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT_S = 240  # per multi-process launch; tiny nets take a few seconds


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_config(model="asintrovae", **extra):
    return asv.Config(**{"model": model, "channels": (4, 8), "image_size": 8, "z_dim": 3,
                         "batch_size": 8, "epochs": 1, **extra})


def rank_batch(rank, size=4):
    """Each rank's own 4 images (3 x 8 x 8): different data, so different local gradients."""
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.rand(size, 3, 8, 8, generator=generator)


def no_amp():
    return torch.autocast("cpu", enabled=False)


def local_gradients(nets, x, seed):
    """A rank's own VAE gradient, on a copy of the networks, without any communication."""
    import copy
    encoder, decoder = copy.deepcopy(nets["encoder"]), copy.deepcopy(nets["decoder"])
    torch.manual_seed(seed)
    loss, _, _ = asv.vae_objective(encoder, decoder, x, beta_rec=1.0, beta_kl=1.0, amp=no_amp)
    params = [*encoder.parameters(), *decoder.parameters()]
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def two_rank_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ranks = asv.Ranks(rank, world, rank)
    cpu = torch.device("cpu")
    results = {}
    # 1. the reduced gradient of one VAE step against this rank's own, independently computed
    torch.manual_seed(rank)  # different initial weights: the broadcast must make them rank 0's
    nets, opts = asv.make_state(tiny_config("vae"), 3, cpu, ranks)
    x = rank_batch(rank)
    results["local"] = local_gradients(nets, x, seed=7 + rank)
    torch.manual_seed(7 + rank)
    asv.train_step("vae", nets, opts, x, tiny_config("vae"), 1.0, 1.0, no_amp)
    results["reduced"] = [p.grad.detach().clone() for name in ("encoder", "decoder")
                          for p in nets[name].parameters()]
    # 2. a few AS-IntroVAE steps (gathered AS-Distance) and AVAE-S steps: identical weights
    for model, steps in (("asintrovae", 3), ("avae-s", 2)):
        cfg = tiny_config(model, **({"image_size": 20, "pretrain_epochs": 0, "adv_epochs": 1}
                                    if model == "avae-s" else {}))
        torch.manual_seed(0)
        nets, opts = asv.make_state(cfg, 3, cpu, ranks)
        state = asv.new_vae_s_state(100, 1, cpu) if model == "avae-s" else None
        torch.manual_seed(11 + rank)
        for step in range(steps):
            x = torch.rand(4, 3, cfg.image_size, cfg.image_size)
            asv.train_step(model, nets, opts, x, cfg, 0.5, 1.0 / (3 * 8 * 8), no_amp, state)
            asv.average_buffers_over_ranks([nets[name] for name in opts])  # as train() does
        results[model] = {name: {k: v.clone() for k, v in nets[name].state_dict().items()}
                          for name in opts}
        if state is not None:
            results["rec_weights"] = state["rec_weights"]
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def guarded(rank, worker, world, port, out):
    """worker(rank, ...) with its traceback written to out/rank<r>.error if it fails."""
    try:
        worker(rank, world, port, out)
    except BaseException:
        import traceback
        with open(os.path.join(out, f"rank{rank}.error"), "w") as handle:
            handle.write(traceback.format_exc())
        raise


def spawn_two_ranks(worker, out):
    """worker on 2 spawned gloo ranks, each joined with a timeout (a hang fails, not blocks)."""
    context = mp.start_processes(guarded, args=(worker, 2, free_port(), out), nprocs=2,
                                 join=False, start_method="spawn")
    for process in context.processes:
        process.join(TIMEOUT_S)
    alive = [p for p in context.processes if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, f"a rank hung for {TIMEOUT_S} s"
    errors = [open(os.path.join(out, name)).read() for name in sorted(os.listdir(out))
              if name.endswith(".error")]
    assert all(p.exitcode == 0 for p in context.processes) and not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ranks"))
    spawn_two_ranks(two_rank_worker, out)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]


def test_the_reduced_gradient_is_the_mean_of_the_ranks_own_gradients(two_ranks):
    rank0, rank1 = two_ranks
    for local0, local1, reduced0, reduced1 in zip(rank0["local"], rank1["local"],
                                                  rank0["reduced"], rank1["reduced"]):
        assert not torch.allclose(local0, local1)  # the ranks' data differ
        torch.testing.assert_close(reduced0, (local0 + local1) / 2, rtol=1e-5, atol=1e-7)
        assert torch.equal(reduced0, reduced1)


@pytest.mark.parametrize("model", ["asintrovae", "avae-s"])
def test_weights_stay_identical_on_both_ranks(two_ranks, model):
    assert_identical(two_ranks[0][model], two_ranks[1][model], model)
    if model == "avae-s":  # AVAE-S Eq. 5's lambdas probed over both ranks' batches
        assert two_ranks[0]["rec_weights"] == two_ranks[1]["rec_weights"] is not None


def gather_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(5)
    mu_r, logvar_r, mu_f, logvar_f = torch.randn(4, 5, 3, generator=generator)  # (5, 3) each
    rows = slice(0, 3) if rank == 0 else slice(3, 5)  # 3 + 2 rows: unequal shares
    mine = [v[rows].clone().requires_grad_(True) for v in (mu_r, logvar_r, mu_f, logvar_f)]
    as_dist = asv.as_distance(*asv.as_batch(*mine, gather=True))
    loss = as_dist * (1.0 + mine[0].sum())  # each rank's loss also depends on its own rows
    loss.backward()
    torch.save({"as": as_dist.detach(), "grads": [v.grad for v in mine]},
               os.path.join(out, f"gather{rank}.pt"))
    dist.destroy_process_group()


def test_gathered_as_distance_and_its_gradient_are_the_one_process_ones(tmp_path):
    """Ranks with 3 and 2 rows: the gathered AS-Distance equals the one over all 5 rows, and the
    summed rank gradients equal the gradient of the summed rank losses in one process."""
    spawn_two_ranks(gather_worker, str(tmp_path))
    parts = [torch.load(tmp_path / f"gather{r}.pt") for r in (0, 1)]
    generator = torch.Generator().manual_seed(5)
    whole = [v.clone().requires_grad_(True) for v in torch.randn(4, 5, 3, generator=generator)]
    as_dist = asv.as_distance(*whole)
    (as_dist * (1.0 + whole[0][:3].sum()) + as_dist * (1.0 + whole[0][3:].sum())).backward()
    for part in parts:
        torch.testing.assert_close(part["as"], as_dist.detach())
    for index, tensor in enumerate(whole):
        both = torch.cat([parts[0]["grads"][index], parts[1]["grads"][index]])
        torch.testing.assert_close(both, tensor.grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# the command line under torchrun: resume, one-line launch errors
# --------------------------------------------------------------------------------------------------
def torchrun(args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for name in asv.TORCHRUN_VARIABLES:
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", os.path.join(ROOT, "as_introvae.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def test_a_stopped_two_rank_run_resumes_to_the_unbroken_run(tmp_path):
    """20 images in global batches of 8 (ranks of 4, the last batch 2 + 2), 6 steps: stopped
    after 3 (a checkpoint at 2, then the stop's at 3) and rerun with the same command up to 6,
    it ends with the weights, optimiser states, every rank's RNG and the log of a 6-step run."""
    np.savez(tmp_path / "train.npz", images=pattern_images(20, 0))

    weights = tmp_path / "inception.pt"  # random weights: FID's plumbing, not its value
    torch.save(eval_metrics.InceptionV3FID().state_dict(), weights)
    fid = ["--fid-weights", str(weights), "--fid-samples", "6"]

    def flags(out, max_iters, *extra):
        return ["--dataset", "npz", "--data-root", str(tmp_path / "train.npz"),
                "--channels", "8,16", "--z-dim", "4", "--batch-size", "8", "--epochs", "2",
                "--log-every", "1", "--img-every", "100", "--ckpt-every", "2",
                "--fid-samples", "0", "--eval-images", "8", "--num-workers", "0", "--hflip",
                "true", "--out", str(out), "--max-iters", str(max_iters), *extra]
    for out, stops in ((tmp_path / "broken", (3, 6)), (tmp_path / "unbroken", (6,))):
        for stop in stops:
            result = torchrun(flags(out, stop, *(fid if out.name == "unbroken" else [])), tmp_path)
            assert result.returncode == 0, result.stderr[-3000:]
            if out.name == "broken" and stop == 6:
                assert "resuming from" in result.stdout and "at step 3 of 6" in result.stdout
    broken, unbroken = (asv.load_checkpoint(str(tmp_path / name / "checkpoint.pt"))
                        for name in ("broken", "unbroken"))
    assert broken["step"] == unbroken["step"] == 6 and len(unbroken["rng_by_rank"]) == 2
    for key in ("nets", "opts", "rng_by_rank"):
        assert_identical(broken[key], unbroken[key], key)
    logs = [(tmp_path / name / "log.jsonl").read_text().splitlines()
            for name in ("broken", "unbroken")]
    strip = [[{k: v for k, v in json.loads(line).items() if k != "img_per_s"}
              for line in log] for log in logs]
    # a record per step and the reconstruction record at T = 6
    assert strip[0] == strip[1] and [r["step"] for r in strip[0]] == [1, 2, 3, 4, 5, 6, 6]
    config = json.loads((tmp_path / "unbroken" / "config.json").read_text())
    assert config["derived"]["world_size"] == 2 and config["derived"]["batch_size_per_rank"] == 4
    # the evaluation split over the ranks and gathered: every image and sample counted once
    results = json.loads((tmp_path / "unbroken" / "results.json").read_text())
    assert results["reconstruction"]["images"] == 8 and results["step"] == 6
    assert results["fid"]["reference_images"] == 6 and np.isfinite(results["fid"]["value"])


def test_pooled_statistics_are_those_of_the_union():
    rows = np.random.default_rng(0).normal(size=(11, 3))
    parts = [(part.mean(0), np.cov(part, rowvar=False), len(part)) for part in (rows[:5], rows[5:])]
    mean, covariance, n = asv.pooled_statistics(parts)
    assert n == 11
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(covariance, np.cov(rows, rowvar=False), rtol=1e-10)


@pytest.mark.parametrize("environment, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK, WORLD_SIZE set but not LOCAL_RANK, MASTER_ADDR, "
                                       "MASTER_PORT: launch with torchrun"),
    ({"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "1"}, "--batch-size 8 is the global batch and the 3 ranks do not divide it"),
])
def test_launch_problems_are_one_line(environment, message, tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "train.npz", images=pattern_images(20, 0))
    for name in asv.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    flags = ["--dataset", "npz", "--data-root", str(tmp_path / "train.npz"), "--channels", "8,16",
             "--batch-size", "8", "--out", str(tmp_path / "run")]
    assert asv.main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
