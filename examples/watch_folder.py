"""Watch a folder and classify every new image with a WaveCLIP bundle (runtime only: numpy + onnxruntime, no torch).

    python examples/watch_folder.py BUNDLE INBOX/ [--labels "tabby cat,espresso,goldfish"] [--once]

New files are classified as they appear (early exit: most stop at level 0); one line per image.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from runtime.cascade import Cascade  # noqa: E402
from runtime.preprocess import IMAGE_SUFFIXES, ImageError  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="bundle folder (manifest.json + level graphs)")
    p.add_argument("folder", type=Path, help="folder to watch")
    p.add_argument("--labels", help="comma-separated subset of the bundle's class names to choose among")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between scans (default 1)")
    p.add_argument("--once", action="store_true", help="classify what is there now and exit")
    args = p.parse_args()
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    try:
        cascade = Cascade(args.bundle, labels=labels, top_k=1)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seen: set[Path] = set()
    while True:
        for path in sorted(args.folder.iterdir()):
            if path in seen or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            seen.add(path)
            try:
                r = cascade.classify([path])[0]
            except ImageError as e:
                print(f"skipped: {e}", file=sys.stderr)
                continue
            print(f"{path.name}: {r.class_name} ({r.score:.2f}), exit level {r.exit_level}, "
                  f"{sum(r.level_ms) + r.preprocess_ms:.1f} ms", flush=True)
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
