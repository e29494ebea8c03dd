"""The equations both scripts implement are one definition: same source, same values.

as_introvae.py (images) and toy2d.py (2D) each carry the KL, the AS-Distance, the annealing of c
and the VAE / IntroVAE / Soft-IntroVAE / AS-IntroVAE losses, so each script can be read and copied
alone. This file keeps the two copies from drifting apart.
"""
import inspect

import pytest
import torch

import as_introvae
import toy2d

SHARED = (
    "kl_divergence",
    "as_distance",
    "annealing_coefficient",
    "vae_loss",
    "intro_encoder_loss",
    "intro_decoder_loss",
    "as_intro_encoder_loss",
    "as_intro_decoder_loss",
)


@pytest.mark.parametrize("name", SHARED)
def test_same_source_in_both_scripts(name):
    assert inspect.getsource(getattr(as_introvae, name)) == inspect.getsource(getattr(toy2d, name))


def per_sample(seed, *shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(6, 3), (2, 6, 3)])  # one batch; two stacked runs
@pytest.mark.parametrize("reduction", ["paper", "official_sum", "official_mean"])
def test_as_distance_and_kl_agree(shape, reduction):
    mu_a, lv_a, mu_b, lv_b = (per_sample(i, *shape) * 2 - 1 for i in range(4))
    ours = as_introvae.as_distance(mu_a, lv_a, mu_b, lv_b, reduction=reduction)
    theirs = toy2d.as_distance(mu_a, lv_a, mu_b, lv_b, reduction=reduction)
    assert torch.equal(ours, theirs) and ours.shape == shape[:-2]
    assert torch.equal(as_introvae.kl_divergence(mu_a, lv_a), toy2d.kl_divergence(mu_a, lv_a))


def test_unknown_reduction_and_schedule_raise_in_both():
    mu = per_sample(0, 4, 2)
    for module in (as_introvae, toy2d):
        with pytest.raises(ValueError, match="reduction"):
            module.as_distance(mu, mu, mu, mu, reduction="mean")
        with pytest.raises(ValueError, match="schedule"):
            module.annealing_coefficient(3, 10, "cosine")


@pytest.mark.parametrize("schedule", ["linear", "tanh"])
def test_annealing_agrees(schedule):
    for t in (0, 1, 599, 600, 3000, 2999):
        assert as_introvae.annealing_coefficient(t, 3000, schedule) == toy2d.annealing_coefficient(
            t, 3000, schedule
        )


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("c", [0.3, 1.0])
def test_losses_agree(variant, c):
    terms = [per_sample(10 + i, 5) * 3 for i in range(6)]
    as_dist = torch.tensor(0.7, dtype=torch.float64)
    weights = dict(beta_rec=0.4, beta_kl=1.5, beta_neg=0.8)
    enc_a = as_introvae.as_intro_encoder_loss(*terms, as_dist, c=c, s=0.25, **weights)
    enc_b = toy2d.as_intro_encoder_loss(*terms, as_dist, c=c, s=0.25, **weights)
    assert all(torch.equal(a, b) for a, b in zip(enc_a, enc_b))
    dec = dict(c=c, s=0.25, beta_rec=0.4, beta_kl=1.5, gamma_r=0.1, variant=variant)
    dec_a = as_introvae.as_intro_decoder_loss(*terms[:5], as_dist, **dec)
    assert torch.equal(dec_a, toy2d.as_intro_decoder_loss(*terms[:5], as_dist, **dec))
    intro = dict(margin=2.0, **weights)
    assert torch.equal(
        as_introvae.intro_encoder_loss(*terms[:4], **intro),
        toy2d.intro_encoder_loss(*terms[:4], **intro),
    )
    assert torch.equal(
        as_introvae.intro_decoder_loss(*terms[:3], beta_rec=0.4, beta_kl=1.5),
        toy2d.intro_decoder_loss(*terms[:3], beta_rec=0.4, beta_kl=1.5),
    )
    assert torch.equal(
        as_introvae.vae_loss(terms[0], terms[1], beta_rec=0.4, beta_kl=1.5),
        toy2d.vae_loss(terms[0], terms[1], beta_rec=0.4, beta_kl=1.5),
    )
