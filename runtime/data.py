"""Image lists (folders or CSVs) and batch loading to uint8 arrays (numpy + Pillow, no torch).

Training, calibration and evaluation all read their images through here, so they agree on what a data source means:
- a folder: every image under it (recursively), sorted; label = None, or the parent folder's name;
- a CSV: a path column (``path`` or ``file``, relative to the CSV's folder), an optional label column (``wnid`` or
  ``label``) and an optional ``split`` column, filtered by ``split``.
"""
from __future__ import annotations

import csv
import hashlib
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from runtime.preprocess import IMAGE_SUFFIXES, ImageError, image_to_array

PATH_COLUMNS = ("path", "file")
LABEL_COLUMNS = ("wnid", "label")


class DataError(ValueError):
    """A data source that cannot be used (missing, malformed, empty); the message is one line."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    label: str | None = None


def read_image_list(source: str | os.PathLike, split: str | None = None, limit: int | None = None, seed: int = 0,
                    labels_from_folders: bool = False) -> list[ImageRecord]:
    """Records of a folder or CSV (see the module docstring); ``limit`` keeps a deterministic spread of N records."""
    source = Path(source).expanduser()
    if source.is_dir():
        if split is not None:
            raise DataError(f"{source}: a split ({split!r}) needs a CSV with a 'split' column, not a folder")
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        records = [ImageRecord(p, p.parent.name if labels_from_folders else None) for p in files]
        if not records:
            raise DataError(f"{source}: no image files in this folder")
    elif source.is_file():
        records = _read_csv(source, split)
    else:
        raise DataError(f"{source}: no such data folder or CSV file")
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        records = spread(records, limit, seed)
    return records


def _read_csv(path: Path, split: str | None) -> list[ImageRecord]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read CSV ({' '.join(str(e).split())})") from None
    path_col = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_col is None:
        raise DataError(f"{path}: CSV has no path column (expected one of {', '.join(PATH_COLUMNS)}; "
                        f"found {', '.join(map(repr, columns)) or 'no header'})")
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    if split is not None:
        if "split" not in columns:
            raise DataError(f"{path}: split {split!r} requested but the CSV has no 'split' column")
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise DataError(f"{path}: no rows with split {split!r}")
    if not rows:
        raise DataError(f"{path}: CSV has no rows")
    root = path.parent
    for i, r in enumerate(rows, start=1):
        if not isinstance(r.get(path_col), str) or not r[path_col].strip():
            raise DataError(f"{path}: data row {i}: no {path_col!r} value")
    return [ImageRecord(root / r[path_col], (r.get(label_col) or None) if label_col else None) for r in rows]


def data_root() -> Path | None:
    """The shared data folder named by ``$WAVECLIP_DATA``, if any."""
    root = os.environ.get("WAVECLIP_DATA")
    return Path(root).expanduser() if root else None


def portable_source(source: str | os.PathLike, *roots: str | os.PathLike | None) -> str:
    """How provenance names a data source: its path relative to the first of ``roots`` (or the data root) that holds
    it, else its file or folder name only; never a machine's absolute path."""
    path = Path(source).expanduser().resolve()
    for root in [*roots, data_root()]:
        if root is None:
            continue
        try:
            rel = path.relative_to(Path(root).expanduser().resolve()).as_posix()
        except ValueError:
            continue
        if rel != ".":
            return rel
    return path.name


def spread(records: Sequence[ImageRecord], limit: int, seed: int = 0) -> list[ImageRecord]:
    """A deterministic subset of ``limit`` records in their original order: a seeded shuffle, or with labels, a seeded
    round-robin over labels (so every class is represented as evenly as the limit allows)."""
    if limit >= len(records):
        return list(records)
    rng = random.Random(seed)
    order = list(range(len(records)))
    if all(r.label is None for r in records):
        rng.shuffle(order)
        return [records[i] for i in sorted(order[:limit])]
    by_label: dict[str | None, list[int]] = defaultdict(list)
    for i in order:
        by_label[records[i].label].append(i)
    queues = list(by_label.values())
    for q in queues:
        rng.shuffle(q)
    rng.shuffle(queues)
    chosen: list[int] = []
    for rank in range(max(map(len, queues))):
        chosen += [q[rank] for q in queues if rank < len(q)]
        if len(chosen) >= limit:
            break
    return [records[i] for i in sorted(chosen[:limit])]


def records_digest(records: Sequence[ImageRecord]) -> str:
    """sha256 over each record's absolute path, file size and label (a cache key for anything computed per image)."""
    h = hashlib.sha256()
    for r in records:
        try:
            size = r.path.stat().st_size
        except OSError:
            size = -1
        h.update(f"{r.path.resolve()}\t{size}\t{r.label}\n".encode())
    return h.hexdigest()


def load_images(records: Sequence[ImageRecord], spec: dict, skip_errors: bool = True,
                on_skip: Callable[[ImageRecord, str], None] | None = None
                ) -> tuple[np.ndarray, list[ImageRecord], int]:
    """Decode and resize records with :func:`runtime.preprocess.image_to_array` -> (uint8 [N, S, S, 3], the records
    kept, number skipped). Unreadable images are skipped (``on_skip(record, reason)`` is told) unless ``skip_errors``
    is False, then their :class:`ImageError` propagates."""
    size = spec["image_size"]
    arrays, kept = [], []
    for r in records:
        try:
            arrays.append(image_to_array(r.path, spec))
        except ImageError as e:
            if not skip_errors:
                raise
            if on_skip is not None:
                on_skip(r, str(e))
            continue
        kept.append(r)
    batch = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return batch, kept, len(records) - len(kept)
