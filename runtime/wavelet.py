"""YCbCr + multi-scale Haar DWT + per-level patches in numpy.

The one implementation of WaveCLIP's tokenizer input: training, export validation and the device runtime all call it,
so what a device feeds the graphs cannot drift from what the model was trained on. PyWavelets
(``pywt.wavedec2(x, 'haar', mode='periodization')``) is its reference in the tests.
"""
from __future__ import annotations

import numpy as np

_YCBCR = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float32
)
_YCBCR_OFFSET = np.array([0.0, 128.0, 128.0], dtype=np.float32)


def rgb_to_ycbcr(rgb: np.ndarray, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """BT.601 full-range (JPEG) YCbCr. ``rgb``: [..., H, W, 3] in 0..255 -> [..., 3, H, W] float32 in 0..255,
    then ``* scale + offset`` (folded into the transform)."""
    rgb = np.moveaxis(np.asarray(rgb, dtype=np.float32), -1, -3)
    out = np.empty(rgb.shape, dtype=np.float32)
    m = _YCBCR * np.float32(scale)
    bias = _YCBCR_OFFSET * np.float32(scale) + np.float32(offset)
    for c in range(3):
        y = out[..., c, :, :]
        np.multiply(rgb[..., 0, :, :], m[c, 0], out=y)
        y += rgb[..., 1, :, :] * m[c, 1]
        y += rgb[..., 2, :, :] * m[c, 2]
        y += bias[c]
    return out


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr`: [..., 3, H, W] -> [..., H, W, 3]."""
    x = np.moveaxis(np.asarray(ycc, dtype=np.float64), -3, -1) - _YCBCR_OFFSET
    return x @ np.linalg.inv(_YCBCR.astype(np.float64)).T


def haar_dwt2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One 2D Haar step over the last two axes. Returns (LL [..., H/2, W/2], details [..., 3, H/2, W/2]).

    Details are ordered (horizontal, vertical, diagonal) like PyWavelets' (cH, cV, cD). Computed separably (row sums
    and differences, then column sums and differences) straight into the output arrays.
    """
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"Haar DWT needs even sides, got {x.shape[-2:]}")
    x = np.asarray(x)
    half = np.float32(0.5) if x.dtype == np.float32 else 0.5
    rows_sum = x[..., 0::2, :] + x[..., 1::2, :]
    rows_diff = x[..., 0::2, :] - x[..., 1::2, :]
    ll = rows_sum[..., 0::2] + rows_sum[..., 1::2]
    ll *= half
    details = np.empty(ll.shape[:-2] + (3,) + ll.shape[-2:], dtype=ll.dtype)
    np.add(rows_diff[..., 0::2], rows_diff[..., 1::2], out=details[..., 0, :, :])
    np.subtract(rows_sum[..., 0::2], rows_sum[..., 1::2], out=details[..., 1, :, :])
    np.subtract(rows_diff[..., 0::2], rows_diff[..., 1::2], out=details[..., 2, :, :])
    details *= half
    return ll, details


def haar_idwt2(ll: np.ndarray, details: np.ndarray) -> np.ndarray:
    """Inverse of :func:`haar_dwt2`."""
    h, v, d = details[..., 0, :, :], details[..., 1, :, :], details[..., 2, :, :]
    out = np.empty(ll.shape[:-2] + (ll.shape[-2] * 2, ll.shape[-1] * 2), dtype=np.result_type(ll, details))
    out[..., 0::2, 0::2] = (ll + h + v + d) * 0.5
    out[..., 0::2, 1::2] = (ll + h - v - d) * 0.5
    out[..., 1::2, 0::2] = (ll - h + v - d) * 0.5
    out[..., 1::2, 1::2] = (ll - h - v + d) * 0.5
    return out


def wavedec2(x: np.ndarray, levels: int) -> list[np.ndarray]:
    """Multi-scale Haar DWT, coarse to fine: [LL_J [...,H',W'], D_J [...,3,H',W'], ..., D_1 [...,3,H/2,W/2]]."""
    details = []
    ll = x
    for _ in range(levels):
        ll, det = haar_dwt2(ll)
        details.append(det)
    return [ll] + details[::-1]


def waverec2(bands: list[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`wavedec2`."""
    x = bands[0]
    for det in bands[1:]:
        x = haar_idwt2(x, det)
    return x


def patchify(band: np.ndarray, grid: int) -> np.ndarray:
    """[B, C, nb, h, w] -> [B, grid*grid, C*nb*p*p] with p = h // grid (tokens row-major; values channel, band, y, x)."""
    bsz, c, nb, h, w = band.shape
    p = h // grid
    if h != w or p * grid != h:
        raise ValueError(f"band {h}x{w} does not split into a {grid}x{grid} grid")
    x = band.reshape(bsz, c, nb, grid, p, grid, p).transpose(0, 3, 5, 1, 2, 4, 6)
    return np.ascontiguousarray(x.reshape(bsz, grid * grid, c * nb * p * p), dtype=np.float32)


def images_to_levels(rgb: np.ndarray, spec: dict) -> list[np.ndarray]:
    """Square RGB images [B, S, S, 3] (0..255) -> per-level patches ``[B, grid*grid, values_per_token]`` float32.

    ``spec`` is the preprocessing spec of a config or a bundle manifest (``WaveCLIPConfig.preprocessing_spec()``); a
    level's own ``grid`` (a model with ``level_grids``) overrides the spec's.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim == 3:
        rgb = rgb[None]
    size = spec["image_size"]
    if rgb.shape[1:] != (size, size, 3):
        raise ValueError(f"expected images of shape [B, {size}, {size}, 3], got {list(rgb.shape)}")
    norm = spec["normalize"]
    ycc = rgb_to_ycbcr(rgb, norm["scale"], norm["offset"])
    bands = wavedec2(ycc, spec["dwt_levels"])
    grids = [level.get("grid", spec["grid"]) for level in spec["levels"]]
    return [patchify(band if k else band[:, :, None], g) for k, (band, g) in enumerate(zip(bands, grids))]
