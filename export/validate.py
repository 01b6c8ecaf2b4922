"""Optimum-style validation: every level graph in ONNX Runtime (CPU) against PyTorch on real images."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from model.waveclip import WaveCLIP
from runtime.preprocess import list_images

REPO = Path(__file__).resolve().parents[1]
FP32_ATOL = 1e-4
FP16_ATOL = {"embedding": 1e-2, "present": 5e-2}
MAX_IMAGES = 16


def tolerances(precision: str, atol: float | None = None) -> dict[str, float]:
    """Max abs diff allowed per output kind; ``atol`` overrides both."""
    if atol is not None:
        return {"embedding": atol, "present": atol}
    return dict(FP16_ATOL) if precision == "fp16" else {"embedding": FP32_ATOL, "present": FP32_ATOL}


def find_images(paths: Sequence[str | os.PathLike] | None = None, limit: int = MAX_IMAGES) -> tuple[list, str]:
    """Validation images: ``paths`` (at most ``limit``, evenly spaced in name order: validation runs them as one
    batch, and a folder of 1,000 b16 images takes over 24 GiB), else the shared imagenet-sample (first ``limit``), else
    ``examples/images``, else seeded synthetic images (said so in the report). Returns (images, source)."""
    if paths:
        found = list_images(paths)
        if not found:
            raise FileNotFoundError(f"no images found in {', '.join(map(str, paths))}")
        if len(found) > limit:
            return [found[i * len(found) // limit] for i in range(limit)], f"--images ({limit} of {len(found)})"
        return found, "--images"
    data = Path(os.environ.get("WAVECLIP_DATA", REPO.parent / "shared" / "data"))
    for folder in (data / "imagenet-sample", REPO / "examples" / "images"):
        found = list_images([folder]) if folder.is_dir() else []
        if found:
            return found[:limit], str(folder)
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(4)], "synthetic (no real images found)"


def ort_session(path: str | os.PathLike, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _logits(head: dict, emb: np.ndarray) -> np.ndarray:
    w = np.asarray(head["weight"], dtype=np.float32)
    return float(head["logit_scale"]) * emb @ w.T + np.asarray(head["bias"], dtype=np.float32)


def _top1(head: dict, ref: np.ndarray, got: np.ndarray) -> tuple[float, int]:
    """(agreement, flips not explained by the embedding diff). A flip is explained when the reference's top-1/top-2
    logit margin is within the largest change the diff can cause: 2 * scale * max_j |W_j| * |diff|."""
    a, b = _logits(head, ref), _logits(head, got)
    agree = a.argmax(1) == b.argmax(1)
    if a.shape[1] < 2:
        return 1.0, 0
    top2 = np.sort(a, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    bound = 2 * abs(float(head["logit_scale"])) * np.linalg.norm(np.asarray(head["weight"]), axis=1).max() \
        * np.linalg.norm(ref - got, axis=1)
    return float(agree.mean()), int((~agree & (margin > bound)).sum())


def validate_bundle(folder: Path, levels: list[dict], model: WaveCLIP, head: dict, patches: list[np.ndarray],
                    tol: dict[str, float], progress: bool = True) -> dict:
    """Run the level graphs in ``folder`` as an incremental cascade and compare each output with
    ``model.forward_level`` (fed its own cache) and each embedding with the full masked forward ``model(patches)``."""
    tp = [torch.from_numpy(p) for p in patches[: len(levels)]]
    with torch.no_grad():
        full = [e.numpy() for e in model(tp)]
    report, failures = [], []
    past_ort: list[np.ndarray] = []
    past_pt = None
    for lv in tqdm(levels, desc="validate", unit="level", disable=not progress):
        k = lv["level"]
        sess = ort_session(folder / lv["file"])
        names = [o.name for o in sess.get_outputs()]
        feeds = {"patches": patches[k], **{i["name"]: t for i, t in zip(lv["inputs"][1:], past_ort)}}
        got = dict(zip(names, sess.run(None, feeds)))
        with torch.no_grad():
            emb, past_pt = model.forward_level(k, tp[k], past_pt)
        ref = {"embedding": emb.numpy()}
        ref.update({lv["outputs"][1 + 2 * i + j]["name"]: t.numpy()
                    for i, pair in enumerate(past_pt) for j, t in enumerate(pair)})
        entry: dict = {"level": k, "file": lv["file"], "outputs": {}}
        want = [o["name"] for o in lv["outputs"]]
        if names != want:
            failures.append(f"level {k}: output names {names} != manifest {want}")
        for name, r in ref.items():
            g = got.get(name)
            if g is None:
                continue
            entry["outputs"][name] = {"shape": list(g.shape), "max_abs_diff": float(np.abs(g - r).max())}
            if g.shape != r.shape:
                failures.append(f"level {k}: {name} shape {list(g.shape)} != {list(r.shape)}")
        diffs = entry["outputs"]
        entry["embedding_max_abs_diff"] = diffs["embedding"]["max_abs_diff"]
        entry["present_max_abs_diff"] = max(v["max_abs_diff"] for n, v in diffs.items() if n != "embedding")
        entry["vs_full_forward_max_abs_diff"] = float(np.abs(got["embedding"] - full[k]).max())
        entry["top1_agreement"], flips = _top1(head, full[k], got["embedding"])
        entry["unexplained_top1_flips"] = flips
        for kind, value in (("embedding", entry["embedding_max_abs_diff"]), ("present", entry["present_max_abs_diff"]),
                            ("embedding", entry["vs_full_forward_max_abs_diff"])):
            if not value <= tol[kind]:  # also catches NaN
                failures.append(f"level {k}: {kind} max abs diff {value:.3g} > atol {tol[kind]:g}")
        if flips:
            failures.append(f"level {k}: {flips} top-1 flips not explained by the embedding diff")
        past_ort = [got[o["name"]] for o in lv["outputs"][1:]]
        report.append(entry)
    return {"passed": not failures, "failures": failures, "tolerances": tol, "batch": int(patches[0].shape[0]),
            "levels": report}


def format_table(result: dict) -> str:
    """The validation result as a short Markdown table."""
    rows = ["| level | embedding diff | max present diff | vs full forward | top-1 agree |",
            "|---|---|---|---|---|"]
    for e in result["levels"]:
        rows.append(f"| {e['level']} | {e['embedding_max_abs_diff']:.2e} | {e['present_max_abs_diff']:.2e} | "
                    f"{e['vs_full_forward_max_abs_diff']:.2e} | {e['top1_agreement']:.0%} |")
    tol = result["tolerances"]
    verdict = "PASSED" if result["passed"] else "FAILED: " + "; ".join(result["failures"])
    rows.append(f"validation {verdict} (atol embedding {tol['embedding']:g}, present {tol['present']:g}, "
                f"{result['batch']} images: {result.get('images', {}).get('source', '?')})")
    return "\n".join(rows)
