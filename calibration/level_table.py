"""Per-level predictions computed once, anywhere: the Parquet of ``python -m cluster.classify --levels all``.

Fitting gate thresholds on millions of images is then one distributed pass plus the local search of gate_search, and
the int8 evaluation is two such passes (fp32 and int8 bundle) compared here, without running a graph.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from calibration.gate_search import GateError, LevelStats
from runtime.bundle import Bundle

LEVEL_COLUMNS = ("path", "input_label", "error", "label", "exit_level", "level_pred", "level_margin")


def is_parquet(source: str | os.PathLike) -> bool:
    return Path(source).suffix.lower() == ".parquet"


def read_level_table(path: str | os.PathLike):
    """(pyarrow table of LEVEL_COLUMNS, run metadata); refuses files that are not a ``--levels all`` result."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GateError("reading a Parquet needs pyarrow: pip install 'waveclip-edge[cluster]'") from None
    from cluster.output import METADATA_KEY

    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as e:
        raise GateError(f"{path}: cannot read Parquet ({' '.join(str(e).split())})") from None
    meta = json.loads((schema.metadata or {}).get(METADATA_KEY, b"null"))
    if not meta or meta.get("format") != "waveclip-edge/cluster-classify":
        raise GateError(f"{path}: not a result of python -m cluster.classify")
    missing = [c for c in LEVEL_COLUMNS if c not in schema.names]
    if missing:
        raise GateError(f"{path}: has no per-level columns ({', '.join(missing)}); rerun cluster.classify with "
                        "--levels all")
    return pq.read_table(path, columns=list(LEVEL_COLUMNS)), meta


def check_bundle(meta: dict, bundle: Bundle, path: str | os.PathLike) -> None:
    """The Parquet must come from this bundle's graphs and head (its gate may have changed since)."""
    from cluster.output import files_digest

    if meta["files_sha256"] != files_digest(bundle):
        raise GateError(f"{path} was computed with another bundle ({meta.get('bundle_name')} at "
                        f"{meta.get('bundle')}), not {bundle.path}")


def _levels(table, num_levels: int, values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """[L, N] head columns (index into ``values``) and float32 margins of every level."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows and not pc.all(pc.equal(pc.list_value_length(table["level_pred"]), num_levels)).as_py():
        raise GateError(f"per-level columns do not have {num_levels} levels on every row")
    flat = pc.index_in(pc.list_flatten(table["level_pred"]), value_set=pa.array(values, pa.string()))
    if flat.null_count:
        raise GateError("per-level predictions name labels that are not in the bundle's head")
    pred = flat.to_numpy().reshape(-1, num_levels).T
    margin = pc.list_flatten(table["level_margin"]).to_numpy().astype(np.float32).reshape(-1, num_levels).T
    return np.ascontiguousarray(pred), np.ascontiguousarray(margin)


def level_stats(bundle: Bundle, path: str | os.PathLike, reference: str | None) -> tuple[LevelStats, str]:
    """LevelStats of a ``--levels all`` Parquet (as :func:`calibration.gate.measure_levels` measures them) and the
    reference (``labels`` when the rows have labels, else ``full``). Unreadable rows are counted as skipped; with
    reference ``labels``, rows whose label is not in the head are dropped and counted."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table, meta = read_level_table(path)
    check_bundle(meta, bundle, path)
    ok = pc.is_null(table["error"])
    skipped = table.num_rows - pc.sum(ok.cast("int64")).as_py()
    table = table.filter(ok)
    if not table.num_rows:
        raise GateError(f"{path}: none of its {meta['images']} images could be read")
    has_labels = table["input_label"].null_count < table.num_rows
    reference = reference or ("labels" if has_labels else "full")
    if reference == "labels" and not has_labels:
        raise GateError(f"{path}: no labels (use --reference full)")
    ids = pc.index_in(table["input_label"], value_set=pa.array(bundle.labels, pa.string()))
    target = pc.coalesce(ids, pc.index_in(table["input_label"], value_set=pa.array(bundle.class_names, pa.string())))
    dropped = 0
    if reference == "labels":
        known = pc.is_valid(target)
        dropped = table.num_rows - pc.sum(known.cast("int64")).as_py()
        if not dropped < table.num_rows:
            example = next(v for v in table["input_label"].to_pylist() if v is not None)
            raise GateError(f"labels do not match the bundle's labels: e.g. {example!r} is not among "
                            f"{', '.join(bundle.labels[:3])}, ... nor the class names")
        table, target = table.filter(known), target.filter(known)
    pred, margin = _levels(table, bundle.num_levels, bundle.labels)
    target_np = target.to_numpy().astype(np.int64) if target.null_count == 0 else None
    cum = np.array([lv["cumulative_gflops"] for lv in bundle.manifest["levels"]])
    return LevelStats(pred, margin, target_np, cum, paths=table["path"].to_pylist(), skipped=skipped,
                      dropped=dropped), reference


def compare_tables(fp32_path: str | os.PathLike, int8_path: str | os.PathLike) -> dict:
    """fp32 vs int8 from two ``--levels all`` Parquets of the same images: per-level top-1 agreement (and accuracy
    when every row has a label), and the cascade's label / exit-level agreement. Embedding cosines need the
    embeddings, which the Parquet does not keep: they are None."""
    import pyarrow.compute as pc

    (a, meta_a), (b, meta_b) = read_level_table(fp32_path), read_level_table(int8_path)
    if meta_a["num_levels"] != meta_b["num_levels"]:
        raise GateError(f"{fp32_path} has {meta_a['num_levels']} levels, {int8_path} {meta_b['num_levels']}")
    for t, p in ((a, fp32_path), (b, int8_path)):
        if pc.count_distinct(t["path"]).as_py() != t.num_rows:
            raise GateError(f"{p}: an image path occurs more than once")
    a = a.take(pc.sort_indices(a, [("path", "ascending")]))
    b = b.take(pc.sort_indices(b, [("path", "ascending")]))
    if a.num_rows != b.num_rows or not a["path"].equals(b["path"]):
        raise GateError(f"{fp32_path} and {int8_path} are not results for the same images")
    ok = pc.and_(pc.is_null(a["error"]), pc.is_null(b["error"]))
    a, b = a.filter(ok), b.filter(ok)
    if not a.num_rows:
        raise GateError("no image was readable in both runs")
    L = meta_a["num_levels"]
    pa_, pb_ = (np.array(pc.list_flatten(t["level_pred"]).to_pylist(), object).reshape(-1, L).T for t in (a, b))
    truth = np.array(a["input_label"].to_pylist(), object)
    labelled = a["input_label"].null_count == 0
    levels = []
    for k in range(L):
        entry = {"level": k, "top1_agreement": float((pa_[k] == pb_[k]).mean()), "cosine_mean": None,
                 "cosine_min": None, "embedding_max_abs_diff": None}
        if labelled:
            entry["accuracy_fp32"] = float((pa_[k] == truth).mean())
            entry["accuracy_int8"] = float((pb_[k] == truth).mean())
        levels.append(entry)
    lab_eq = np.array(pc.equal(a["label"], b["label"]).to_pylist())
    ea, eb = a["exit_level"].to_numpy(), b["exit_level"].to_numpy()
    cum_a, cum_b = np.array(meta_a["cumulative_gflops"]), np.array(meta_b["cumulative_gflops"])
    return {
        "images": a.num_rows, "unreadable": int(len(ok) - a.num_rows),
        "int8_backend": f"{meta_b.get('bundle_name')} ({meta_b.get('precision')}), from {int8_path}",
        "reference": f"{meta_a.get('bundle_name')} ({meta_a.get('precision')}), from {fp32_path}",
        "levels": levels, "min_top1_agreement": min(e["top1_agreement"] for e in levels),
        "cascade": {"thresholds": meta_a["thresholds"], "thresholds_int8": meta_b["thresholds"],
                    "label_agreement": float(lab_eq.mean()), "exit_level_agreement": float((ea == eb).mean()),
                    "agreement": float((lab_eq & (ea == eb)).mean()),
                    "mean_exit_level_fp32": float(ea.mean()), "mean_exit_level_int8": float(eb.mean()),
                    "gflops_per_image_fp32": float(cum_a[ea].mean()), "gflops_per_image_int8": float(cum_b[eb].mean())},
    }
