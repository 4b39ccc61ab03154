"""Drawing from a trained model: samplers for z, decoding to pixel means, reconstructions.

Samplers (all return z: [n, D]):
- prior: z ~ N(0, t^2 I) with temperature t.
- gmm: ex-post density estimation (Ghosh et al. 2020): a Gaussian mixture fitted by scikit-learn to the
  encoder means of the training images after training, stored as tensors in `RUN_DIR/gmm.safetensors`
  and sampled here in torch, so drawing is instant and loading executes no code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import fastpath
from .checkpoint import atomic_write_bytes
from .errors import CheckpointError, VaedrawError

GMM_NAME = "gmm.safetensors"
SAMPLERS = ("prior", "gmm")


@dataclass
class GaussianMixture:
    """A full-covariance mixture: weights [K], means [K, D], scale_tril [K, D, D] (Cholesky factors).

    For a conditional model the mixture is class-conditional: `labels` [K] says which digit each
    component was fitted to (the codes of that digit's training images), so z | y is drawn from the
    components of y alone. Codes still carry some of the digit's identity; drawing them from the same
    digit's region keeps z and y in agreement.
    """

    weights: torch.Tensor
    means: torch.Tensor
    scale_tril: torch.Tensor
    labels: torch.Tensor | None = None

    def sample(self, n: int, generator: torch.Generator | None = None,
               y: torch.Tensor | None = None) -> torch.Tensor:
        """z = means[c] + L[c] eps, c ~ Categorical(weights) (restricted to label y[i] when given). -> [n, D]."""
        if y is not None and self.labels is not None:
            p = self.weights[None, :] * (self.labels[None, :] == y.cpu()[:, None])  # [n, K]
            missing = p.sum(1) == 0
            if missing.any():
                raise VaedrawError(f"the mixture has no component for digit(s) {sorted(set(y[missing].tolist()))}")
            c = torch.multinomial(p, 1, generator=generator)[:, 0]
        else:
            c = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], 1, generator=generator, dtype=self.means.dtype)
        return self.means[c] + (self.scale_tril[c] @ eps).squeeze(-1)

    def save(self, path: str | Path) -> None:
        tensors = {"weights": self.weights, "means": self.means, "scale_tril": self.scale_tril}
        if self.labels is not None:
            tensors["labels"] = self.labels
        atomic_write_bytes(Path(path), lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))

    @classmethod
    def load(cls, path: str | Path) -> GaussianMixture:
        try:
            t = load_file(str(path))
            gmm = cls(t["weights"], t["means"], t["scale_tril"], t.get("labels"))
        except Exception as e:  # any unreadable or incomplete file means the same thing to the user
            raise CheckpointError(f"{path} is not a readable mixture file ({e}); refit it with "
                                  "`vaedraw fit-gmm RUN_DIR`") from None
        k, d = gmm.means.shape
        if (gmm.weights.shape != (k,) or gmm.scale_tril.shape != (k, d, d)
                or (gmm.labels is not None and gmm.labels.shape != (k,))):
            raise CheckpointError(f"{path}: mixture tensors have inconsistent shapes")
        return gmm

    @classmethod
    def fit(cls, z: np.ndarray, n_components: int, seed: int = 0, y: np.ndarray | None = None) -> GaussianMixture:
        """Fit by EM (scikit-learn, full covariances, k-means init). z: [N, D]; with labels y: [N], one
        mixture of about n_components / n_classes components per label, weighted by the label's share."""
        from sklearn.mixture import GaussianMixture as SkGMM

        def fit_one(zc: np.ndarray, k: int):
            sk = SkGMM(n_components=max(1, min(k, len(zc))), covariance_type="full", random_state=seed,
                       reg_covar=1e-5, max_iter=200)
            sk.fit(zc.astype(np.float64))
            return sk.weights_, sk.means_, sk.covariances_

        if y is None:
            parts, labels = [(1.0, *fit_one(z, n_components))], None
        else:
            classes = np.unique(y)
            k = max(1, round(n_components / len(classes)))
            parts = [(float(np.mean(y == c)), *fit_one(z[y == c], k)) for c in classes]
            labels = torch.as_tensor(np.concatenate([np.full(len(p[1]), c) for c, p in zip(classes, parts)]))
        weights = np.concatenate([share * w for share, w, _, _ in parts])
        cov = torch.as_tensor(np.concatenate([c for _, _, _, c in parts]), dtype=torch.float64)
        return cls(
            weights=torch.as_tensor(weights / weights.sum(), dtype=torch.float32),
            means=torch.as_tensor(np.concatenate([m for _, _, m, _ in parts]), dtype=torch.float32),
            scale_tril=torch.linalg.cholesky(cov).float(),
            labels=None if labels is None else labels.long(),
        )


def prior_sample(n: int, latent_dim: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """z ~ N(0, temperature^2 I). -> [n, D]."""
    return temperature * torch.randn(n, latent_dim, generator=generator)


@torch.no_grad()
def encode_means(model, images: torch.Tensor, labels: torch.Tensor | None = None,
                 batch_size: int = 2000) -> torch.Tensor:
    """Encoder means mu(x) of uint8 images [N, 28, 28] (embedding uses the mean, not a sample). -> [N, D]."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).unsqueeze(1).float().div_(255)
        y = None if labels is None or not model.n_classes else labels[i:i + batch_size].to(device)
        out.append(model.encode(x, y)[0].float().cpu())
    return torch.cat(out)


def fit_gmm(model, images: torch.Tensor, labels: torch.Tensor | None, n_components: int, seed: int,
            out: str | Path) -> GaussianMixture:
    """Fit the gmm sampler to the training set's encoder means and save it to `out`."""
    was_training = model.training
    model.eval()
    z = encode_means(model, images, labels).numpy()
    model.train(was_training)
    y = labels.numpy() if labels is not None and model.n_classes else None
    gmm = GaussianMixture.fit(z, n_components, seed, y)
    gmm.save(out)
    return gmm


def draw_codes(sampler: str, n: int, latent_dim: int, *, temperature: float = 1.0,
               gmm: GaussianMixture | None = None, generator: torch.Generator | None = None,
               y: torch.Tensor | None = None) -> torch.Tensor:
    """n codes [n, D]; y [n] (conditional runs) selects the class-conditional mixture's components."""
    check_sampler(sampler, gmm)
    if sampler == "prior":
        return prior_sample(n, latent_dim, temperature, generator)
    return gmm.sample(n, generator, y)


def check_sampler(sampler: str, gmm: GaussianMixture | None) -> None:
    """A VaedrawError naming the fix unless `sampler` can draw (gmm needs a fitted mixture)."""
    if sampler not in SAMPLERS:
        raise VaedrawError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if sampler == "gmm" and gmm is None:
        raise VaedrawError("this run has no fitted mixture for --sampler gmm; fit one with "
                           "`vaedraw fit-gmm RUN_DIR` or use --sampler prior")


@torch.no_grad()
def decode_means(model, z: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 1000,
                 precision: str = "auto") -> torch.Tensor:
    """Pixel means sigmoid(decode(z)) in [0, 1]. z: [n, D] -> [n, 1, 28, 28] float32 on the CPU.

    precision auto decodes in bfloat16 where the device computes it natively (`fastpath.inference_autocast`);
    batches of 1,000 keep a CPU's activations in cache (10,000 default-model digits: about 0.4 s on 2 cores).
    """
    device = next(model.parameters()).device
    out = []
    with fastpath.inference_autocast(device, precision):
        for i in range(0, len(z), batch_size):
            yy = None if y is None else y[i:i + batch_size].to(device)
            out.append(torch.sigmoid(model.decode(z[i:i + batch_size].to(device), yy).float()).cpu())
    return torch.cat(out) if out else torch.empty(0, 1, 28, 28)


def to_npz_array(x: torch.Tensor) -> np.ndarray:
    """The interchange format: uint8 [n, 28, 28], each pixel round(255 * mean of the pixel distribution)."""
    return torch.round(x.float().clamp(0, 1)[:, 0] * 255).to(torch.uint8).numpy()


def save_npz(path: str | Path, x: torch.Tensor, **extra: np.ndarray) -> Path:
    path = Path(path)
    arrays = {"x": to_npz_array(x), **extra}

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write_bytes(path, write)
    return path
