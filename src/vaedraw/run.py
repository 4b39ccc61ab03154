"""A trained run, loaded from its directory: the Python API behind `vaedraw sample`, `reconstruct`, ...

    run = vaedraw.load_run("runs/mnist")
    mu, logvar = run.encode(x)          # x: [B, C, H, W] in [0, 1] (run.image_shape) -> the code posterior [B, D]
    x_mean = run.decode(z)              # codes z: [n, D] -> pixel means [n, C, H, W]
    x_new = run.sample(64, sampler="gmm", seed=0)
    x_rec = run.reconstruct(x)          # at the posterior mean (decode(mu(x))), dropout off

Codes are what the model exposes to tools (models/): D = run.latent_dim = the model's code_dim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .config import RunConfig
from .errors import CheckpointError, VaedrawError
from .models import VAE
from .sample import GMM_NAME, GaussianMixture, decode_means, draw_codes, reconstruct_means

DATA_SOURCE_NAME = "data.json"  # where a run records the data it was trained on


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else the CPU; 'cpu', 'cuda' and 'cuda:N' must exist here.

    Anything else (mps, xla, meta, a typo) is refused: the models and their fast paths are written
    and tested for CPUs and CUDA GPUs only.
    """
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise VaedrawError(f"--device {device!r} is not one vaedraw runs on; use auto, cpu, cuda or cuda:N")
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise VaedrawError(f"--device {device!r}: there is one CPU device; use --device cpu")
        return dev
    if not torch.cuda.is_available():
        raise VaedrawError(f"--device {device} was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise VaedrawError(f"--device {device}: this machine has {count} CUDA GPU{'s' if count > 1 else ''} "
                           f"(cuda:0..cuda:{count - 1})")
    return dev


@dataclass
class Run:
    """A run directory's model (in eval mode), config and fitted sampler."""

    run_dir: Path
    config: RunConfig
    model: VAE
    step: int
    metrics: dict
    gmm: GaussianMixture | None = None
    data_source: dict | None = None  # {"train": provenance, "test": provenance}; None for runs saved before

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def latent_dim(self) -> int:
        """The size D of the codes tools see (the model's code_dim)."""
        return self.model.code_dim

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.model.image_shape)

    @property
    def n_classes(self) -> int:
        return self.model.n_classes

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

    def _check_images(self, x) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise VaedrawError(f"images must have shape [B, {', '.join(map(str, self.image_shape))}], "
                               f"got {list(x.shape)}")
        return x

    @torch.no_grad()
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] in [0, 1] -> the code posterior (mu, logvar) [B, D] on the CPU."""
        y = self.check_labels(y)
        x = self._check_images(x)
        mu, logvar = self.model.encode(x.to(self.device).float(), None if y is None else y.to(self.device))
        return mu.float().cpu(), logvar.float().cpu()

    @torch.no_grad()
    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None, temperature: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """codes z: [n, D] -> pixel means [n, C, H, W] in [0, 1] on the CPU. Latent groups below the code
        (hierarchical models) come from their priors at `temperature` (0: their means)."""
        z = torch.as_tensor(z, dtype=torch.float32)
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise VaedrawError(f"codes must have shape [n, {self.latent_dim}], got {list(z.shape)}")
        return decode_means(self.model, z, self.check_labels(y), temperature=temperature, generator=generator)

    @property
    def default_sampler(self) -> str:
        """The preset's sampler, or the prior when the preset's mixture was never fitted (sample.fit_gmm=false)."""
        sampler = self.config.sample.sampler
        return "prior" if sampler == "gmm" and self.gmm is None else sampler

    def codes(self, n: int, sampler: str | None = None, seed: int | None = None,
              temperature: float | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """n codes [n, D] from `sampler` (default: `default_sampler`); y [n] for conditional runs."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        return draw_codes(sampler or self.default_sampler, n, self.model,
                          temperature=self.config.sample.temperature if temperature is None else temperature,
                          gmm=self.gmm, generator=g, y=y)

    def sample(self, n: int, sampler: str | None = None, seed: int | None = None,
               temperature: float | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """n new images (pixel means) [n, C, H, W]. For a conditional run, y: [n] labels; its gmm
        sampler draws z | y from the components fitted to that digit's codes."""
        if n < 0:
            raise VaedrawError(f"-n must be positive, got {n}")
        y = self.check_labels(y)
        if y is not None and len(y) != n:
            raise VaedrawError(f"got {len(y)} labels for {n} samples")
        t = self.config.sample.temperature if temperature is None else temperature
        # the lower groups' noise from its own generator, so the codes are those `codes` gives for the seed
        g = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        return self.decode(self.codes(n, sampler, seed, t, y), y, temperature=t, generator=g)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction at the posterior mean, dropout off (decode(mu(x)); for a hierarchy every group's
        posterior mean): [B, C, H, W] -> [B, C, H, W] pixel means."""
        y = self.check_labels(y)
        x = self._check_images(x)
        return reconstruct_means(self.model, x.float(), y)

    def load_split(self, split: str, data_dir: str | Path | None = None, progress: bool = True):
        """The `split` ("train" or "test") of the data this run was trained on (`data.load_recorded`:
        other data are refused with a message saying which to pass); for a run saved before runs
        recorded their data, the config's data set from `data_dir` or the usual places."""
        from . import data

        if self.data_source is None:
            return data.load_split(self.config.data.dataset, split, data_dir, progress=progress)
        return data.load_recorded(self.data_source[split], split, data_dir, progress=progress)


def load_run(run_dir: str | Path, device: str = "auto", with_gmm: bool = True) -> Run:
    """Load a run directory written by `vaedraw train` (rebuilding the model from its stored config).

    with_gmm=False leaves the fitted mixture unread (`vaedraw fit-gmm` replaces it, even a damaged one)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():  # a mistyped path: a usage error, not a damaged run
        raise VaedrawError(f"run directory {run_dir} does not exist; train one with `vaedraw train --out {run_dir}`")
    path = run_dir / ckpt_io.CHECKPOINT_NAME
    ckpt = ckpt_io.load(path)
    model = ckpt_io.model_from_checkpoint(ckpt, path).to(resolve_device(device)).eval()
    gmm_path = run_dir / GMM_NAME
    gmm = GaussianMixture.load(gmm_path) if with_gmm and gmm_path.exists() else None
    if gmm is not None and gmm.means.shape[1] != model.code_dim:
        raise CheckpointError(f"{gmm_path} was fitted to {gmm.means.shape[1]}-d codes but the model's are "
                              f"{model.code_dim}-d; refit it")
    return Run(run_dir=run_dir, config=ckpt.config, model=model, step=ckpt.step, metrics=ckpt.metrics, gmm=gmm,
               data_source=read_data_source(run_dir))


def read_data_source(run_dir: Path) -> dict | None:
    """The data a run recorded at training start (`data.json`: {"train": provenance, "test": provenance}),
    or None for a run saved before runs recorded it. A damaged file is a CheckpointError naming it."""
    path = Path(run_dir) / DATA_SOURCE_NAME
    if not path.exists():
        return None
    try:
        source = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable data record ({type(e).__name__}); it is written by "
                              "`vaedraw train`: restore it or retrain") from None
    if (not isinstance(source, dict) or not all(isinstance(source.get(k), dict) for k in ("train", "test"))):
        raise CheckpointError(f"{path} is not a data record (it needs \"train\" and \"test\" entries); "
                              "restore it or retrain")
    return source
