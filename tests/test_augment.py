"""Augmented distillation views: reproducible crops, cached teacher targets paired with the student's pixels, and a
distillation run that draws them and resumes exactly."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import load_checkpoint
from model.config import get_preset
from model.teachers import load_teacher
from runtime.preprocess import PIXEL_KEYS, image_to_array
from train import distill, setup
from train.augment import Augment
from train.teacher_cache import pool_map, teacher_targets, with_augmented_views

from conftest import write_noise_images

TEACHER = "open_clip:ViT-Tiny-Test"
SPEC = get_preset("waveclip-tiny").preprocessing_spec()


@pytest.fixture(scope="module")
def images(noise_images):
    return noise_images


def test_crop_boxes_follow_random_resized_crop():
    aug = Augment(1, 0, SPEC)
    rng = np.random.default_rng(0)
    fallback = 0
    for _ in range(500):
        width = int(rng.integers(32, 300))
        height = int(width * rng.uniform(0.6, 1.7))  # photo shapes
        top, left, h, w = aug.crop_box(width, height, rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        side = min(width, height)
        if (top, left, h, w) == ((height - side) // 2, (width - side) // 2, side, side):  # ten misses: the centre
            fallback += 1
            continue
        area = h * w / (width * height)
        assert aug.scale[0] * 0.8 <= area <= aug.scale[1] * 1.05  # rounding of small crops
        assert math.log(aug.ratio[0]) - 0.35 <= math.log(w / h) <= math.log(aug.ratio[1]) + 0.35
    assert fallback < 10


def test_views_are_reproducible_and_distinct(images):
    aug = Augment(3, 0, SPEC)
    im = Image.open(images[0].path).convert("RGB")
    first, again = aug(im, images[0].path), aug(im, images[0].path)
    arrays = [np.asarray(v) for v in first]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(arrays, again))
    assert not np.array_equal(image_to_array(first[0], SPEC), image_to_array(first[1], SPEC))
    other_seed = np.asarray(Augment(3, 1, SPEC)(im, images[0].path)[0])
    assert other_seed.shape != arrays[0].shape or not np.array_equal(other_seed, arrays[0])
    assert Augment(3, 0, SPEC).describe() != Augment(3, 1, SPEC).describe() != Augment(2, 1, SPEC).describe()


def test_cached_views_pair_teacher_targets_with_the_students_pixels(images, tmp_path):
    teacher = load_teacher(TEACHER)
    aug = Augment(2, 0, SPEC)
    targets, stats = teacher_targets(teacher, images, tmp_path, dense_grid=2, batch_size=3, progress=False,
                                     augment=aug)
    size = SPEC["image_size"]
    assert targets.emb.shape == (6, 2, teacher.embed_dim) and targets.pixels.shape == (6, 2, size, size, 3)
    assert targets.pixels.dtype == torch.uint8 and stats["computed"] == 6
    view = aug.view(Image.open(images[3].path).convert("RGB"), images[3].path, 1)
    assert np.array_equal(targets.pixels[3, 1].numpy(), image_to_array(view, SPEC))
    emb, fmap = teacher.encode_with_map(teacher.preprocess([view]))
    assert torch.allclose(targets.emb[3, 1].float(), emb[0], atol=1e-2)
    assert torch.allclose(targets.dense[3, 1].float(), pool_map(fmap, 2)[0], atol=1e-2)
    again, stats2 = teacher_targets(teacher, images, tmp_path, dense_grid=2, progress=False, augment=aug)
    assert stats2["computed"] == 0 and torch.equal(again.pixels, targets.pixels)
    _, plain = teacher_targets(teacher, images, tmp_path, dense_grid=2, flip=False, progress=False)
    _, reseeded = teacher_targets(teacher, images, tmp_path, dense_grid=2, progress=False, augment=Augment(2, 1, SPEC))
    assert len({stats["key"], plain["key"], reseeded["key"]}) == 3 and reseeded["computed"] == 6


def test_more_views_reuse_the_cached_blocks(images, tmp_path):
    """Views are cached in blocks of two: growing --aug-views from 2 to 3 runs the teacher on view 2 only, and the
    views keep their numbers (view k is the same pixels and targets whatever K)."""
    teacher = load_teacher(TEACHER)
    n = len(images)
    plain, _ = teacher_targets(teacher, images, tmp_path, dense_grid=2, flip=False, progress=False)
    arrays = np.stack([image_to_array(Image.open(r.path).convert("RGB"), SPEC) for r in images])
    grow = lambda k: with_augmented_views(teacher, images, plain, arrays, tmp_path, Augment(k, 0, SPEC),  # noqa: E731
                                          dense_grid=2, batch_size=3, student_view=None)
    two, pixels2, stats2 = grow(2)
    three, pixels3, stats3 = grow(3)
    assert stats2["computed"] == n and stats3["computed"] == n  # the second call computed the new block only
    assert stats3["key"].split(",")[0] == stats2["key"]
    assert three.emb.shape[1] == 4 and np.array_equal(pixels3[:, :3], pixels2)
    assert torch.equal(three.emb[:, :3], two.emb) and torch.equal(three.dense[:, :3], two.dense)
    view = Augment(3, 0, SPEC).view(Image.open(images[1].path).convert("RGB"), images[1].path, 2)
    assert np.array_equal(pixels3[1, 3], image_to_array(view, SPEC))
    assert Augment(2, 0, SPEC).block(2, 2).describe() != Augment(2, 0, SPEC).describe()
    assert Augment(2, 0, SPEC).block(0, 2).describe() == Augment(2, 0, SPEC).describe()  # old caches stay valid


@pytest.fixture(scope="module")
def large_images(tmp_path_factory):
    """Noise photos 3x the student's 64 px, so the student's view loses detail that the native view keeps (on the
    48 x 40 noise images both views are upsamplings of the same pixels and differ by little)."""
    return write_noise_images(tmp_path_factory.mktemp("large_noise"), 192, 224, seed=1)


@pytest.mark.parametrize("augment", [None, Augment(2, 0, SPEC)])
def test_student_view_feeds_the_teacher_the_students_pixels(augment, large_images, tmp_path):
    """--teacher-view student: the teacher's input is the student's exact pixels (of the image, or of each view)
    resized to its input with the whole view; its own cache."""
    images = large_images
    teacher = load_teacher(TEACHER)
    targets, stats = teacher_targets(teacher, images, tmp_path, dense_grid=2, flip=False, progress=False,
                                     augment=augment, student_view=SPEC)
    im = Image.open(images[2].path).convert("RGB")
    view = im if augment is None else augment.view(im, images[2].path, 1)
    pixels = Image.fromarray(image_to_array(view, SPEC))
    emb, fmap = teacher.encode_with_map(teacher.preprocess_square([pixels]))
    v = 0 if augment is None else 1
    assert torch.allclose(targets.emb[2, v].float(), emb[0], atol=1e-2)
    assert torch.allclose(targets.dense[2, v].float(), pool_map(fmap, 2)[0], atol=1e-2)
    native_emb = teacher.encode_image(teacher.preprocess([view]))[0]
    to_student, to_native = ((targets.emb[2, v].float() - e).norm().item() for e in (emb[0], native_emb))
    assert to_native > 10 * max(to_student, 1e-3)
    _, native = teacher_targets(teacher, images, tmp_path, dense_grid=2, flip=False, progress=False, augment=augment)
    assert native["key"] != stats["key"] and native["computed"] == 6
    # a student that tokenizes the same pixels otherwise (its own grid per level) reuses the targets
    regrid = get_preset("waveclip-tiny", level_grids=[4, 4, 4, 8]).preprocessing_spec()
    assert regrid != SPEC and {k: regrid[k] for k in PIXEL_KEYS} == {k: SPEC[k] for k in PIXEL_KEYS}
    regrid_aug = None if augment is None else Augment(2, 0, regrid)
    _, same = teacher_targets(teacher, images, tmp_path, dense_grid=2, flip=False, progress=False,
                              augment=regrid_aug, student_view=regrid)
    assert same["key"] == stats["key"] and same["computed"] == 0


def test_efficientnet_square_preprocess_keeps_the_whole_view():
    """Resize 256 + CenterCrop 224 cuts 1/16 of each border; the student's view is seen whole."""
    teacher = load_teacher("efficientnet-lite0")
    im = np.zeros((64, 64, 3), np.uint8)
    im[:, :2] = 255  # a white left border, 2 of 64 columns
    native, square = (f([Image.fromarray(im)])[0] for f in (teacher.preprocess, teacher.preprocess_square))
    assert square.shape == native.shape == (3, 224, 224)
    assert square[:, :, 0].min() > 0.9 and native[:, :, 0].max() < -0.9  # [-1, 1]: the border is in, or cut
    assert torch.allclose(square[:, :, 100:], torch.full_like(square[:, :, 100:], -1.0))


def test_batches_draw_views_without_changing_plain_batches():
    idx, flips, views = setup.batch_at(7, 100, 16, 3)
    idx3, flips3, views3 = setup.batch_at(7, 100, 16, 3, views=3)
    assert np.array_equal(idx, idx3) and np.array_equal(flips, flips3) and not views.any()
    allv = np.concatenate([setup.batch_at(s, 100, 16, 3, views=3)[2] for s in range(12)])
    assert set(allv.tolist()) == {0, 1, 2}


def test_distill_with_augmented_views_runs_and_resumes_exactly(images, tmp_path):
    folder = images[0].path.parent
    (tmp_path / "labels.txt").write_text("n01440764\nn01443537\n")  # a zero-shot head of 2 classes: cheap
    args = ["--teacher", TEACHER, "--data", str(folder), "--preset", "waveclip-tiny", "--batch-size", "4",
            "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--aug-views", "2", "--labels",
            str(tmp_path / "labels.txt")]
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert distill.main([*args, "--out", str(a), "--steps", "4"]) == 0
    distill.run(distill.parse_args([*args, "--out", str(b), "--steps", "4"]), stop_after=2)
    assert distill.main([*args, "--out", str(b), "--steps", "4", "--resume"]) == 0
    (_, ca), (_, cb) = load_checkpoint(a), load_checkpoint(b)
    assert ca["provenance"]["aug_views"] == 2 and ca["provenance"]["aug_cache"]["computed"] == 6
    assert cb["provenance"]["aug_cache"]["computed"] == 0  # the resumed run read the cache
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])
    with pytest.raises(SystemExit):
        distill.parse_args([*args, "--out", str(a), "--teacher-views", "2"])


def test_distill_teacher_view_student_is_its_own_cache(images, tmp_path):
    folder = images[0].path.parent
    (tmp_path / "labels.txt").write_text("n01440764\nn01443537\n")
    args = ["--teacher", TEACHER, "--data", str(folder), "--preset", "waveclip-tiny", "--batch-size", "4",
            "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--labels", str(tmp_path / "labels.txt"),
            "--steps", "2"]
    assert distill.main([*args, "--out", str(tmp_path / "n.pt"), "--teacher-view", "native"]) == 0
    assert distill.main([*args, "--out", str(tmp_path / "s.pt")]) == 0  # the default
    (_, n), (_, s) = load_checkpoint(tmp_path / "n.pt"), load_checkpoint(tmp_path / "s.pt")
    assert n["provenance"]["teacher_view"] == "native" and s["provenance"]["teacher_view"] == "student"
    assert n["provenance"]["teacher_cache"]["key"] != s["provenance"]["teacher_cache"]["key"]
    assert s["provenance"]["teacher_cache"]["computed"] == 6
