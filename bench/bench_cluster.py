"""One process (runtime.classify) vs Ray Data (cluster.classify) with 1 and 2 actors, on the same images, in one run.

    python bench/bench_cluster.py BUNDLE --data CSV --split val --limit 2000 [--small 200] [--json OUT.json]

Each Ray configuration runs as the command does: a fresh local Ray (its start-up timed apart), then the pipeline
(actor start-up included). A second, small run per configuration separates the fixed cost of a run from the marginal
cost per image: marginal = (t_N - t_small) / (N - small). Every Ray run's labels and exit levels are checked against
runtime.classify's (batch 1).
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.classify import classify, parse_args  # noqa: E402
from devices.machine import cpu_record  # noqa: E402
from runtime.classify import main as runtime_classify  # noqa: E402
from runtime.atomic import write_text_atomic  # noqa: E402
from runtime.cli import ArgumentParser, integer, output_file  # noqa: E402
from runtime.data import read_image_list  # noqa: E402


def one_process(bundle: str, paths: list[str], batch: int) -> tuple[dict, dict]:
    """(summary, {path: (label, exit level)}) of runtime.classify --json; wall_s is its classification loop."""
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        runtime_classify([bundle, *paths, "--json", "--batch-size", str(batch)])
    doc = json.loads(out.getvalue())
    doc["summary"]["command_s"] = time.perf_counter() - t0
    return doc["summary"], {r["image"]: (r["label"], r["exit_level"]) for r in doc["results"]}


def ray_run(bundle: str, csv_path: Path, actors: int, threads: int, out: Path) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    summary = classify(parse_args([bundle, "--data", str(csv_path), "--out", str(out), "--actors", str(actors),
                                   "--threads-per-actor", str(threads), "--force", "-q"]))
    summary["command_s"] = time.perf_counter() - t0
    rows = pq.read_table(out, columns=["path", "label", "exit_level"]).to_pylist()
    return summary, {r["path"]: (r["label"], r["exit_level"]) for r in rows}


def main() -> int:
    p = ArgumentParser(prog="python bench/bench_cluster.py", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--data", required=True)
    p.add_argument("--split")
    p.add_argument("--limit", type=integer(1), default=2000)
    p.add_argument("--small", type=integer(1), default=200)
    p.add_argument("--configs", default="1x1,2x1", help="ACTORSxTHREADS,... (default 1x1,2x1)")
    p.add_argument("--json", type=output_file, help="write the results here")
    args = p.parse_args()
    records = read_image_list(args.data, args.split, args.limit)
    paths = [str(r.path) for r in records]
    result: dict = {"cpu": cpu_record(), "bundle": args.bundle, "images": len(paths), "small": args.small}
    with tempfile.TemporaryDirectory() as tmp:
        lists = {}
        for n in (len(paths), args.small):
            lists[n] = Path(tmp) / f"list{n}.csv"
            lists[n].write_text("path\n" + "\n".join(paths[:n]) + "\n")
        one = {}
        for batch in (1, 32):
            summary, answers = one_process(args.bundle, paths, batch)
            one[batch] = answers
            result[f"runtime_classify_batch{batch}"] = {"images_per_s": len(paths) / summary["wall_s"],
                                                        "loop_s": summary["wall_s"], "command_s": summary["command_s"]}
            print(f"runtime.classify batch {batch}: {len(paths) / summary['wall_s']:.1f} img/s", flush=True)
        for cfg in args.configs.split(","):
            actors, threads = map(int, cfg.split("x"))
            entry = {}
            for n in (args.small, len(paths)):
                summary, answers = ray_run(args.bundle, lists[n], actors, threads, Path(tmp) / "out.parquet")
                mismatches = sum(answers[p_] != one[1][p_] for p_ in paths[:n])
                entry[n] = {"ray_start_s": summary["ray_start_s"], "run_s": summary["run_s"],
                            "command_s": summary["command_s"], "images_per_s": n / summary["run_s"],
                            "mismatches_vs_runtime_classify": mismatches}
                print(f"ray {actors} actor(s) x {threads} thread(s), {n} images: start {summary['ray_start_s']:.1f} s, "
                      f"run {summary['run_s']:.1f} s ({n / summary['run_s']:.1f} img/s), {mismatches} mismatches",
                      flush=True)
            big, small = entry[len(paths)], entry[args.small]
            marginal = (big["run_s"] - small["run_s"]) / (len(paths) - args.small)
            entry["marginal_ms_per_image"] = 1e3 * marginal
            entry["fixed_run_s"] = small["run_s"] - args.small * marginal
            result[f"ray_{actors}x{threads}"] = entry
            print(f"  marginal {1e3 * marginal:.2f} ms/img ({1 / marginal:.1f} img/s steady), fixed per run "
                  f"{entry['fixed_run_s']:.1f} s", flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
