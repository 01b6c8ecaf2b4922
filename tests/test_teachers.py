import csv
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.teachers import (
    EFFICIENTNET_LITE0_LOGIT_SCALE,
    Head,
    TeacherError,
    imagenet_classes,
    load_teacher,
    resolve_labels,
)

TINY = "open_clip:ViT-Tiny-Test"


def synthetic_images(n: int = 2) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (180 + 20 * i, 260, 3), generator=g, dtype=torch.uint8).numpy())
            for i in range(n)]


def labelled_images(data_dir: Path, step: int) -> tuple[list[Image.Image], torch.Tensor]:
    """Every ``step``-th image of imagenet-sample with its class index."""
    with open(data_dir / "imagenet-sample" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[::step]
    images = [Image.open(data_dir / "imagenet-sample" / r["file"]) for r in rows]
    return images, torch.tensor([int(r["class_index"]) for r in rows])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_teacher(TINY)


@pytest.fixture(scope="module")
def effnet():
    return load_teacher("efficientnet-lite0")


# --- specs and labels ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["foo", "open_clip", "open_clip:", "open_clip:NoSuchArch", "efficientnet-lite1",
                                  TINY + ":nosuchtag", TINY + ":/no/such/dir/weights.pt"])
def test_bad_spec_is_one_line_teacher_error(spec):
    with pytest.raises(TeacherError) as err:
        load_teacher(spec)
    assert "\n" not in str(err.value) and str(err.value)


def test_failed_download_is_one_line_teacher_error(monkeypatch):
    import open_clip.factory

    def offline(*args, **kwargs):
        raise OSError("network unreachable\nsecond line")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(TeacherError, match="network unreachable second line") as err:
        load_teacher("open_clip:ViT-B-32:openai")
    assert "\n" not in str(err.value)


def test_imagenet_table_matches_open_clip():
    from open_clip import IMAGENET_CLASSNAMES

    table = imagenet_classes()
    assert [i for i, _, _ in table] == list(range(1000))
    assert [name for _, _, name in table] == list(IMAGENET_CLASSNAMES)
    assert table[0][1] == "n01440764" and len({wnid for _, wnid, _ in table}) == 1000


def test_resolve_labels():
    assert resolve_labels(["n01440764", "goldfish", "n15075141"]) == [0, 1, 999]
    with pytest.raises(TeacherError, match="not-a-class"):
        resolve_labels(["tench", "not-a-class"])
    with pytest.raises(TeacherError, match="ambiguous"):
        resolve_labels(["missile"])  # two ImageNet classes share this open_clip name


def test_head_logits_formula():
    head = Head(["a", "b"], torch.eye(2, 3), torch.tensor([0.0, 1.0]), 10.0)
    assert torch.allclose(head.logits(torch.tensor([[3.0, 4.0, 0.0]])), torch.tensor([[6.0, 9.0]]))


# --- open_clip ----------------------------------------------------------------------------------------------------
def test_tiny_open_clip_teacher(tiny, caplog):
    assert (tiny.name, tiny.embed_dim, tiny.width, tiny.image_size) == (TINY, 64, 64, 224)
    pixels = tiny.preprocess(synthetic_images())
    assert pixels.shape == (2, 3, 224, 224)
    emb = tiny.encode_image(pixels)
    assert emb.shape == (2, 64) and emb.dtype == torch.float32 and not emb.requires_grad

    head = tiny.head(["tench", "n01443537", "n15075141"])
    assert head.class_names == ["tench", "goldfish", "toilet paper"]
    assert head.weight.shape == (3, 64) and head.bias.shape == (3,)
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(head.bias, torch.zeros(3))
    assert head.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)
    assert head.logits(emb).shape == (2, 3)

    state = tiny.vit_state()
    assert state["grid"] == 7 and state["positional_embedding"].shape == (50, 64) and len(state["blocks"]) == 2
    assert state["class_embedding"].shape == (64,) and state["heads"] == 2

    with caplog.at_level(logging.WARNING, logger="model.teachers"):
        load_teacher(TINY)
    assert "randomly initialised" in caplog.text


def test_open_clip_local_weights_file(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = load_teacher(f"{TINY}:{path}")
    pixels = tiny.preprocess(synthetic_images())
    assert torch.equal(loaded.encode_image(pixels), tiny.encode_image(pixels))


def test_open_clip_vit_b16_random_init():
    teacher = load_teacher("open_clip:ViT-B-16")
    assert (teacher.embed_dim, teacher.width, teacher.image_size) == (512, 768, 224)
    state = teacher.vit_state()
    assert len(state["blocks"]) == 12 and state["grid"] == 14 and state["heads"] == 12
    assert state["positional_embedding"].shape == (1 + 14 * 14, 768) and state["class_embedding"].shape == (768,)
    assert "attn.in_proj_weight" in state["blocks"][0]


# --- efficientnet-lite0 -------------------------------------------------------------------------------------------
def test_efficientnet_head_approximates_classifier(effnet, data_dir):
    assert (effnet.embed_dim, effnet.width, effnet.vit_state()) == (1280, None, None)
    images, labels = labelled_images(data_dir, step=10)  # 100 images
    pixels = effnet.preprocess(images)
    assert pixels.shape == (100, 3, 224, 224) and -1 <= pixels.min() < 0 < pixels.max() <= 1
    feats = effnet.encode_image(pixels)
    assert feats.shape == (100, 1280)
    head = effnet.head([wnid for _, wnid, _ in imagenet_classes()])
    assert head.logit_scale == EFFICIENTNET_LITE0_LOGIT_SCALE
    true_top1 = effnet.classify_logits(pixels).argmax(1)
    assert (head.logits(feats).argmax(1) == true_top1).float().mean().item() >= 0.95
    assert (true_top1 == labels).float().mean().item() > 0.75  # trained weights (87% on these 100)


def test_efficientnet_head_selects_classifier_rows(effnet):
    head = effnet.head(["n15075141", "tench"])
    assert head.class_names == ["toilet paper", "tench"]
    assert torch.equal(head.weight, effnet.model.classifier.weight[[999, 0]])
    fc = effnet.model.classifier
    torch.testing.assert_close(head.bias, fc.bias[[999, 0]] + fc.weight[[999, 0]] @ effnet.feature_mean)


@pytest.mark.slow
def test_efficientnet_is_imagenet_trained(effnet, data_dir):
    images, labels = labelled_images(data_dir, step=3)  # 334 images
    top1 = (effnet.classify_logits(effnet.preprocess(images)).argmax(1) == labels).float().mean().item()
    assert top1 > 0.8  # measured 0.892 on these 334, 0.871 on all 1000
