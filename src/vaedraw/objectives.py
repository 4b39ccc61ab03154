"""Objectives and bounds, as pure functions, in nats.

Reductions are explicit: sum over pixels and latent dimensions, mean over the batch only where a
function says so. One function, `log_px`, is the decoder's log-likelihood for both the ELBO and the
importance-weighted bound, so the bound with k = 1 is the ELBO. Models assemble their objective from
these (models.VAE.elbo_terms, VAE.log_weights); nothing else does.

Likelihoods (decoder output `logits`, pixel mean sigmoid(logits)):
- bernoulli: log p(x|z) = sum_i x_i log m_i + (1 - x_i) log(1 - m_i), computed stably from logits.
- gaussian: the article's objective, summed squared error. It is -log N(x; m, sigma^2 = 1/2) up to the
  constant n_pixels * 0.5 * log(pi) (n_pixels = C * H * W values per image), which `log_px` includes so
  that the value is a proper log-density of grayscale pixels (not comparable with Bernoulli numbers on
  binarized pixels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "gaussian")
_LOG_2PI = math.log(2 * math.pi)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) = 0.5 * sum(mu^2 + exp(logvar) - 1 - logvar).

    Kingma & Welling 2014, appendix B. [..., D] -> [...].
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def reconstruction_loss(x: torch.Tensor, logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The image term that training minimizes, summed over pixels. [B, C, H, W] -> [B].

    bernoulli: binary cross-entropy = -log p(x|z). gaussian: sum of squared errors (the article).
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)
    if likelihood == "gaussian":
        return (torch.sigmoid(logits) - x).pow(2).flatten(1).sum(-1)
    raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")


def log_px(x: torch.Tensor, logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    """log p(x | z) in nats, summed over pixels. x, logits: [..., C, H, W] (broadcast) -> [...]."""
    n_pixels = x.shape[-1] * x.shape[-2] * x.shape[-3]
    const = 0.5 * math.log(math.pi) * n_pixels if likelihood == "gaussian" else 0.0
    x, logits = torch.broadcast_tensors(x, logits)
    lead = x.shape[:-3]
    nll = reconstruction_loss(x.reshape(-1, *x.shape[-3:]), logits.reshape(-1, *x.shape[-3:]), likelihood)
    return -(nll.view(lead) + const)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dim. [..., D] -> [...]."""
    return -0.5 * (_LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dim. [..., D] -> [...]."""
    return -0.5 * (_LOG_2PI + z.pow(2)).sum(-1)


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """L_k = log (1/k) sum_j w_j (Burda et al. 2015, eq. 8), by a stable log-sum-exp. [k, B] -> [B].

    With k = 1 this is the one-sample ELBO estimate; E[L_k] grows with k towards log p(x).
    """
    k = log_w.shape[0]
    return torch.logsumexp(log_w, dim=0) - math.log(k)
