"""``python -m cluster.classify BUNDLE --data DIR|CSV|PARQUET --out OUT.parquet``: classify an image set with Ray Data.

Decoding and wavelet preprocessing run in Ray tasks, the early-exit cascade in a pool of actors (one runtime Cascade
each), and one Parquet row per input image (unreadable ones with an ``error``) is written on the driver: staged, then
moved into place. Without --address a small local Ray starts on this machine; with --address the same command runs on
an existing cluster (the code and the bundle are shipped to its nodes; image paths must be readable there).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from typing import Sequence

from tqdm import tqdm

from runtime.backends import BackendError
from runtime.bundle import BundleError, load_bundle
from runtime.cascade import normalize_thresholds
from runtime.cli import ArgumentParser, integer
from runtime.data import DataError
from runtime.errors import one_line

from cluster.output import OutputError, StagedParquetWriter, check_output, result_schema, run_metadata
from cluster.pipeline import CascadeWorker, RunConfig, build_dataset, bundle_files, local_cpus, manifest_digest
from cluster.source import blocks, read_source

LOCAL_OBJECT_STORE_MB = 256


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m cluster.classify", description=__doc__.split(":", 1)[1].strip().split("\n\n")[0],
                epilog="Exit status: 0 written; 1 the run failed after Ray's retries; 2 bad input (bundle, data, "
                       "output). Nothing is written unless every input row has its result row.")
    p.add_argument("bundle", help="bundle folder (python -m export.onnx or calibration.quantize)")
    p.add_argument("--data", required=True, metavar="DIR|CSV|PARQUET",
                   help="images: a folder (recursive), or a CSV / Parquet list with a path/file column and optional "
                        "wnid/label and split columns (relative paths are relative to the list's folder)")
    p.add_argument("--split", help="only the rows of this split (CSV / Parquet lists with a split column)")
    p.add_argument("--out", required=True, metavar="OUT.parquet", help="result file to create")
    p.add_argument("--address", help="an existing Ray cluster: 'auto' (this node's), 'ray://HEAD:10001' (Ray "
                                     "client) or HEAD:6379; default: start a small local Ray")
    p.add_argument("--actors", type=integer(1),
                   help="cascade actors (default: 1 locally; on a cluster an autoscaling pool of 1 to "
                        "CPUs/threads-per-actor)")
    p.add_argument("--threads-per-actor", type=integer(1), default=1, metavar="T",
                   help="intra-op threads (and CPUs reserved) per actor (default 1)")
    p.add_argument("--levels", choices=("exit", "all"), default="exit",
                   help="exit: the cascade with early exit (default); all: run every level on every image and also "
                        "write per-level predictions and margins (for calibration.gate / calibration.compare)")
    p.add_argument("--threshold", type=float, nargs="+", metavar="T",
                   help="gate thresholds: one for every level or one per level before the last (default: manifest)")
    p.add_argument("--batch-size", type=integer(1), default=32,
                   help="images per decoding task and cascade call (default 32)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def start_ray(address: str | None, actors: int, threads: int) -> bool:
    """Connect to ``address`` (shipping this code to the nodes) or start a small local Ray; returns whether this
    call started it. An already initialised Ray (e.g. a test's or a notebook's) is used as is."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}
    if address:
        import cluster
        import runtime

        ray.init(address=address, runtime_env={"py_modules": [runtime, cluster]}, **quiet)
    else:
        ray.init(num_cpus=local_cpus(actors, threads), object_store_memory=LOCAL_OBJECT_STORE_MB << 20, **quiet)
    return True


def configure_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one tqdm bar on the driver instead of Ray's per-operator bars
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def actor_pool(actors: int | None, threads: int, local: bool):
    import ray
    import ray.data

    if actors:
        return ray.data.ActorPoolStrategy(size=actors)
    if local:
        return ray.data.ActorPoolStrategy(size=1)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cpus // threads))


class RunError(RuntimeError):
    """The distributed run failed (after Ray's retries); nothing was written."""


def original_error(err: BaseException) -> str:
    """One line naming the worker's original exception, which Ray's wrappers carry only as traceback text."""
    causes = re.findall(r"^(\w[\w.]*: .*)\n+The above exception was the direct cause", str(err), re.M)
    return causes[0] if causes else one_line(err)


def classify(args: argparse.Namespace, worker: type[CascadeWorker] = CascadeWorker) -> dict:
    """Run the pipeline and write ``args.out``; returns a summary. Raises the one-line errors of bad input, and
    RunError when the run fails. ``worker``: the actor class (tests inject faults with a subclass)."""
    out = check_output(args.out, args.force)
    bundle = load_bundle(args.bundle, verify=not args.no_verify)
    threshold = args.threshold[0] if args.threshold and len(args.threshold) == 1 else args.threshold
    thresholds = normalize_thresholds(threshold, bundle)
    images = read_source(args.data, args.split)
    config = RunConfig(bundle=str(bundle.path.resolve()), manifest_sha256=manifest_digest(bundle),
                       thresholds=tuple(thresholds), all_levels=args.levels == "all",
                       threads=args.threads_per_actor, batch_size=args.batch_size)
    import ray

    t0 = time.perf_counter()
    started = start_ray(args.address, args.actors or 1, args.threads_per_actor)
    startup_s = time.perf_counter() - t0
    writer = None
    try:
        configure_ray_data()
        files_ref = ray.put(bundle_files(bundle)) if args.address else None
        compute = actor_pool(args.actors, args.threads_per_actor, local=not args.address)
        ds = build_dataset(blocks(images, args.batch_size), bundle, config, compute, files_ref, worker)
        metadata = run_metadata(bundle, thresholds, config.all_levels, images.num_rows, str(args.data))
        writer = StagedParquetWriter(out, result_schema(config.all_levels), metadata, images.num_rows)
        errors = 0
        t1 = time.perf_counter()
        with tqdm(total=images.num_rows, unit="img", disable=args.quiet, file=sys.stderr) as bar:
            try:
                for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    writer.write(table)
                    errors += table.num_rows - table["error"].null_count
                    bar.update(table.num_rows)
            except ray.exceptions.RayError as e:
                raise RunError(f"the Ray run failed, nothing written: {original_error(e)}") from None
        run_s = time.perf_counter() - t1
        writer.commit()
        writer = None
    finally:
        if writer is not None:
            writer.abort()
        if started:
            ray.shutdown()
    return {"images": images.num_rows, "unreadable": int(errors), "ray_start_s": startup_s, "run_s": run_s,
            "images_per_s": images.num_rows / run_s if run_s else 0.0, "out": str(out)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = classify(args)
    except (BundleError, BackendError, DataError, OutputError, ValueError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{summary['images']} images ({summary['unreadable']} unreadable) -> {summary['out']}  "
          f"{summary['images_per_s']:.1f} img/s over {summary['run_s']:.1f} s (Ray start {summary['ray_start_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
