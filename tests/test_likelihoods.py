"""The discretized logistic mixture of 8-bit pixels (objectives: logistic_mixture): a proper probability of
the 256 levels, per-pixel sums, pixel means, stable gradients at the edge bins, and a colour ConvVAE that
trains, whose IWAE bound with k = 1 is its ELBO and whose evaluation reports bits per dimension."""

from __future__ import annotations

import math

import pytest
import torch

from vaedraw import build_config, data, load_run
from vaedraw.errors import ConfigError
from vaedraw.evaluate import evaluate_run, format_report, iwae
from vaedraw.models import build_model
from vaedraw.objectives import (
    decoder_channels, iwae_bound, log_normal, log_px, log_standard_normal, pixel_mean, reconstruction_loss,
)
from vaedraw.sample import decode_means

LM = "logistic_mixture"
LEVELS = torch.arange(256, dtype=torch.float64) / 255  # the 256 values of an 8-bit pixel, as models see them


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pack(logit_pi, means, log_scales, coeffs) -> torch.Tensor:
    """Mixture parameters of one pixel -> decoder output [1, P, 1, 1] in the layout objectives reads:
    K logits | K x C means | K x C log scales | K x C(C-1)/2 coefficients (before tanh), component-major."""
    parts = [logit_pi.reshape(-1), means.reshape(-1), log_scales.reshape(-1), coeffs.reshape(-1)]
    return torch.cat(parts).view(1, -1, 1, 1)


def _random_mixture(k: int, c: int, seed: int, mean_range=(-1.2, 1.2), log_scale_range=(-4.0, 0.5)):
    g = _gen(seed)
    lo, hi = mean_range
    slo, shi = log_scale_range
    return (2 * torch.randn(k, generator=g, dtype=torch.float64),
            lo + (hi - lo) * torch.rand(k, c, generator=g, dtype=torch.float64),
            slo + (shi - slo) * torch.rand(k, c, generator=g, dtype=torch.float64),
            torch.randn(k, c * (c - 1) // 2, generator=g, dtype=torch.float64))


def _first_channels(mixture, c: int):
    """The same mixture over its first c channels: the coefficients of channel pairs (i, j) with i < c."""
    logit_pi, means, log_scales, coeffs = mixture
    return logit_pi, means[:, :c], log_scales[:, :c], coeffs[:, :c * (c - 1) // 2]


def _probs(values: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """P(x) of single pixels: values [N, C] in [0, 1], params [1, P, 1, 1] -> [N]."""
    x = values.view(len(values), -1, 1, 1)
    return log_px(x, params.expand(len(values), -1, -1, -1), LM).exp()


# ----------------------------------------------------------------------------- a proper probability
@pytest.mark.parametrize("k", [1, 5])
def test_a_grey_pixel_sums_to_one_over_its_256_levels(k):
    for seed in range(4):
        params = _pack(*_random_mixture(k, 1, seed))
        total = _probs(LEVELS[:, None], params).sum()
        assert abs(total.item() - 1) < 1e-4
    # float32, as training computes it
    params = _pack(*_random_mixture(k, 1, 9)).float()
    assert abs(_probs(LEVELS[:, None].float(), params).double().sum().item() - 1) < 1e-4


@pytest.mark.parametrize("k", [1, 5])
def test_a_colour_pixel_sums_to_one_over_its_256_cubed_values(k):
    """Channel by channel: summing the blue level out of the RGB mixture leaves the same mixture over red and
    green, summing green out of that leaves the one over red, and red sums to 1; so all 256^3 sum to 1."""
    mixture = _random_mixture(k, 3, 10 + k)
    rgb, rg, r = (_pack(*_first_channels(mixture, c)) for c in (3, 2, 1))
    g = _gen(20 + k)
    pairs = torch.randint(0, 256, (24, 2), generator=g)
    for red, green in pairs.tolist():
        values = torch.stack([torch.full((256,), LEVELS[red]), torch.full((256,), LEVELS[green]), LEVELS], 1)
        over_blue = _probs(values, rgb).sum()
        expected = _probs(torch.stack([LEVELS[red], LEVELS[green]])[None], rg)[0]
        assert abs(over_blue.item() - expected.item()) < 1e-4 * max(expected.item(), 1e-3)
    grid = torch.cartesian_prod(LEVELS, LEVELS)  # [65536, 2]: every (red, green)
    p_rg = _probs(grid, rg).view(256, 256)
    torch.testing.assert_close(p_rg.sum(1), _probs(LEVELS[:, None], r), rtol=1e-4, atol=1e-7)
    assert abs(p_rg.sum().item() - 1) < 1e-4


def test_decoder_channels_follow_pixelcnn_plus_plus():
    assert decoder_channels("bernoulli", 3) == decoder_channels("gaussian", 3) == 3
    assert decoder_channels(LM, 1, 10) == 30  # pi, mu, log s
    assert decoder_channels(LM, 3, 10) == 100  # PixelCNN++'s 10 per component for RGB
    assert decoder_channels(LM, 3) == 100  # K = 10 by default, as model.mixture_components
    with pytest.raises(ValueError, match="poisson"):
        decoder_channels("poisson", 1)
    with pytest.raises(ValueError, match="multiple of 10"):
        log_px(torch.zeros(1, 3, 2, 2), torch.zeros(1, 31, 2, 2), LM)


def test_log_px_of_a_batch_is_the_sum_of_its_pixels():
    g = _gen(30)
    k, b, c, h, w = 4, 3, 3, 4, 5
    params = 2 * torch.randn(b, decoder_channels(LM, c, k), h, w, generator=g, dtype=torch.float64)
    x = torch.randint(0, 256, (b, c, h, w), generator=g).double() / 255
    x[0, :, 0, 0], x[1, :, 1, 1] = 0.0, 1.0  # the edge bins too
    got = log_px(x, params, LM)
    assert got.shape == (b,)
    per_pixel = torch.zeros(b, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            per_pixel += log_px(x[..., i:i + 1, j:j + 1], params[..., i:i + 1, j:j + 1], LM)
    torch.testing.assert_close(got, per_pixel, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(reconstruction_loss(x, params, LM), -got, rtol=0, atol=0)
    # leading sample dims broadcast as for the other likelihoods: [k, B, P, H, W] against [B, C, H, W]
    many = torch.stack([params, params.flip(0)])
    both = log_px(x, many, LM)
    assert both.shape == (2, b)
    torch.testing.assert_close(both[1], log_px(x, params.flip(0), LM), rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- pixel means
def _expected_level(params: torch.Tensor) -> torch.Tensor:
    """E[x] of a one-channel mixture by summing over its 256 levels."""
    return (_probs(LEVELS[:, None], params) * LEVELS).sum()


@pytest.mark.parametrize("k", [1, 5])
def test_pixel_mean_is_the_expectation_over_the_256_levels(k):
    for seed in range(4):
        params = _pack(*_random_mixture(k, 1, 40 + seed))
        mean = pixel_mean(params, LM, 1)
        assert mean.shape == (1, 1, 1, 1)
        assert abs(mean.item() - _expected_level(params).item()) < 1e-3
    # RGB without coupling: each channel's mean is that of its own mixture (the indicator is shared)
    logit_pi, means, log_scales, coeffs = _random_mixture(k, 3, 50 + k)
    coeffs = torch.zeros_like(coeffs)
    mean = pixel_mean(_pack(logit_pi, means, log_scales, coeffs), LM, 3)
    assert mean.shape == (1, 3, 1, 1)
    for ch in range(3):
        one = _pack(logit_pi, means[:, ch], log_scales[:, ch], coeffs[:, :0])
        assert abs(mean[0, ch].item() - _expected_level(one).item()) < 1e-3


def test_pixel_mean_of_coupled_channels_is_their_expectation_inside_the_range():
    """With the components inside [-1, 1] the coupled means are linear in the earlier channel: the mean is
    the exact expectation over all 256 x 256 (first, second) levels."""
    mixture = _random_mixture(3, 2, 60, mean_range=(-0.4, 0.4), log_scale_range=(-4.0, -3.0))
    params = _pack(*mixture)
    grid = torch.cartesian_prod(LEVELS, LEVELS)
    p = _probs(grid, params)
    assert abs(p.sum().item() - 1) < 1e-4
    expected = (p[:, None] * grid).sum(0)
    torch.testing.assert_close(pixel_mean(params, LM, 2).view(2), expected, rtol=0, atol=1e-3)


def test_pixel_mean_is_sigmoid_for_one_output_per_value_and_needs_the_channels_for_a_mixture():
    logits = torch.randn(2, 3, 4, 4, generator=_gen(70))
    for lik in ("bernoulli", "gaussian"):
        torch.testing.assert_close(pixel_mean(logits, lik), torch.sigmoid(logits), rtol=0, atol=0)
    with pytest.raises(ValueError, match="n_channels"):
        pixel_mean(torch.zeros(1, 30, 2, 2), LM)


# ----------------------------------------------------------------------------- numerical safety
def test_gradients_are_finite_at_the_edge_bins_with_extreme_parameters():
    k, c = 3, 3
    x = torch.stack([torch.zeros(c, 2, 2), torch.ones(c, 2, 2)])  # every value in an edge bin
    x[:, 0, 0, 1] = 128 / 255
    g = _gen(80)
    for scale in (1.0, 30.0, 1e3):
        params = (scale * torch.randn(2, decoder_channels(LM, c, k), 2, 2, generator=g)).requires_grad_()
        loss = reconstruction_loss(x, params, LM).sum()
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(params.grad).all()
        assert torch.isfinite(pixel_mean(params.detach(), LM, c)).all()
    # a component sitting far beyond an edge gives that edge bin probability 1, and its tails stay finite
    far = _pack(torch.zeros(1), torch.full((1, 1), -50.0), torch.full((1, 1), -7.0), torch.zeros(1, 0)).float()
    assert abs(_probs(torch.zeros(1, 1), far).item() - 1) < 1e-6
    params = far.clone().requires_grad_()
    lp = log_px(torch.ones(1, 1, 1, 1), params, LM)
    lp.backward()
    assert torch.isfinite(lp) and lp.item() < -1e4 and torch.isfinite(params.grad).all()


def test_low_precision_decoder_output_is_scored_in_float32():
    g = _gen(90)
    params = torch.randn(2, decoder_channels(LM, 3, 4), 4, 4, generator=g)
    x = torch.randint(0, 256, (2, 3, 4, 4), generator=g).float() / 255
    exact = log_px(x, params, LM)
    half = log_px(x, params.bfloat16(), LM)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, log_px(x, params.bfloat16().float(), LM), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = log_px(x, params, LM)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, exact, rtol=0, atol=0)


# ----------------------------------------------------------------------------- config and models
def test_logistic_mixture_config_rules():
    with pytest.raises(ConfigError, match="data.binarize=none"):
        build_config("default", overrides={"model.likelihood": LM})
    cfg = build_config("default", overrides={"model.likelihood": LM, "data.binarize": "none",
                                             "model.mixture_components": "7"})
    assert (cfg.model.likelihood, cfg.model.mixture_components) == (LM, 7)
    for bad in ("0", "65"):
        with pytest.raises(ConfigError, match="model.mixture_components"):
            build_config("default", overrides={"model.mixture_components": bad})
    seed = build_config("seed", overrides={"model.likelihood": LM})
    with pytest.raises(ConfigError, match="model.arch=seed.*bernoulli or gaussian"):
        build_model(seed.model)


def _colour_model(seed: int = 0, k: int = 5):
    torch.manual_seed(seed)
    cfg = build_config("default", overrides={"model.likelihood": LM, "data.binarize": "none",
                                             "model.mixture_components": str(k), "model.latent_dim": "4",
                                             "model.conv.channels": "8", "model.conv.hidden": "32"})
    return build_model(cfg.model, (3, 32, 32))


@pytest.fixture(scope="module")
def colour_batch() -> torch.Tensor:
    images = torch.randint(0, 256, (8, 32, 32, 3), generator=_gen(100), dtype=torch.uint8)
    return data.to_float(images)


def test_a_colour_conv_vae_trains_on_8_bit_pixels(colour_batch):
    model = _colour_model()
    x = colour_batch
    assert model.decode(torch.zeros(2, 4)).shape == (2, 5 * 10, 32, 32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = _gen(101)
    losses = []
    for _ in range(30):
        recon, kl, _ = model.elbo_terms(x, None, lambda t: torch.randn(t.shape, generator=g))
        loss = (recon + kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 100  # nats per image
    # uniform noise images: nothing beats 8 bits per value by much, and the model is a proper likelihood
    assert losses[-1] / (3 * 32 * 32 * math.log(2)) > 7.0
    means = decode_means(model.eval(), torch.randn(6, 4, generator=g))
    assert means.shape == (6, 3, 32, 32) and 0 <= means.min() and means.max() <= 1


@torch.no_grad()
def test_iwae_with_one_sample_is_the_elbo_of_the_same_noise(colour_batch):
    model = _colour_model(1).eval()
    x = colour_batch[:4]
    log_w = model.log_weights(x, None, 1, generator=_gen(7))
    mu, logvar = model.encode(x)
    eps = torch.randn(1, *mu.shape, generator=_gen(7))[0]
    z = mu + torch.exp(0.5 * logvar) * eps
    elbo_1 = log_px(x, model.decode(z), LM) + log_standard_normal(z) - log_normal(z, mu, logvar)
    assert log_w.shape == (1, 4)
    torch.testing.assert_close(iwae_bound(log_w), elbo_1, rtol=1e-6, atol=1e-3)  # ~2e4 nats in float32
    # and the training term is the same -log p(x|z) for that z
    recon, _, _ = model.elbo_terms(x, None, lambda t: eps)
    torch.testing.assert_close(recon, -log_px(x, model.decode(z), LM), rtol=1e-6, atol=1e-3)
    assert torch.isfinite(iwae(model, x, None, k=3)).all()


# ----------------------------------------------------------------------------- evaluation end to end
def test_evaluation_of_a_colour_run_reports_bits_per_dimension(tmp_path, monkeypatch):
    import toy_dataset

    from vaedraw.train import train

    monkeypatch.setitem(data.DATASETS, toy_dataset.SPEC.name, toy_dataset.SPEC)
    cfg = build_config("default", overrides={
        "data.dataset": "toy-squares", "data.binarize": "none", "model.likelihood": LM,
        "model.mixture_components": "3", "model.latent_dim": "4", "model.conv.channels": "8",
        "model.conv.hidden": "32", "train.steps": "12", "train.batch_size": "32", "train.log_every": "6",
        "train.eval_every": "12", "train.picture_every": "12", "train.checkpoint_every": "12",
        "train.eval_images": "32", "sample.gmm_components": "2"})
    out = tmp_path / "colour"
    train(cfg, out, device="cpu", progress=False, argv=["test"])
    res = evaluate_run(load_run(out, "cpu"), iwae_k=4, n_samples=20, n_images=16, progress=False)
    dims = 3 * 16 * 16 * math.log(2)
    assert res["likelihood"] == LM and res["comparable"] is True
    assert res["elbo_bpd"] == pytest.approx(-res["elbo"] / dims)
    assert res["iwae_bpd"] == pytest.approx(-res["iwae"] / dims)
    # a probability of discrete pixels: positive bits; the k = 4 bound is no worse than the ELBO but for noise
    assert 0 < res["iwae_bpd"] < res["elbo_bpd"] + 0.05 < 20
    text = format_report(res)
    assert "bits/dim" in text and "8-bit pixels" in text
