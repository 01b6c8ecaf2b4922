import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from model.config import PRESETS, get_preset, vit_gflops
from model.waveclip import WaveCLIP


def random_levels(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, cfg.patches_per_level, cfg.patch_dim(k), generator=g) for k in range(cfg.num_levels)]


@pytest.mark.parametrize("preset", ["waveclip-tiny", "waveclip-demo"])
def test_cached_levels_equal_full_masked_forward(preset):
    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = WaveCLIP(cfg).eval()
    patches = random_levels(cfg)
    with torch.no_grad():
        full = model(patches)
        cascade = model.forward_cascade(patches)
        blockwise = model(patches, blockwise=True)  # attention level by level, no masked scores
    for k, (a, b, c) in enumerate(zip(full, cascade, blockwise)):
        assert (a - b).abs().max().item() <= 1e-5, f"level {k}"
        assert (c - b).abs().max().item() <= 1e-5, f"level {k}"
        assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_level_k_only_sees_levels_up_to_k():
    torch.manual_seed(0)
    cfg = get_preset("waveclip-tiny")
    model = WaveCLIP(cfg).eval()
    patches = random_levels(cfg)
    changed = [p.clone() for p in patches]
    changed[2] += 1.0
    with torch.no_grad():
        a, b = model(patches), model(changed)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[2], b[2]) and not torch.allclose(a[3], b[3])


def test_cache_length_is_checked():
    cfg = get_preset("waveclip-tiny")
    model = WaveCLIP(cfg).eval()
    p = random_levels(cfg)
    with torch.no_grad():
        _, present = model.forward_level(0, p[0])
        with pytest.raises(ValueError, match="KV cache of length 34"):
            model.forward_level(2, p[2], present)


def test_b16_layout_and_gflops():
    cfg = get_preset("waveclip-b16")
    assert [cfg.patch_dim(k) for k in range(4)] == [48, 144, 576, 2304]
    assert [cfg.past_length(k) + cfg.tokens_per_level for k in range(4)] == [50, 100, 150, 200]
    full = cfg.cumulative_gflops(3)
    vit = vit_gflops()
    assert 0.9 < full / vit < 1.2  # "costs what a ViT-B/16 costs"
    assert cfg.level_gflops(0) < full / 4


def test_gflops_match_profiler():
    """The analytic count agrees with torch's FLOP counter on the incremental level graphs."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_preset("waveclip-demo")
    model = WaveCLIP(cfg).eval()
    patches = random_levels(cfg, batch=1)
    past = None
    with torch.no_grad():
        for k in range(cfg.num_levels):
            with FlopCounterMode(display=False) as counter:
                _, past = model.forward_level(k, patches[k], past)
            measured = counter.get_total_flops() / 1e9
            assert abs(measured - cfg.level_gflops(k)) / cfg.level_gflops(k) < 0.02, k


def test_preset_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="divisible"):
        PRESETS["waveclip-tiny"].replace(heads=3)


def _head(n=3, d=64):
    return {"class_names": [f"c{i}" for i in range(n)], "weight": torch.randn(n, d), "bias": torch.zeros(n),
            "logit_scale": 100.0}


def test_checkpoint_roundtrip(tmp_path):
    cfg = get_preset("waveclip-tiny")
    model = WaveCLIP(cfg).eval()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, _head(), teacher="open_clip:ViT-Tiny-Test", provenance={"steps": 0})
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["teacher"] == "open_clip:ViT-Tiny-Test" and ckpt["head"]["class_names"] == ["c0", "c1", "c2"]
    p = random_levels(cfg)
    with torch.no_grad():
        assert torch.equal(model(p)[3], loaded(p)[3])


def test_checkpoint_refusals(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError, match="no such"):
        read_checkpoint(missing)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        read_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a WaveCLIP checkpoint"):
        read_checkpoint(other)
    cfg = get_preset("waveclip-tiny")
    ok = tmp_path / "ok.pt"
    save_checkpoint(ok, WaveCLIP(cfg), _head(), teacher="t")
    ckpt = torch.load(ok, weights_only=True)
    ckpt["format_version"] = 99
    torch.save(ckpt, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        read_checkpoint(tmp_path / "v99.pt")
    ckpt["format_version"] = 1
    ckpt["evil"] = Evil()
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickled"):
        read_checkpoint(tmp_path / "evil.pt")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_published_checkpoint_is_half_and_loads_as_fp32(tmp_path):
    from model.checkpoint import publish_checkpoint

    cfg = get_preset("waveclip-tiny")
    model = WaveCLIP(cfg).eval()
    src, dst = tmp_path / "full.pt", tmp_path / "pub.pt"
    save_checkpoint(src, model, _head(), teacher="t", train_state={"step": 3, "opt": {"x": torch.ones(3)}})
    publish_checkpoint(src, dst)
    assert dst.stat().st_size < 0.6 * src.stat().st_size
    loaded, ckpt = load_checkpoint(dst)
    assert "train_state" not in ckpt and next(loaded.parameters()).dtype == torch.float32
    p = random_levels(cfg)
    with torch.no_grad():
        assert (model(p)[3] - loaded(p)[3]).abs().max() < 1e-2


def test_two_layer_patch_embedding(tmp_path):
    """patch_hidden: the cache identity, the analytic FLOPs and the checkpoint round trip hold for it too."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    cfg = get_preset("waveclip-tiny").replace(patch_hidden=24)
    model = WaveCLIP(cfg).eval()
    assert isinstance(model.patch_embed[3], torch.nn.Sequential) and model.patch_embed[3][0].out_features == 24
    patches = random_levels(cfg)
    with torch.no_grad():
        full, cascade = model(patches), model.forward_cascade(patches)
        assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(full, cascade))
        past, single = None, random_levels(cfg, batch=1)
        for k in range(cfg.num_levels):
            with FlopCounterMode(display=False) as counter:
                _, past = model.forward_level(k, single[k], past)
            assert abs(counter.get_total_flops() / 1e9 - cfg.level_gflops(k)) / cfg.level_gflops(k) < 0.02, k
    assert cfg.level_gflops(3) != get_preset("waveclip-tiny").level_gflops(3)
    save_checkpoint(tmp_path / "c.pt", model, _head(), teacher="t")
    loaded, _ = load_checkpoint(tmp_path / "c.pt")
    assert loaded.config.patch_hidden == 24
    with torch.no_grad():
        assert torch.equal(model(patches)[3], loaded(patches)[3])
    with pytest.raises(ValueError, match="patch_hidden"):
        cfg.replace(patch_hidden=-1)


def level_patches(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, cfg.level_patches(k), cfg.patch_dim(k), generator=g) for k in range(cfg.num_levels)]


def test_level_grids_layout():
    """A finer grid at the finest level: 64 tokens of 4x4 patches there, 16 elsewhere; the cache and the cost follow."""
    cfg = get_preset("waveclip-tiny", level_grids=[4, 4, 4, 8])
    assert cfg.level_grids == (4, 4, 4, 8) and not cfg.uniform
    assert [cfg.level_tokens(k) for k in range(4)] == [17, 17, 17, 65]
    assert [cfg.past_length(k) for k in range(4)] == [0, 17, 34, 51]
    assert [cfg.patch_dim(k) for k in range(4)] == [12, 36, 144, 144]
    assert [lv["tokens"] for lv in cfg.preprocessing_spec()["levels"]] == [16, 16, 16, 64]
    assert cfg.level_gflops(3) > 3 * cfg.level_gflops(2)
    assert get_preset("waveclip-tiny", level_grids=[4, 4, 4, 4]).uniform
    with pytest.raises(ValueError, match="ask per level"):
        cfg.tokens_per_level
    for bad, match in [([4, 4, 8], "one grid per level"), ([4, 4, 4, 6], "multiple of grid"),
                       ([16, 4, 4, 4], "do not split"), ([4, 4, 4, "8"], "multiple of grid")]:
        with pytest.raises(ValueError, match=match):
            get_preset("waveclip-tiny", level_grids=bad)


def test_level_grids_cached_levels_equal_full_forward():
    torch.manual_seed(0)
    cfg = get_preset("waveclip-tiny", level_grids=[4, 4, 8, 8])
    model = WaveCLIP(cfg).eval()
    patches = level_patches(cfg)
    with torch.no_grad():
        full, tokens = model(patches, return_tokens=True)
        cascade = model.forward_cascade(patches)
        blockwise = model(patches, blockwise=True)
    assert [t.shape[1] for t in tokens] == [16, 16, 64, 64]
    for a, b, c in zip(full, cascade, blockwise):
        assert (a - b).abs().max().item() <= 1e-5 and (c - b).abs().max().item() <= 1e-5
    assert set(dict(model.named_parameters())) >= {"pos_embed", "pos_embed_grid.8"}
