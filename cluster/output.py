"""The result Parquet: its columns, its metadata, and a writer that stages the file and moves it into place.

Columns (one row per input image, never dropped): ``row`` (input order), ``path``, ``input_label`` (the list's label or
null), ``error`` (why the image could not be read, else null), ``label`` (predicted label id), ``class_name``,
``score``, ``margin`` (softmax top-1 minus top-2 at exit), ``exit_level``, ``level_ms`` (per image: each level's batch
time divided by the rows that ran it). With ``--levels all`` also ``level_pred`` (label id predicted by each level) and
``level_margin`` (each level's margin): what ``calibration.gate`` and ``calibration.compare`` read.
The schema metadata key ``waveclip`` holds JSON: bundle name, precision, ``files_sha256`` (digest of the bundle's
file list, unchanged when the gate rewrites the manifest), thresholds, ``cumulative_gflops``, levels, images.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from runtime.bundle import Bundle

METADATA_KEY = b"waveclip"
ROW_GROUP_ROWS = 65536


class OutputError(ValueError):
    """An output that cannot be written (exists, or rows missing or repeated); one-line message."""


def result_schema(all_levels: bool) -> pa.Schema:
    fields = [("row", pa.int64()), ("path", pa.string()), ("input_label", pa.string()), ("error", pa.string()),
              ("label", pa.string()), ("class_name", pa.string()), ("score", pa.float64()), ("margin", pa.float64()),
              ("exit_level", pa.int32()), ("level_ms", pa.list_(pa.float64()))]
    if all_levels:
        fields += [("level_pred", pa.list_(pa.string())), ("level_margin", pa.list_(pa.float32()))]
    return pa.schema(fields)


def files_digest(bundle: Bundle) -> str:
    """sha256 of the bundle's sorted file list with digests: identifies its graphs and head, not its gate."""
    return hashlib.sha256(json.dumps(bundle.manifest["files"], sort_keys=True).encode()).hexdigest()


def run_metadata(bundle: Bundle, thresholds: list[float], all_levels: bool, images: int, source: str) -> dict:
    return {"format": "waveclip-edge/cluster-classify", "version": 1, "bundle": str(bundle.path.resolve()),
            "bundle_name": bundle.manifest.get("name"), "precision": bundle.manifest.get("precision"),
            "files_sha256": files_digest(bundle), "thresholds": thresholds,
            "levels": "all" if all_levels else "exit", "num_levels": bundle.num_levels,
            "cumulative_gflops": [lv["cumulative_gflops"] for lv in bundle.manifest["levels"]],
            "images": images, "source": source}


def check_output(out: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output (rerunning never duplicates rows) unless ``force``; the folder must exist."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputError(f"{out} already exists (use --force to replace it)")
    if out.is_dir():
        raise OutputError(f"{out} is a folder; give a .parquet file path")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: no such folder")
    return out


class StagedParquetWriter:
    """Writes row batches to a hidden temporary file beside ``out``; :meth:`commit` checks that every row id
    0..N-1 came exactly once and moves the file into place (``os.replace``); anything else deletes it."""

    def __init__(self, out: Path, schema: pa.Schema, metadata: dict, rows: int) -> None:
        self.out, self.rows = out, rows
        self.schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.tmp.chmod(0o644)  # mkstemp makes it private; results are meant to be shared
        self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.seen = bytearray(rows)
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.written = 0

    def write(self, table: pa.Table) -> None:
        for r in table["row"].to_pylist():
            if not 0 <= r < self.rows or self.seen[r]:
                raise OutputError(f"row {r} came twice or is not an input row; nothing written")
            self.seen[r] = 1
        self.buffer.append(table.cast(self.schema))
        self.buffered += table.num_rows
        self.written += table.num_rows
        if self.buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.concat_tables(self.buffer), row_group_size=ROW_GROUP_ROWS)
        self.buffer, self.buffered = [], 0

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        if self.written != self.rows:
            raise OutputError(f"{self.rows - self.written} of {self.rows} rows missing from the results; "
                              "nothing written")
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)
