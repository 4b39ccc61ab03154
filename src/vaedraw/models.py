"""VAE networks. Models expose building blocks, not training:

    encode(x, y=None) -> (mu, logvar)    x: [B, 1, 28, 28] in [0, 1]; mu, logvar: [B, D]
    decode(z, y=None) -> logits          z: [B, D]; logits: [B, 1, 28, 28]
    forward(x, y=None) -> (logits, mu, logvar, z) with z = mu + sigma * eps (reparameterized)

`y` is an int64 label [B], used only by conditional models (`n_classes > 0`). The decoder always
returns logits; the likelihood (objectives.py) says how they become a pixel distribution (its mean is
sigmoid(logits) for both likelihoods used here). Networks are rebuilt only from a `ModelConfig`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import ConfigError

IMAGE_SHAPE = (1, 28, 28)  # channels, height, width of every dataset we support
N_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) (Kingma & Welling 2014, eq. 10). Shapes [..., D].

    `eps` (default: drawn here) lets a caller supply the noise, as the training step does."""
    return mu + torch.exp(0.5 * logvar) * (torch.randn_like(mu) if eps is None else eps)


class VAE(nn.Module):
    latent_dim: int
    n_classes: int

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        mu, logvar = self.encode(x, y)
        z = reparameterize(mu, logvar)
        return self.decode(z, y), mu, logvar, z

    def _one_hot(self, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        if not self.n_classes:
            return None
        if y is None:
            raise ValueError("this is a conditional model: pass the labels y")
        return F.one_hot(y, self.n_classes).to(like.dtype)


# ----------------------------------------------------------------------------- the article's model
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
    """The article's network (docs/SEED.md), with TensorFlow 'same' padding reproduced exactly.

    Stride-2 'same' on the even sizes here pads 1 and 1, which is PyTorch's padding=1; stride-1 'same'
    is asymmetric (1, 2), done with SamePad / SameCrop. The article's "sd" = 0.5 * dense(8) is used
    as log sigma, so logvar = 2 * sd is the dense output itself. Glorot-uniform kernels, zero biases
    (TensorFlow 1 defaults). 10,151,489 parameters.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
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
            nn.Linear(14 * 14 * 64, N_PIXELS),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, x, y=None):
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z, y=None):
        # [B, 49] viewed as [B, 7, 7, 1] (NHWC) is the same memory as [B, 1, 7, 7]: one channel.
        h = self.decoder_dense(z).view(-1, 1, 7, 7)
        return self.decoder_conv(h).view(-1, *IMAGE_SHAPE)


# ----------------------------------------------------------------------------- our model
class ConvVAE(VAE):
    """A small convolutional VAE for 28x28 images with a Bernoulli (logit) decoder.

    encoder: conv 4x4/2 (c) -> conv 4x4/2 (2c) -> dense (hidden) -> mu, logvar (D)
    decoder: dense (hidden) -> dense (2c x 7 x 7) -> convT 4x4/2 (c) -> convT 4x4/2 (1) -> logits
    SiLU activations. A conditional model appends the one-hot label to the encoder's dense input and
    to z.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.latent_dim, self.n_classes = cfg.latent_dim, cfg.n_classes
        c, h, k = cfg.channels, cfg.hidden, cfg.n_classes
        act = nn.SiLU()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 4, stride=2, padding=1), act,      # 28 -> 14
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), act,  # 14 -> 7
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
        )
        self.encoder_dense = nn.Sequential(nn.Linear(2 * c * 49 + k, h), act, nn.Linear(h, 2 * cfg.latent_dim))
        self.decoder_dense = nn.Sequential(
            nn.Linear(cfg.latent_dim + k, h), act, nn.Linear(h, 2 * c * 49), act, nn.Dropout(cfg.dropout)
        )
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), act,  # 7 -> 14
            nn.ConvTranspose2d(c, 1, 4, stride=2, padding=1),           # 14 -> 28
        )
        self._c = c

    def encode(self, x, y=None):
        h = self.encoder(x)
        onehot = self._one_hot(y, h)
        if onehot is not None:
            h = torch.cat([h, onehot], dim=1)
        mu, logvar = self.encoder_dense(h).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z, y=None):
        onehot = self._one_hot(y, z)
        if onehot is not None:
            z = torch.cat([z, onehot], dim=1)
        h = self.decoder_dense(z).view(-1, 2 * self._c, 7, 7)
        return self.decoder_conv(h)


ARCHS: dict[str, type[VAE]] = {"seed": SeedVAE, "conv": ConvVAE}


def build_model(cfg: ModelConfig) -> VAE:
    if cfg.arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown architecture {cfg.arch!r}; choose one of: {', '.join(ARCHS)}")
    return ARCHS[cfg.arch](cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
