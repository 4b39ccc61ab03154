"""ConvVAE: the small convolutional VAE of the default preset."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..objectives import decoder_channels
from .base import VAE, check_halvable
from .seed import SEED_IMAGE_SHAPE

class ConvVAE(VAE):
    """A small convolutional VAE for C x H x W images, H and W multiples of 4.

    encoder: conv 4x4/2 (c) -> conv 4x4/2 (2c) -> dense (hidden) -> mu, logvar (D)
    decoder: dense (hidden) -> dense (2c x H/4 x W/4) -> convT 4x4/2 (c) -> convT 4x4/2 (P) -> params
    [B, P, H, W], P = objectives.decoder_channels(likelihood, C, model.mixture_components): the logits for
    bernoulli and gaussian (P = C), the mixture's parameters for logistic_mixture.
    SiLU activations. A conditional model appends the one-hot label to the encoder's dense input and
    to z. Options: model.conv.channels (c), model.conv.hidden.
    """

    def __init__(self, cfg: ModelConfig, image_shape=SEED_IMAGE_SHAPE):
        super().__init__()
        n_channels, height, width = check_halvable(image_shape, "conv")
        self.image_shape, self.likelihood = (n_channels, height, width), cfg.likelihood
        self.latent_dim, self.n_classes = cfg.latent_dim, cfg.n_classes
        c, h, k = cfg.conv.channels, cfg.conv.hidden, cfg.n_classes
        self._grid = (2 * c, height // 4, width // 4)  # the decoder's first feature map
        flat = 2 * c * (height // 4) * (width // 4)
        out_channels = decoder_channels(cfg.likelihood, n_channels, cfg.mixture_components)
        act = nn.SiLU()
        self.encoder = nn.Sequential(
            nn.Conv2d(n_channels, c, 4, stride=2, padding=1), act,  # H -> H/2
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), act,       # H/2 -> H/4
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
        )
        self.encoder_dense = nn.Sequential(nn.Linear(flat + k, h), act, nn.Linear(h, 2 * cfg.latent_dim))
        self.decoder_dense = nn.Sequential(
            nn.Linear(cfg.latent_dim + k, h), act, nn.Linear(h, flat), act, nn.Dropout(cfg.dropout)
        )
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), act,         # H/4 -> H/2
            nn.ConvTranspose2d(c, out_channels, 4, stride=2, padding=1),       # H/2 -> H
        )

    def encode(self, x, y=None):
        h = self.encoder(x)
        onehot = self._one_hot(y, h)
        if onehot is not None:
            h = torch.cat([h, onehot], dim=1)
        mu, logvar = self.encoder_dense(h).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z, y=None, eps=None):
        onehot = self._one_hot(y, z)
        if onehot is not None:
            z = torch.cat([z, onehot], dim=1)
        h = self.decoder_dense(z).view(-1, *self._grid)
        return self.decoder_conv(h)


