import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.checkpoint import load_checkpoint
from model.teachers import Head
from train import head as head_fit


def clusters(n_per: int, seed: int, dim: int = 16, classes: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two 'levels' of noisy embeddings around one centre per class (the second less noisy), unit norm."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)), dim=-1)
    y = torch.arange(classes).repeat_interleave(n_per)
    levels = [F.normalize(centres[y] + s * torch.randn(len(y), dim, generator=g), dim=-1) for s in (0.25, 0.15)]
    return levels, y


def random_head(classes: int = 3, dim: int = 16) -> Head:
    w = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    return Head([f"k{i}" for i in range(classes)], w, torch.zeros(classes), 10.0)


def test_fit_head_learns_held_apart_clusters_and_is_deterministic():
    (fit, y), (held, y_held) = clusters(60, seed=0), clusters(60, seed=1)
    before = head_fit.accuracy(random_head(), held, y_held)
    new = head_fit.fit_head(random_head(), fit, y, epochs=60, lr=1e-2, pull=0.0, batch_size=64)
    after = head_fit.accuracy(new, held, y_held)
    assert max(before) < 0.7 and min(after) > 0.95, (before, after)
    again = head_fit.fit_head(random_head(), fit, y, epochs=60, lr=1e-2, pull=0.0, batch_size=64)
    assert torch.equal(new.weight, again.weight) and torch.equal(new.bias, again.bias)
    assert new.logit_scale == 10.0 and new.class_names == ["k0", "k1", "k2"]


def test_refit_teacher_head_fits_the_labelled_images_only():
    (fit, y), (held, y_held) = clusters(8000, seed=0), clusters(60, seed=1)  # the defaults' 20 epochs: 240 steps
    rows = [int(r) for r in y]
    noisy = [None if i % 2 else r for i, r in enumerate(rows)]  # half unlabelled: they must be left out
    refit = head_fit.refit_teacher_head(random_head(), fit[0], noisy, "test data")
    assert min(head_fit.accuracy(refit, held, y_held)) > max(head_fit.accuracy(random_head(), held, y_held)) + 0.2
    same = head_fit.fit_head(random_head(), [fit[0][::2]], y[::2])
    assert torch.allclose(refit.weight, same.weight) and torch.allclose(refit.bias, same.bias)
    with pytest.raises(head_fit.DistillError, match="no image of test data has a label"):
        head_fit.refit_teacher_head(random_head(), fit[0], [None] * len(rows), "test data")


def test_pull_keeps_the_rows_near_the_start():
    fit, y = clusters(60, seed=0)
    start = random_head()
    free = head_fit.fit_head(start, fit, y, epochs=20, lr=1e-2, pull=0.0)
    held = head_fit.fit_head(start, fit, y, epochs=20, lr=1e-2, pull=100.0)
    assert (held.weight - start.weight).norm() < 0.2 * (free.weight - start.weight).norm()


def test_label_rows_match_ids_names_and_imagenet_names():
    head = {"class_names": ["fish A", "fish B"], "labels": ["n01440764", "n01443537"]}
    assert head_fit.label_rows(head, ["n01443537", "fish A", "goldfish", None, "zebra-ish"]) == \
        [1, 0, 1, None, None]  # "goldfish": ImageNet's name of n01443537
    own = {"class_names": ["good part", "scratched"], "labels": ["ok", "defect"]}  # not ImageNet classes
    assert head_fit.label_rows(own, ["defect", "good part", "dented"]) == [1, 0, None]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Images of the tiny head's classes c0-c3 (a distinct colour each, 8 per class) + one corrupt file + one label
    that is not in the head; split fit (6 per class) / calib (2 per class)."""
    root = tmp_path_factory.mktemp("head_data")
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 200, 40], [40, 40, 220], [230, 220, 40]], np.float32)
    rows = []
    for i in range(32):
        c = i % 4
        img = (colours[c] + rng.normal(0, 25, (64, 64, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i}.png")
        rows.append([f"{i}.png", f"c{c}", "fit" if i < 24 else "calib"])
    (root / "broken.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "other.png")
    rows += [["broken.png", "c0", "fit"], ["other.png", "not-a-class", "fit"]]
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split"], *rows])
    return root / "labels.csv"


def test_cli_refits_the_head_and_records_it(tiny_checkpoint, labelled, tmp_path, capsys):
    out = tmp_path / "refit.pt"
    assert head_fit.main([str(tiny_checkpoint), "-o", str(out), "--data", str(labelled), "--split", "fit",
                          "--eval-data", str(labelled), "--eval-split", "calib", "--epochs", "200", "--lr", "0.05",
                          "--pull", "0", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "on 24 images x 4 levels (1 without a label in the head, 1 unreadable)" in printed
    model, ckpt = load_checkpoint(out)
    _, original = load_checkpoint(tiny_checkpoint)
    for k, v in original["state_dict"].items():  # the tower is untouched
        assert torch.equal(v, ckpt["state_dict"][k]), k
    assert not torch.equal(ckpt["head"]["weight"], original["head"]["weight"])
    assert ckpt["head"]["labels"] == original["head"]["labels"] and "train_state" not in ckpt
    report = ckpt["provenance"]["head_fit"]
    assert report["images"] == 24 and report["dropped"] == 1 and report["skipped"] == 1
    assert report["held_apart"]["images"] == 8
    assert min(report["fit_top1"]["after"]) == 1.0 and max(report["fit_top1"]["before"]) < 1.0  # colours separate


def test_cli_bad_input_exits_2_and_writes_nothing(tiny_checkpoint, labelled, tmp_path, capsys):
    out = tmp_path / "refit.pt"
    other = tmp_path / "other.csv"
    other.write_text("path,label\n0.png,zebra\n".replace("0.png", str(labelled.parent / "0.png")))
    assert head_fit.main([str(tiny_checkpoint), "-o", str(out), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no image" in err and err.count("\n") == 1 and not out.exists()
    out.write_bytes(b"keep me")
    assert head_fit.main([str(tiny_checkpoint), "-o", str(out), "--data", str(labelled)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert head_fit.main([str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.pt"), "--data", str(labelled)]) == 2
    assert not (tmp_path / "x.pt").exists()


def test_new_head_over_the_datas_own_labels(tiny_checkpoint, labelled, tmp_path, capsys):
    out = tmp_path / "own.pt"
    assert head_fit.main([str(tiny_checkpoint), "-o", str(out), "--data", str(labelled), "--split", "fit",
                          "--new-head", "--eval-data", str(labelled), "--eval-split", "calib", "--epochs", "100",
                          "--lr", "0.05", "--threads", "1"]) == 0
    _, ckpt = load_checkpoint(out)  # checked: shapes, names, scale
    head = ckpt["head"]
    assert head["labels"] == head["class_names"] == ["c0", "c1", "c2", "c3", "not-a-class"]
    assert head["weight"].shape == (5, 64) and head["logit_scale"] == 30.0
    report = ckpt["provenance"]["head_fit"]
    assert report["new_head"] and report["images"] == 25 and report["dropped"] == 0 and report["skipped"] == 1
    assert min(report["held_apart"]["after"]) == 1.0
    single = tmp_path / "single.csv"
    single.write_text(f"path,label\n{labelled.parent / '0.png'},c0\n{labelled.parent / '4.png'},c0\n")
    assert head_fit.main([str(tiny_checkpoint), "-o", str(tmp_path / "x.pt"), "--data", str(single),
                          "--new-head"]) == 2
    assert "at least two classes" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_centroid_rows_are_unit_class_means():
    emb = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])]
    rows = head_fit.centroid_rows(emb, torch.tensor([0, 0, 1]), 3)
    assert torch.allclose(rows[0], F.normalize(torch.tensor([1.0, 1.0]), dim=0))
    assert torch.allclose(rows[1], F.normalize(torch.tensor([1.0, 1.0]), dim=0)) and rows[2].abs().sum() == 0
