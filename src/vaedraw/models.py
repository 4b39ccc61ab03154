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

Adding an architecture: one class deriving from `VAE` (in its own file if you like) and one line in
`ARCHS`. Networks are rebuilt only from a `ModelConfig` and the image shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import ConfigError
from .objectives import (
    kl_to_standard_normal, log_normal, log_px, log_standard_normal, reconstruction_loss,
)

MAX_IMAGE_SIDE = 4096  # pixels per side: beyond this an image shape is a damaged file, not a data set


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) (Kingma & Welling 2014, eq. 10). Shapes [..., D].

    `eps` (default: drawn here) lets a caller supply the noise, as the training step does."""
    return mu + torch.exp(0.5 * logvar) * (torch.randn_like(mu) if eps is None else eps)


def check_image_shape(shape) -> tuple[int, int, int]:
    """(C, H, W) as a tuple of positive ints, or a ConfigError saying what is wrong."""
    try:
        c, h, w = (int(s) for s in shape)
        ok = all(int(s) == s for s in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok or min(c, h, w) < 1 or max(h, w) > MAX_IMAGE_SIDE or c > 4:
        raise ConfigError(f"image shape must be (channels 1-4, height, width) with sides 1..{MAX_IMAGE_SIDE}, "
                          f"got {shape!r}")
    return c, h, w


class VAE(nn.Module):
    """One diagonal-Gaussian latent z with a standard normal prior; subclasses give encode and decode."""

    image_shape: tuple[int, int, int]
    latent_dim: int
    n_classes: int
    likelihood: str

    @property
    def code_dim(self) -> int:
        return self.latent_dim

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """(logits, mu, logvar, z) with z = mu + sigma * eps, eps from the global RNG."""
        mu, logvar = self.encode(x, y)
        z = reparameterize(mu, logvar)
        return self.decode(z, y), mu, logvar, z

    def elbo_terms(self, x: torch.Tensor, y: torch.Tensor | None, noise) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """Per-image terms of the training objective: recon [B] = -log p(x|z) as trained (summed squared
        error for the gaussian likelihood), kl [B] = KL(q(z|x) || N(0, I)) analytically, and the logits.

        One reparameterized z per image with eps = noise(mu). Encoder outputs and logits are taken in
        float32, so the terms are float32 under autocast too.
        """
        mu, logvar = self.encode(x, y)
        mu, logvar = mu.float(), logvar.float()
        z = reparameterize(mu, logvar, noise(mu))
        logits = self.decode(z, y)
        return reconstruction_loss(x, logits.float(), self.likelihood), kl_to_standard_normal(mu, logvar), logits

    def log_weights(self, x: torch.Tensor, y: torch.Tensor | None, k: int, generator: torch.Generator | None = None,
                    chunk: int = 256) -> torch.Tensor:
        """log w_j = log p(x|z_j) + log p(z_j) - log q(z_j|x), z_j ~ q(z|x), j = 1..k. x: [B, C, H, W] -> [k, B].

        The k samples are decoded `chunk` at a time (each chunk one batched decode of chunk * B images).
        The noise comes from `generator` (on x's device), else the global torch RNG.
        """
        mu, logvar = self.encode(x, y)
        mu, logvar = mu.float(), logvar.float()
        out = []
        for start in range(0, k, chunk):
            kk = min(chunk, k - start)
            eps = torch.randn(kk, *mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
            z = reparameterize(mu, logvar, eps)  # [kk, B, D]
            yy = None if y is None else y.repeat(kk)
            logits = self.decode(z.reshape(-1, z.shape[-1]), yy).view(kk, *x.shape)
            out.append(log_px(x, logits.float(), self.likelihood) + log_standard_normal(z) - log_normal(z, mu, logvar))
        return torch.cat(out, 0)

    def prior_codes(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n codes from the prior at a temperature: z ~ N(0, temperature^2 I), on the CPU. -> [n, D]."""
        return temperature * torch.randn(n, self.code_dim, generator=generator)

    def _one_hot(self, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        if not self.n_classes:
            return None
        if y is None:
            raise ValueError("this is a conditional model: pass the labels y")
        return F.one_hot(y, self.n_classes).to(like.dtype)


# ----------------------------------------------------------------------------- the article's model
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

    def decode(self, z, y=None):
        # [B, 49] viewed as [B, 7, 7, 1] (NHWC) is the same memory as [B, 1, 7, 7]: one channel.
        h = self.decoder_dense(z).view(-1, 1, 7, 7)
        return self.decoder_conv(h).view(-1, *SEED_IMAGE_SHAPE)


# ----------------------------------------------------------------------------- our model
class ConvVAE(VAE):
    """A small convolutional VAE with a Bernoulli (logit) decoder, for C x H x W images, H and W multiples of 4.

    encoder: conv 4x4/2 (c) -> conv 4x4/2 (2c) -> dense (hidden) -> mu, logvar (D)
    decoder: dense (hidden) -> dense (2c x H/4 x W/4) -> convT 4x4/2 (c) -> convT 4x4/2 (C) -> logits
    SiLU activations. A conditional model appends the one-hot label to the encoder's dense input and
    to z. Options: model.conv.channels (c), model.conv.hidden.
    """

    def __init__(self, cfg: ModelConfig, image_shape=SEED_IMAGE_SHAPE):
        super().__init__()
        n_channels, height, width = check_image_shape(image_shape)
        if height % 4 or width % 4:
            raise ConfigError(f"model.arch=conv halves the image twice: height and width must be multiples of 4, "
                              f"got {height}x{width}")
        self.image_shape, self.likelihood = (n_channels, height, width), cfg.likelihood
        self.latent_dim, self.n_classes = cfg.latent_dim, cfg.n_classes
        c, h, k = cfg.conv.channels, cfg.conv.hidden, cfg.n_classes
        self._grid = (2 * c, height // 4, width // 4)  # the decoder's first feature map
        flat = 2 * c * (height // 4) * (width // 4)
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
            nn.ConvTranspose2d(c, n_channels, 4, stride=2, padding=1),         # H/2 -> H
        )

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
        h = self.decoder_dense(z).view(-1, *self._grid)
        return self.decoder_conv(h)


ARCHS: dict[str, type[VAE]] = {"seed": SeedVAE, "conv": ConvVAE}


def build_model(cfg: ModelConfig, image_shape=SEED_IMAGE_SHAPE) -> VAE:
    """The network `cfg` describes, for images of `image_shape` (C, H, W): ARCHS[cfg.arch](cfg, image_shape)."""
    if cfg.arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown architecture {cfg.arch!r}; choose one of: {', '.join(ARCHS)}")
    return ARCHS[cfg.arch](cfg, check_image_shape(image_shape))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
