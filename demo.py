"""The whole story on the shipped demo model: export the bundled checkpoint, then classify the bundled images.

    python demo.py [IMAGES...] [--out out/demo]

1. `python -m export.onnx models/waveclip-demo/ckpt.pt -o out/demo/bundle` (validated against PyTorch); skipped,
   using the shipped fp32 bundle, when torch is not installed (a runtime-only install).
2. `python -m runtime.classify` on examples/images with the fp32 bundle and the shipped int8 bundle, using the gate
   thresholds calibrated for the shipped bundle: labels, exit levels, time per level and the compute saved.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from runtime.cli import ArgumentParser

REPO = Path(__file__).resolve().parent
DEMO = REPO / "models" / "waveclip-demo"


def main() -> int:
    p = ArgumentParser(prog="python demo.py", description=__doc__.splitlines()[0],
                       epilog="Exit status: 0 done, 1 no image could be read, 2 bad input (images, --out).")
    p.add_argument("images", nargs="*", default=[str(REPO / "examples" / "images")], help="images or folders")
    p.add_argument("--out", type=Path, default=REPO / "out" / "demo", help="where the exported bundle goes")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from runtime.classify import main as classify

    shipped = json.loads((DEMO / "bundle" / "manifest.json").read_text())
    thresholds = [str(t) for t in shipped["gate"]["thresholds"]]
    bundle = DEMO / "bundle"
    if importlib.util.find_spec("torch") is not None:
        from export.onnx import main as export

        print(f"== 1. export {DEMO / 'ckpt.pt'} -> {args.out / 'bundle'} (validated against PyTorch)", flush=True)
        rc = export([str(DEMO / "ckpt.pt"), "-o", str(args.out / "bundle"), "--force", "--images", *args.images])
        if rc:
            return rc  # its one-line error is on stderr
        bundle = args.out / "bundle"
    else:
        print("== 1. torch not installed: using the shipped fp32 bundle", flush=True)
    print(f"\n== 2. classify with the fp32 bundle, gate thresholds {', '.join(thresholds)} "
          f"({shipped['gate']['source']})", flush=True)
    rc = classify([str(bundle), *args.images, "--threshold", *thresholds, "--top-k", "3"])
    print("\n== 3. the same with the shipped int8 bundle (onnxruntime QDQ)", flush=True)
    return rc or classify([str(DEMO / "bundle-int8"), *args.images, "--top-k", "3"])


if __name__ == "__main__":
    sys.exit(main())
