"""The image list of a run as an Arrow table (``row``, ``path``, ``input_label``), read on the driver before Ray starts.

A folder or CSV is read with :func:`runtime.data.read_image_list` (the same rules as training, calibration and
``runtime.classify``: folders sorted recursively, CSV paths relative to the CSV's folder, ``split`` filter). A Parquet
image list (a ``.parquet`` file or folder of files; the columnar form for tens of millions of images) follows the same
column rules: ``path``/``file``, optional ``wnid``/``label`` and ``split``. Reading the list first means bad input
fails in a second with a one-line error, not after Ray's start-up.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from runtime.data import LABEL_COLUMNS, PATH_COLUMNS, DataError, read_image_list

IMAGE_LIST_SCHEMA = pa.schema([("row", pa.int64()), ("path", pa.string()), ("input_label", pa.string())])


def is_parquet(source: str | os.PathLike) -> bool:
    return Path(source).suffix.lower() == ".parquet"


def read_source(source: str | os.PathLike, split: str | None = None) -> pa.Table:
    """Image list -> table with ``row`` (0..N-1, input order), ``path`` (absolute or as given) and ``input_label``."""
    source = Path(source).expanduser()
    if is_parquet(source) and source.exists():
        return _read_parquet_list(source, split)
    records = read_image_list(source, split)
    return pa.table({"row": pa.array(range(len(records)), pa.int64()),
                     "path": pa.array([str(r.path) for r in records], pa.string()),
                     "input_label": pa.array([r.label for r in records], pa.string())}, schema=IMAGE_LIST_SCHEMA)


def _read_parquet_list(source: Path, split: str | None) -> pa.Table:
    try:
        schema = pq.read_schema(source) if source.is_file() else pq.ParquetDataset(source).schema
        columns = schema.names
        path_col = next((c for c in PATH_COLUMNS if c in columns), None)
        if path_col is None:
            raise DataError(f"{source}: Parquet image list has no path column (expected one of "
                            f"{', '.join(PATH_COLUMNS)}; found {', '.join(columns) or 'none'})")
        label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
        if split is not None and "split" not in columns:
            raise DataError(f"{source}: split {split!r} requested but the Parquet has no 'split' column")
        wanted = [c for c in (path_col, label_col, "split" if split is not None else None) if c]
        table = pq.read_table(source, columns=wanted)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{source}: cannot read Parquet ({' '.join(str(e).split())})") from None
    if split is not None:
        table = table.filter(pc.equal(table["split"].cast(pa.string()), split))
        if not table.num_rows:
            raise DataError(f"{source}: no rows with split {split!r}")
    if not table.num_rows:
        raise DataError(f"{source}: Parquet image list has no rows")
    paths = table[path_col].cast(pa.string())
    if paths.null_count:
        raise DataError(f"{source}: {paths.null_count} rows have no path")
    root = str(source.parent)
    absolute = pc.starts_with(paths, "/")
    paths = pc.if_else(absolute, paths, pc.binary_join_element_wise(root, paths, "/"))
    labels = (table[label_col].cast(pa.string()) if label_col else pa.nulls(table.num_rows, pa.string()))
    labels = pc.if_else(pc.equal(labels, ""), pa.scalar(None, pa.string()), labels)  # empty label = no label
    return pa.table({"row": pa.array(range(table.num_rows), pa.int64()), "path": paths, "input_label": labels},
                    schema=IMAGE_LIST_SCHEMA)


def blocks(table: pa.Table, batch_size: int, min_blocks: int = 16, rows_per_block: int = 256,
           max_blocks: int = 4096) -> list[pa.Table]:
    """Split the list into blocks for Ray Data, each a whole number of batches: at least ``min_blocks`` so every
    worker has work, else ``rows_per_block`` rows (each block is one Ray task per stage, and a task costs
    milliseconds of scheduling), and never more than ``max_blocks`` blocks."""
    n = table.num_rows
    per_block = max(min(-(-n // min_blocks), rows_per_block), -(-n // max_blocks))
    per_block = max(batch_size, -(-per_block // batch_size) * batch_size)
    return [table.slice(i, per_block) for i in range(0, n, per_block)]
