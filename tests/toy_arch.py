"""A toy architecture in one file: what adding a model takes.

A class deriving from `vaedraw.models.VAE` that builds its layers from the model config and the image
shape and gives `encode` and `decode`; with one Gaussian latent it inherits the objective (`elbo_terms`,
`log_weights`, `prior_codes`). Registering it is one line, `models.ARCHS["toy"] = ToyVAE` (the tests do
it with monkeypatch, so the package itself is unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from vaedraw.models import VAE


class ToyVAE(VAE):
    """A one-hidden-layer MLP encoder and decoder for images of any shape."""

    HIDDEN = 32

    def __init__(self, cfg, image_shape):
        super().__init__()
        self.image_shape, self.likelihood = tuple(image_shape), cfg.likelihood
        self.latent_dim, self.n_classes = cfg.latent_dim, cfg.n_classes
        n_pixels = image_shape[0] * image_shape[1] * image_shape[2]
        self.encoder = nn.Sequential(nn.Linear(n_pixels + cfg.n_classes, self.HIDDEN), nn.Tanh(),
                                     nn.Dropout(cfg.dropout), nn.Linear(self.HIDDEN, 2 * cfg.latent_dim))
        self.decoder = nn.Sequential(nn.Linear(cfg.latent_dim + cfg.n_classes, self.HIDDEN), nn.Tanh(),
                                     nn.Linear(self.HIDDEN, n_pixels))

    def _with_label(self, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        onehot = self._one_hot(y, h)
        return h if onehot is None else torch.cat([h, onehot], dim=1)

    def encode(self, x, y=None):
        return self.encoder(self._with_label(x.flatten(1), y)).chunk(2, dim=1)

    def decode(self, z, y=None, eps=None):
        return self.decoder(self._with_label(z, y)).view(-1, *self.image_shape)
