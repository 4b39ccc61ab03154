"""The latent space of a trained run: interpolations, 2-d maps and manifold grids.

    z = interpolation_codes(mu0, mu1, frames)       # {"linear": [T, D], "spherical": [T, D]}
    z2 = Projection.fit(mu, "pca").transform(mu)    # [N, D] -> [N, 2]
    z = manifold_codes(20, basis, data_quantiles(basis.coords(mu), 20))  # [400, D] over where the codes are

Everything embeds an image by its code: the encoder mean mu(x) (`sample.encode_means`), never a sample.
Images are [C, H, W] as the run's model has them (`run.image_shape`); nothing here assumes a size. The
same functions serve the command line (`vaedraw interpolate | latent-map | manifold`) and the web
explorer (web.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import VaedrawError

PROJECTIONS = ("pca", "tsne", "umap")
MAX_FRAMES = 1_000  # points on an interpolation path; each is one decode and one strip tile
MIN_GRID, MAX_GRID = 2, 100  # manifold digits per side: 100 x 100 is already 10,000 decodes in one picture
MANIFOLD_EDGE = 0.05  # prior spacing spans the normal quantiles 0.05 .. 0.95 (the Keras/TF tutorials' choice)
DATA_EDGE = 0.01  # data spacing spans the codes' 1% .. 99% quantiles: all but the outermost codes
SPACINGS = ("data", "prior")
# The drawing canvas's preprocessing is MNIST's own (LeCun et al. 1998): digits scaled to fit a 20x20 box
# and centred by mass in a 28x28 image. It is specific to MNIST-like grey digits, not to any run's shape.
MNIST_SIZE = 28
MNIST_BOX = 20


# ----------------------------------------------------------------------------- interpolation
def lerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 - t) z0 + t z1. z0, z1: [D]; t: [T] -> [T, D]."""
    t = t.to(z0.dtype)[:, None]
    return (1 - t) * z0 + t * z1


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985; White 2016, "Sampling Generative Networks"):

        slerp(z0, z1; t) = sin((1 - t) W) / sin W * z0 + sin(t W) / sin W * z1,  cos W = <z0, z1> / |z0||z1|.

    Between codes of equal norm every point keeps that norm, so the path stays in the shell where a
    Gaussian prior puts its mass instead of cutting through the low-norm middle as `lerp` does.
    Falls back to `lerp` when the codes are (anti)parallel or one is zero. z0, z1: [D]; t: [T] -> [T, D].
    """
    n0, n1 = z0.norm(), z1.norm()
    if n0 < eps or n1 < eps:
        return lerp(z0, z1, t)
    cos_w = torch.clamp(torch.dot(z0, z1) / (n0 * n1), -1.0, 1.0)
    w = torch.arccos(cos_w)
    sin_w = torch.sin(w)
    if sin_w < eps:
        return lerp(z0, z1, t)
    t = t.to(z0.dtype)[:, None]
    return (torch.sin((1 - t) * w) / sin_w) * z0 + (torch.sin(t * w) / sin_w) * z1


def check_frames(frames: int) -> int:
    """Points on an interpolation path: 2 (the endpoints) .. MAX_FRAMES."""
    if not MIN_GRID <= frames <= MAX_FRAMES:
        raise VaedrawError(f"--frames must be from 2 (the two endpoints) to {MAX_FRAMES:,}, got {frames:,}")
    return frames


def interpolation_codes(z0: torch.Tensor, z1: torch.Tensor, frames: int) -> dict[str, torch.Tensor]:
    """Both paths from z0 to z1 in `frames` points, endpoints included. -> {"linear", "spherical"}: [frames, D]."""
    t = torch.linspace(0, 1, check_frames(frames), dtype=torch.float64)
    z0, z1 = z0.double(), z1.double()
    return {"linear": lerp(z0, z1, t).float(), "spherical": slerp(z0, z1, t).float()}


def interpolation_labels(y0: int, y1: int, frames: int) -> torch.Tensor:
    """Labels along a conditional interpolation: y0 for the first half of the path, y1 for the second.

    The decoder was trained on one-hot labels only, so a blended label would be off its training
    distribution; the code z (the style) moves smoothly and the label switches at the midpoint. -> [frames].
    """
    return torch.where(torch.linspace(0, 1, frames) < 0.5, y0, y1).long()


def first_index_of(labels: torch.Tensor, digit: int) -> int:
    """Index of the first image labelled `digit` (labels: [N])."""
    hits = (labels == digit).nonzero()
    if not len(hits):
        raise VaedrawError(f"the test split has no image of digit {digit}")
    return int(hits[0, 0])


@dataclass
class Interpolation:
    """Decoded paths between two images: images [frames, C, H, W] per path, the codes, the labels used."""

    linear: torch.Tensor
    spherical: torch.Tensor
    z: dict[str, torch.Tensor]
    y: torch.Tensor | None


def interpolate(run, x0: torch.Tensor, x1: torch.Tensor, frames: int = 10, y0: int | None = None,
                y1: int | None = None) -> Interpolation:
    """Encode x0, x1 ([C, H, W] each, in [0, 1]) to their means and decode both paths between them.

    Conditional runs encode each image with its own label and decode with `interpolation_labels`.
    """
    if run.conditional and (y0 is None or y1 is None):
        raise VaedrawError("this run is conditional: both endpoints need their digit labels")
    check_frames(frames)
    ya = None if not run.conditional else torch.tensor([y0, y1])
    mu, _ = run.encode(torch.stack([x0, x1]), ya)
    z = interpolation_codes(mu[0], mu[1], frames)
    y = interpolation_labels(y0, y1, frames) if run.conditional else None
    return Interpolation(linear=run.decode(z["linear"], y), spherical=run.decode(z["spherical"], y), z=z, y=y)


def there_and_back(x: torch.Tensor) -> torch.Tensor:
    """Frames for a looping animation: x[0..T-1] then back x[T-2..1]. [T, ...] -> [2T - 2, ...]."""
    return torch.cat([x, x.flip(0)[1:-1]]) if len(x) > 2 else x


# ----------------------------------------------------------------------------- 2-d projections
@dataclass
class Projection:
    """A map from codes [N, D] to the plane [N, 2].

    pca keeps its fitted linear map, so new codes (a digit drawn in the web page) land on the same
    picture; t-SNE and UMAP embed only the codes they were fitted to (`points`). A 2-d latent is its
    own map (method "plane").
    """

    method: str
    points: np.ndarray  # [N, 2] the fitted codes' positions
    mean: np.ndarray | None = None  # [D]   pca: x -> (x - mean) @ components.T
    components: np.ndarray | None = None  # [2, D]

    @classmethod
    def fit(cls, z: torch.Tensor | np.ndarray, method: str = "pca", seed: int = 0) -> Projection:
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2 or len(z) < 3:
            raise VaedrawError(f"a latent map needs at least 3 codes [N, D], got shape {list(z.shape)}")
        if method not in PROJECTIONS:
            raise VaedrawError(f"unknown projection {method!r}; choose one of: {', '.join(PROJECTIONS)}")
        d = z.shape[1]
        if d <= 2:
            eye = np.eye(2)[:, :d].T  # [d, 2]; a 1-d latent is drawn on the x axis
            return cls("plane", z @ eye, np.zeros(d), eye.T)
        if method == "pca":
            from sklearn.decomposition import PCA

            pca = PCA(n_components=2, random_state=seed).fit(z)
            return cls("pca", pca.transform(z), pca.mean_, pca.components_)
        if method == "tsne":
            from sklearn.manifold import TSNE

            perplexity = float(min(30.0, (len(z) - 1) / 3))
            points = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(z)
            return cls("tsne", points)
        try:
            import umap
        except ImportError:
            raise VaedrawError("--method umap needs the umap-learn package (pip install 'vaedraw[umap]'); "
                               "use --method pca or tsne") from None
        return cls("umap", umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(z))

    @property
    def linear(self) -> bool:
        return self.components is not None

    def transform(self, z: torch.Tensor | np.ndarray) -> np.ndarray:
        """New codes [M, D] -> [M, 2]; only linear maps (pca, plane) can place new codes."""
        if not self.linear:
            raise VaedrawError(f"a {self.method} map cannot place new codes; use pca")
        return (np.asarray(z, dtype=np.float64) - self.mean) @ self.components.T


# ----------------------------------------------------------------------------- manifold grids
@dataclass
class Basis:
    """An affine frame in latent space: z = mean + sum_i c_i * scale_i * directions_i.

    mean: [D]; directions: [k, D] orthonormal rows; scale: [k]. `coords` inverts it for codes in the span.
    """

    mean: torch.Tensor
    directions: torch.Tensor
    scale: torch.Tensor

    def codes(self, c: torch.Tensor) -> torch.Tensor:
        """c: [n, k] -> z: [n, D]."""
        return self.mean + (c * self.scale) @ self.directions

    def coords(self, z: torch.Tensor) -> torch.Tensor:
        """z: [n, D] -> c: [n, k] (the orthogonal projection onto the frame, in units of scale)."""
        return ((z - self.mean) @ self.directions.T) / self.scale

    @classmethod
    def axes(cls, latent_dim: int) -> Basis:
        """The latent axes themselves around the prior's mean: z = c."""
        return cls(torch.zeros(latent_dim), torch.eye(latent_dim), torch.ones(latent_dim))

    @classmethod
    def principal(cls, mu: torch.Tensor, k: int = 2) -> Basis:
        """The k leading principal directions of codes mu [N, D], scaled by their standard deviations."""
        from sklearn.decomposition import PCA

        k = min(k, mu.shape[1], len(mu))
        pca = PCA(n_components=k).fit(mu.double().numpy())
        return cls(torch.as_tensor(pca.mean_, dtype=torch.float32),
                   torch.as_tensor(pca.components_, dtype=torch.float32),
                   torch.as_tensor(np.sqrt(pca.explained_variance_), dtype=torch.float32).clamp_min(1e-6))


def check_grid(grid: int) -> int:
    """Manifold digits per side: MIN_GRID .. MAX_GRID."""
    if not MIN_GRID <= grid <= MAX_GRID:
        raise VaedrawError(f"--grid must be from {MIN_GRID} to {MAX_GRID} digits a side, got {grid:,}")
    return grid


def normal_quantiles(grid: int, edge: float = MANIFOLD_EDGE) -> torch.Tensor:
    """Phi^-1(p) for p evenly spaced in [edge, 1 - edge]: equal prior mass between neighbours. -> [grid]."""
    if grid < MIN_GRID:
        raise VaedrawError(f"--grid must be at least {MIN_GRID}, got {grid}")
    return torch.special.ndtri(torch.linspace(edge, 1 - edge, grid, dtype=torch.float64)).float()


def data_quantiles(coords: torch.Tensor, grid: int, edge: float = DATA_EDGE) -> torch.Tensor:
    """Positions along each axis at the codes' own quantiles: coords [N, k] (codes in a basis's units)
    -> [grid, k], column j = the quantiles of coords[:, j] at p evenly spaced in [edge, 1 - edge].

    The data's counterpart of `normal_quantiles`: equal shares of the codes between neighbours, so the
    grid covers where the encoder puts images (a 2-d latent's codes can sit three prior deviations out)
    and is densest where they crowd. An axis along which all codes agree gives no extent; it keeps the
    prior's spacing.
    """
    coords = torch.as_tensor(coords).double()
    if coords.dim() != 2 or len(coords) < 2:
        raise VaedrawError(f"data spacing needs at least 2 codes [N, k], got shape {list(coords.shape)}")
    if not torch.isfinite(coords).all():
        raise VaedrawError("the encoder gave non-finite codes: the run cannot place a manifold by its data")
    p = torch.linspace(edge, 1 - edge, grid, dtype=torch.float64)
    q = torch.quantile(coords, p, dim=0)  # [grid, k]
    flat = (q[-1] - q[0]) <= 1e-9 * q.abs().amax(0).clamp_min(1.0)
    if flat.any():
        q[:, flat] = normal_quantiles(grid).double()[:, None]
    return q.float()


def manifold_codes(grid: int, basis: Basis, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Codes on a grid x grid lattice in the first two directions of `basis`, row-major for a picture:
    columns run along direction 0 (left to right, increasing), rows along direction 1 (top = largest,
    as on a plot's y axis). positions: [grid, 2] coordinates along each direction, in the basis's units
    (default: `normal_quantiles` on both). -> [grid * grid, D]."""
    if basis.directions.shape[0] < 2:
        raise VaedrawError("a manifold grid needs a latent space of at least 2 dimensions")
    check_grid(grid)
    if positions is None:
        positions = normal_quantiles(grid)[:, None].expand(grid, 2)
    if tuple(positions.shape) != (grid, 2):
        raise VaedrawError(f"manifold positions must be [{grid}, 2], got {list(positions.shape)}")
    c1, c0 = torch.meshgrid(positions[:, 1].flip(0), positions[:, 0], indexing="ij")  # [grid, grid] each
    c = torch.stack([c0.reshape(-1), c1.reshape(-1)], dim=1)
    return Basis(basis.mean, basis.directions[:2], basis.scale[:2]).codes(c)


def manifold_basis(run, mu: torch.Tensor | None = None) -> Basis:
    """The plane a manifold picture spans: the latent axes for a 2-d latent, else the two leading
    principal directions of the encoder means `mu` [N, D] around their mean."""
    if run.latent_dim == 2:
        return Basis.axes(2)
    if mu is None:
        raise VaedrawError("a manifold over a latent space larger than 2-d needs the test-set encoder means")
    return Basis.principal(mu, 2)


def manifold_positions(grid: int, basis: Basis, mu: torch.Tensor | None = None,
                       spacing: str = "data") -> torch.Tensor:
    """Where the grid's columns and rows sit along the basis's two directions -> [grid, 2] (basis units).

    spacing "data" (needs mu [N, D]): the codes' 1%..99% quantiles along each direction (`data_quantiles`);
    "prior", or no codes at hand: the prior's quantiles Phi^-1(0.05..0.95) (`normal_quantiles`), which for
    a principal-direction basis means 0.05..0.95 of a normal with the codes' spread.
    """
    if spacing not in SPACINGS:
        raise VaedrawError(f"unknown manifold spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    check_grid(grid)
    if spacing == "prior" or mu is None:
        return normal_quantiles(grid)[:, None].expand(grid, 2).clone()
    plane = Basis(basis.mean, basis.directions[:2], basis.scale[:2])
    return data_quantiles(plane.coords(mu.float()), grid)


def manifold(run, grid: int = 20, mu: torch.Tensor | None = None, digit: int | None = None,
             spacing: str = "data") -> torch.Tensor:
    """Decoded manifold grid: [grid * grid, C, H, W], row-major (see `manifold_codes`). `mu`: test-set
    encoder means [N, D]; they place the plane (larger latents) and, with spacing "data", its extent."""
    if run.conditional and digit is None:
        raise VaedrawError(f"this run is conditional: say which class the manifold shows "
                           f"(--digit 0-{run.n_classes - 1})")
    basis = manifold_basis(run, mu)
    z = manifold_codes(grid, basis, manifold_positions(grid, basis, mu, spacing))
    y = None if digit is None else torch.full((len(z),), digit, dtype=torch.long)
    return run.decode(z, y)


# ----------------------------------------------------------------------------- drawings
def mnist_like(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Bring a drawing (white ink on black, [H, W] in [0, 1]) to MNIST's layout, as its digits were made:
    the ink's bounding box scaled to fit MNIST_BOX x MNIST_BOX (aspect kept, antialiased), then placed in
    MNIST_SIZE x MNIST_SIZE so its centre of mass is at the centre. An empty drawing stays empty.
    -> [1, MNIST_SIZE, MNIST_SIZE] in [0, 1].

    This is MNIST's preprocessing, meant for runs of 28x28 grey digits; a caller with another grey image
    shape resizes the result, and colour runs take no drawings.
    """
    a = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    if a.ndim != 2:
        raise VaedrawError(f"a drawing must be a 2-d image, got shape {list(a.shape)}")
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    rows, cols = np.nonzero(a > 0.05)
    if not len(rows):
        return torch.from_numpy(out)[None]
    crop = a[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = crop.shape
    s = MNIST_BOX / max(h, w)
    hh, ww = max(1, round(h * s)), max(1, round(w * s))
    small = Image.fromarray((crop * 255).astype(np.uint8)).resize((ww, hh), Image.LANCZOS)
    small = np.asarray(small, dtype=np.float32) / 255
    total = small.sum()
    cy = (small.sum(1) @ np.arange(hh)) / total if total > 0 else (hh - 1) / 2
    cx = (small.sum(0) @ np.arange(ww)) / total if total > 0 else (ww - 1) / 2
    centre = (MNIST_SIZE - 1) / 2
    top = int(np.clip(round(centre - cy), 0, MNIST_SIZE - hh))
    left = int(np.clip(round(centre - cx), 0, MNIST_SIZE - ww))
    out[top:top + hh, left:left + ww] = small
    return torch.from_numpy(out)[None]
