"""Every Tiny-ImageNet val image: cluster.classify (local Ray, 2 actors) vs runtime.classify (default batch 1) must
give the same label and exit level on every row, each input row exactly once; the wall times of both are printed.

    python bench/full_val_equality.py [BUNDLE] [--data LABELS.csv]
"""
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from cluster.classify import classify, parse_args  # noqa: E402
from runtime.classify import main as runtime_classify  # noqa: E402
from runtime.cli import ArgumentParser, integer  # noqa: E402
from runtime.data import read_image_list  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = ArgumentParser(prog="python bench/full_val_equality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="?", default=str(REPO / "models" / "waveclip-demo" / "bundle"))
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tiny-imagenet-200" / "labels.csv"))
    p.add_argument("--split", default="val")
    p.add_argument("--actors", type=integer(1), default=2)
    args = p.parse_args()
    recs = read_image_list(args.data, args.split)
    with tempfile.TemporaryDirectory() as tmp:
        listing, out = Path(tmp) / "list.csv", Path(tmp) / "out.parquet"
        listing.write_text("path,wnid\n" + "".join(f"{r.path},{r.label}\n" for r in recs))
        t0 = time.perf_counter()
        s = classify(parse_args([args.bundle, "--data", str(listing), "--out", str(out), "--actors",
                                 str(args.actors), "-q"]))
        print(f"cluster.classify, {args.actors} actors: command {time.perf_counter() - t0:.1f} s (Ray start "
              f"{s['ray_start_s']:.1f} s, pipeline {s['run_s']:.1f} s = {s['images_per_s']:.1f} img/s)", flush=True)
        rows = pq.read_table(out).to_pylist()
    text, t0 = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(io.StringIO()):
        runtime_classify([args.bundle, *[str(r.path) for r in recs], "--json"])
    doc = json.loads(text.getvalue())
    print(f"runtime.classify (batch 1): command {time.perf_counter() - t0:.1f} s (loop {doc['summary']['wall_s']:.1f} s "
          f"= {len(recs) / doc['summary']['wall_s']:.1f} img/s)", flush=True)
    ref = {r["image"]: (r["label"], r["exit_level"]) for r in doc["results"]}
    bad = [r["path"] for r in rows if (r["label"], r["exit_level"]) != ref.get(r["path"])]
    once = sorted(r["row"] for r in rows) == list(range(len(recs)))
    print(json.dumps({"inputs": len(recs), "rows": len(rows), "every_row_once": once, "mismatches": len(bad),
                      "first_mismatches": bad[:5]}))
    return 0 if once and not bad else 1


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
