"""Augmented views for distillation: random-resized crops with colour jitter, each a pure function of (seed, image
path, view), so the teacher's targets for a view can be cached once and the student trains on exactly those pixels.

Views are numbered from ``first``: ``Augment(2, seed, spec, first=2)`` gives views 2 and 3 of the same sequence, so
a cache of views 0-1 stays valid when more views are asked for (``train.teacher_cache.with_augmented_views`` caches
them in blocks of ``VIEW_BLOCK``).

The crop parameters follow torchvision's ``RandomResizedCrop`` (area scale and log-uniform aspect ratio, ten tries,
then the central crop); the crop and the colour changes are torchvision's functional ops on the PIL image. The
student sees a view as it sees any image (``runtime.preprocess.image_to_array``), the teacher through its own
preprocessing, as for the plain image.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torchvision.transforms import functional as TF

from runtime.preprocess import pixel_spec

VIEW_BLOCK = 2  # augmented views are teacher-run and cached in blocks of this many


@dataclass(frozen=True)
class Augment:
    """``views`` augmented views per image for a student preprocessing ``spec`` (see module docstring)."""

    views: int
    seed: int
    spec: dict
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.3  # brightness, contrast and saturation factors in [1 - jitter, 1 + jitter]
    first: int = 0  # number of the first view

    def block(self, first: int, views: int) -> "Augment":
        """Views ``first .. first + views - 1`` of the same sequence."""
        return dataclasses.replace(self, first=first, views=views)

    def describe(self) -> str:
        """Everything that changes the views (part of the teacher cache key)."""
        spec = pixel_spec(self.spec)  # what decides the views' pixels (not how the student tokenizes them)
        first = f"|first={self.first}" if self.first else ""  # absent for view 0: caches of views 0.. stay valid
        return (f"aug1|views={self.views}|seed={self.seed}|scale={self.scale}|ratio={self.ratio}|jitter={self.jitter}"
                f"|{spec}{first}")

    def rng(self, path: str | os.PathLike, view: int) -> np.random.Generator:
        digest = hashlib.sha256(f"{self.seed}|{os.path.abspath(path)}|{view}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, height, width) as ``RandomResizedCrop.get_params`` draws them."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        side = min(width, height)
        return (height - side) // 2, (width - side) // 2, side, side

    def view(self, image: Image.Image, path: str | os.PathLike, view: int) -> Image.Image:
        rng = self.rng(path, view)
        top, left, h, w = self.crop_box(*image.size, rng)
        out = TF.crop(image, top, left, h, w)
        lo, hi = 1 - self.jitter, 1 + self.jitter
        for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
            out = adjust(out, float(rng.uniform(lo, hi)))
        return out

    def __call__(self, image: Image.Image, path: str | os.PathLike) -> list[Image.Image]:
        return [self.view(image, path, self.first + v) for v in range(self.views)]
