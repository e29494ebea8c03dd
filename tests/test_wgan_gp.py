"""WGAN-GP (--model wgan-gp): the gradient penalty against its closed form, both steps' gradients
against an independent computation on a tiny network, the noise drawn per sample, the EMA moving
on generator steps only, and a run end to end (resume included) through the command line."""

import copy
import json

import pytest
import torch

import as_introvae as asv
from helpers import assert_identical, npz_run_flags

pytestmark = pytest.mark.usefixtures("one_thread", "offline_torch_home")
LAMBDA = 7.0  # not the default 10: a dropped or doubled weight shows


def no_amp():
    return torch.autocast("cpu", enabled=False)


def tiny(n_critic=1):
    cfg = asv.make_config(dict(dataset="folder", image_size=8, channels=(4, 8), z_dim=3,
                               batch_size=4, model="wgan-gp", lambda_gp=LAMBDA,
                               n_critic=n_critic))
    torch.manual_seed(0)
    nets, opts = asv.make_state(cfg, 3, torch.device("cpu"))
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return cfg, nets, opts, x


class LinearCritic(torch.nn.Module):
    """D(x) = <w, x> + b: its gradient is w at every point, so the penalty is lambda (||w|| - 1)^2."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 1)

    def forward(self, x):
        return self.fc(x.flatten(1)).view(-1)


def test_gradient_penalty_of_a_linear_critic_is_its_closed_form():
    cfg, nets, opts, x = tiny()
    critic = LinearCritic()
    with torch.no_grad():
        critic.fc.weight.mul_(30.0)  # ||w|| well away from 1
    w, b = critic.fc.weight[0].detach().clone(), critic.fc.bias.detach().clone()
    opt = torch.optim.Adam(critic.parameters())
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    eps = torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    stats = asv.wgan_critic_step(critic, nets["decoder"], opt, x, z, eps, lambda_gp=LAMBDA,
                                 amp=no_amp)
    with torch.no_grad():
        fake = nets["decoder"](z)
    penalty = LAMBDA * (w.norm() - 1) ** 2
    wasserstein = (x.flatten(1) @ w + b).mean() - (fake.flatten(1) @ w + b).mean()
    assert stats["gp"].item() == pytest.approx(penalty.item(), rel=1e-5)
    assert stats["wasserstein"].item() == pytest.approx(wasserstein.item(), rel=1e-4, abs=1e-6)
    assert stats["loss_c"].item() == pytest.approx((penalty - wasserstein).item(), rel=1e-5)


def reference_critic_loss(critic, generator, x, z, eps):
    """Algorithm 1, lines 4-7, written out again: x_hat per sample, the penalty through
    torch.autograd.grad with create_graph, averaged over the batch."""
    with torch.no_grad():
        fake = generator(z)
    x_hat = (eps * x + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    penalty = LAMBDA * (grad.reshape(grad.shape[0], -1).pow(2).sum(1).sqrt() - 1) ** 2
    return (critic(fake) - critic(x) + penalty).mean()


def assert_grads(module, reference_loss, reference_module, what):
    want = torch.autograd.grad(reference_loss, list(reference_module.parameters()))
    for (name, param), expected in zip(module.named_parameters(), want):
        assert param.grad is not None, f"{what}: no gradient for {name}"
        torch.testing.assert_close(param.grad, expected, rtol=1e-4,
                                   atol=1e-4 * expected.abs().max().item() + 1e-12,
                                   msg=lambda m: f"{what} {name}: {m}")


def test_one_iteration_draws_per_sample_noise_and_both_gradients_match_the_equations():
    """train_step draws z (B, z), eps (B, 1, 1, 1), then the generator's z (B, z); with the same
    draws the critic's gradient equals the written-out Algorithm 1 (a nonlinear critic, so a
    penalty at the wrong points or one eps for the whole batch changes it), and the generator's
    gradient equals that of -mean D(G(z)) through the critic as just updated."""
    cfg, nets, opts, x = tiny(n_critic=1)
    twin = copy.deepcopy({k: nets[k] for k in ("critic", "decoder")})
    torch.manual_seed(11)
    critic_step = asv.wgan_critic_step
    critic_after = {}

    def critic_step_then_keep(*args, **kwargs):
        out = critic_step(*args, **kwargs)
        critic_after["grads"] = [p.grad.clone() for p in nets["critic"].parameters()]
        critic_after["critic"] = copy.deepcopy(nets["critic"])
        return out

    asv.wgan_critic_step = critic_step_then_keep
    try:
        stats = asv.train_step("wgan-gp", nets, opts, x, cfg, 1.0, 1.0, no_amp, step=0)
    finally:
        asv.wgan_critic_step = critic_step
    assert {"loss_c", "gp", "wasserstein", "loss_g"} <= set(stats)
    torch.manual_seed(11)
    z, eps = torch.randn(4, 3), torch.rand(4, 1, 1, 1)
    z_g = torch.randn(4, 3)
    loss = reference_critic_loss(twin["critic"], twin["decoder"], x, z, eps)
    assert stats["loss_c"].item() == pytest.approx(loss.item(), rel=1e-5)
    want = torch.autograd.grad(loss, list(twin["critic"].parameters()))
    for got, expected in zip(critic_after["grads"], want):
        torch.testing.assert_close(got, expected, rtol=1e-4,
                                   atol=1e-4 * expected.abs().max().item() + 1e-12)
    critic = critic_after["critic"].requires_grad_(False)
    generator_loss = -critic(twin["decoder"](z_g)).mean()
    assert stats["loss_g"].item() == pytest.approx(generator_loss.item(), rel=1e-5)
    assert_grads(nets["decoder"], generator_loss, twin["decoder"], "generator")


def test_generator_steps_every_n_critic_iterations():
    cfg, nets, opts, x = tiny(n_critic=3)
    generator_before = {k: v.clone() for k, v in nets["decoder"].named_parameters()}
    turns = []
    for step in range(6):
        stats = asv.train_step("wgan-gp", nets, opts, x, cfg, 1.0, 1.0, no_amp, step=step)
        turns.append("loss_g" in stats)
        assert asv.generator_turn(step, cfg) == turns[-1]
        if step == 1:  # two critic steps: the generator's weights have not moved
            assert_identical(dict(nets["decoder"].named_parameters()), generator_before)
    assert turns == [False, False, True, False, False, True]
    assert asv.generator_turn(4, asv.Config(model="asintrovae"))  # every step elsewhere


def flags(data, out, *extra):
    return npz_run_flags(data, out, "--epochs", "3", "--model", "wgan-gp", "--n-critic", "2",
                         *extra, every=2)


def test_run_logs_both_losses_moves_the_ema_on_generator_steps_and_resumes(data, tmp_path):
    assert asv.main(flags(data, tmp_path / "one_go", "--max-iters", "7")) == 0
    lines = (tmp_path / "one_go" / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, 8))
    assert ["loss_g" in r for r in records] == [False, True] * 3 + [False]
    assert all({"loss_c", "gp", "wasserstein"} <= set(r) for r in records)
    results = json.loads((tmp_path / "one_go" / "results.json").read_text())
    assert "no encoder" in results["reconstruction"]["note"]
    assert (tmp_path / "one_go" / "samples.png").is_file()
    assert not (tmp_path / "one_go" / "reconstruction.png").exists()
    # resume: 4 steps, then the same command to 7, equals 7 in one go, bit for bit
    assert asv.main(flags(data, tmp_path / "resumed", "--max-iters", "4")) == 0
    assert asv.main(flags(data, tmp_path / "resumed", "--max-iters", "7")) == 0
    one, two = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
                for name in ("one_go", "resumed"))
    for part in ("nets", "opts", "rng"):
        assert_identical(one[part], two[part], part)
    assert set(one["nets"]) == {"decoder", "critic", "ema"}
    assert asv.main(["--table", str(tmp_path / "one_go"), "--out", str(tmp_path / "t")]) == 0
    assert "| WGAN-GP | 0 | - | - | - | no encoder" in (tmp_path / "t" / "table.md").read_text()


def test_the_ema_moves_on_generator_steps_only(data, tmp_path):
    """Steps 0 and 2 are critic steps, step 1 also a generator step: the EMA's weights are
    d * initial + (1 - d) * generator after step 1 (= the final generator), lerped once."""
    assert asv.main(flags(data, tmp_path / "run", "--max-iters", "3", "--ema-decay", "0.5")) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["nets"]
    cfg = asv.make_config(dict(dataset="npz", data_root=str(data / "train.npz"),
                               channels=(8, 16), z_dim=4, batch_size=8, model="wgan-gp"))
    asv.seed_everything(cfg.seed)  # what opening the run does before building the networks
    start, _ = asv.make_state(cfg, 3, torch.device("cpu"))
    for name, initial in start["decoder"].named_parameters():
        expected = 0.5 * initial.detach() + 0.5 * state["decoder"][name]
        torch.testing.assert_close(state["ema"][name], expected, rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")
