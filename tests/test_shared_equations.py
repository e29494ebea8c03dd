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
    "check_as_distance_arguments",
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


# With identical source, equal values follow; this adds the shapes each script feeds in: one
# batch (images) and runs stacked in a leading dimension (toy2d), under every reduction.
@pytest.mark.parametrize("shape", [(6, 3), (2, 6, 3)])  # one batch; two stacked runs
@pytest.mark.parametrize("reduction", ["paper", "official_sum", "official_mean"])
def test_as_distance_and_kl_agree(shape, reduction):
    mu_a, lv_a, mu_b, lv_b = (per_sample(i, *shape) * 2 - 1 for i in range(4))
    ours = as_introvae.as_distance(mu_a, lv_a, mu_b, lv_b, reduction=reduction)
    theirs = toy2d.as_distance(mu_a, lv_a, mu_b, lv_b, reduction=reduction)
    assert torch.equal(ours, theirs) and ours.shape == shape[:-2]
    assert torch.equal(as_introvae.kl_divergence(mu_a, lv_a), toy2d.kl_divergence(mu_a, lv_a))
