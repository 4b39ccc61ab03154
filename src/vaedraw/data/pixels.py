"""Pixels of the user's own images: any image Pillow reads -> uint8 grey [H, W] or RGB [H, W, 3], one size.

`Options(image_size, channels)` are the conversion settings (`data.image_size`, `data.channels`):

- modes: palette images are expanded through their palette (with its transparency), 1-bit images become
  0/255, 16-bit grey (I;16*, and 32-bit I read as 16-bit values) is scaled to 8 bits by v * 255 / 65535
  (rounded) instead of being clipped, CMYK / YCbCr / LAB / HSV become RGB; an animated GIF or WebP gives
  its first frame;
- alpha is composited on **black**: a pixel becomes colour * alpha / 255 (rounded), so transparent areas
  are 0, like MNIST's background;
- channels: 1 = grey (RGB -> L by Pillow's ITU-R 601-2 luma), 3 = RGB (grey repeated), 0 = the images'
  own: grey when every image is grey (R = G = B in every pixel), else RGB;
- size: image_size > 0 resizes the short side to image_size with Pillow's antialiased Lanczos filter and
  keeps the centre square (one resampling of the centre crop); 0 keeps each image's own size.

`decode_files(paths, options)` is what a worker process runs: every file is decoded on its own, and a
file that cannot be read gives its reason instead of an array. A decompression bomb (more pixels than
Pillow's `Image.MAX_IMAGE_PIXELS`, its DecompressionBombWarning made an error) is reported as such.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vaedraw.errors import ConfigError

CHANNELS = (0, 1, 3)  # data.channels: 0 = the images' own, 1 = grey, 3 = RGB
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = {"RGBA": "RGBA", "RGBa": "RGBA", "LA": "LA", "La": "LA", "PA": "RGBA"}
BOMB = "decompression bomb"  # the reason decode_files gives for an image over Pillow's pixel limit


@dataclass(frozen=True)
class Options:
    """How the user's images are converted: `image_size` (0 = their own size) and `channels` (0, 1, 3)."""

    image_size: int = 0
    channels: int = 0

    @classmethod
    def of(cls, source: object = None) -> Options:
        """Options from None (the defaults), an Options, a DataConfig or a recorded dict; checked."""
        if source is None:
            return cls()
        if isinstance(source, Options):
            return source
        get = source.get if isinstance(source, dict) else lambda k, d: getattr(source, k, d)
        opts = cls(get("image_size", 0), get("channels", 0))
        if not isinstance(opts.channels, int) or opts.channels not in CHANNELS:
            raise ConfigError(f"data.channels={opts.channels!r}: choose 1 (grey), 3 (RGB) or 0 (the images' own)")
        if not isinstance(opts.image_size, int) or opts.image_size < 0:
            raise ConfigError(f"data.image_size={opts.image_size!r}: a side in pixels, or 0 for the images' own size")
        return opts

    def as_dict(self) -> dict:
        return {"image_size": self.image_size, "channels": self.channels}


def _on_black(a: np.ndarray) -> np.ndarray:
    """uint8 [H, W, k + 1] with alpha last -> [H, W, k]: colour * alpha / 255, rounded (alpha on black)."""
    colour, alpha = a[..., :-1].astype(np.uint32), a[..., -1:].astype(np.uint32)
    return ((colour * alpha + 127) // 255).astype(np.uint8)


def plain(img: Image.Image) -> np.ndarray:
    """A Pillow image -> uint8 [H, W] (grey modes) or [H, W, 3], alpha composited on black."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return ((v * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("L", "RGB") and "transparency" in img.info:  # a tRNS colour key
        img = img.convert("LA" if mode == "L" else "RGBA")
    elif mode in _ALPHA:
        img = img.convert(_ALPHA[mode]) if mode != _ALPHA[mode] else img
    elif mode not in ("L", "RGB"):  # 1, F, CMYK, YCbCr, LAB, HSV, ...
        img = img.convert("L" if mode in ("1", "F") else "RGB")
    a = np.asarray(img)
    if img.mode in ("LA", "RGBA"):
        a = _on_black(a)
        return a[..., 0] if img.mode == "LA" else a
    return a


def is_grey(a: np.ndarray) -> bool:
    """True for uint8 [H, W], and for [H, W, 3] whose three channels are equal everywhere."""
    return a.ndim == 2 or (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2]))


def to_channels(a: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] -> [H, W] (channels 1) or [H, W, 3] (channels 3); 0: grey content as [H, W]."""
    if a.ndim == 3 and (channels == 1 or (channels == 0 and is_grey(a))):
        return a[..., 0].copy() if is_grey(a) else np.asarray(Image.fromarray(a, "RGB").convert("L"))
    if a.ndim == 2 and channels == 3:
        return np.repeat(a[..., None], 3, axis=2)
    return a


def resize(a: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W(, 3)] -> [size, size(, 3)]: the centre square of side min(H, W), Lanczos-resampled."""
    h, w = a.shape[:2]
    if size == 0 or (h, w) == (size, size):
        return a
    m = min(h, w)
    left, top = (w - m) / 2, (h - m) / 2
    img = Image.fromarray(a)
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + m, top + m)))


def convert(a: np.ndarray, opts: Options) -> np.ndarray:
    """Plain uint8 pixels [H, W(, 3)] -> the channels and size `opts` ask for."""
    return resize(to_channels(a, opts.channels), opts.image_size)


def decode_file(path: str, opts: Options) -> np.ndarray:
    """One image file -> uint8 [H, W] or [H, W, 3] per `opts`; Pillow's errors propagate."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if opts.image_size and img.format == "JPEG":  # decode at the smallest DCT scale still >= the target
                img.draft(img.mode, (opts.image_size, opts.image_size))
            img.load()
            a = plain(img)
    return convert(a, opts)


def _reason(e: BaseException) -> str:
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"{BOMB}: {e}"
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def decode_files(paths: list[str], opts: Options) -> list[np.ndarray | str]:
    """Each file -> its pixels (see decode_file), or the reason it cannot be read (a str)."""
    out: list[np.ndarray | str] = []
    for path in paths:
        try:
            out.append(decode_file(path, opts))
        except Exception as e:  # noqa: BLE001 - a damaged file can raise almost anything inside a decoder
            out.append(_reason(e))
    return out


def luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> [...]: Pillow's RGB -> L conversion (ITU-R 601-2, its fixed-point rounding), vectorised."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def convert_batch(images: np.ndarray, opts: Options) -> np.ndarray:
    """uint8 [N, H, W] or [N, H, W, C] (C: 1 grey, 3 RGB, 4 RGBA) -> [N, H', W'] or [N, H', W', 3] per `opts`,
    as `decode_file` converts one image (alpha on black; data.channels=0: grey when every image is grey)."""
    a = images
    if a.ndim == 4 and a.shape[3] == 1:
        a = a[..., 0]
    elif a.ndim == 4 and a.shape[3] == 4:
        a = _on_black(a)
    if a.ndim == 4 and (opts.channels == 1 or (opts.channels == 0 and is_grey(a))):
        a = a[..., 0] if is_grey(a) else luma(a)
    elif a.ndim == 3 and opts.channels == 3:
        a = np.repeat(a[..., None], 3, axis=3)
    if opts.image_size and a.shape[1:3] != (opts.image_size, opts.image_size):
        out = np.empty((len(a), opts.image_size, opts.image_size, *a.shape[3:]), np.uint8)
        for i in range(len(a)):
            out[i] = resize(a[i], opts.image_size)
        a = out
    return np.ascontiguousarray(a)
