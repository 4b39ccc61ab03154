"""The `VAE` interface and its implementation for one diagonal-Gaussian latent (see the package docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..objectives import (
    kl_to_standard_normal, log_normal, log_px, log_standard_normal, reconstruction_loss,
)

MAX_IMAGE_SIDE = 4096  # pixels per side: beyond this an image shape is a damaged file, not a data set


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) (Kingma & Welling 2014, eq. 10). Shapes [..., D].

    `eps` (default: drawn here) lets a caller supply the noise, as the training step does."""
    return mu + torch.exp(0.5 * logvar) * (torch.randn_like(mu) if eps is None else eps)


def per_sample_noise(noise, like: torch.Tensor, k: int) -> list[torch.Tensor]:
    """k draws noise(like), each shaped like `like` [B, ...]: one call per importance sample, so each call
    is a batch of images (a data-parallel process keeps its own images' rows) and the first j samples of
    k are those of a run with j (the bound grows with k on the same draws)."""
    return [noise(like) for _ in range(k)]


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


def check_halvable(shape, arch: str) -> tuple[int, int, int]:
    """`check_image_shape`, and sides that two stride-2 layers halve exactly (multiples of 4), or a ConfigError
    naming the architecture."""
    n_channels, height, width = check_image_shape(shape)
    if height % 4 or width % 4:
        raise ConfigError(f"model.arch={arch} halves the image twice: height and width must be multiples of 4, "
                          f"got {height}x{width}")
    return n_channels, height, width


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

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None,
               eps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Decoder output [B, C', H, W] from codes z [B, D]. `eps` is the noise of latent groups below the code
        (one [B, *shape] per entry of `lower_shapes`, already times a temperature; None = their prior means);
        a model with one latent has none and ignores it."""
        raise NotImplementedError

    # the latent groups: their names (the code first) and the per-image shapes of those below the code
    group_names: tuple[str, ...] = ("code",)
    lower_shapes: tuple[tuple[int, ...], ...] = ()

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

    def group_kl(self, x: torch.Tensor, y: torch.Tensor | None, noise) -> torch.Tensor:
        """KL of each latent group [L, B] (the terms whose sum is elbo_terms' kl); here L = 1."""
        mu, logvar = self.encode(x, y)
        return kl_to_standard_normal(mu.float(), logvar.float())[None]

    def posterior_offsets(self, x: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """What each latent group's posterior mean says beyond its prior's: E_q[z_i | x] - E_p[z_i | z_<i], a
        list over L of [B, d_i] (active units are counted on these). For a N(0, I) prior, E_q[z | x] itself."""
        return [self.encode(x, y)[0].float()]

    def reconstruct_logits(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder output at the posterior mean: decode(mu(x)). [B, C, H, W] -> [B, C', H, W]."""
        return self.decode(self.encode(x, y)[0], y)

    def log_weight_terms(self, x: torch.Tensor, y: torch.Tensor | None, k: int, noise,
                         chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(x|z_j), log p(z_j) - log q(z_j|x)), each [k, B], for k samples z_j ~ q(z|x) drawn with
        eps = noise(t). The k samples are decoded `chunk` at a time (one batched decode of chunk * B images)."""
        mu, logvar = self.encode(x, y)
        mu, logvar = mu.float(), logvar.float()
        log_pxs, log_ratios = [], []
        for start in range(0, k, chunk):
            kk = min(chunk, k - start)
            z = reparameterize(mu, logvar, torch.stack(per_sample_noise(noise, mu, kk)))  # [kk, B, D]
            yy = None if y is None else y.repeat(kk)
            logits = self.decode(z.reshape(-1, z.shape[-1]), yy).view(kk, *x.shape[:1], -1, *x.shape[2:])
            log_pxs.append(log_px(x, logits.float(), self.likelihood))
            log_ratios.append(log_standard_normal(z) - log_normal(z, mu, logvar))
        return torch.cat(log_pxs), torch.cat(log_ratios)

    def log_weights(self, x: torch.Tensor, y: torch.Tensor | None, k: int, generator: torch.Generator | None = None,
                    chunk: int = 256, noise=None) -> torch.Tensor:
        """log w_j = log p(x, z_j) - log q(z_j|x), z_j ~ q(z|x), j = 1..k. x: [B, C, H, W] -> [k, B].

        The noise comes from `noise` (a callable as in elbo_terms) or else from `generator` (on x's device),
        else the global torch RNG.
        """
        if noise is None:
            def noise(t):
                return torch.randn(t.shape, device=t.device, dtype=t.dtype, generator=generator)
        log_px_, log_ratio = self.log_weight_terms(x, y, k, noise, chunk)
        return log_px_ + log_ratio

    def prior_codes(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n codes from the prior at a temperature: z ~ N(0, temperature^2 I), on the CPU. -> [n, D]."""
        return temperature * torch.randn(n, self.code_dim, generator=generator)

    def _one_hot(self, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        if not self.n_classes:
            return None
        if y is None:
            raise ValueError("this is a conditional model: pass the labels y")
        return F.one_hot(y, self.n_classes).to(like.dtype)


