"""Tests for vaedraw.objectives: the KL, both likelihoods, the training loss's reductions, the IWAE bound."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from vaedraw import fastpath
from vaedraw.config import ConvOptions, ModelConfig
from vaedraw.models import VAE, build_model
from vaedraw.objectives import (
    iwae_bound, kl_to_standard_normal, log_normal, log_px, log_standard_normal, reconstruction_loss,
)

DTYPE = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- KL
def test_kl_matches_a_monte_carlo_estimate():
    """E_q[log q(z) - log p(z)] over many z ~ q, within 5 standard errors of the analytic value."""
    g = _gen(0)
    mu = torch.tensor([0.5, -1.2, 2.0, 0.0], dtype=DTYPE)
    logvar = torch.tensor([-1.0, 0.7, 0.0, -2.5], dtype=DTYPE)
    q, p = Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros(4, dtype=DTYPE), torch.ones(4, dtype=DTYPE))
    n = 200_000
    z = mu + torch.exp(0.5 * logvar) * torch.randn(n, 4, generator=g, dtype=DTYPE)
    terms = (q.log_prob(z) - p.log_prob(z)).sum(-1)  # [n]
    mc, se = terms.mean(), terms.std() / math.sqrt(n)
    analytic = kl_to_standard_normal(mu, logvar)
    assert analytic.shape == ()
    assert abs(analytic - mc) < 5 * se
    assert se < 0.01  # the check is tight enough to mean something
    # and the closed form itself agrees with torch.distributions
    assert torch.allclose(analytic, kl_divergence(q, p).sum(), rtol=1e-12)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(3, 5)
    assert torch.equal(kl_to_standard_normal(zeros, zeros), torch.zeros(3))
    g = _gen(1)
    mu, logvar = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    kl = kl_to_standard_normal(mu, logvar)
    assert kl.shape == (3,) and (kl > 0).all()


def test_kl_sums_over_the_last_dim_only():
    g = _gen(2)
    mu, logvar = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    kl = kl_to_standard_normal(mu, logvar)
    assert kl.shape == (2, 3)
    assert torch.allclose(kl[1, 2], kl_to_standard_normal(mu[1, 2], logvar[1, 2]))


# ----------------------------------------------------------------------------- likelihoods
@pytest.mark.parametrize("binary", [True, False])
def test_bernoulli_log_px_is_the_direct_sum(binary):
    g = _gen(3)
    logits = 3 * torch.randn(4, 1, 28, 28, generator=g, dtype=DTYPE)
    x = torch.rand(4, 1, 28, 28, generator=g, dtype=DTYPE)
    if binary:
        x = torch.bernoulli(x, generator=g)
    p = torch.sigmoid(logits)
    direct = (x * torch.log(p) + (1 - x) * torch.log(1 - p)).flatten(1).sum(-1)
    got = log_px(x, logits, "bernoulli")
    assert got.shape == (4,)
    assert torch.allclose(got, direct, rtol=1e-10)
    if binary:
        assert torch.allclose(got, Bernoulli(logits=logits).log_prob(x).flatten(1).sum(-1), rtol=1e-10)
    assert torch.allclose(reconstruction_loss(x, logits, "bernoulli"), -direct, rtol=1e-10)


def test_bernoulli_log_px_is_stable_for_large_logits():
    x = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1).expand(2, 1, 28, 28)
    logits = torch.tensor([200.0, -200.0]).view(2, 1, 1, 1).expand(2, 1, 28, 28)
    got = log_px(x, logits, "bernoulli")
    assert torch.isfinite(got).all() and got.abs().max() < 1e-6
    wrong = log_px(1 - x, logits, "bernoulli")
    assert torch.allclose(wrong, torch.full((2,), -200.0 * 784), rtol=1e-6)


def test_gaussian_log_px_is_the_normal_density_with_variance_one_half():
    g = _gen(4)
    logits = torch.randn(3, 1, 28, 28, generator=g, dtype=DTYPE)
    x = torch.rand(3, 1, 28, 28, generator=g, dtype=DTYPE)
    m = torch.sigmoid(logits)
    expected = Normal(m, math.sqrt(0.5)).log_prob(x).flatten(1).sum(-1)
    assert torch.allclose(log_px(x, logits, "gaussian"), expected, rtol=1e-10)


def test_gaussian_reconstruction_loss_is_the_summed_squared_error():
    g = _gen(5)
    logits = torch.randn(3, 1, 28, 28, generator=g, dtype=DTYPE)
    x = torch.rand(3, 1, 28, 28, generator=g, dtype=DTYPE)
    direct = torch.stack([((torch.sigmoid(logits[i]) - x[i]) ** 2).sum() for i in range(3)])
    assert torch.allclose(reconstruction_loss(x, logits, "gaussian"), direct, rtol=1e-12)
    # log_px differs from it only by the Normal's constant
    const = 784 * 0.5 * math.log(math.pi)
    assert torch.allclose(log_px(x, logits, "gaussian"), -(direct + const), rtol=1e-12)


def test_log_px_broadcasts_over_leading_sample_dims():
    g = _gen(6)
    x = torch.bernoulli(torch.rand(2, 1, 28, 28, generator=g))
    logits = torch.randn(5, 2, 1, 28, 28, generator=g)  # [k, B, C, H, W]
    got = log_px(x, logits, "bernoulli")
    assert got.shape == (5, 2)
    assert torch.allclose(got[3, 1], log_px(x[1:2], logits[3, 1:2], "bernoulli")[0])


def test_an_unknown_likelihood_is_an_error():
    x = torch.zeros(1, 1, 28, 28)
    with pytest.raises(ValueError, match="poisson"):
        reconstruction_loss(x, x, "poisson")


def test_log_normal_matches_torch_distributions():
    g = _gen(7)
    z, mu, logvar = (torch.randn(6, 3, generator=g, dtype=DTYPE) for _ in range(3))
    expected = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    assert torch.allclose(log_normal(z, mu, logvar), expected, rtol=1e-12)
    assert torch.allclose(log_standard_normal(z), Normal(0.0, 1.0).log_prob(z).sum(-1), rtol=1e-12)


# ----------------------------------------------------------------------------- the training loss
class _Fixed(VAE):
    """A 'model' whose encoder and decoder return given tensors: the objective's reductions alone."""

    def __init__(self, mu, logvar, logits, likelihood):
        super().__init__()
        self.mu, self.logvar, self.logits, self.likelihood = mu, logvar, logits, likelihood
        self.latent_dim, self.n_classes, self.image_shape = mu.shape[1], 0, tuple(logits.shape[1:])

    def encode(self, x, y=None):
        return self.mu, self.logvar

    def decode(self, z, y=None):
        return self.logits


def _objective(model) -> fastpath.Objective:
    return fastpath.Objective(model, binarize=False, plan=fastpath.Plan(), noise=fastpath.Noise())


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_training_loss_sums_over_pixels_and_dims_and_averages_over_the_batch(likelihood):
    g = _gen(8)
    b, d = 5, 3
    x = torch.rand(b, 1, 28, 28, generator=g)  # float32: the terms are float32 (as under autocast)
    logits = torch.randn(b, 1, 28, 28, generator=g)
    mu, logvar = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    model = _Fixed(mu, logvar, logits, likelihood)
    recon_b, kl_b, _ = model.elbo_terms(x, None, torch.zeros_like)
    assert recon_b.shape == kl_b.shape == (b,)
    loss, recon, kl = _objective(model)(x)
    assert loss.shape == recon.shape == kl.shape == ()
    per_image_recon, per_image_kl = [], []
    for i in range(b):
        m = torch.sigmoid(logits[i])
        if likelihood == "bernoulli":
            per_image_recon.append(-(x[i] * torch.log(m) + (1 - x[i]) * torch.log(1 - m)).sum())
        else:
            per_image_recon.append(((m - x[i]) ** 2).sum())
        per_image_kl.append(-0.5 * (1 + logvar[i] - mu[i] ** 2 - logvar[i].exp()).sum())
    torch.testing.assert_close(recon_b, torch.stack(per_image_recon), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(kl_b, torch.stack(per_image_kl), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(recon, recon_b.mean(), rtol=0, atol=0)
    torch.testing.assert_close(kl, kl_b.mean(), rtol=0, atol=0)
    torch.testing.assert_close(loss, recon + kl, rtol=0, atol=0)
    # doubling the batch with a copy of itself leaves batch means unchanged
    twice = _objective(_Fixed(torch.cat([mu, mu]), torch.cat([logvar, logvar]), torch.cat([logits, logits]),
                              likelihood))(torch.cat([x, x]))
    torch.testing.assert_close(twice[0], loss, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- importance weighting
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="conv", latent_dim=3, conv=ConvOptions(channels=4, hidden=16))).eval()


def test_iwae_with_one_sample_is_the_elbo_estimate(tiny_model):
    x = torch.bernoulli(torch.rand(4, 1, 28, 28, generator=_gen(9)))
    torch.manual_seed(10)
    with torch.no_grad():
        log_w = tiny_model.log_weights(x, None, 500, chunk=128)
        mu, logvar = tiny_model.encode(x)
    assert log_w.shape == (500, 4)
    assert torch.equal(iwae_bound(log_w[:1]), log_w[0])
    # E_q[log w] = E_q[log p(x|z)] - KL(q || p): the mean of log w and an independent estimate of the image
    # term (fresh noise) minus the analytic KL must agree within 5 standard errors of their difference.
    elbo_mc = log_w.mean(0)
    torch.manual_seed(11)
    with torch.no_grad():
        eps = torch.randn(500, *mu.shape)
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = tiny_model.decode(z.reshape(-1, 3)).view(500, *x.shape)
        recon = log_px(x, logits, "bernoulli")  # [k, B]
    elbo_indep = recon.mean(0) - kl_to_standard_normal(mu, logvar)
    se = torch.sqrt(log_w.var(0) / 500 + recon.var(0) / 500)
    assert ((elbo_mc - elbo_indep).abs() < 5 * se).all()


def test_iwae_bound_is_a_stable_log_mean_exp_and_grows_with_k():
    g = _gen(12)
    log_w = torch.randn(50, 3, generator=g, dtype=DTYPE) * 4 - 1000.0  # far below exp's range
    bound = iwae_bound(log_w)
    assert torch.isfinite(bound).all()
    ref = torch.log(torch.exp(log_w + 1000.0).mean(0)) - 1000.0
    assert torch.allclose(bound, ref, rtol=1e-12)
    # Jensen: log mean exp >= mean for any set of weights
    assert (bound >= log_w.mean(0)).all()
