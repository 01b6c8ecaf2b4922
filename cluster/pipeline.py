"""The Ray Data pipeline: image list -> decode + preprocess (tasks) -> cascade (actor pool) -> result rows.

Only the runtime's public API is used: :func:`runtime.data.load_images`, :func:`runtime.wavelet.images_to_levels`,
:class:`runtime.cascade.Cascade` and the backend interface (``run_level``).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from runtime.bundle import MANIFEST, Bundle, sha256_file
from runtime.cascade import Cascade, margins
from runtime.data import ImageRecord, load_images
from runtime.wavelet import images_to_levels

from cluster.output import result_schema

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class RunConfig:
    """What every worker needs to know (small, pickled into each task and actor)."""

    bundle: str  # the bundle folder on the driver (used directly where it exists with the same manifest)
    manifest_sha256: str
    thresholds: tuple[float, ...]
    all_levels: bool
    threads: int
    batch_size: int


def level_shapes(spec: dict) -> list[tuple[int, int]]:
    """(tokens, values per token) of each level's patches, from the manifest's preprocessing spec."""
    return [(lv["tokens"], lv["values_per_token"]) for lv in spec["levels"]]


def decode_batch(batch: dict[str, np.ndarray], spec: dict) -> dict[str, np.ndarray]:
    """Decode, resize and wavelet-transform a batch of paths (a Ray task). Unreadable images keep their row, with the
    reason in ``error`` and zero patches that the cascade skips."""
    records = [ImageRecord(Path(p)) for p in batch["path"]]
    reasons: dict[int, str] = {}
    arrays, kept, _ = load_images(records, spec, on_skip=lambda r, why: reasons.__setitem__(id(r), why))
    # Strings are never null in transit ("" = none), so every batch has the same column types.
    out = {"row": np.asarray(batch["row"], np.int64), "path": np.array([str(p) for p in batch["path"]], object),
           "input_label": np.array([v if isinstance(v, str) else "" for v in batch["input_label"]], object),
           "error": np.array([reasons.get(id(r), "") for r in records], dtype=object)}
    ok = np.array([id(r) not in reasons for r in records])
    patches = images_to_levels(arrays, spec) if kept else None
    for k, shape in enumerate(level_shapes(spec)):
        full = np.zeros((len(records), *shape), np.float32)
        if patches is not None:
            full[ok] = patches[k]
        out[f"level{k}"] = full
    return out


def bundle_files(bundle: Bundle) -> dict[str, bytes]:
    """Every file of a bundle (manifest included), to ship to nodes that do not share the driver's filesystem."""
    return {name: (bundle.path / name).read_bytes() for name in [*bundle.manifest["files"], MANIFEST]}


class CascadeWorker:
    """One runtime Cascade per actor; ``threads`` intra-op threads so that actors on a node do not fight for cores.

    ``files`` (the bundle's bytes, from the object store) is used only where the driver's bundle folder is not
    visible with the same manifest, e.g. on another node of a cluster."""

    def __init__(self, config: RunConfig, files: dict[str, bytes] | None = None) -> None:
        self.config = config
        path, self._tmp = Path(config.bundle), None
        if not ((path / MANIFEST).is_file() and sha256_file(path / MANIFEST) == config.manifest_sha256):
            if files is None:
                raise FileNotFoundError(f"bundle {path} is not on this node and was not shipped")
            self._tmp = path = Path(tempfile.mkdtemp(prefix="waveclip-bundle-"))
            for name, data in files.items():
                (path / name).parent.mkdir(parents=True, exist_ok=True)
                (path / name).write_bytes(data)
        self.cascade = Cascade(path, "onnxruntime", list(config.thresholds), threads=config.threads)
        self.schema = result_schema(config.all_levels)

    def __del__(self) -> None:
        if getattr(self, "_tmp", None) is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["row"])
        ok = np.flatnonzero([not e for e in batch["error"]])
        levels = [np.asarray(batch[f"level{k}"])[ok] for k in range(self.cascade.bundle.num_levels)]
        cols = self._all_levels(levels) if self.config.all_levels else self._cascade(levels)
        out: dict[str, list] = {name: [None] * n for name in self.schema.names}
        out["row"], out["path"] = [int(r) for r in batch["row"]], [str(p) for p in batch["path"]]
        for name in ("input_label", "error"):
            out[name] = [str(v) if v else None for v in batch[name]]
        for name, values in cols.items():
            for i, v in zip(ok, values):
                out[name][i] = v
        return pa.table(out, schema=self.schema)

    def _cascade(self, levels: list[np.ndarray]) -> dict[str, list]:
        """The runtime's early-exit cascade, exactly as ``runtime.classify`` runs it."""
        if not len(levels[0]):
            return {}
        results = self.cascade.classify_levels(levels)
        exits = np.array([r.exit_level for r in results])
        ran = [(exits >= k).sum() for k in range(exits.max() + 1)]  # rows that ran level k in this batch
        return {"label": [r.label for r in results], "class_name": [r.class_name for r in results],
                "score": [r.score for r in results], "margin": [r.margin for r in results],
                "exit_level": [r.exit_level for r in results],
                "level_ms": [[ms / ran[k] for k, ms in enumerate(r.level_ms)] for r in results]}

    def _all_levels(self, levels: list[np.ndarray]) -> dict[str, list]:
        """Every level on every row (what gate fitting and int8 evaluation need), timed per level; the cascade's
        decision is read off the per-level margins with the same rule (first level with margin >= threshold)."""
        n = len(levels[0])
        if not n:
            return {}
        c, past, probs, level_ms = self.cascade, None, [], []
        for k in range(c.max_level + 1):
            t0 = time.perf_counter()
            emb, past = c.backend.run_level(k, levels[k], past)
            probs.append(c.probabilities(emb))
            level_ms.append((time.perf_counter() - t0) * 1e3 / n)
        marg = np.stack([margins(p) for p in probs])  # [L, N]
        pred = np.stack([p.argmax(1) for p in probs])  # [L, N] head columns
        passed = marg[:-1] >= np.array(c.thresholds)[:, None]
        exits = np.where(passed.any(0), passed.argmax(0), c.max_level)
        rows = np.arange(n)
        best = c.class_index[pred[exits, rows]]
        labels, names = c.bundle.labels, c.bundle.class_names
        level_labels = np.array(labels, dtype=object)[c.class_index[pred]]  # [L, N] label ids
        return {"label": [labels[b] for b in best], "class_name": [names[b] for b in best],
                "score": [float(probs[e][i, pred[e, i]]) for i, e in enumerate(exits)],
                "margin": [float(marg[e, i]) for i, e in enumerate(exits)],
                "exit_level": [int(e) for e in exits], "level_ms": [level_ms] * n,
                "level_pred": [list(level_labels[:, i]) for i in rows],
                "level_margin": [marg[:, i].astype(np.float32) for i in rows]}


def build_dataset(image_blocks: Sequence[pa.Table], bundle: Bundle, config: RunConfig, compute,
                  files_ref=None, worker: type[CascadeWorker] = CascadeWorker):
    """The lazy Ray Dataset of result rows (nothing runs until it is iterated). Ray Data restarts a dead actor and
    retries its task (its defaults for actor pools: max_restarts=-1, max_task_retries=-1), so every row comes once."""
    import ray.data

    env = {"env_vars": {v: str(config.threads) for v in THREAD_VARIABLES}}
    ds = ray.data.from_arrow(list(image_blocks))
    ds = ds.map_batches(decode_batch, fn_kwargs={"spec": bundle.preprocessing}, batch_size=config.batch_size,
                        batch_format="numpy", num_cpus=1)
    # Own thread settings (runtime_env) also keep Ray from fusing decoding into the actors: it stays in tasks.
    return ds.map_batches(worker, fn_constructor_args=(config, files_ref), batch_size=config.batch_size,
                          batch_format="numpy", compute=compute, num_cpus=config.threads, runtime_env=env)


def local_cpus(actors: int, threads: int) -> int:
    """CPUs a local Ray gets: the actors' threads plus one for decoding tasks (at least 2)."""
    return max(2, actors * threads + 1)


def manifest_digest(bundle: Bundle) -> str:
    return sha256_file(bundle.path / MANIFEST)

