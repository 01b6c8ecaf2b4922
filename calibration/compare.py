"""fp32 vs int8 on held-out images: top-1 agreement and embedding cosine per level (each level forced), and the cascade
(label and exit level with the bundle's gate thresholds).

``python -m calibration.compare FP32.parquet INT8.parquet``: the same comparison (no cosines) from two runs of
``python -m cluster.classify BUNDLE --levels all`` over the same images, for sets too large for one machine.
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

import numpy as np
from tqdm import tqdm

from calibration.gate_search import exit_levels
from runtime.bundle import Bundle
from runtime.cascade import Cascade, margins
from runtime.cli import ArgumentParser, number

CHUNK = 32


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def _run(cascade: Cascade, patches: list[np.ndarray], progress: bool, desc: str):
    """Per-level embeddings [L][N, D] and the cascade's (labels [N], exit levels [N]) with its thresholds, from ONE
    pass over every level in chunks of CHUNK rows (the gate's decision depends only on the per-level margins)."""
    n = patches[0].shape[0]
    embs: list[list[np.ndarray]] = [[] for _ in range(cascade.bundle.num_levels)]
    for i in tqdm(range(0, n, CHUNK), desc=desc, unit="batch", disable=not progress):
        for k, e in enumerate(cascade.run_all_levels([p[i:i + CHUNK] for p in patches])):
            embs[k].append(e)
    embs = [np.concatenate(e) for e in embs]
    probs = [cascade.probabilities(e) for e in embs]
    exits = exit_levels(np.stack([margins(p) for p in probs]), np.array([cascade.thresholds]))[0]
    columns = np.stack([p.argmax(1) for p in probs])[exits, np.arange(n)]
    labels = np.array(cascade.bundle.labels)[cascade.class_index[columns]]
    return embs, labels, exits


def compare(fp32: Bundle, int8: Bundle, patches: list[np.ndarray], int8_backend: str = "onnxruntime",
            true_labels: Sequence[str | None] | None = None, progress: bool = True, weights: str = "auto",
            one_pass: bool = False, reference: dict | None = None) -> dict:
    """Compare the int8 bundle (run by ``int8_backend`` in its ``weights`` mode; auto, as the runtime: the split
    graphs when it has them; with ``one_pass``, its one-pass graph for every level's embedding) with the fp32 bundle
    (ONNX Runtime CPU, level graphs) on ``patches``. ``reference``: a dict kept between calls on the same fp32 bundle
    and patches, so that the fp32 pass runs once for several int8 forms."""
    cache = {} if reference is None else reference
    if "cascade" not in cache:
        cache["cascade"] = Cascade(fp32, "onnxruntime", providers=["CPUExecutionProvider"], weights="levels",
                                   one_pass=False)
        cache["run"] = _run(cache["cascade"], patches, progress, "eval fp32")
    ref, (ref_emb, ref_lab, ref_exit) = cache["cascade"], cache["run"]
    q_opts = {"weights": weights} | ({"providers": ["CPUExecutionProvider"]} if int8_backend == "onnxruntime" else {})
    got = Cascade(int8, int8_backend, one_pass=one_pass, **q_opts)
    q_emb, q_lab, q_exit = _run(got, patches, progress, f"eval int8 ({int8_backend})")
    labels = np.array(fp32.labels)
    known = true_labels is not None and all(t in set(fp32.labels) for t in true_labels)
    levels = []
    for k, (a, b) in enumerate(zip(ref_emb, q_emb)):
        pa, pb = ref.probabilities(a).argmax(1), got.probabilities(b).argmax(1)
        cos = _cosine(a, b)
        entry = {"level": k, "top1_agreement": float((pa == pb).mean()), "cosine_mean": float(cos.mean()),
                 "cosine_min": float(cos.min()), "embedding_max_abs_diff": float(np.abs(a - b).max())}
        if known:
            truth = np.array(true_labels)
            entry["accuracy_fp32"] = float((labels[pa] == truth).mean())
            entry["accuracy_int8"] = float((labels[pb] == truth).mean())
        levels.append(entry)
    cum = [lv["cumulative_gflops"] for lv in fp32.manifest["levels"]]
    return {
        "images": int(patches[0].shape[0]),
        "int8_backend": int8_backend,
        "reference": "fp32 bundle, onnxruntime CPUExecutionProvider",
        "levels": levels,
        "min_top1_agreement": min(e["top1_agreement"] for e in levels),
        "cascade": {"thresholds": ref.thresholds,
                    "label_agreement": float((ref_lab == q_lab).mean()),
                    "exit_level_agreement": float((ref_exit == q_exit).mean()),
                    "agreement": float(((ref_lab == q_lab) & (ref_exit == q_exit)).mean()),
                    "mean_exit_level_fp32": float(ref_exit.mean()), "mean_exit_level_int8": float(q_exit.mean()),
                    "gflops_per_image_fp32": float(np.mean([cum[e] for e in ref_exit])),
                    "gflops_per_image_int8": float(np.mean([cum[e] for e in q_exit]))},
    }


def format_table(report: dict) -> str:
    """The comparison as a Markdown table plus a cascade line."""
    acc = "accuracy_fp32" in report["levels"][0]
    head = "| level | top-1 agreement | cosine mean | cosine min |" + (" acc fp32 | acc int8 |" if acc else "")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    def cos(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.5f}"

    for e in report["levels"]:
        row = f"| {e['level']} | {e['top1_agreement']:.2%} | {cos(e['cosine_mean'])} | {cos(e['cosine_min'])} |"
        if acc:
            row += f" {e['accuracy_fp32']:.2%} | {e['accuracy_int8']:.2%} |"
        rows.append(row)
    c = report["cascade"]
    rows.append(f"cascade (thresholds {', '.join(f'{t:g}' for t in c['thresholds'])}): label agreement "
                f"{c['label_agreement']:.2%}, exit-level agreement {c['exit_level_agreement']:.2%}, mean exit level "
                f"{c['mean_exit_level_fp32']:.2f} fp32 / {c['mean_exit_level_int8']:.2f} int8 "
                f"({report['images']} held-out images, int8 on {report['int8_backend']})")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    from calibration.gate_search import GateError
    from calibration.level_table import compare_tables

    p = ArgumentParser(prog="python -m calibration.compare",
                       description="fp32 vs int8 from two runs of `python -m cluster.classify BUNDLE "
                                   "--levels all` over the same images: per-level top-1 agreement (and "
                                   "accuracy with labels) and cascade agreement; no embedding cosines.")
    p.add_argument("fp32", help="Parquet of cluster.classify --levels all with the fp32 bundle")
    p.add_argument("int8", help="Parquet of cluster.classify --levels all with the int8 bundle, same images")
    p.add_argument("--min-agreement", type=number(0, 1), default=0.99,
                   help="exit 1 when any level's top-1 agreement is lower (default 0.99)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    try:
        report = compare_tables(args.fp32, args.int8)
    except GateError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if report["min_top1_agreement"] >= args.min_agreement else 1


if __name__ == "__main__":
    sys.exit(main())
