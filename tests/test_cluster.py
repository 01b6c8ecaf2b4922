"""cluster.classify (Ray Data over the runtime): equality with runtime.classify, unreadable rows, fault tolerance,
refused reruns, and the Parquet feeding calibration.gate / calibration.compare. One local Ray per module."""
import ast
import contextlib
import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from calibration.compare import compare  # noqa: E402
from calibration.compare import main as compare_main  # noqa: E402
from calibration.gate import main as gate_main  # noqa: E402
from calibration.gate import measure_levels  # noqa: E402
from calibration.gate_search import GateError  # noqa: E402
from calibration.level_table import compare_tables, level_stats  # noqa: E402
from cluster.classify import classify, main, parse_args  # noqa: E402
from cluster.pipeline import CascadeWorker  # noqa: E402
from cluster.source import read_source  # noqa: E402
from runtime.bundle import load_bundle  # noqa: E402
from runtime.cascade import Cascade  # noqa: E402
from runtime.classify import main as runtime_classify  # noqa: E402
from runtime.data import load_images, read_image_list  # noqa: E402
from runtime.wavelet import images_to_levels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "models" / "waveclip-demo" / "bundle"
INT8 = REPO / "models" / "waveclip-demo" / "bundle-int8"
N = 200


_RAY_START_FAILED: list[str] = []


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the whole module (its start-up costs seconds); cluster.classify reuses it. Ray gives its
    node 30 s to start (hard-coded); on a starved machine it is tried twice, and a failure is reported once."""
    import ray

    if _RAY_START_FAILED:
        pytest.fail(f"local Ray did not start: {_RAY_START_FAILED[0]}")
    for attempt in range(2):
        try:
            ray.init(num_cpus=3, object_store_memory=256 << 20, include_dashboard=False, logging_level=logging.ERROR)
            break
        except Exception as e:  # Ray raises a bare Exception when its node times out during start-up
            ray.shutdown()
            if attempt:
                _RAY_START_FAILED.append(str(e))
                pytest.fail(f"local Ray did not start: {e}")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(folder, labelled CSV): the first N Tiny-ImageNet val images (links) plus one unreadable file."""
    folder = tmp_path_factory.mktemp("cluster") / "images"
    folder.mkdir()
    rows = [r for r in csv.DictReader(open(data_dir / "tiny-imagenet-200" / "labels.csv")) if r["split"] == "val"][:N]
    for r in rows:
        (folder / Path(r["path"]).name).symlink_to(data_dir / "tiny-imagenet-200" / r["path"])
    (folder / "broken.jpg").write_bytes(b"not an image")
    table = folder.parent / "labels.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "wnid"])
        w.writerows([f"images/{Path(r['path']).name}", r["wnid"]] for r in rows)
        w.writerow(["images/broken.jpg", rows[0]["wnid"]])
    return folder, table


@pytest.fixture(scope="module")
def reference(images) -> dict[str, dict]:
    """runtime.classify's answer (one process, batch 1) per image path."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        runtime_classify([str(BUNDLE), str(images[0]), "--json"])
    return {r["image"]: r for r in json.loads(out.getvalue())["results"]}


def run(args: list[str], worker=CascadeWorker) -> dict:
    return classify(parse_args([*args, "-q"]), worker=worker)


def rows_of(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def assert_equal_to_runtime(rows: list[dict], reference: dict, n_inputs: int) -> None:
    assert sorted(r["row"] for r in rows) == list(range(n_inputs))  # every input row exactly once
    errors = [r for r in rows if r["error"] is not None]
    assert [Path(r["path"]).name for r in errors] == ["broken.jpg"] and errors[0]["label"] is None
    good = [r for r in rows if r["error"] is None]
    assert {str(Path(r["path"]).resolve()) for r in good} == {str(Path(p).resolve()) for p in reference}
    ref = {str(Path(p).resolve()): v for p, v in reference.items()}
    for r in good:
        want = ref[str(Path(r["path"]).resolve())]
        assert (r["label"], r["exit_level"]) == (want["label"], want["exit_level"]), r["path"]
        assert r["margin"] == pytest.approx(want["margin"], abs=1e-4)


@pytest.fixture(scope="module")
def levels_parquet(ray_session, images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cluster-out") / "fp32.parquet"
    run([str(BUNDLE), "--data", str(images[1]), "--out", str(out), "--levels", "all", "--actors", "1"])
    return out


def test_labels_and_exit_levels_equal_runtime_classify(ray_session, images, reference, tmp_path):
    out = tmp_path / "out.parquet"
    summary = run([str(BUNDLE), "--data", str(images[0]), "--out", str(out), "--actors", "2", "--batch-size", "16"])
    rows = rows_of(out)
    assert summary["images"] == N + 1 and summary["unreadable"] == 1
    assert_equal_to_runtime(rows, reference, N + 1)
    assert all(len(r["level_ms"]) == r["exit_level"] + 1 for r in rows if r["error"] is None)
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]  # staged file moved, nothing left over


def test_levels_all_decisions_and_gate_stats_equal_measuring_here(levels_parquet, images, reference):
    rows = rows_of(levels_parquet)
    assert_equal_to_runtime(rows, reference, N + 1)
    assert all(len(r["level_pred"]) == 4 and len(r["level_margin"]) == 4 for r in rows if r["error"] is None)
    bundle = load_bundle(BUNDLE)
    stats, reference_kind = level_stats(bundle, levels_parquet, None)
    assert reference_kind == "labels" and stats.skipped == 1 and stats.n == N
    here = measure_levels(Cascade(bundle), read_image_list(images[1]), batch_size=32)
    order = np.argsort(stats.paths)
    assert sorted(stats.paths) == sorted(here.paths)
    np.testing.assert_array_equal(stats.pred[:, order], here.pred[:, np.argsort(here.paths)])
    np.testing.assert_array_equal(stats.target[order], here.target[np.argsort(here.paths)])
    np.testing.assert_allclose(stats.margin[:, order], here.margin[:, np.argsort(here.paths)], atol=1e-5)


def test_gate_cli_fits_thresholds_from_the_parquet(levels_parquet, tmp_path, capsys):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle)
    assert gate_main([str(bundle), "--data", str(levels_parquet), "--out-dir", str(tmp_path / "curve")]) == 0
    gate = json.loads((bundle / "manifest.json").read_text())["gate"]
    assert gate["calibration"]["data"]["images"] == N and gate["calibration"]["data"]["unreadable"] == 1
    assert (tmp_path / "curve" / "gate_curve.csv").is_file()
    assert gate_main([str(INT8), "--data", str(levels_parquet), "--dry-run"]) == 2  # another bundle's graphs
    assert "computed with another bundle" in capsys.readouterr().err


def test_compare_from_parquets_equals_in_process_compare(levels_parquet, images, tmp_path, capsys):
    int8_out = tmp_path / "int8.parquet"
    run([str(INT8), "--data", str(images[1]), "--out", str(int8_out), "--levels", "all"])
    report = compare_tables(levels_parquet, int8_out)
    records = [r for r in read_image_list(images[1]) if r.path.name != "broken.jpg"]
    arrays, kept, _ = load_images(records, load_bundle(BUNDLE).preprocessing)
    here = compare(load_bundle(BUNDLE), load_bundle(INT8), images_to_levels(arrays, load_bundle(BUNDLE).preprocessing),
                   true_labels=[r.label for r in kept], progress=False)
    assert report["images"] == here["images"] == N
    for got, want in zip(report["levels"], here["levels"]):
        assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=1.5 / N)
        assert got["accuracy_int8"] == pytest.approx(want["accuracy_int8"], abs=1.5 / N)
    assert report["cascade"]["label_agreement"] == pytest.approx(here["cascade"]["label_agreement"], abs=1.5 / N)
    assert compare_main([str(levels_parquet), str(int8_out), "--min-agreement", "0"]) == 0
    assert "| 0 |" in capsys.readouterr().out


def test_killed_actor_is_restarted_and_every_row_comes_once(ray_session, images, reference, tmp_path):
    marker = tmp_path / "killed"

    class KilledOnce(CascadeWorker):
        """SIGKILLs its own process on its second batch, the first time only (the marker survives the restart)."""

        def __call__(self, batch):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2 and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    out = tmp_path / "out.parquet"
    run([str(BUNDLE), "--data", str(images[0]), "--out", str(out), "--actors", "2", "--batch-size", "16"],
        worker=KilledOnce)
    assert marker.exists()
    assert_equal_to_runtime(rows_of(out), reference, N + 1)


def test_failed_run_writes_nothing(ray_session, images, tmp_path, capsys):
    class Broken(CascadeWorker):
        def __call__(self, batch):
            raise ValueError("model exploded")

    from cluster.classify import RunError

    with pytest.raises(RunError, match="model exploded"):
        run([str(BUNDLE), "--data", str(images[0]), "--out", str(tmp_path / "out.parquet")], worker=Broken)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tmp_path, capsys):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"earlier results")
    assert main([str(BUNDLE), "--data", str(REPO / "examples" / "images"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    assert out.read_bytes() == b"earlier results"


@pytest.mark.parametrize("case", ["no data", "no bundle", "parquet without path", "bad split", "zero actors"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys):
    data, bundle, extra = str(REPO / "examples" / "images"), str(BUNDLE), []
    if case == "no data":
        data = str(tmp_path / "missing")
    elif case == "no bundle":
        bundle = str(tmp_path)
    elif case == "parquet without path":
        import pyarrow as pa

        data = str(tmp_path / "list.parquet")
        pq.write_table(pa.table({"image": ["a.jpg"]}), data)
    elif case == "bad split":
        extra = ["--split", "val"]
    else:
        extra = ["--actors", "0"]
    try:
        rc = main([bundle, "--data", data, "--out", str(tmp_path / "out.parquet"), *extra])
    except SystemExit as e:  # argparse's own checks
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out.parquet").exists()


def test_parquet_image_list_follows_the_csv_rules(images, tmp_path):
    import pyarrow as pa

    folder, table = images
    rows = list(csv.DictReader(open(table)))
    listing = folder.parent / "list.parquet"
    pq.write_table(pa.table({"file": [r["path"] for r in rows], "label": [r["wnid"] for r in rows],
                             "split": ["val" if i % 2 else "train" for i in range(len(rows))]}), listing)
    from_csv, from_parquet = read_source(table), read_source(listing)
    assert from_parquet["path"].to_pylist() == from_csv["path"].to_pylist()
    assert from_parquet["input_label"].to_pylist() == from_csv["input_label"].to_pylist()
    assert read_source(listing, "val")["path"].to_pylist() == from_csv["path"].to_pylist()[1::2]


def test_gate_refuses_a_parquet_without_levels(tmp_path):
    """A default (exit-only) result has no per-level columns: gate fitting says to rerun with --levels all."""
    import pyarrow as pa

    from cluster.output import StagedParquetWriter, result_schema, run_metadata

    bundle, out, schema = load_bundle(BUNDLE), tmp_path / "exit.parquet", result_schema(False)
    writer = StagedParquetWriter(out, schema, run_metadata(bundle, bundle.thresholds, False, 1, "x"), 1)
    row = {"row": 0, "path": "a.jpg", "error": "unreadable"}
    writer.write(pa.Table.from_pylist([{n: row.get(n) for n in schema.names}], schema=schema))
    writer.commit()
    assert pq.read_table(out).num_rows == 1
    with pytest.raises(GateError, match="--levels all"):
        level_stats(bundle, out, None)


def test_worker_builds_the_bundle_from_shipped_files(images, tmp_path):
    """On a node without the driver's folder the actor writes the shipped bundle bytes to a temp folder."""
    from cluster.pipeline import RunConfig, bundle_files, decode_batch, manifest_digest

    bundle = load_bundle(BUNDLE)
    config = RunConfig(str(tmp_path / "not-on-this-node"), manifest_digest(bundle), tuple(bundle.thresholds),
                       False, 1, 8)
    with pytest.raises(FileNotFoundError):
        CascadeWorker(config)
    worker = CascadeWorker(config, bundle_files(bundle))
    paths = sorted(str(p) for p in images[0].iterdir() if p.name != "broken.jpg")[:8]
    batch = {"row": np.arange(8), "path": np.array(paths, object), "input_label": np.array([None] * 8, object)}
    got = worker(decode_batch(batch, bundle.preprocessing)).to_pylist()
    want = Cascade(bundle).classify(paths)
    assert [(r["label"], r["exit_level"]) for r in got] == [(w.label, w.exit_level) for w in want]


def test_address_runs_the_same_command_on_an_existing_cluster(ray_session, images, reference, tmp_path):
    """The module's Ray is the 'existing cluster'; the CLI connects with --address (code shipped as py_modules)."""
    out = tmp_path / "out.parquet"
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "cluster.classify", str(BUNDLE), "--data", str(images[0]), "--out",
                           str(out), "--address", address, "--actors", "1", "-q"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_equal_to_runtime(rows_of(out), reference, N + 1)


def test_runtime_never_imports_ray_or_torch(tmp_path):
    code = ("import sys, runtime.classify, runtime.cascade, runtime.data, runtime.backends.ort, runtime.timing; "
            "bad = [m for m in ('ray', 'torch', 'pyarrow', 'cluster') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    for path in (REPO / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("ray", "torch", "cluster", "model") for n in names), (path, names)


def test_cluster_uses_only_the_runtime_public_api():
    for path in (REPO / "cluster").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                    "runtime", "model", "train", "export", "calibration", "devices"):
                assert node.module.startswith("runtime"), (path, node.module)
                assert not any(part.startswith("_") for part in node.module.split(".")), (path, node.module)
                assert not any(a.name.startswith("_") for a in node.names), (path, [a.name for a in node.names])
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in ("torch", "model") for a in node.names), path
