"""HierarchicalVAE: a top-down hierarchical VAE (the NVAE / VDVAE family) for C x H x W images, H, W multiples of 4.

Latent groups, top to bottom (L = 1 + 2 * groups):

    z_0        the code: a vector [D] (D = model.latent_dim), prior N(0, I)
    z_1..z_G   maps [k_lo, H/4, W/4]   (G = model.hierarchical.groups, k_lo = latent_channels)
    z_G+1..    maps [k_hi, H/2, W/2]   (k_hi = latent_channels / 2)

Generative model p(x, z) = p(z_0) prod_i p(z_i | z_<i) p(x | z): the top-down path starts from z_0 (a dense
layer to a [c_lo, H/4, W/4] map h), and every group reads its prior p(z_i | z_<i) = N(mu_p(h), sigma_p(h))
from h, then adds its sample back into h (h <- cell(h + proj(z_i))). Between the two resolutions h is
upsampled; the output is a stride-2 transposed conv from H/2 to the decoder's channels at H.

Inference q(z | x) = q(z_0 | x) prod_i q(z_i | x, z_<i): a bottom-up deterministic encoder gives features
e_lo [c_lo, H/4, W/4] and e_hi [c_hi, H/2, W/2] once per image; each group's posterior is parameterized
relative to its prior (NVAE's residual normal, Vahdat & Kautz 2020, eq. 2):

    q(z_i | x, z_<i) = N(mu_p + dmu, sigma_p * exp(dlogvar / 2)),  (dmu, dlogvar) = conv([h, e])

so a group that carries no information sits at dmu = dlogvar = 0 and costs no KL, and the KL of the others
measures the change from prior to posterior. Log-variances are soft-clamped to [-LOGVAR_LIMIT, LOGVAR_LIMIT]
(a tanh), which keeps early updates from sending sigma to 0 or infinity.

What tools see: the code z_0 (`encode` gives its posterior, `decode(z_0)` draws the lower groups at their
prior means, or at `eps` noise for samples at a temperature), so the mixture sampler, interpolation, latent
maps and the explorer work on it unchanged. `reconstruct_logits` uses every group's posterior mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..objectives import decoder_channels, kl_normal, log_normal, log_px, reconstruction_loss
from .base import VAE, check_halvable, per_sample_noise
from .seed import SEED_IMAGE_SHAPE

LOGVAR_LIMIT = 8.0  # |log sigma^2| at most this: sigma in [0.018, 55]


def soft_clamp(t: torch.Tensor, limit: float = LOGVAR_LIMIT) -> torch.Tensor:
    """limit * tanh(t / limit): about t for |t| << limit, never beyond +-limit, gradients everywhere."""
    return limit * torch.tanh(t / limit)


class ResidualCell(nn.Module):
    """h + conv3x3(SiLU(conv3x3(SiLU(h)))): [B, c, h, w] -> same. The last conv starts at zero, so a new
    cell is the identity and a deep top-down path starts as a short one (the usual trick for stability)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.conv2(F.silu(self.conv1(F.silu(h))))


class LatentGroup(nn.Module):
    """One latent group on a feature map: its prior from h, its posterior relative to the prior from [h, e],
    and the cell that merges its sample back into h. Maps: h [B, c, r, s], e [B, c, r, s], z [B, k, r, s]."""

    def __init__(self, channels: int, latent_channels: int):
        super().__init__()
        self.prior = nn.Conv2d(channels, 2 * latent_channels, 3, padding=1)
        self.posterior = nn.Conv2d(2 * channels, 2 * latent_channels, 3, padding=1)
        self.project = nn.Conv2d(latent_channels, channels, 1)
        self.cell = ResidualCell(channels)
        # the posterior starts at the prior (zero residual) and the prior at N(0, I)
        for conv in (self.prior, self.posterior):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def prior_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.prior(h).float().chunk(2, dim=1)
        return mu, soft_clamp(logvar)

    def posterior_params(self, h: torch.Tensor, e: torch.Tensor, mu_p: torch.Tensor,
                         logvar_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dmu, dlogvar = self.posterior(torch.cat([h, e], dim=1)).float().chunk(2, dim=1)
        return mu_p + dmu, soft_clamp(logvar_p + dlogvar)

    def merge(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.cell(h + self.project(z.to(h.dtype)))


class HierarchicalVAE(VAE):
    """See the module docstring. Options (model.hierarchical): channels (c_lo; c_hi = c_lo / 2), groups (per
    resolution), latent_channels (k_lo; k_hi = k_lo / 2), hidden (the dense layer beside z_0); model.latent_dim
    is D, the code's size. A conditional model adds the one-hot label to the encoder's top dense layer and to
    z_0 where it enters the top-down path."""

    def __init__(self, cfg: ModelConfig, image_shape=SEED_IMAGE_SHAPE):
        super().__init__()
        n_channels, height, width = check_halvable(image_shape, "hierarchical")
        if cfg.likelihood == "gaussian":
            raise ConfigError("model.arch=hierarchical models binarized pixels (likelihood bernoulli) or 8-bit ones "
                              "(logistic_mixture); the gaussian squared error is the article's: use model.arch=seed "
                              "or conv for it")
        o = cfg.hierarchical
        self.image_shape, self.likelihood = (n_channels, height, width), cfg.likelihood
        self.latent_dim, self.n_classes = cfg.latent_dim, cfg.n_classes
        c_lo, c_hi = o.channels, max(1, o.channels // 2)
        k_lo, k_hi = o.latent_channels, max(1, o.latent_channels // 2)
        self._lo, self._hi = (height // 4, width // 4), (height // 2, width // 2)
        self._c_lo = c_lo
        flat = c_lo * self._lo[0] * self._lo[1]
        n_out = decoder_channels(cfg.likelihood, n_channels, cfg.mixture_components)

        # bottom-up: H -> H/2 (e_hi) -> H/4 (e_lo) -> the code's posterior
        self.stem = nn.Conv2d(n_channels, c_hi, 4, stride=2, padding=1)
        self.up_cells_hi = nn.Sequential(*(ResidualCell(c_hi) for _ in range(o.groups)))
        self.down = nn.Conv2d(c_hi, c_lo, 4, stride=2, padding=1)
        self.up_cells_lo = nn.Sequential(*(ResidualCell(c_lo) for _ in range(o.groups)))
        self.to_code = nn.Sequential(nn.Linear(flat + self.n_classes, o.hidden), nn.SiLU(),
                                     nn.Linear(o.hidden, 2 * cfg.latent_dim))
        # top-down: z_0 -> h [c_lo, H/4, W/4] -> groups -> upsample -> groups -> pixels
        self.from_code = nn.Sequential(nn.Linear(cfg.latent_dim + self.n_classes, o.hidden), nn.SiLU(),
                                       nn.Linear(o.hidden, flat), nn.SiLU())
        self.groups_lo = nn.ModuleList(LatentGroup(c_lo, k_lo) for _ in range(o.groups))
        self.upsample = nn.ConvTranspose2d(c_lo, c_hi, 4, stride=2, padding=1)
        self.groups_hi = nn.ModuleList(LatentGroup(c_hi, k_hi) for _ in range(o.groups))
        self.to_pixels = nn.ConvTranspose2d(c_hi, n_out, 4, stride=2, padding=1)
        self.group_names = ("code",) + tuple(f"{self._lo[0]}x{self._lo[1]}.{i + 1}" for i in range(o.groups)) + \
            tuple(f"{self._hi[0]}x{self._hi[1]}.{i + 1}" for i in range(o.groups))
        self.lower_shapes = ((k_lo, *self._lo),) * o.groups + ((k_hi, *self._hi),) * o.groups

    # ------------------------------------------------------------------ the two paths
    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e_hi = self.up_cells_hi(F.silu(self.stem(x)))
        e_lo = self.up_cells_lo(self.down(e_hi))
        return e_lo, e_hi

    def _code_posterior(self, e_lo: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.silu(e_lo).flatten(1)
        onehot = self._one_hot(y, h)
        if onehot is not None:
            h = torch.cat([h, onehot], dim=1)
        mu, logvar = self.to_code(h).float().chunk(2, dim=1)
        return mu, soft_clamp(logvar)

    def _top(self, z0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        onehot = self._one_hot(y, z0)
        if onehot is not None:
            z0 = torch.cat([z0, onehot], dim=1)
        return self.from_code(z0).view(-1, self._c_lo, *self._lo)

    def _groups(self):
        """(group, resolution index: 0 for H/4, 1 for H/2), top to bottom."""
        yield from ((g, 0) for g in self.groups_lo)
        yield from ((g, 1) for g in self.groups_hi)

    def _top_down(self, z0: torch.Tensor, y: torch.Tensor | None, choose) -> torch.Tensor:
        """Run the top-down path from z_0 [B, D]; `choose(i, h, group) -> z_i` picks each lower group's
        sample (it may record terms on the way). Returns the decoder output [B, C', H, W]."""
        h = self._top(z0, y)
        for i, (group, level) in enumerate(self._groups()):
            if level == 1 and i == len(self.groups_lo):
                h = F.silu(self.upsample(h))
            h = group.merge(h, choose(i, h, group))
        if not self.groups_hi:
            h = F.silu(self.upsample(h))
        return self.to_pixels(F.silu(h))

    # ------------------------------------------------------------------ the code interface
    def encode(self, x, y=None):
        e_lo, _ = self._features(x)
        return self._code_posterior(e_lo, y)

    def decode(self, z, y=None, eps=None):
        """Decoder output from the code z_0 [B, D]; lower groups at their prior means (eps None) or at
        mu_p + sigma_p * eps_i (eps: a list of [B, *lower_shapes[i]] noise, already times a temperature)."""
        def choose(i, h, group):
            mu, logvar = group.prior_params(h)
            return mu if eps is None else mu + torch.exp(0.5 * logvar) * eps[i].to(mu)
        return self._top_down(z, y, choose)

    def reconstruct_logits(self, x, y=None):
        """Every group at its posterior mean given x (and the groups above at theirs): [B, C', H, W]."""
        return self._posterior_pass(x, y, noise=None)[0]

    # ------------------------------------------------------------------ objective and bounds
    def _posterior_pass(self, x, y, noise, k: int = 1):
        """Sample z ~ q(z | x) top to bottom (posterior means when noise is None), k samples per image.

        x: [B, C, H, W] -> (logits [k * B, C', H, W] sample-major, terms), terms a list over the L groups
        of dicts with mu, logvar (posterior), mu_p, logvar_p (prior; None for z_0) and z, each [k * B, ...]
        float32.
        """
        e_lo, e_hi = self._features(x)
        mu0, logvar0 = self._code_posterior(e_lo, y)
        b = x.shape[0]
        if k > 1:  # sample-major: rows j*B..(j+1)*B are sample j of every image
            e_lo, e_hi = e_lo.repeat(k, 1, 1, 1), e_hi.repeat(k, 1, 1, 1)
            mu0, logvar0 = mu0.repeat(k, 1), logvar0.repeat(k, 1)
            y = None if y is None else y.repeat(k)

        def draw(mu):  # one call per sample, as VAE.log_weight_terms draws
            return torch.cat(per_sample_noise(noise, mu[:b], k)) if k > 1 else noise(mu)

        z0 = mu0 if noise is None else mu0 + torch.exp(0.5 * logvar0) * draw(mu0)
        terms = [dict(mu=mu0, logvar=logvar0, mu_p=None, logvar_p=None, z=z0)]

        def choose(i, h, group):
            mu_p, logvar_p = group.prior_params(h)
            mu, logvar = group.posterior_params(h, e_lo if i < len(self.groups_lo) else e_hi, mu_p, logvar_p)
            z = mu if noise is None else mu + torch.exp(0.5 * logvar) * draw(mu)
            terms.append(dict(mu=mu, logvar=logvar, mu_p=mu_p, logvar_p=logvar_p, z=z))
            return z

        return self._top_down(z0, y, choose), terms

    @staticmethod
    def _group_kl(t: dict) -> torch.Tensor:
        """KL(q(z_i | x, z_<i) || p(z_i | z_<i)) analytically, given the sampled parents: [N]."""
        mu, logvar = t["mu"].flatten(1), t["logvar"].flatten(1)
        if t["mu_p"] is None:
            return kl_normal(mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar))
        return kl_normal(mu, logvar, t["mu_p"].flatten(1), t["logvar_p"].flatten(1))

    def elbo_terms(self, x, y, noise):
        """recon [B] = -log p(x | z), kl [B] = sum over groups of the analytic KL of each group given its
        sampled parents (NVAE's estimator: exact in z_i, one sample of z_<i), and the logits."""
        logits, terms = self._posterior_pass(x, y, noise)
        kl = torch.stack([self._group_kl(t) for t in terms]).sum(0)
        return reconstruction_loss(x, logits.float(), self.likelihood), kl, logits

    def group_kl(self, x, y, noise) -> torch.Tensor:
        """Per-group KL [L, B], one posterior sample of the parents (the terms `elbo_terms` sums)."""
        _, terms = self._posterior_pass(x, y, noise)
        return torch.stack([self._group_kl(t) for t in terms])

    def posterior_offsets(self, x, y=None) -> list[torch.Tensor]:
        """E_q[z_i | x, z_<i] - E_p[z_i | z_<i] of each group (the residual dmu; mu for the code), the groups
        above at their posterior means: a list over L of [B, d_i]. A lower group's prior mean moves with the
        groups above, so its posterior mean varies over images even when the group carries nothing; the
        offset does not."""
        _, terms = self._posterior_pass(x, y, noise=None)
        return [(t["mu"] if t["mu_p"] is None else t["mu"] - t["mu_p"]).flatten(1) for t in terms]

    def log_weight_terms(self, x, y, k, noise, chunk=256):
        """(log p(x | z_j) [k, B], log p(z_j) - log q(z_j | x) [k, B]) over all L groups, z_j ~ q(z | x):
        log p(z) = log N(z_0; 0, I) + sum_i log p(z_i | z_<i), log q alike; `chunk` samples per pass."""
        log_px_parts, log_ratio_parts = [], []
        for start in range(0, k, chunk):
            kk = min(chunk, k - start)
            logits, terms = self._posterior_pass(x, y, noise, k=kk)
            ratio = 0.0
            for t in terms:
                z, mu, logvar = t["z"].flatten(1), t["mu"].flatten(1), t["logvar"].flatten(1)
                mu_p = torch.zeros_like(z) if t["mu_p"] is None else t["mu_p"].flatten(1)
                logvar_p = torch.zeros_like(z) if t["logvar_p"] is None else t["logvar_p"].flatten(1)
                ratio = ratio + log_normal(z, mu_p, logvar_p) - log_normal(z, mu, logvar)
            log_px_parts.append(log_px(x, logits.float().view(kk, *x.shape[:1], *logits.shape[1:]), self.likelihood))
            log_ratio_parts.append(ratio.view(kk, -1))
        return torch.cat(log_px_parts), torch.cat(log_ratio_parts)

