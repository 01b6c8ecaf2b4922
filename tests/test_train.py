import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import load_checkpoint, publish_checkpoint
from train import distill
from train.losses import distill_loss, entropy_loss, kl_distill, label_loss, lr_at, self_distill_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = "open_clip:ViT-Tiny-Test"
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 generated 48x56 PNGs over 4 ImageNet wnids (24 train, 8 val) + one corrupt train file; labels.csv."""
    root = tmp_path_factory.mktemp("train_data")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:56]
    rows = []
    for i in range(32):
        colour = np.array([i * 7 % 255, 60 * (i % 4), 255 - i * 5], np.float32)
        wave = 40 * np.sin(xx / (2 + i % 4) + yy / (3 + i % 5))[..., None]
        img = (colour + wave + rng.normal(0, 10, (48, 56, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i}.png")
        rows.append([f"{i}.png", WNIDS[i % 4], "train" if i < 24 else "val"])
    (root / "broken.png").write_bytes(b"not an image")
    rows.append(["broken.png", WNIDS[0], "train"])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "wnid", "split"], *rows])
    return root


def argv(data, out, *extra):
    return ["--teacher", TEACHER, "--data", str(data / "labels.csv"), "--split", "train", "--preset", "waveclip-tiny",
            "--out", str(out), "--batch-size", "8", "--threads", "1", "--cache-dir", str(data / "cache"), *extra]


def test_losses_and_schedule():
    t = torch.randn(4, 8)
    parts = distill_loss([t * 2, -t], t, [0.5, 0.5], logits=lambda e: e @ torch.eye(8), kl_weight=1.0)
    assert parts.cosine == pytest.approx([0.0, 2.0], abs=1e-6) and parts.kl[1] > 0 and parts.kl[0] > 0
    assert kl_distill(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.0)


def test_tiny_run_writes_checkpoint_with_head_and_provenance(data, tmp_path, capsys):
    out = tmp_path / "ckpt.pt"
    assert distill.main(argv(data, out, "--steps", "4", "--save-every", "2",
                             "--eval-data", str(data / "labels.csv"), "--eval-split", "val")) == 0
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().out
    model, ckpt = load_checkpoint(out)
    assert model.config.name == "waveclip-tiny" and model.config.embed_dim == 64  # the teacher's
    head = ckpt["head"]
    assert head["labels"] == WNIDS and head["class_names"][0] == "tench" and head["weight"].shape == (4, 64)
    prov = ckpt["provenance"]
    assert prov["teacher"] == TEACHER and prov["init"] == f"vit:{TEACHER}" and prov["steps"] == 4
    assert prov["data"]["images"] == 24 and prov["data"]["skipped"] == 1 and prov["images_per_s"] > 0
    assert len(prov["final_losses"]["cosine"]) == 4 and prov["teacher_cache"]["key"]
    ev = prov["eval"]
    assert ev["images"] == 8 and ev["labelled"] == 8 and len(ev["student_top1"]) == 4 and 0 <= ev["teacher_top1"] <= 1
    assert ckpt["train_state"]["step"] == 4 and ckpt["train_state"]["optimizer"]["state"]


def test_same_seed_same_weights_and_exact_resume(data, tmp_path):
    a, b, c, d = (tmp_path / f"{n}.pt" for n in "abcd")
    assert distill.main(argv(data, a, "--steps", "4", "--seed", "3")) == 0
    assert distill.main(argv(data, b, "--steps", "4", "--seed", "3")) == 0
    assert distill.main(argv(data, c, "--steps", "4", "--seed", "4")) == 0
    cache = [load_checkpoint(p)[1]["provenance"]["teacher_cache"] for p in (a, b, c)]
    assert cache[1]["key"] == cache[0]["key"] and cache[1]["computed"] == 0  # the second run reuses the cache
    assert cache[0]["backend"] == "torch" and cache[1]["backend"] == "cache"  # what ran the teacher (open_clip: torch)
    assert cache[2]["key"] != cache[0]["key"]  # another seed: another random teacher
    sa, sb, sc = (load_checkpoint(p)[1]["state_dict"] for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # interrupted after 2 of 4 steps, then --resume: identical to the uninterrupted run
    distill.run(distill.parse_args(argv(data, d, "--steps", "4", "--seed", "3")), stop_after=2)
    assert load_checkpoint(d)[1]["train_state"]["step"] == 2
    assert distill.main(argv(data, d, "--steps", "4", "--seed", "3", "--resume")) == 0
    _, ckpt = load_checkpoint(d)
    assert ckpt["provenance"]["steps"] == 4 and ckpt["provenance"]["images_seen"] == 32
    assert all(torch.equal(sa[k], ckpt["state_dict"][k]) for k in sa)


def test_cutmix_changes_the_batches_and_resumes_exactly(data, tmp_path):
    plain, mixed, resumed = (tmp_path / f"{n}.pt" for n in ("plain", "mixed", "resumed"))
    assert distill.main(argv(data, plain, "--steps", "3", "--seed", "3")) == 0
    assert distill.main(argv(data, mixed, "--steps", "3", "--seed", "3", "--cutmix", "1")) == 0
    distill.run(distill.parse_args(argv(data, resumed, "--steps", "3", "--seed", "3", "--cutmix", "1")), stop_after=1)
    assert distill.main(argv(data, resumed, "--steps", "3", "--seed", "3", "--cutmix", "1", "--resume")) == 0
    (_, p), (_, m), (_, r) = (load_checkpoint(x) for x in (plain, mixed, resumed))
    assert m["provenance"]["cutmix"] == 1 and p["provenance"]["cutmix"] == 0
    assert not all(torch.equal(p["state_dict"][k], m["state_dict"][k]) for k in p["state_dict"])
    assert all(torch.equal(m["state_dict"][k], r["state_dict"][k]) for k in m["state_dict"])
    assert distill.main(argv(data, mixed, "--steps", "4", "--resume", "--patch-hidden", "8")) == 2  # other layout
    hidden = tmp_path / "hidden.pt"
    assert distill.main(argv(data, hidden, "--steps", "1", "--patch-hidden", "8")) == 0
    assert load_checkpoint(hidden)[0].config.patch_hidden == 8
    with pytest.raises(SystemExit) as exc:
        distill.parse_args(argv(data, tmp_path / "bad.pt", "--cutmix", "1.5"))
    assert exc.value.code == 2 and not (tmp_path / "bad.pt").exists()


def test_label_loss_counts_only_labelled_images():
    emb = [torch.randn(4, 8), torch.randn(4, 8)]
    logits = lambda e: e @ torch.eye(8)  # noqa: E731
    none = label_loss(emb, torch.tensor([-1, -1, -1, -1]), [0.5, 0.5], logits)
    assert none.item() == 0.0
    rows = torch.tensor([3, -1, 5, -1])
    want = sum(0.5 * torch.nn.functional.cross_entropy(e[[0, 2]], rows[[0, 2]]) for e in emb)
    assert label_loss(emb, rows, [0.5, 0.5], logits).item() == pytest.approx(want.item())


def test_self_distill_loss_teaches_earlier_levels_the_last_levels_answer():
    torch.manual_seed(0)
    logits = lambda e: e @ torch.eye(6)  # noqa: E731
    last = torch.randn(5, 6)
    same = [last.clone(), last.clone(), last]
    assert self_distill_loss(same, [0.2, 0.3, 0.5], logits).item() == pytest.approx(0.0, abs=1e-6)
    early = [torch.randn(5, 6, requires_grad=True) for _ in range(2)]
    out_last = last.clone().requires_grad_(True)
    loss = self_distill_loss([*early, out_last], [0.2, 0.3, 0.5], logits, temperature=2.0)
    want = 0.2 * kl_distill(early[0], last, 2.0) + 0.3 * kl_distill(early[1], last, 2.0)
    assert loss.item() == pytest.approx(want.item()) and loss.item() > 0
    loss.backward()
    assert out_last.grad is None and all(e.grad.abs().sum() > 0 for e in early)  # the last level is only a target


def test_entropy_loss_is_the_weighted_entropy_and_pushes_away_from_ties():
    logits = lambda e: e @ torch.eye(4)  # noqa: E731
    tie = torch.tensor([[2.0, 2.0, 0.0, 0.0]])
    sure = torch.tensor([[20.0, 0.0, 0.0, 0.0]])
    top, rest = math.e ** 2 / (2 * math.e ** 2 + 2), 1 / (2 * math.e ** 2 + 2)  # softmax of [2, 2, 0, 0]
    want = -(2 * top * math.log(top) + 2 * rest * math.log(rest))
    assert entropy_loss([tie, sure], [1.0, 0.0], logits).item() == pytest.approx(want, rel=1e-5)
    assert entropy_loss([sure], [1.0], logits).item() < 1e-6
    near = torch.tensor([[2.0, 1.9, 0.0, 0.0]], requires_grad=True)
    entropy_loss([near], [1.0], logits).backward()
    assert near.grad[0, 0] < near.grad[0, 1]  # descent raises the top class more than the second: the gap widens


@pytest.mark.parametrize("flag", ["--self-weight", "--entropy-weight"])
def test_loss_weight_changes_training_and_is_recorded(data, tmp_path, flag):
    plain, weighted = tmp_path / "plain.pt", tmp_path / "weighted.pt"
    key = flag[2:].replace("-", "_")
    assert distill.main(argv(data, plain, "--steps", "2", "--seed", "3")) == 0
    assert distill.main(argv(data, weighted, "--steps", "2", "--seed", "3", flag, "1")) == 0
    (_, p), (_, w) = (load_checkpoint(x) for x in (plain, weighted))
    assert p["provenance"][key] == 0 and w["provenance"][key] == 1
    assert not all(torch.equal(p["state_dict"][k], w["state_dict"][k]) for k in p["state_dict"])
    for bad in ("-1", "inf", "nan"):
        with pytest.raises(SystemExit) as exc:
            distill.parse_args(argv(data, tmp_path / "bad.pt", flag, bad))
        assert exc.value.code == 2 and not (tmp_path / "bad.pt").exists()


def test_label_weight_uses_the_labels_and_resumes_exactly(data, tmp_path):
    plain, labelled, resumed = (tmp_path / f"{n}.pt" for n in ("plain", "labelled", "resumed"))
    assert distill.main(argv(data, plain, "--steps", "3", "--seed", "3")) == 0
    assert distill.main(argv(data, labelled, "--steps", "3", "--seed", "3", "--label-weight", "1")) == 0
    distill.run(distill.parse_args(argv(data, resumed, "--steps", "3", "--seed", "3", "--label-weight", "1")),
                stop_after=1)
    assert distill.main(argv(data, resumed, "--steps", "3", "--seed", "3", "--label-weight", "1", "--resume")) == 0
    (_, p), (_, m), (_, r) = (load_checkpoint(x) for x in (plain, labelled, resumed))
    assert m["provenance"]["label_weight"] == 1 and m["provenance"]["labelled"] == 24
    assert p["provenance"]["label_weight"] == 0 and p["provenance"]["labelled"] is None
    assert not all(torch.equal(p["state_dict"][k], m["state_dict"][k]) for k in p["state_dict"])
    assert all(torch.equal(m["state_dict"][k], r["state_dict"][k]) for k in m["state_dict"])
    for bad in (["--label-weight", "-1"], ["--label-weight", "1", "--cutmix", "0.5"]):
        with pytest.raises(SystemExit) as exc:
            distill.parse_args(argv(data, tmp_path / "bad.pt", *bad))
        assert exc.value.code == 2


def test_kl_head_refit_fits_the_teachers_rows_on_its_cached_embeddings(data, tmp_path, capsys):
    labels_kl, refit_kl = tmp_path / "labels.pt", tmp_path / "refit.pt"
    assert distill.main(argv(data, labels_kl, "--steps", "2", "--kl-head", "labels")) == 0
    capsys.readouterr()
    assert distill.main(argv(data, refit_kl, "--steps", "2", "--kl-head", "refit")) == 0
    assert "teacher head refit on 24 labelled images" in capsys.readouterr().out
    (_, a), (_, b) = (load_checkpoint(x) for x in (labels_kl, refit_kl))
    assert a["provenance"]["kl_head"] == "labels" and b["provenance"]["kl_head"] == "refit"
    assert not all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert torch.equal(a["head"]["weight"], b["head"]["weight"])  # the student's head stays the teacher's rows


def test_resume_adds_steps(data, tmp_path):
    out = tmp_path / "r.pt"
    assert distill.main(argv(data, out, "--steps", "2")) == 0
    assert distill.main(argv(data, out, "--steps", "5", "--resume")) == 0
    prov = load_checkpoint(out)[1]["provenance"]
    assert prov["steps"] == 5 and prov["images_seen"] == 40


def test_init_starts_from_a_published_checkpoint(data, tmp_path, capsys):
    """--init: the student starts from the checkpoint's weights (its fp16 published form too), with a new optimizer
    and schedule (--lr 0 keeps them as loaded); a checkpoint of another preset is refused with one line."""
    a, pub, b = tmp_path / "a.pt", tmp_path / "pub.pt", tmp_path / "b.pt"
    assert distill.main(argv(data, a, "--steps", "3", "--seed", "5")) == 0
    publish_checkpoint(a, pub)
    assert distill.main(argv(data, b, "--steps", "2", "--init", str(pub), "--lr", "0")) == 0
    src, got = load_checkpoint(pub)[1]["state_dict"], load_checkpoint(b)[1]
    assert all(torch.equal(src[k].float(), got["state_dict"][k]) for k in src)
    assert got["provenance"]["init"] == "checkpoint:pub.pt@3" and got["train_state"]["step"] == 2
    capsys.readouterr()
    assert distill.main(argv(data, tmp_path / "c.pt", "--steps", "1", "--init", str(pub), "--preset", "waveclip-demo")) == 2
    assert "--init: " in capsys.readouterr().err and not (tmp_path / "c.pt").exists()
    # a linear patch embedding grows into a two-layer one of 2 x width units with the same function
    grown = tmp_path / "grown.pt"
    assert distill.main(argv(data, grown, "--steps", "1", "--init", str(pub), "--lr", "0", "--patch-hidden", "128")) == 0
    (old, _), (new, ckpt) = load_checkpoint(pub), load_checkpoint(grown)
    assert new.config.patch_hidden == 128 and ckpt["provenance"]["init"] == "checkpoint:pub.pt@3"
    g = torch.Generator().manual_seed(0)
    levels = [torch.randn(3, old.config.patches_per_level, old.config.patch_dim(k), generator=g)
              for k in range(old.config.num_levels)]
    with torch.no_grad():
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(old(levels), new(levels)))
    assert distill.main(argv(data, tmp_path / "d.pt", "--steps", "1", "--init", str(pub), "--patch-hidden", "100")) == 2


def test_bad_input_exits_2_with_one_line(data, tmp_path):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.png").write_bytes(b"junk")
    out = str(tmp_path / "o.pt")
    base = ["--preset", "waveclip-tiny", "--out", out, "--steps", "1", "--cache-dir", str(tmp_path / "cache")]
    cases = {
        "no such data folder": ["--teacher", TEACHER, "--data", str(tmp_path / "missing"), *base],
        "no readable images": ["--teacher", TEACHER, "--data", str(tmp_path / "corrupt"), *base],
        "unknown teacher spec": ["--teacher", "resnet-9000", "--data", str(data / "labels.csv"), *base],
        "unknown preset": ["--teacher", TEACHER, "--data", str(data / "labels.csv"), *base, "--preset", "nope"],
        "preset/teacher width mismatch": ["--teacher", TEACHER, "--data", str(data / "labels.csv"), *base,
                                          "--preset", "waveclip-b16"],
    }
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    procs = {msg: subprocess.Popen([sys.executable, "-m", "train.distill", *args], cwd=REPO, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for msg, args in cases.items()}
    for msg, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (msg, stderr)
        assert len(stderr.strip().splitlines()) == 1 and msg in stderr and "Traceback" not in stderr, (msg, stderr)


@pytest.mark.slow
def test_smoke_distillation_from_efficientnet_improves_level3_cosine(data_dir, tmp_path):
    """waveclip-tiny from efficientnet-lite0 on 256 tiny-imagenet train images: the level-3 cosine to the teacher
    on 64 held-out val images beats the initial model's."""
    from model.teachers import load_teacher
    from runtime.data import load_images, read_image_list
    from train.evaluate import student_embeddings
    from train.teacher_cache import teacher_embeddings

    csv_path = str(data_dir / "tiny-imagenet-200" / "labels.csv")
    common = ["--teacher", "efficientnet-lite0", "--data", csv_path, "--split", "train", "--limit", "256",
              "--preset", "waveclip-tiny", "--batch-size", "32", "--threads", "1", "--cache-dir", str(tmp_path / "cache")]
    assert distill.main([*common, "--out", str(tmp_path / "trained.pt"), "--steps", "80"]) == 0
    assert distill.main([*common, "--out", str(tmp_path / "init.pt"), "--steps", "0"]) == 0

    held_out = read_image_list(csv_path, split="val", limit=64, seed=1)
    teacher = load_teacher("efficientnet-lite0")
    target, _ = teacher_embeddings(teacher, held_out, tmp_path / "cache", flip=False, progress=False)
    cosines = {}
    for name in ("init", "trained"):
        model, _ = load_checkpoint(tmp_path / f"{name}.pt")
        images, kept, _ = load_images(held_out, model.config.preprocessing_spec())
        level3 = student_embeddings(model, images)[3]
        cosines[name] = torch.nn.functional.cosine_similarity(level3, target[:, 0].float(), dim=-1).mean().item()
    print(f"held-out level-3 cosine to the teacher: {cosines}")
    assert cosines["trained"] > cosines["init"] + 0.1, cosines


def test_init_regrids_a_level(data, tmp_path):
    """--init with --level-grids: the levels whose grid changes get a new tokenizer (patch embedding, statistics from
    the data) and the new grid a position embedding resampled from the checkpoint's; every other weight is the
    checkpoint's, so the levels before the first changed one answer exactly as before (attention is causal)."""
    import torch.nn.functional as F

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert distill.main(argv(data, a, "--steps", "2")) == 0
    assert distill.main(argv(data, b, "--steps", "1", "--init", str(a), "--lr", "0", "--level-grids", "4,4,4,8")) == 0
    (old, _), (new, ckpt) = load_checkpoint(a), load_checkpoint(b)
    assert new.config.level_grids == (4, 4, 4, 8) and tuple(ckpt["config"]["level_grids"]) == (4, 4, 4, 8)
    o, n = old.state_dict(), new.state_dict()
    assert n["patch_embed.3.weight"].shape[1] == new.config.patch_dim(3) == 144
    assert not torch.equal(n["patch_scale_3"], torch.ones(144))  # standardised by the data
    base = o["pos_embed"].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    resampled = F.interpolate(base, size=(8, 8), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    assert torch.allclose(n["pos_embed_grid.8"], resampled.reshape(64, -1))
    assert all(torch.equal(o[k], n[k]) for k in o if not k.startswith(("patch_embed.3.", "patch_shift_3",
                                                                          "patch_scale_3")))
    g = torch.Generator().manual_seed(0)
    old_levels = [torch.randn(2, old.config.level_patches(k), old.config.patch_dim(k), generator=g) for k in range(3)]
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(old(old_levels), new(old_levels)))
