"""Token-aligned CutMix (train.mix): pasted tokens are exactly the partner's at every wavelet level."""
import numpy as np
import torch

from model.config import get_preset
from runtime.wavelet import images_to_levels
from train.mix import cutmix, cutmix_plan


def _batch(b=6, size=64, grid=4, dim=5, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
    emb = torch.from_numpy(rng.normal(size=(b, dim)).astype(np.float32))
    dense = torch.from_numpy(rng.normal(size=(b, grid * grid, channels)).astype(np.float32))
    return px, emb, dense


def test_pasted_tokens_are_the_partners_at_every_level():
    spec = get_preset("waveclip-demo").preprocessing_spec()
    grid = spec["grid"]
    px, emb, dense = _batch()
    out_px, out_emb, out_dense = cutmix(px, emb, dense, grid, 1.0, seed=3, step=11)
    partner, boxes, mixed = cutmix_plan(len(px), grid, 1.0, 3, 11)
    assert mixed.all() and (partner != np.arange(len(px))).all()
    mine, theirs, got = (images_to_levels(x, spec) for x in (px, px[partner], out_px))
    for i, (r, c, h, w) in enumerate(boxes):
        inside = np.zeros((grid, grid), bool)
        inside[r:r + h, c:c + w] = True
        inside = inside.ravel()
        assert 0 < inside.sum() < grid * grid
        for level in range(len(got)):
            np.testing.assert_allclose(got[level][i][inside], theirs[level][i][inside], atol=1e-5)
            np.testing.assert_allclose(got[level][i][~inside], mine[level][i][~inside], atol=1e-5)
        np.testing.assert_array_equal(out_dense[i][torch.from_numpy(inside)], dense[partner[i]][torch.from_numpy(inside)])
        np.testing.assert_array_equal(out_dense[i][torch.from_numpy(~inside)], dense[i][torch.from_numpy(~inside)])
        area = inside.mean()
        torch.testing.assert_close(out_emb[i], (1 - area) * emb[i] + area * emb[partner[i]])


def test_share_of_mixed_samples_and_determinism():
    partner, boxes, mixed = cutmix_plan(4096, 4, 0.3, 0, 5)
    assert abs(mixed.mean() - 0.3) < 0.03
    assert set(np.unique(boxes[:, 2])) == {1, 2, 3} and (boxes[:, 0] + boxes[:, 2] <= 4).all()
    again = cutmix_plan(4096, 4, 0.3, 0, 5)
    assert all(np.array_equal(a, b) for a, b in zip((partner, boxes, mixed), again))
    assert not np.array_equal(mixed, cutmix_plan(4096, 4, 0.3, 0, 6)[2])


def test_off_leaves_the_batch_alone():
    px, emb, dense = _batch()
    out_px, out_emb, out_dense = cutmix(px, emb, dense, 4, 0.0, 0, 0)
    assert out_px is px and out_emb is emb and out_dense is dense
    out_px, out_emb, out_dense = cutmix(px, emb, None, 4, 1.0, 0, 0)
    assert out_dense is None and not np.array_equal(out_px, px)
