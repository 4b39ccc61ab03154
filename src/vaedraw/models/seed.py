"""The article's network, reproduced exactly (docs/SEED_PORT.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .base import VAE

SEED_IMAGE_SHAPE = (1, 28, 28)  # the article's MNIST digits; also the shape of runs saved before shapes were recorded


class SamePad(nn.Module):
    """TensorFlow 'same' padding for a 4x4 kernel at stride 1: 1 before, 2 after (TF puts the odd pixel last)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (1, 2, 1, 2))


class SameCrop(nn.Module):
    """The matching crop after a stride-1 4x4 transposed conv: drop 1 before and 2 after (17 -> 14)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 1:-2, 1:-2]


class HWCFlatten(nn.Module):
    """Flatten [B, C, H, W] in TensorFlow's height-width-channel order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


class SeedVAE(VAE):
    """The article's network (docs/SEED_PORT.md), with TensorFlow 'same' padding reproduced exactly.

    Stride-2 'same' on the even sizes here pads 1 and 1, which is PyTorch's padding=1; stride-1 'same'
    is asymmetric (1, 2), done with SamePad / SameCrop. The article's "sd" = 0.5 * dense(8) is used
    as log sigma, so logvar = 2 * sd is the dense output itself. Glorot-uniform kernels, zero biases
    (TensorFlow 1 defaults). 10,151,489 parameters. Its sizes are the article's: 28x28 grey images only.
    """

    def __init__(self, cfg: ModelConfig, image_shape=SEED_IMAGE_SHAPE):
        super().__init__()
        if tuple(image_shape) != SEED_IMAGE_SHAPE:
            raise ConfigError(f"model.arch=seed is the article's network for 1x28x28 images; this data is "
                              f"{'x'.join(map(str, image_shape))}: use model.arch=conv")
        if cfg.likelihood not in ("bernoulli", "gaussian"):
            raise ConfigError(f"model.arch=seed is the article's network, with one output per pixel: "
                              f"model.likelihood must be bernoulli or gaussian, got {cfg.likelihood}; "
                              f"use model.arch=conv for {cfg.likelihood}")
        self.image_shape, self.likelihood = SEED_IMAGE_SHAPE, cfg.likelihood
        self.latent_dim, self.n_classes = cfg.latent_dim, 0
        p, act = cfg.dropout, nn.LeakyReLU(0.3)
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 64, 4, stride=2, padding=1), act, nn.Dropout(p),   # 28 -> 14
            nn.Conv2d(64, 64, 4, stride=2, padding=1), act, nn.Dropout(p),  # 14 -> 7
            SamePad(), nn.Conv2d(64, 64, 4, stride=1), act, nn.Dropout(p),  # 7 -> 7
            HWCFlatten(),                                                   # 3136
        )
        self.to_mu = nn.Linear(7 * 7 * 64, cfg.latent_dim)
        self.to_logvar = nn.Linear(7 * 7 * 64, cfg.latent_dim)
        self.decoder_dense = nn.Sequential(
            nn.Linear(cfg.latent_dim, 24), act,  # the article's 49 * 1 / 2, meant as integer division
            nn.Linear(24, 49), act,
        )
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(1, 64, 4, stride=2, padding=1), nn.ReLU(), nn.Dropout(p),  # 7 -> 14
            nn.ConvTranspose2d(64, 64, 4, stride=1), SameCrop(), nn.ReLU(), nn.Dropout(p),  # 14 -> 14
            nn.ConvTranspose2d(64, 64, 4, stride=1), SameCrop(), nn.ReLU(),  # 14 -> 14
            HWCFlatten(),  # 12544
            nn.Linear(14 * 14 * 64, 28 * 28),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, x, y=None):
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z, y=None, eps=None):
        # [B, 49] viewed as [B, 7, 7, 1] (NHWC) is the same memory as [B, 1, 7, 7]: one channel.
        h = self.decoder_dense(z).view(-1, 1, 7, 7)
        return self.decoder_conv(h).view(-1, *SEED_IMAGE_SHAPE)


