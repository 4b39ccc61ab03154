"""Objectives and bounds, as pure functions, in nats.

Reductions are explicit: sum over pixels and latent dimensions, mean over the batch only where a
function says so. One function, `log_px`, is the decoder's log-likelihood for both the ELBO and the
importance-weighted bound, so the bound with k = 1 is the ELBO. Models assemble their objective from
these (models.VAE.elbo_terms, VAE.log_weights); nothing else does.

Likelihoods of images x [B, C, H, W] in [0, 1], given the decoder output `params` [B, P, H, W] with
P = `decoder_channels(likelihood, C)`; `pixel_mean` turns params into pictures:
- bernoulli (P = C, params are logits, mean sigmoid(logits)): log p(x|z) = sum_i x_i log m_i +
  (1 - x_i) log(1 - m_i), computed stably from logits.
- gaussian (P = C, mean sigmoid(logits)): the article's objective, summed squared error. It is
  -log N(x; m, sigma^2 = 1/2) up to the constant n_pixels * 0.5 * log(pi) (n_pixels = C * H * W values
  per image), which `log_px` includes so that the value is a proper log-density of grayscale pixels (not
  comparable with Bernoulli numbers on binarized pixels).
- logistic_mixture: the discretized mixture of logistics of 8-bit pixels x in {0, 1/255, ..., 1}
  (Salimans et al. 2017, PixelCNN++, eq. 2 and section 2.2; the form VDVAE uses), a proper probability of
  the 256 grey levels of each channel; see `_logistic_mixture_log_prob`. Its K (model.mixture_components)
  is read from P: P = K (1 + 2C + C(C-1)/2).

  Colour channels follow PixelCNN++'s channel-autoregressive parameterization, generalized to C channels
  (C = 1: the plain mixture of 3K parameters; RGB: PixelCNN++'s and VDVAE's 10K): one mixture indicator
  per pixel for all its channels, and each channel's mean shifted linearly by the channels before it.
  Independent channels would be simpler, but given z the channels of a pixel are strongly correlated (a
  colour is mostly its brightness), which they cannot express, and with the coupling a colour model is
  the one of PixelCNN++ / VDVAE, whose bits per dimension are the published figures.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "gaussian", "logistic_mixture")
MIXTURE_COMPONENTS = 10  # K, the mixture size of logistic_mixture by default (model.mixture_components)
_LOG_2PI = math.log(2 * math.pi)
_HALF_BIN = 1.0 / 255  # half a grey level on PixelCNN++'s [-1, 1] scale (256 levels, 255 steps of 2/255)
_MIN_LOG_SCALE = -7.0  # PixelCNN++'s floor on log s: a component narrower than this has no more to gain


def _check_likelihood(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")


def _mixture_params_per_component(n_channels: int) -> int:
    """1 mixture logit + C means + C log scales + C(C-1)/2 channel coefficients (PixelCNN++: 10 for RGB)."""
    return 1 + 2 * n_channels + n_channels * (n_channels - 1) // 2


def decoder_channels(likelihood: str, n_channels: int, components: int = MIXTURE_COMPONENTS) -> int:
    """How many output channels P a decoder produces for images of `n_channels` channels.

    bernoulli, gaussian: n_channels (one logit per value). logistic_mixture: components * (1 + 2C +
    C(C-1)/2), e.g. 3K for grey and 10K for RGB as in PixelCNN++; `components` is model.mixture_components.
    """
    _check_likelihood(likelihood)
    if likelihood != "logistic_mixture":
        return n_channels
    return components * _mixture_params_per_component(n_channels)


def _split_mixture(params: torch.Tensor, n_channels: int):
    """params [..., P, H, W] -> logit_pi [..., K, H, W], means, log_scales [..., K, C, H, W] and the
    channel coefficients [..., K, C(C-1)/2, H, W] (tanh applied), in float32 or wider."""
    if params.dtype not in (torch.float32, torch.float64):
        params = params.float()  # bf16 / fp16 decoder output: the tails below need float32
    per = _mixture_params_per_component(n_channels)
    p = params.shape[-3]
    if p % per:
        raise ValueError(f"logistic_mixture for {n_channels}-channel images needs a multiple of {per} decoder "
                         f"channels (decoder_channels), got {p}")
    k, c, lead, hw = p // per, n_channels, params.shape[:-3], params.shape[-2:]
    logit_pi, means, log_scales, coeffs = params.split([k, k * c, k * c, k * c * (c - 1) // 2], dim=-3)
    means = means.reshape(*lead, k, c, *hw)
    log_scales = log_scales.reshape(*lead, k, c, *hw).clamp_min(_MIN_LOG_SCALE)
    coeffs = torch.tanh(coeffs.reshape(*lead, k, c * (c - 1) // 2, *hw))
    return logit_pi, means, log_scales, coeffs


def _coupled_means(means: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PixelCNN++'s channel-autoregressive means: mu_c + sum_{j<c} a_cj * x_j for each component.

    means [..., K, C, H, W], coeffs [..., K, C(C-1)/2, H, W] ordered (1,0), (2,0), (2,1), (3,0), ...;
    x [..., C, H, W] on [-1, 1] (the observed values, or the earlier channels' means for `pixel_mean`)."""
    c = means.shape[-3]
    if c == 1:
        return means
    x = x.unsqueeze(-4)  # [..., 1, C, H, W]: the same pixel values for every component
    out, i = [means[..., 0, :, :]], 0
    for ch in range(1, c):
        shift = sum(coeffs[..., i + j, :, :] * x[..., j, :, :] for j in range(ch))
        out.append(means[..., ch, :, :] + shift)
        i += ch
    return torch.stack(out, dim=-3)


def _logistic_mixture_log_prob(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """log P(x) of each pixel (all its channels), in nats. x [..., C, H, W] in [0, 1], params [..., P, H, W]
    -> [..., H, W].

    Salimans et al. 2017 (PixelCNN++): x is rescaled to [-1, 1]; each pixel has one mixture indicator
    shared by its C channels, and channel c of component k is a logistic with mean mu_kc + sum_{j<c}
    a_kcj x_j (a = tanh of the decoder output) and scale s_kc = exp(log_scale), log_scale >= -7.
    P(x_c) = F(x_c + 1/255) - F(x_c - 1/255) (F the logistic CDF), with the edge bins 0 and 255 running to
    -inf and +inf, so the 256 levels of each channel sum to 1. Stable forms: log F(t) = t - softplus(t)
    and log(1 - F(t)) = -softplus(t); the interior difference is taken where the CDF is far from 1 (right
    of the mean as (1 - F(x - 1/255)) - (1 - F(x + 1/255))) and, where it falls below 1e-5, replaced by the
    density at the bin's centre times the bin width 2/255, as PixelCNN++ does. Float32 throughout
    (autocast off), whatever the decoder's precision.
    """
    with torch.autocast(x.device.type, enabled=False):
        c = x.shape[-3]
        logit_pi, means, log_scales, coeffs = _split_mixture(params, c)
        x = 2 * x.to(means.dtype) - 1  # [..., C, H, W] on [-1, 1]
        centered = x.unsqueeze(-4) - _coupled_means(means, coeffs, x)  # [..., K, C, H, W]
        inv_s = torch.exp(-log_scales)
        plus_in, min_in, mid_in = inv_s * (centered + _HALF_BIN), inv_s * (centered - _HALF_BIN), inv_s * centered
        log_cdf_plus = plus_in - F.softplus(plus_in)  # bin 0: log F(x + 1/255)
        log_one_minus_cdf_min = -F.softplus(min_in)  # bin 255: log(1 - F(x - 1/255))
        delta = torch.where(mid_in > 0, torch.sigmoid(-min_in) - torch.sigmoid(-plus_in),
                            torch.sigmoid(plus_in) - torch.sigmoid(min_in))
        log_pdf_mid = mid_in - log_scales - 2 * F.softplus(mid_in) + math.log(2 * _HALF_BIN)
        interior = torch.where(delta > 1e-5, torch.log(delta.clamp_min(1e-12)), log_pdf_mid)
        x_b = x.unsqueeze(-4).expand_as(centered)
        log_p = torch.where(x_b < -0.999, log_cdf_plus, torch.where(x_b > 0.999, log_one_minus_cdf_min, interior))
        return torch.logsumexp(log_p.sum(-3) + F.log_softmax(logit_pi, dim=-3), dim=-3)


def _softplus_difference(v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """softplus(v + d) - softplus(v) for d >= 0, without the cancellation of the plain difference when d is
    small: log1p(sigmoid(v) * expm1(d)) there (a wide component), the plain difference elsewhere."""
    small = torch.log1p(torch.sigmoid(v) * torch.expm1(d.clamp_max(1.0)))
    return torch.where(d < 1, small, F.softplus(v + d) - F.softplus(v))


def _logistic_mixture_mean(params: torch.Tensor, n_channels: int) -> torch.Tensor:
    """Pixel means in [0, 1] of a logistic mixture. params [..., P, H, W] -> [..., C, H, W].

    Each component's channel is the logistic clamped to [-1, 1], whose mean is
    -1 + s (softplus((mu + 1) / s) - softplus((mu - 1) / s)); the 256-level variable differs from it by the
    rounding to a grey level, under half a grey level and negligible once s exceeds a grey level. Coupled
    channels (C > 1) take the earlier channels at that component's means (exact while the clamp is not
    reached). The means are mixed with the weights softmax(logit_pi)."""
    with torch.autocast(params.device.type, enabled=False):
        logit_pi, means, log_scales, coeffs = _split_mixture(params, n_channels)
        s = torch.exp(log_scales.clamp_max(30.0))  # beyond e^30 a component is flat on [-1, 1] anyway
        pi = torch.softmax(logit_pi, dim=-3).unsqueeze(-3)  # [..., K, 1, H, W]
        cols, i = [], 0
        for ch in range(n_channels):
            mu = means[..., ch, :, :]
            for j in range(ch):
                mu = mu + coeffs[..., i + j, :, :] * cols[j]
            i += ch
            sc = s[..., ch, :, :]
            cols.append(-1 + sc * _softplus_difference((mu - 1) / sc, 2 / sc))
        m = torch.stack(cols, dim=-3)  # [..., K, C, H, W] on [-1, 1]
        return ((pi * m).sum(-4) + 1).mul(0.5).clamp(0, 1)


def pixel_mean(params: torch.Tensor, likelihood: str, n_channels: int | None = None) -> torch.Tensor:
    """The pixel means of the decoder output, in [0, 1]: what pictures show. [B, P, H, W] -> [B, C, H, W].

    bernoulli, gaussian: sigmoid(params). logistic_mixture: the mean of the mixture
    (`_logistic_mixture_mean`); it needs `n_channels` (C, the images' channels: model.image_shape[0]),
    since P alone does not say how many channels and components it holds.
    """
    _check_likelihood(likelihood)
    if likelihood != "logistic_mixture":
        return torch.sigmoid(params)
    if n_channels is None:
        raise ValueError("pixel_mean of a logistic_mixture needs n_channels (the images' channels)")
    return _logistic_mixture_mean(params, n_channels)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) = 0.5 * sum(mu^2 + exp(logvar) - 1 - logvar).

    Kingma & Welling 2014, appendix B. [..., D] -> [...].
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def kl_normal(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) for diagonal Gaussians, summed over the last dim:
    0.5 * sum(logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) / exp(logvar_p) - 1). [..., D] -> [...]."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1.0).sum(-1)


def reconstruction_loss(x: torch.Tensor, logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The image term that training minimizes, summed over pixels. x [B, C, H, W], logits (the decoder
    output) [B, P, H, W] -> [B].

    bernoulli: binary cross-entropy = -log p(x|z). gaussian: sum of squared errors (the article).
    logistic_mixture: -log P(x|z) of the 8-bit pixels, in nats.
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)
    if likelihood == "gaussian":
        return (torch.sigmoid(logits) - x).pow(2).flatten(1).sum(-1)
    if likelihood == "logistic_mixture":
        return -_logistic_mixture_log_prob(x, logits).flatten(1).sum(-1)
    raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")


def log_px(x: torch.Tensor, logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    """log p(x | z) in nats, summed over pixels. x [..., C, H, W], logits [..., P, H, W] (leading dims
    broadcast; P = decoder_channels(likelihood, C)) -> [...]."""
    n_pixels = x.shape[-1] * x.shape[-2] * x.shape[-3]
    const = 0.5 * math.log(math.pi) * n_pixels if likelihood == "gaussian" else 0.0
    lead = torch.broadcast_shapes(x.shape[:-3], logits.shape[:-3])
    x, logits = x.expand(*lead, *x.shape[-3:]), logits.expand(*lead, *logits.shape[-3:])
    nll = reconstruction_loss(x.reshape(-1, *x.shape[-3:]), logits.reshape(-1, *logits.shape[-3:]), likelihood)
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
