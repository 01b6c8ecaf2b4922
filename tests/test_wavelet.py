import numpy as np
import pytest
import pywt
from PIL import Image

from model.config import get_preset
from runtime.preprocess import image_to_array
from runtime.wavelet import (haar_dwt2, images_to_levels, rgb_to_ycbcr, wavedec2, waverec2, ycbcr_to_rgb)

rng = np.random.default_rng(0)


def test_ycbcr_matches_pillow_jpeg_transform():
    rgb = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    ours = rgb_to_ycbcr(rgb)
    pil = np.asarray(Image.fromarray(rgb).convert("YCbCr"), dtype=np.float32).transpose(2, 0, 1)
    assert np.abs(ours - pil).max() <= 1.0  # Pillow rounds to uint8
    np.testing.assert_allclose(ycbcr_to_rgb(ours), rgb, atol=1e-3)


@pytest.mark.parametrize("levels", [1, 3])
def test_dwt_matches_pywavelets(levels):
    x = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
    ours = wavedec2(x, levels)
    ref = pywt.wavedec2(x, "haar", mode="periodization", level=levels, axes=(-2, -1))
    assert np.abs(ours[0] - ref[0]).max() <= 1e-5
    for det, (ch, cv, cd) in zip(ours[1:], ref[1:]):
        assert np.abs(det - np.stack([ch, cv, cd], axis=-3)).max() <= 1e-5


def test_perfect_reconstruction():
    x = rng.normal(size=(3, 56, 56)).astype(np.float64)
    np.testing.assert_allclose(waverec2(wavedec2(x, 3)), x, atol=1e-12)


def test_odd_side_is_refused():
    with pytest.raises(ValueError, match="even"):
        haar_dwt2(np.zeros((5, 6)))


@pytest.mark.parametrize("preset", ["waveclip-b16", "waveclip-demo"])
def test_level_patch_shapes_and_layout(preset):
    cfg = get_preset(preset)
    spec = cfg.preprocessing_spec()
    s = cfg.image_size
    imgs = rng.integers(0, 256, size=(2, s, s, 3), dtype=np.uint8)
    levels = images_to_levels(imgs, spec)
    assert [lv.shape for lv in levels] == [(2, cfg.patches_per_level, cfg.patch_dim(k)) for k in range(cfg.num_levels)]
    # token (r, c) of level 0 is the LL patch at that grid cell, values ordered channel, row, col
    ycc = rgb_to_ycbcr(imgs) / 255.0 - 0.5
    ll = pywt.wavedec2(ycc, "haar", mode="periodization", level=cfg.dwt_levels, axes=(-2, -1))[0]
    p = cfg.patch_size(0)
    r, c = 1, 2
    expect = ll[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)
    np.testing.assert_allclose(levels[0][0, r * cfg.grid + c], expect, atol=1e-5)
    # finest level: channel-major, then band (H, V, D)
    ch, cv, cd = pywt.wavedec2(ycc, "haar", mode="periodization", level=cfg.dwt_levels, axes=(-2, -1))[-1]
    p = cfg.patch_size(cfg.num_levels - 1)
    expect = np.stack([ch, cv, cd], axis=2)[1, :, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)
    np.testing.assert_allclose(levels[-1][1, r * cfg.grid + c], expect, atol=1e-5)


def test_levels_reconstruct_the_image():
    """Nothing is lost: the level patches hold every coefficient, so the image can be rebuilt from them."""
    cfg = get_preset("waveclip-tiny")
    spec = cfg.preprocessing_spec()
    img = rng.integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)
    levels = images_to_levels(img, spec)
    g = cfg.grid
    bands = []
    for k, lv in enumerate(levels):
        p, nb = cfg.patch_size(k), len(cfg.band_names(k))
        x = lv.reshape(1, g, g, 3, nb, p, p).transpose(0, 3, 4, 1, 5, 2, 6).reshape(1, 3, nb, g * p, g * p)
        bands.append(x[:, :, 0] if k == 0 else x)
    rebuilt = ycbcr_to_rgb((waverec2(bands) + 0.5) * 255.0)
    np.testing.assert_allclose(rebuilt, img, atol=1e-3)


def test_image_to_array_resizes_and_crops():
    spec = get_preset("waveclip-b16").preprocessing_spec()
    im = Image.new("RGB", (300, 500), (10, 200, 30))
    arr = image_to_array(im, spec)
    assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8
    assert tuple(arr[100, 100]) == (10, 200, 30)


def test_level_grids_cut_each_level_on_its_own_grid():
    cfg = get_preset("waveclip-tiny", level_grids=[4, 4, 4, 8])
    rgb = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    levels = images_to_levels(rgb, cfg.preprocessing_spec())
    uniform = images_to_levels(rgb, get_preset("waveclip-tiny").preprocessing_spec())
    assert [p.shape for p in levels] == [(2, 16, 12), (2, 16, 36), (2, 16, 144), (2, 64, 144)]
    for a, b in zip(levels[:3], uniform[:3]):
        assert np.array_equal(a, b)
    # the same coefficients cut into 64 tokens of 4x4 instead of 16 of 8x8: fine token (gy, gx) holds the quarter
    # (gy % 2, gx % 2) of coarse token (gy // 2, gx // 2), for every channel and band
    fine = levels[3].reshape(2, 8, 8, 3, 3, 4, 4)
    coarse = uniform[3].reshape(2, 4, 4, 3, 3, 8, 8)
    for gy in range(8):
        for gx in range(8):
            quarter = coarse[:, gy // 2, gx // 2, :, :, (gy % 2) * 4:(gy % 2) * 4 + 4, (gx % 2) * 4:(gx % 2) * 4 + 4]
            assert np.array_equal(fine[:, gy, gx], quarter)
