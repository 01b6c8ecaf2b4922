import csv
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from model.config import get_preset
from runtime.data import DataError, ImageRecord, load_images, read_image_list, records_digest
from runtime.preprocess import ImageError, image_to_array

WNIDS = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/{wnid}/{i}.png for 3 classes x 4 images, one corrupt file, and labels.csv (train/val split)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        wnid = WNIDS[i % 3]
        (root / wnid).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / wnid / f"{i}.png")
        rows.append([f"{wnid}/{i}.png", wnid, "val" if i >= 9 else "train"])
    (root / WNIDS[0] / "broken.png").write_bytes(b"not an image")
    rows.append([f"{WNIDS[0]}/broken.png", WNIDS[0], "train"])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "wnid", "split"], *rows])
    return root


def test_folder_recursive_with_and_without_folder_labels(tree):
    recs = read_image_list(tree)
    assert len(recs) == 13 and all(r.label is None for r in recs)
    assert recs == sorted(recs, key=lambda r: r.path)
    labelled = read_image_list(tree, labels_from_folders=True)
    assert Counter(r.label for r in labelled) == {WNIDS[0]: 5, WNIDS[1]: 4, WNIDS[2]: 4}


def test_csv_paths_labels_and_split(tree):
    train = read_image_list(tree / "labels.csv", split="train")
    assert len(train) == 10 and all(r.path.parent.parent == tree and r.path.exists() for r in train)
    assert {r.label for r in train} == set(WNIDS)
    assert len(read_image_list(tree / "labels.csv", split="val")) == 3
    assert len(read_image_list(tree / "labels.csv")) == 13


def test_csv_file_and_label_columns(tree, tmp_path):
    path = tmp_path / "list.csv"
    path.write_text(f"file,label\n{tree}/{WNIDS[1]}/1.png,fish\n{tree}/{WNIDS[2]}/2.png,\n")
    recs = read_image_list(path)
    assert recs == [ImageRecord(tree / WNIDS[1] / "1.png", "fish"), ImageRecord(tree / WNIDS[2] / "2.png", None)]


@pytest.mark.parametrize("case, match", [
    ("missing", "no such data folder or CSV"),
    ("no_path_column", "no path column"),
    ("empty_split", "no rows with split 'test'"),
    ("no_split_column", "has no 'split' column"),
    ("folder_split", "needs a CSV"),
    ("empty_folder", "no image files"),
])
def test_bad_sources_raise_one_line_data_error(tree, tmp_path, case, match):
    (tmp_path / "nopath.csv").write_text("name,wnid\na.png,n01440764\n")
    (tmp_path / "nosplit.csv").write_text("path,wnid\na.png,n01440764\n")
    (tmp_path / "empty").mkdir()
    source, split = {
        "missing": (tmp_path / "nope", None), "no_path_column": (tmp_path / "nopath.csv", None),
        "empty_split": (tree / "labels.csv", "test"), "no_split_column": (tmp_path / "nosplit.csv", "train"),
        "folder_split": (tree, "train"), "empty_folder": (tmp_path / "empty", None),
    }[case]
    with pytest.raises(DataError, match=match) as err:
        read_image_list(source, split=split)
    assert "\n" not in str(err.value)


def test_limit_is_deterministic_and_stratified(tree):
    a = read_image_list(tree / "labels.csv", limit=6, seed=1)
    assert a == read_image_list(tree / "labels.csv", limit=6, seed=1)
    assert Counter(r.label for r in a) == {w: 2 for w in WNIDS}  # balanced over labels
    full = read_image_list(tree / "labels.csv")
    assert [full.index(r) for r in a] == sorted(full.index(r) for r in a)  # original order kept
    seeds = {tuple(r.path for r in read_image_list(tree / "labels.csv", limit=6, seed=s)) for s in range(5)}
    assert len(seeds) > 1
    unlabelled = read_image_list(tree, limit=4, seed=0)
    assert len(unlabelled) == 4 and unlabelled == read_image_list(tree, limit=4, seed=0)
    assert len(read_image_list(tree, limit=100)) == 13


def test_load_images_skips_unreadable_with_count(tree):
    spec = get_preset("waveclip-tiny").preprocessing_spec()
    recs = read_image_list(tree / "labels.csv", split="train")
    told = []
    arrays, kept, skipped = load_images(recs, spec, on_skip=lambda r, why: told.append((r, why)))
    assert arrays.dtype == np.uint8 and arrays.shape == (9, 64, 64, 3) and len(kept) == 9 and skipped == 1
    assert told[0][0].path.name == "broken.png" and "broken.png" in told[0][1]
    np.testing.assert_array_equal(arrays[0], image_to_array(kept[0].path, spec))
    with pytest.raises(ImageError):
        load_images(recs, spec, skip_errors=False)
    empty, kept, skipped = load_images([r for r in recs if r.path.name == "broken.png"], spec)
    assert empty.shape == (0, 64, 64, 3) and kept == [] and skipped == 1


def test_records_digest_changes_with_the_list(tree):
    recs = read_image_list(tree / "labels.csv")
    assert records_digest(recs) == records_digest(list(recs))
    assert records_digest(recs) != records_digest(recs[:-1])


def test_runtime_data_does_not_import_torch():
    code = "import sys, runtime.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
