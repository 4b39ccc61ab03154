"""Drawing from a trained model: samplers for codes, decoding to pixel means, reconstructions.

Everything here sees a model through its code (models/): `encode_means` gives the codes of images,
`decode_means` the pixel means of codes, `model.prior_codes` draws codes from the prior.

Samplers (all return codes [n, D], D = model.code_dim):
- prior: the model's prior at temperature t (one Gaussian latent: z ~ N(0, t^2 I)).
- gmm: ex-post density estimation (Ghosh et al. 2020): a Gaussian mixture fitted by scikit-learn to the
  codes of the training images after training, stored as tensors in `RUN_DIR/gmm.safetensors`
  and sampled here in torch, so drawing is instant and loading executes no code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import data as data_mod
from . import fastpath
from .checkpoint import atomic_write_bytes
from .errors import CheckpointError, VaedrawError
from .objectives import pixel_mean

GMM_NAME = "gmm.safetensors"
SAMPLERS = ("prior", "gmm")
# Bounds on a mixture file read from disk (a fitted one is far below them): components, code size, and
# the elements of its Cholesky factors, checked before any tensor is read.
MAX_COMPONENTS = 10_000
MAX_CODE_DIM = 4096
MAX_MIXTURE_ELEMENTS = 256 * 1024 * 1024


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
        """Read a mixture file, refusing (CheckpointError naming the file) one that is unreadable, too
        large, of inconsistent shapes, non-finite, or whose weights are not a distribution."""
        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{path}: {why}; refit it with `vaedraw fit-gmm RUN_DIR`")

        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                if not {"weights", "means", "scale_tril"} <= names:
                    raise bad("not a mixture file (it lacks weights, means or scale_tril)")
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
                _check_mixture_shapes(shapes, bad)
                t = {k: f.get_tensor(k) for k in ("weights", "means", "scale_tril", "labels") if k in names}
        except CheckpointError:
            raise
        except Exception as e:  # any unreadable or incomplete file means the same thing to the user
            raise bad(f"not a readable mixture file ({type(e).__name__})") from None
        for k in ("weights", "means", "scale_tril"):
            if not t[k].is_floating_point():
                raise bad(f"its {k} are not floating-point numbers")
            if not torch.isfinite(t[k]).all():
                raise bad(f"its {k} hold non-finite numbers")
        w = t["weights"].double()
        if (w < 0).any() or abs(w.sum().item() - 1.0) > 1e-4:
            raise bad(f"its weights are not a distribution (they must be >= 0 and sum to 1, sum {w.sum().item():.6g})")
        labels = t.get("labels")
        if labels is not None and (labels.is_floating_point() or labels.is_complex() or (labels < 0).any()):
            raise bad("its labels are not class indices")
        return cls(t["weights"].float(), t["means"].float(), t["scale_tril"].float(),
                   None if labels is None else labels.long())

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


def _check_mixture_shapes(shapes: dict[str, tuple[int, ...]], bad) -> None:
    """Shapes of a mixture file's tensors: weights [K], means [K, D], scale_tril [K, D, D], labels [K], bounded."""
    means = shapes["means"]
    if len(means) != 2:
        raise bad(f"its means have shape {list(means)}, not [components, code size]")
    k, d = means
    if not (1 <= k <= MAX_COMPONENTS and 1 <= d <= MAX_CODE_DIM and k * d * d <= MAX_MIXTURE_ELEMENTS):
        raise bad(f"its size ({k:,} components of {d:,}-d codes) is beyond what vaedraw fits "
                  f"(at most {MAX_COMPONENTS:,} components, {MAX_CODE_DIM:,}-d)")
    want = {"weights": (k,), "scale_tril": (k, d, d), "labels": (k,)}
    wrong = [f"{name} {list(shapes[name])}" for name, shape in want.items() if name in shapes and shapes[name] != shape]
    if wrong:
        raise bad(f"mixture tensors have inconsistent shapes ({', '.join(wrong)} for {k} components of {d}-d codes)")


def _as_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images [N, H, W] / [N, H, W, C] (the data layer's) or float [N, C, H, W] in [0, 1] -> float on device."""
    images = images.to(device)
    if images.is_floating_point():
        return images.float()
    return data_mod.to_float(images)


@torch.no_grad()
def encode_means(model, images: torch.Tensor, labels: torch.Tensor | None = None,
                 batch_size: int = 2000) -> torch.Tensor:
    """The codes of images: encoder means mu(x) (embedding uses the mean, not a sample), dropout off. -> [N, D]
    float32 on the CPU.

    images: uint8 as the data layer holds them ([N, H, W] grey, [N, H, W, C] colour) or float [N, C, H, W]
    in [0, 1]; labels int64 [N], used by conditional models only.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = _as_model_input(images[i:i + batch_size], device)
            y = None if labels is None or not model.n_classes else labels[i:i + batch_size].to(device)
            out.append(model.encode(x, y)[0].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.code_dim)


def fit_gmm(model, images: torch.Tensor, labels: torch.Tensor | None, n_components: int, seed: int,
            out: str | Path) -> GaussianMixture:
    """Fit the gmm sampler to the training set's codes and save it to `out`."""
    z = encode_means(model, images, labels).numpy()
    y = labels.numpy() if labels is not None and model.n_classes else None
    gmm = GaussianMixture.fit(z, n_components, seed, y)
    gmm.save(out)
    return gmm


def draw_codes(sampler: str, n: int, model, *, temperature: float = 1.0,
               gmm: GaussianMixture | None = None, generator: torch.Generator | None = None,
               y: torch.Tensor | None = None) -> torch.Tensor:
    """n codes [n, D] for `model`; y [n] (conditional runs) selects the class-conditional mixture's components."""
    check_sampler(sampler, gmm)
    if sampler == "prior":
        return model.prior_codes(n, temperature, generator)
    return gmm.sample(n, generator, y)


def check_sampler(sampler: str, gmm: GaussianMixture | None) -> None:
    """A VaedrawError naming the fix unless `sampler` can draw (gmm needs a fitted mixture)."""
    if sampler not in SAMPLERS:
        raise VaedrawError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if sampler == "gmm" and gmm is None:
        raise VaedrawError("this run has no fitted mixture for --sampler gmm; fit one with "
                           "`vaedraw fit-gmm RUN_DIR` or use --sampler prior")


def _pixel_means(model, out: torch.Tensor) -> torch.Tensor:
    """Decoder output [n, P, H, W] -> pixel means [n, C, H, W] in [0, 1] (objectives.pixel_mean)."""
    return pixel_mean(out.float(), model.likelihood, model.image_shape[0])


@torch.no_grad()
def decode_means(model, z: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 1000,
                 precision: str = "auto", temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixel means of decode(z) in [0, 1]. z: [n, D] -> [n, C, H, W] float32 on the CPU.

    A model with latent groups below the code (`model.lower_shapes`) draws them from their priors at
    `temperature` (noise from `generator`, on the CPU); 0 takes their prior means, which is what pictures of
    given codes use. precision auto decodes in bfloat16 where the device computes it natively
    (`fastpath.inference_autocast`); batches of 1,000 keep a CPU's activations in cache (10,000
    default-model digits: about 0.4 s on 2 cores).
    """
    device = next(model.parameters()).device
    out = []
    with fastpath.inference_autocast(device, precision):
        for i in range(0, len(z), batch_size):
            zb = z[i:i + batch_size]
            yy = None if y is None else y[i:i + batch_size].to(device)
            eps = None
            if model.lower_shapes and temperature > 0:
                eps = [(temperature * torch.randn(len(zb), *shape, generator=generator)).to(device)
                       for shape in model.lower_shapes]
            out.append(_pixel_means(model, model.decode(zb.to(device), yy, eps)).cpu())
    return torch.cat(out) if out else torch.empty(0, *model.image_shape)


@torch.no_grad()
def reconstruct_means(model, x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 1000,
                      precision: str = "auto") -> torch.Tensor:
    """Pixel means of the model's reconstruction at the posterior mean (`model.reconstruct_logits`: decode(mu(x))
    for one latent, every group's posterior mean for a hierarchy), dropout off. x: [n, C, H, W] in [0, 1]
    -> [n, C, H, W] float32 on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with fastpath.inference_autocast(device, precision):
            for i in range(0, len(x), batch_size):
                yy = None if y is None or not model.n_classes else y[i:i + batch_size].to(device)
                out.append(_pixel_means(model, model.reconstruct_logits(x[i:i + batch_size].to(device).float(),
                                                                        yy)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, *model.image_shape)


def to_npz_array(x: torch.Tensor) -> np.ndarray:
    """The interchange format, laid out as the data layer holds images: uint8 [n, H, W] (grey) or [n, H, W, C],
    each pixel round(255 * mean of the pixel distribution). x: [n, C, H, W]."""
    u8 = torch.round(x.float().clamp(0, 1) * 255).to(torch.uint8)
    return (u8[:, 0] if u8.shape[1] == 1 else u8.permute(0, 2, 3, 1)).numpy()


def save_npz(path: str | Path, x: torch.Tensor, **extra: np.ndarray) -> Path:
    path = Path(path)
    arrays = {"x": to_npz_array(x), **extra}

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write_bytes(path, write)
    return path
