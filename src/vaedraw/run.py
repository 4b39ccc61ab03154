"""A trained run, loaded from its directory: the Python API behind `vaedraw sample`, `reconstruct`, ...

    run = vaedraw.load_run("runs/mnist")
    mu, logvar = run.encode(x)          # x: [B, 1, 28, 28] in [0, 1]
    x_mean = run.decode(z)              # z: [n, D] -> pixel means [n, 1, 28, 28]
    x_new = run.sample(64, sampler="gmm", seed=0)
    x_rec = run.reconstruct(x)          # decode(mu(x)), dropout off
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .config import RunConfig
from .errors import CheckpointError, VaedrawError
from .models import VAE
from .sample import GMM_NAME, GaussianMixture, decode_means, draw_codes

N_DIGITS = 10


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else the CPU; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VaedrawError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise VaedrawError(f"unknown device {device!r}; use auto, cpu or cuda") from None


@dataclass
class Run:
    """A run directory's model (in eval mode), config and fitted sampler."""

    run_dir: Path
    config: RunConfig
    model: VAE
    step: int
    metrics: dict
    gmm: GaussianMixture | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    @property
    def conditional(self) -> bool:
        return self.model.n_classes > 0

    def check_labels(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """Conditional runs need labels in 0..n_classes-1; others take none."""
        if not self.conditional:
            if y is not None:
                raise VaedrawError(f"this run ({self.config.preset} preset) is not conditional: it cannot draw a "
                                   "chosen digit; train one with --preset conditional")
            return None
        if y is None:
            raise VaedrawError("this run is conditional: say which digits to draw (--digit 0-9, a list, or all)")
        y = torch.as_tensor(y, dtype=torch.long)
        if y.numel() and (y.min() < 0 or y.max() >= self.model.n_classes):
            raise VaedrawError(f"digit labels must be in 0..{self.model.n_classes - 1}")
        return y

    @torch.no_grad()
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, 1, 28, 28] in [0, 1] -> (mu, logvar) [B, D] on the CPU."""
        y = self.check_labels(y)
        mu, logvar = self.model.encode(x.to(self.device).float(), None if y is None else y.to(self.device))
        return mu.float().cpu(), logvar.float().cpu()

    @torch.no_grad()
    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z: [n, D] -> pixel means [n, 1, 28, 28] in [0, 1] on the CPU."""
        z = torch.as_tensor(z, dtype=torch.float32)
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise VaedrawError(f"codes must have shape [n, {self.latent_dim}], got {list(z.shape)}")
        return decode_means(self.model, z, self.check_labels(y))

    @property
    def default_sampler(self) -> str:
        """The preset's sampler, or the prior when the preset's mixture was never fitted (sample.fit_gmm=false)."""
        sampler = self.config.sample.sampler
        return "prior" if sampler == "gmm" and self.gmm is None else sampler

    def codes(self, n: int, sampler: str | None = None, seed: int | None = None,
              temperature: float | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """n codes [n, D] from `sampler` (default: `default_sampler`); y [n] for conditional runs."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        return draw_codes(sampler or self.default_sampler, n, self.latent_dim,
                          temperature=self.config.sample.temperature if temperature is None else temperature,
                          gmm=self.gmm, generator=g, y=y)

    def sample(self, n: int, sampler: str | None = None, seed: int | None = None,
               temperature: float | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """n new images (pixel means) [n, 1, 28, 28]. For a conditional run, y: [n] labels; its gmm
        sampler draws z | y from the components fitted to that digit's codes."""
        if n < 0:
            raise VaedrawError(f"-n must be positive, got {n}")
        y = self.check_labels(y)
        if y is not None and len(y) != n:
            raise VaedrawError(f"got {len(y)} labels for {n} samples")
        return self.decode(self.codes(n, sampler, seed, temperature, y), y)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """decode(mu(x)) with dropout off: [B, 1, 28, 28] -> [B, 1, 28, 28] pixel means."""
        mu, _ = self.encode(x, y)
        return self.decode(mu, y)


def load_run(run_dir: str | Path, device: str = "auto") -> Run:
    """Load a run directory written by `vaedraw train` (rebuilding the model from its stored config)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; train one with `vaedraw train --out {run_dir}`")
    path = run_dir / ckpt_io.CHECKPOINT_NAME
    ckpt = ckpt_io.load(path)
    model = ckpt_io.model_from_checkpoint(ckpt, path).to(resolve_device(device)).eval()
    gmm_path = run_dir / GMM_NAME
    gmm = GaussianMixture.load(gmm_path) if gmm_path.exists() else None
    if gmm is not None and gmm.means.shape[1] != model.latent_dim:
        raise CheckpointError(f"{gmm_path} was fitted to {gmm.means.shape[1]}-d codes but the model's are "
                              f"{model.latent_dim}-d; refit it")
    return Run(run_dir=run_dir, config=ckpt.config, model=model, step=ckpt.step, metrics=ckpt.metrics, gmm=gmm)
