"""Pictures: image grids (Pillow), loss curves (matplotlib), animated GIFs.

Images come in as float tensors [N, C, H, W] with values in [0, 1] (the decoder's pixel means), C = 1
(grey, drawn white on black) or 3 (RGB); the size is whatever the images have. Grids, strips and
animations are enlarged `scale` times with nearest-neighbour resampling, so every model pixel stays a
sharp square block (no smoothing that would show detail the model did not draw).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .checkpoint import atomic_write_bytes
from .errors import VaedrawError

DEFAULT_SCALE = 3  # the picture commands' --scale: each model pixel becomes a 3 x 3 block on screen
MAX_SCALE = 16
# Pixels in one picture: Pillow (and so many viewers built on it) warns of a decompression bomb above this
# when opening a file, and the picture must fit in memory while it is drawn.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
GREY = 64  # the background between tiles
PROGRESS_MS = 200  # the progress animation: milliseconds a frame
PROGRESS_LAST_MS = 2_000  # and on its last frame, so the end state can be seen before it loops


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, 1, H, W] or [N, H, W] in [0, 1] -> uint8 [N, H, W]; [N, 3, H, W] -> uint8 [N, H, W, 3]; = round(255 * x)."""
    x = x.detach().float().cpu()
    if x.dim() == 4:
        if x.shape[1] == 1:
            x = x[:, 0]
        elif x.shape[1] == 3:
            x = x.permute(0, 2, 3, 1)
        else:
            raise VaedrawError(f"pictures show grey (1) or RGB (3) channels, got images of shape {list(x.shape)}")
    elif x.dim() != 3:
        raise VaedrawError(f"pictures take images [N, C, H, W] or [N, H, W], got shape {list(x.shape)}")
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8).numpy()


def grid_size(n: int, image_hw: tuple[int, int], nrow: int | None = None, pad: int = 2,
              scale: int = 2) -> tuple[int, int]:
    """(width, height) in pixels of `image_grid` for n images of (H, W)."""
    h, w = image_hw
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    return (nrow * (w + pad) + pad) * scale, (rows * (h + pad) + pad) * scale


def check_picture(n: int, image_hw: tuple[int, int], nrow: int | None = None, pad: int = 2,
                  scale: int = 2, option: str = "--scale") -> None:
    """Refuse, before any work, a scale outside 1..MAX_SCALE or a picture of more than MAX_PIXELS pixels."""
    if not 1 <= scale <= MAX_SCALE:
        raise VaedrawError(f"{option} must be from 1 to {MAX_SCALE}, got {scale:,}")
    width, height = grid_size(n, image_hw, nrow, pad, scale)
    if width * height > MAX_PIXELS:
        raise VaedrawError(f"the picture would be {width:,} x {height:,} pixels, over {MAX_PIXELS:,} in all: "
                           f"use a smaller {option} or fewer images")


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 2) -> Image.Image:
    """Tile N images row-major, `nrow` per row (default: a near-square grid), on a dark grey background,
    enlarged `scale` times (nearest neighbour). Grey images give an "L" picture, RGB ones an "RGB" one."""
    imgs = to_uint8(x)
    n, h, w = imgs.shape[:3]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, *imgs.shape[3:]), GREY, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    pil = Image.fromarray(canvas, mode="L" if imgs.ndim == 3 else "RGB")
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def save_image(img: Image.Image, path: str | Path) -> Path:
    """Write a PNG (or any format Pillow knows by the suffix) atomically."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write_bytes(path, lambda p: img.save(p, format=fmt))
    return path


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    return save_image(image_grid(x, nrow, scale=scale), path)


def save_gif(frames: list[Image.Image], path: str | Path, ms_per_frame: int | list[int] = 120,
             loop: int = 0) -> Path:
    """An animated GIF from PIL frames (all the same size); ms_per_frame: one duration, or one per frame."""
    path = Path(path)
    atomic_write_bytes(path, lambda p: frames[0].save(
        p, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=loop))
    return path


def _font(size: int):
    """Pillow's built-in font at `size` pixels (Pillow >= 10.1), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def captioned(img: Image.Image, text: str, height: int = 24) -> Image.Image:
    """The picture with a black band of `height` pixels above it holding `text` in white."""
    mode = "RGB" if img.mode == "RGB" else "L"
    out = Image.new(mode, (img.width, img.height + height), 0)
    out.paste(img.convert(mode), (0, height))
    ImageDraw.Draw(out).text((6, height // 2), text, fill="white" if mode == "RGB" else 255,
                             font=_font(height * 2 // 3), anchor="lm")
    return out


def save_progress_gif(pictures: list[Path], path: str | Path, ms_per_frame: int = PROGRESS_MS,
                      last_ms: int = PROGRESS_LAST_MS) -> Path | None:
    """Training's monitoring pictures (pictures/step_*.png) as one animation, each frame captioned with
    its step, `ms_per_frame` a frame and `last_ms` on the last one. None when there are no pictures."""
    frames = []
    for p in pictures:
        with Image.open(p) as img:
            m = re.search(r"step_0*(\d+)", Path(p).stem)
            frames.append(captioned(img, f"step {int(m.group(1)):,}" if m else Path(p).stem))
    if not frames:
        return None
    return save_gif(frames, path, [ms_per_frame] * (len(frames) - 1) + [last_ms])


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
def class_colours(n: int, plt) -> list:
    """n distinct colours: matplotlib's qualitative tab10 / tab20 while they suffice, else evenly spaced hues."""
    for name in ("tab10", "tab20"):
        cmap = plt.get_cmap(name)
        if n <= cmap.N:
            return [cmap(i) for i in range(n)]
    return [plt.get_cmap("hsv")(i / n) for i in range(n)]


def plot_latent_map(points: np.ndarray, labels: np.ndarray | None, out: str | Path, title: str = "",
                    axis_names: tuple[str, str] = ("", ""), legend_title: str = "digit") -> Path:
    """Scatter of 2-d positions [N, 2] coloured by label [N] (one colour per class, with a legend);
    labels None (unlabelled data): one colour, no legend."""
    plt = _pyplot()

    points = np.asarray(points)
    fig, ax = plt.subplots(figsize=(7, 6))
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.6, linewidths=0)
    else:
        labels = np.asarray(labels)
        classes = np.unique(labels)
        for d, colour in zip(classes, class_colours(len(classes), plt)):
            m = labels == d
            ax.scatter(points[m, 0], points[m, 1], s=4, alpha=0.6, color=colour, label=str(int(d)), linewidths=0)
        ax.legend(title=legend_title, markerscale=4, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                  ncol=max(1, math.ceil(len(classes) / 25)))
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return _save_figure(fig, out)


def save_manifold(x: torch.Tensor, grid: int, path: str | Path, scale: int = DEFAULT_SCALE) -> Path:
    """A manifold grid [grid * grid, C, H, W] (row-major) as one picture, no gaps between images."""
    return save_image(image_grid(x, nrow=grid, pad=0, scale=scale), path)


def save_strip(rows: list[torch.Tensor], path: str | Path, scale: int = DEFAULT_SCALE) -> Path:
    """Interpolation strips, one row per tensor [T, C, H, W] (all the same T)."""
    return save_grid(torch.cat(rows), path, nrow=len(rows[0]), scale=scale)


def animation_frames(rows: list[torch.Tensor], scale: int = DEFAULT_SCALE) -> list[Image.Image]:
    """Frame t shows image t of every row side by side. rows: tensors [T, C, H, W] (the same T)."""
    return [image_grid(torch.stack([r[t] for r in rows]), nrow=len(rows), scale=scale) for t in range(len(rows[0]))]
