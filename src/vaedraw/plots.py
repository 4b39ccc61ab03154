"""Pictures: image grids (Pillow), loss curves (matplotlib), animated GIFs.

Images come in as float tensors [N, 1, H, W] with values in [0, 1] (the decoder's pixel means).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import atomic_write_bytes


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, 1, H, W] (or [N, H, W]) in [0, 1] -> uint8 [N, H, W] = round(255 * x)."""
    x = x.detach().float().cpu()
    if x.dim() == 4:
        x = x[:, 0]
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8).numpy()


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 2) -> Image.Image:
    """Tile N images row-major, `nrow` per row (default: a near-square grid), white on black."""
    imgs = to_uint8(x)
    n, h, w = imgs.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 64, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    pil = Image.fromarray(canvas, mode="L")
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def save_image(img: Image.Image, path: str | Path) -> Path:
    """Write a PNG (or any format Pillow knows by the suffix) atomically."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write_bytes(path, lambda p: img.save(p, format=fmt))
    return path


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    return save_image(image_grid(x, nrow), path)


def save_gif(frames: list[Image.Image], path: str | Path, ms_per_frame: int = 120, loop: int = 0) -> Path:
    """An animated GIF from PIL frames (all the same size)."""
    path = Path(path)
    atomic_write_bytes(path, lambda p: frames[0].save(
        p, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=loop))
    return path


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), imported only when plotting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, out: str | Path) -> Path:
    """Lay out, write atomically as PNG, and free the figure."""
    fig.tight_layout()
    out = Path(out)
    atomic_write_bytes(out, lambda p: fig.savefig(p, format="png", dpi=100))
    _pyplot().close(fig)
    return out


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write; the rest stays usable
    return rows


def plot_curves(metrics_path: str | Path, out: str | Path, title: str = "") -> Path | None:
    """Loss, reconstruction and KL terms against step, train and test, from metrics.jsonl."""
    plt = _pyplot()

    rows = read_metrics(metrics_path)
    if not rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for split, style in (("train", "-"), ("test", "o-")):
        pts = [r for r in rows if r.get("split") == split]
        if not pts:
            continue
        steps = [r["step"] for r in pts]
        for ax, key in zip(axes, ("loss", "recon", "kl")):
            ax.plot(steps, [r[key] for r in pts], style, label=split, markersize=3)
    for ax, key in zip(axes, ("loss (nats/image)", "reconstruction term", "KL term")):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return _save_figure(fig, out)


# ----------------------------------------------------------------------------- latent-space pictures
def plot_latent_map(points: np.ndarray, labels: np.ndarray, out: str | Path, title: str = "",
                    axis_names: tuple[str, str] = ("", "")) -> Path:
    """Scatter of 2-d positions [N, 2] coloured by label [N] (one colour per digit, with a legend)."""
    plt = _pyplot()

    points, labels = np.asarray(points), np.asarray(labels)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10")
    for d in np.unique(labels):
        m = labels == d
        ax.scatter(points[m, 0], points[m, 1], s=4, alpha=0.6, color=cmap(int(d) % 10), label=str(int(d)),
                   linewidths=0)
    ax.legend(title="digit", markerscale=4, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return _save_figure(fig, out)


def save_manifold(x: torch.Tensor, grid: int, path: str | Path) -> Path:
    """A manifold grid [grid * grid, 1, 28, 28] (row-major) as one picture, no gaps between digits."""
    return save_image(image_grid(x, nrow=grid, pad=0, scale=1), path)


def save_strip(rows: list[torch.Tensor], path: str | Path) -> Path:
    """Interpolation strips, one row per tensor [T, 1, 28, 28] (all the same T)."""
    return save_grid(torch.cat(rows), path, nrow=len(rows[0]))


def animation_frames(rows: list[torch.Tensor], scale: int = 4) -> list[Image.Image]:
    """Frame t shows image t of every row side by side. rows: tensors [T, 1, 28, 28] (the same T)."""
    return [image_grid(torch.stack([r[t] for r in rows]), nrow=len(rows), scale=scale) for t in range(len(rows[0]))]
