"""The distillation recipe's levers: dense targets, their mirror, the exported teacher pass, bf16, splits."""
import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import get_preset
from model.teachers import TeacherError, load_teacher
from model.waveclip import WaveCLIP
from train import distill
from train.dense import DenseHead, channel_stats, dense_loss, mirror_grid
from train.losses import distill_loss
from train.setup import use_bf16
from train.teacher_cache import pool_map, teacher_targets
from train.teacher_onnx import BF16_MAP_ATOL, BF16_MIN_COSINE, onnx_encoder

TEACHER = "open_clip:ViT-Tiny-Test"


def test_mirror_grid_equals_pooling_the_mirrored_map():
    fmap = torch.randn(2, 5, 7, 7)
    assert torch.allclose(mirror_grid(pool_map(fmap, 4), 4), pool_map(fmap.flip(-1), 4), atol=1e-6)
    assert not torch.allclose(pool_map(fmap, 4), pool_map(fmap.flip(-1), 4))


def test_pool_map_is_adaptive_average_row_major():
    fmap = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    pooled = pool_map(fmap, 2)  # [1, 4, 2]
    assert pooled.shape == (1, 4, 2)
    assert pooled[0, 1, 0].item() == pytest.approx(fmap[0, 0, :2, 2:].mean().item())  # row 0, column 1


def test_dense_loss_and_parts():
    t = torch.randn(3, 16, 8)
    assert dense_loss(t * 3, t).item() == pytest.approx(0.0, abs=1e-6)
    assert dense_loss(-t, t).item() == pytest.approx(2.0, abs=1e-6)
    emb = torch.randn(3, 4)
    parts = distill_loss([emb, emb], emb, [0.5, 0.5], dense_pred=[t, -t], dense_target=t, dense_weight=1.0)
    assert parts.dense == pytest.approx([0.0, 2.0], abs=1e-5) and parts.total.item() == pytest.approx(1.0, abs=1e-5)
    off = distill_loss([emb], emb, [1.0], dense_pred=[t], dense_target=t, dense_weight=0.0)
    assert off.dense == [0.0]
    maps = torch.randn(10, 1, 16, 8) * 3 + 1
    mean, std = channel_stats(maps)
    flat = maps.reshape(-1, 8)
    assert torch.allclose(mean, flat.mean(0)) and torch.allclose(std, flat.std(0))
    sub_mean, _ = channel_stats(maps, max_rows=5)  # every second image
    assert torch.allclose(sub_mean, maps[::2].reshape(-1, 8).mean(0))
    assert DenseHead(12, 8)(torch.randn(2, 16, 12)).shape == (2, 16, 8)


def test_forward_tokens_leave_embeddings_unchanged():
    torch.manual_seed(0)
    cfg = get_preset("waveclip-tiny")
    model = WaveCLIP(cfg).eval()
    patches = [torch.randn(2, cfg.patches_per_level, cfg.patch_dim(k)) for k in range(cfg.num_levels)]
    plain = model(patches)
    embs, tokens = model(patches, return_tokens=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, embs))
    assert [t.shape for t in tokens] == [(2, cfg.patches_per_level, cfg.width)] * cfg.num_levels


def test_use_bf16():
    cpu = torch.device("cpu")
    assert use_bf16("bf16", cpu) and not use_bf16("fp32", cpu)
    assert use_bf16("auto", cpu) == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@pytest.fixture(scope="module")
def images(noise_images):
    return noise_images


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_exported_teacher_matches_torch(backend):
    pytest.importorskip(backend)
    teacher = load_teacher("efficientnet-lite0")
    rng = np.random.default_rng(0)
    pixels = teacher.preprocess([Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)])
    encode, ran = onnx_encoder(teacher, pixels[:2], threads=1, backend=backend)
    assert ran == backend
    emb, fmap = encode(pixels)  # another batch size than the parity sample's
    ref_emb, ref_map = teacher.encode_with_map(pixels)
    assert fmap.shape == (3, 320, 7, 7)
    assert torch.allclose(emb, ref_emb, atol=1e-3) and torch.allclose(fmap, ref_map, atol=1e-3)
    again, _ = encode(pixels.flip(0))  # a later batch does not overwrite what an earlier one returned
    assert torch.allclose(emb, ref_emb, atol=1e-3) and torch.allclose(again, ref_emb.flip(0), atol=1e-3)
    assert torch.allclose(ref_emb, teacher.encode_image(pixels), atol=1e-5)  # the map path's embedding is the same


def _cpu_has_bf16() -> bool:
    if not importlib.util.find_spec("openvino"):
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.skipif(not _cpu_has_bf16(), reason="needs OpenVINO on a CPU with bf16 (AMX or AVX512-BF16)")
def test_bf16_teacher_is_within_bf16_rounding_and_cached_apart(tmp_path):
    teacher = load_teacher("efficientnet-lite0")
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(files[-1])
    pixels = teacher.preprocess([Image.open(f) for f in files])
    encode, ran = onnx_encoder(teacher, pixels[:2], threads=1, backend="openvino-bf16")
    emb, fmap = encode(pixels)
    ref_emb, ref_map = teacher.encode_with_map(pixels)
    assert ran == "openvino-bf16" and not torch.allclose(emb, ref_emb, atol=1e-4)  # bf16 arithmetic, not fp32's
    assert torch.nn.functional.cosine_similarity(emb, ref_emb, dim=-1).min() >= BF16_MIN_COSINE
    assert (fmap - ref_map).abs().max() <= BF16_MAP_ATOL * ref_map.abs().max()
    from runtime.data import read_image_list

    records = read_image_list(str(tmp_path), None, None, 0)
    fp32, fp32_stats = teacher_targets(teacher, records, tmp_path / "cache", flip=False, progress=False)
    bf16, bf16_stats = teacher_targets(teacher, records, tmp_path / "cache", flip=False, progress=False,
                                       backend="openvino-bf16")
    assert bf16_stats["key"] != fp32_stats["key"] and bf16_stats["computed"] == 3  # never the fp32 targets
    assert bf16_stats["backend"] == "openvino-bf16" and fp32_stats["backend"] == "openvino"
    cos = torch.nn.functional.cosine_similarity(bf16.emb.float(), fp32.emb.float(), dim=-1)
    assert cos.min() >= BF16_MIN_COSINE
    _, again = teacher_targets(teacher, records, tmp_path / "cache", flip=False, progress=False, backend="openvino")
    assert again["key"] == fp32_stats["key"] and again["computed"] == 0  # fp32 backends share their cache


def test_bf16_teacher_never_falls_back():
    teacher = load_teacher(TEACHER)  # open_clip's fused attention does not export
    pixels = teacher.preprocess([Image.fromarray(np.full((64, 64, 3), 90, np.uint8))] * 2)
    with pytest.raises(TeacherError, match="openvino-bf16"):
        onnx_encoder(teacher, pixels, threads=1, backend="openvino-bf16")


def test_teacher_backend_auto_prefers_openvino_and_torch_is_a_choice():
    teacher = load_teacher("efficientnet-lite0")
    pixels = teacher.preprocess([Image.fromarray(np.full((64, 64, 3), 90, np.uint8))] * 2)
    _, ran = onnx_encoder(teacher, pixels, threads=1)
    assert ran == ("openvino" if importlib.util.find_spec("openvino") else "onnxruntime")
    assert onnx_encoder(teacher, pixels, threads=1, backend="torch")[1] == "torch"
    with pytest.raises(ValueError, match="choose from"):
        onnx_encoder(teacher, pixels, backend="tensorrt")


def test_teacher_targets_cache_dense_maps_and_fall_back_to_torch(images, tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(TEACHER)  # open_clip's fused attention does not export: the torch path is used
    targets, stats = teacher_targets(teacher, images, tmp_path, flip=True, dense_grid=2, batch_size=4, progress=False)
    assert targets.emb.shape == (6, 2, teacher.embed_dim) and targets.dense.shape == (6, 2, 4, teacher.width)
    assert stats["computed"] == 6 and stats["backend"] == "torch"
    emb, fmap = teacher.encode_with_map(teacher.preprocess([Image.open(images[0].path).transpose(Image.FLIP_LEFT_RIGHT)]))
    assert torch.allclose(targets.emb[0, 1].float(), emb[0], atol=1e-2)  # view 1 is the mirror
    assert torch.allclose(targets.dense[0, 1].float(), pool_map(fmap, 2)[0], atol=1e-2)
    again, stats = teacher_targets(teacher, images, tmp_path, flip=True, dense_grid=2, progress=False)
    assert stats["computed"] == 0 and torch.equal(again.dense, targets.dense)
    _, other = teacher_targets(teacher, images[:5], tmp_path, flip=True, dense_grid=2, progress=False)
    assert other["key"] != stats["key"] and other["computed"] == 5  # another image list: never reused


def test_recipe_splits_hold_out_val_and_calib(tmp_path):
    from train.recipe_demo import distill_list, write_splits

    data = tmp_path / "data"
    tiny = data / "tiny-imagenet-200"
    tiny.mkdir(parents=True)
    (tiny / "classes.csv").write_text("tiny_index,wnid,imagenet1k_index,words\n0,n01443537,1,goldfish\n")
    rows = [("train/a%d.JPEG" % i, "n01443537", "train") for i in range(25)]
    rows += [("val/v0.JPEG", "n01443537", "val"), ("test/t0.JPEG", "", "test"), ("train/x.JPEG", "n09999999", "train")]
    with open(tiny / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "wnid", "split"), *rows])
    counts = write_splits(data, tmp_path / "work" / "splits.csv")
    assert counts == {"calib": 20, "fit": 5, "val": 1, "extra": 1}
    listed = list(csv.DictReader(open(distill_list(tmp_path / "work" / "splits.csv", tmp_path / "work" / "d.csv"))))
    assert len(listed) == 6 and {r["split"] for r in listed} == {"fit", "extra"}
    assert all(not Path(r["path"]).is_absolute() for r in listed)
    assert (tmp_path / "work" / listed[0]["path"]).resolve().parent.parent == tiny.resolve()


@pytest.mark.slow
def test_b16_preset_from_a_vit_b16_teacher_runs_with_dense_targets(images, tmp_path):
    """The waveclip-b16 path (student initialised from the teacher's ViT-B-16 blocks, dense targets from its 14x14
    patch tokens pooled to the 7x7 grid) runs two steps and resumes; random teacher weights (none can be had here)."""
    from model.checkpoint import load_checkpoint
    from train import distill

    folder = images[0].path.parent
    (tmp_path / "labels.txt").write_text("n01440764\nn01443537\n")  # a zero-shot head of 2 classes: cheap
    args = ["--teacher", "open_clip:ViT-B-16", "--data", str(folder), "--preset", "waveclip-b16", "--labels",
            str(tmp_path / "labels.txt"), "--out", str(tmp_path / "b16.pt"), "--batch-size", "2", "--threads", "2",
            "--cache-dir", str(tmp_path / "cache"), "--save-every", "0"]
    assert distill.main([*args, "--steps", "1"]) == 0
    assert distill.main([*args, "--steps", "2", "--resume"]) == 0
    model, ckpt = load_checkpoint(tmp_path / "b16.pt")
    prov = ckpt["provenance"]
    assert prov["init"] == "vit:open_clip:ViT-B-16" and prov["steps"] == 2 and prov["dense_weight"] == 1.0
    assert prov["final_losses"]["dense"][0] > 0 and ckpt["train_state"]["dense_head"]["proj.weight"].shape == (768, 768)


def test_recipe_stages_and_help(tmp_path):
    """--steps takes one total or increasing stage totals; the CLI parses (its --help runs) and refuses bad input."""
    import argparse
    import subprocess
    import sys

    from train.recipe_demo import (DEFAULT_STAGES, Stage, _show, _stages, distill_command, head_command,
                                   label_command, self_command)

    assert _stages("3400") == (Stage(3400, 0, "student"),)
    assert _stages("3400:native,10500:aug2,12000:student:aug1") == (Stage(3400, 0, "native"), Stage(10500, 2),
                                                                     Stage(12000, 1, "student"))
    default = _stages(",".join(DEFAULT_STAGES))
    assert [s.total for s in default] == sorted({s.total for s in default}) and _show(default) == ",".join(DEFAULT_STAGES)
    for bad in ("5,3", "0", "a", "3400,3400", "", "10:aug", "10:aug9", "10:x2", "10:aug2:aug3", "10:student:native",
                "10:studentx"):
        with pytest.raises(argparse.ArgumentTypeError):
            _stages(bad)
    linear = distill_command(Stage(9000, 2), Path("d.csv"), Path("s.csv"), Path("c.pt"), 2)
    grown = distill_command(Stage(9000, 2), Path("d.csv"), Path("s.csv"), Path("c.pt"), 2, patch_hidden=384)
    assert "--patch-hidden" not in linear and grown[-2:] == ["--patch-hidden", "384"] and grown[:-2] == linear
    assert linear[linear.index("--steps") + 1] == "9000" and linear[linear.index("--aug-views") + 1] == "2"
    head = head_command(Path("c.pt"), Path("h.pt"), Path("s.csv"), 2)  # fit on labelled train images, never val
    assert head[:3] == ["-m", "train.head", "c.pt"] and head[head.index("--split") + 1] == "fit"
    assert head[head.index("--eval-split") + 1] == "calib" and "val" not in head
    labels = label_command(Path("d.csv"), Path("s.csv"), Path("c.pt"), Path("l.pt"), 2, 3000, patch_hidden=384)
    assert labels[labels.index("--init") + 1] == "c.pt" and labels[labels.index("--out") + 1] == "l.pt"
    assert float(labels[labels.index("--label-weight") + 1]) > 0 and labels[labels.index("--steps") + 1] == "3000"
    assert "--resume" in labels and labels[-2:] == ["--patch-hidden", "384"]
    assert distill.parse_args(labels[2:]).label_weight == 0.5  # the arguments train.distill accepts
    selfed = self_command(Path("d.csv"), Path("s.csv"), Path("l.pt"), Path("x.pt"), 2, 1500, patch_hidden=384)
    parsed = distill.parse_args(selfed[2:])  # from the label stage, its label loss kept, the last level teaching
    assert parsed.init == Path("l.pt") and parsed.out == Path("x.pt") and parsed.steps == 1500
    assert parsed.label_weight == 0.5 and parsed.self_weight > 0 and parsed.resume and parsed.patch_hidden == 384
    root = Path(__file__).resolve().parents[1]
    ok = subprocess.run([sys.executable, "-m", "train.recipe_demo", "--help"], cwd=root, capture_output=True, text=True)
    assert ok.returncode == 0 and "--steps" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "train.recipe_demo", "--data", str(tmp_path)], cwd=root,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "labels.csv not found" in bad.stderr
    neg = subprocess.run([sys.executable, "-m", "train.recipe_demo", "--patch-hidden", "-1"], cwd=root,
                         capture_output=True, text=True)
    assert neg.returncode == 2 and neg.stderr.count("\n") == 1 and "--patch-hidden" in neg.stderr
    alone = subprocess.run([sys.executable, "-m", "train.recipe_demo", "--label-steps", "0", "--self-steps", "500"],
                           cwd=root, capture_output=True, text=True)  # the self stage starts from the label stage
    assert alone.returncode == 2 and alone.stderr.count("\n") == 1 and "--self-steps" in alone.stderr


def test_bench_teacher_pass_compares_the_backends():
    """bench/teacher_pass.py on the shipped images: one line per backend, what ran it, and targets that agree."""
    import subprocess
    import sys

    pytest.importorskip("openvino")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "teacher_pass.py"), "--data",
                          str(root / "examples" / "images"), "--limit", "3", "--rounds", "1"],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert "(ran: onnxruntime)" in lines["onnxruntime"] and "(ran: openvino" in lines["openvino"]
    assert float(lines["openvino"].rsplit(" ", 1)[1]) < 0.02  # fp16 cache rounding, not another target
