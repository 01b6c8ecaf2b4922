"""Image decoding and resizing for WaveCLIP (Pillow + numpy), driven by the manifest's preprocessing spec."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from runtime.errors import one_line
from runtime.wavelet import images_to_levels

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused as possible decompression bombs
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


class ImageError(ValueError):
    """An image that cannot be used (unreadable, truncated, empty, too large). Its message is one line."""


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image file to RGB, applying its EXIF orientation. Raises :class:`ImageError` with a one-line reason."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w == 0 or h == 0:
                    raise ImageError(f"{path}: zero-sized image")
                if w * h > max_pixels:
                    raise ImageError(f"{path}: {w}x{h} exceeds {max_pixels} pixels (possible decompression bomb)")
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: cannot decode image ({one_line(e)})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB view of any Pillow image: greyscale, palette, CMYK; alpha is composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def resize_center_crop(im: Image.Image, size: int, resize_shorter: int | None = None,
                       resample: str = "bicubic") -> np.ndarray:
    """Resize the shorter side to ``resize_shorter`` (default ``size``), centre-crop ``size`` -> uint8 [size, size, 3]."""
    shorter = resize_shorter or size
    w, h = im.size
    scale = shorter / min(w, h)
    nw, nh = max(shorter, round(w * scale)), max(shorter, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), _RESAMPLE[resample])
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


PIXEL_KEYS = ("image_size", "resize_shorter", "resample", "crop")  # what image_to_array reads of a spec


def pixel_spec(spec: dict) -> dict:
    """The part of a preprocessing spec that decides the 8-bit pixels (``image_to_array``), sorted by key: two specs
    that tokenize alike pixels differently (their grids) share it."""
    return {k: spec[k] for k in sorted(PIXEL_KEYS) if k in spec}


def image_to_array(image: str | os.PathLike | Image.Image | np.ndarray, spec: dict) -> np.ndarray:
    """One image (path, PIL image or HxWx3 uint8 array) -> uint8 [S, S, 3] following ``spec``."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"array image must be HxWx3, got shape {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ImageError("zero-sized image array")
        image = Image.fromarray(image.astype(np.uint8))
    elif not isinstance(image, Image.Image):
        image = load_image(image)
    else:
        if image.size[0] == 0 or image.size[1] == 0:
            raise ImageError("zero-sized image")
        image = to_rgb(image)
    return resize_center_crop(image, spec["image_size"], spec.get("resize_shorter"), spec.get("resample", "bicubic"))


def preprocess(images: Sequence, spec: dict) -> list[np.ndarray]:
    """Images -> per-level patches ``[B, tokens, values]`` float32 (see :func:`runtime.wavelet.images_to_levels`)."""
    batch = np.stack([image_to_array(im, spec) for im in images])
    return images_to_levels(batch, spec)


def list_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image files."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        else:
            found.append(p)
    return found
