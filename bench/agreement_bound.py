"""How much top-1 agreement any approximation of a bundle can keep, from the model's own margins.

    python bench/agreement_bound.py BUNDLE --data CSV_OR_DIR [--split calib] [--limit 1000]
        [--cosines 0.999,0.9995,0.9999,0.99995]

Runs the fp32 bundle on the images, then perturbs each level's embedding by a random direction orthogonal to it at a
given cosine (the embedding's norm kept up to the cosine) and counts how often the head's top-1 stays the same. An
int8 bundle whose embedding cosine to fp32 is c cannot be expected to agree much better than isotropic noise at c:
the agreement an INT8 check can ask for is bounded by how many images have small top-1/top-2 margins.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.bundle import load_bundle  # noqa: E402
from runtime.cascade import Cascade  # noqa: E402
from runtime.cli import ArgumentParser, integer  # noqa: E402
from runtime.data import load_images, read_image_list, spread  # noqa: E402
from runtime.wavelet import images_to_levels  # noqa: E402


def perturb(emb: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """Each row moved by a random direction orthogonal to it so that cos(row, result) == ``cosine``."""
    noise = rng.standard_normal(emb.shape)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    noise -= (noise * unit).sum(1, keepdims=True) * unit
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return emb + np.tan(np.arccos(cosine)) * np.linalg.norm(emb, axis=1, keepdims=True) * noise


def agreement_table(cascade: Cascade, embeddings: list[np.ndarray], cosines: list[float], seed: int = 0
                    ) -> list[list[float]]:
    """[level][cosine] top-1 agreement of the perturbed embeddings with the clean ones."""
    rng = np.random.default_rng(seed)
    table = []
    for emb in embeddings:
        ref = cascade.probabilities(emb).argmax(1)
        table.append([float((cascade.probabilities(perturb(emb, c, rng)).argmax(1) == ref).mean()) for c in cosines])
    return table


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python bench/agreement_bound.py", description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--data", required=True, help="images: a folder or a CSV with a path column")
    p.add_argument("--split", help="CSV split (e.g. calib)")
    p.add_argument("--limit", type=integer(1), default=1000, help="images (default 1000, spread over the list)")
    p.add_argument("--cosines", default="0.999,0.9995,0.9999,0.99995")
    args = p.parse_args(argv)
    try:
        cosines = [float(c) for c in args.cosines.split(",")]
        if not all(0 < c < 1 for c in cosines):
            raise ValueError(f"--cosines must lie in (0, 1), got {args.cosines}")
        bundle = load_bundle(args.bundle)
        records = spread(read_image_list(args.data, args.split), args.limit, 7)
        images, kept, _ = load_images(records, bundle.preprocessing)
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    cascade = Cascade(bundle, "onnxruntime", providers=["CPUExecutionProvider"], weights="levels")
    levels = images_to_levels(images, bundle.preprocessing)
    chunks = [cascade.run_all_levels([lv[i:i + 64] for lv in levels]) for i in range(0, len(kept), 64)]
    embeddings = [np.concatenate([c[k] for c in chunks]) for k in range(bundle.num_levels)]
    print(f"{len(kept)} images; top-1 agreement with fp32 after isotropic noise at each embedding cosine\n")
    print("| level | " + " | ".join(f"cos {c}" for c in cosines) + " |")
    print("|---|" + "---:|" * len(cosines))
    for k, row in enumerate(agreement_table(cascade, embeddings, cosines)):
        print(f"| {k} | " + " | ".join(f"{a:.1%}" for a in row) + " |")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
