"""VAE networks. A model owns its objective; the training step, the held-out loss and the IWAE bound call it.

The interface every architecture implements (or, for one Gaussian latent, inherits from `VAE`):

    image_shape                 (C, H, W) of the images it models; set from the data at build time
    code_dim, n_classes, likelihood
    encode(x, y=None) -> (mu, logvar)      x: float [B, C, H, W] in [0, 1]; the code posterior [B, D]
    decode(z, y=None) -> logits            z: a code [B, D]; logits [B, C, H, W]
    elbo_terms(x, y, noise) -> (recon [B], kl [B], logits)   the per-image terms of the training objective
    log_weights(x, y, k, generator=None) -> [k, B]           log p(x, z) - log q(z | x), k samples per image
    prior_codes(n, temperature, generator) -> [n, D]         codes drawn from the prior, on the CPU

What tools see of the latent space is the *code*: a fixed-size vector per image, the mean of `encode`.
The mixture sampler is fitted to codes, interpolation, latent maps and sliders move through them, and
`decode` turns one back into an image. For one Gaussian latent the code is z itself; a model with several
latent groups exposes its top group as the code and decodes the lower ones at their prior means (or a
temperature), so every tool works with it unchanged.

`noise` in `elbo_terms` is a callable `noise(t) -> standard normal tensor shaped like t`, supplied by the
caller: the training step passes fastpath.Noise.normal_like (the global batch's noise, so data-parallel
runs stay exact), evaluation a seeded generator. `y` is an int64 label [B], used only by conditional
models (`n_classes > 0`). The decoder returns logits; the likelihood (objectives.py) says how they become
a pixel distribution (its mean is sigmoid(logits) for both likelihoods used here).

Layout: `base` (the `VAE` interface and its one-latent implementation), `seed` (the article's network),
`conv` (ConvVAE), `hierarchical` (HierarchicalVAE). Adding an architecture: one class deriving from `VAE`
in its own module and one line in `ARCHS`. Networks are rebuilt only from a `ModelConfig` and the image shape.
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .base import MAX_IMAGE_SIDE, VAE, check_image_shape, reparameterize
from .conv import ConvVAE
from .hierarchical import HierarchicalVAE
from .seed import SEED_IMAGE_SHAPE, HWCFlatten, SameCrop, SamePad, SeedVAE

__all__ = ["ARCHS", "MAX_IMAGE_SIDE", "SEED_IMAGE_SHAPE", "VAE", "ConvVAE", "HWCFlatten", "HierarchicalVAE",
           "SameCrop", "SamePad", "SeedVAE", "build_model", "check_image_shape", "count_parameters", "reparameterize"]

ARCHS: dict[str, type[VAE]] = {"seed": SeedVAE, "conv": ConvVAE, "hierarchical": HierarchicalVAE}


def build_model(cfg: ModelConfig, image_shape=SEED_IMAGE_SHAPE) -> VAE:
    """The network `cfg` describes, for images of `image_shape` (C, H, W): ARCHS[cfg.arch](cfg, image_shape)."""
    if cfg.arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown architecture {cfg.arch!r}; choose one of: {', '.join(ARCHS)}")
    return ARCHS[cfg.arch](cfg, check_image_shape(image_shape))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
