"""WaveCLIP configuration, presets and analytic FLOP counts (no torch needed)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


# Generous bounds (the presets are far inside them) that keep every size computed from a config finite.
_INT_LIMITS = {"image_size": 16384, "dwt_levels": 8, "grid": 1024, "width": 65536, "layers": 1024, "heads": 1024,
               "embed_dim": 65536, "channels": 3}


@dataclass(frozen=True)
class WaveCLIPConfig:
    """Layout of a WaveCLIP image tower.

    The image (``image_size`` square) goes to YCbCr and a ``dwt_levels``-scale Haar DWT. Inference level 0 is the
    coarse LL band; level k >= 1 adds the three detail bands of scale ``dwt_levels - k + 1``. Every level is cut into
    the same ``grid x grid`` token grid (so each token covers the same image area) plus one CLS token, unless
    ``level_grids`` gives each level its own grid: multiples of ``grid``, the coarsest, so that a finer level cuts its
    bands into more, smaller tokens (more tokens where the detail is; ``grid`` stays the grid of the dense targets).
    """

    image_size: int = 224
    dwt_levels: int = 3
    grid: int = 7
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512
    patch_hidden: int = 0  # hidden width of a two-layer (GELU) patch embedding per level; 0: one linear layer
    level_grids: tuple[int, ...] = ()  # a token grid per level (multiples of ``grid``); empty: ``grid`` everywhere
    channels: int = 3
    wavelet: str = "haar"
    name: str = "custom"

    def __post_init__(self) -> None:
        for name, maximum in _INT_LIMITS.items():  # before any arithmetic: 2 ** dwt_levels must stay small
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
                raise ValueError(f"{name} must be an integer in 1..{maximum}, got {value!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) \
                or not 0 < self.mlp_ratio <= 64:
            raise ValueError(f"mlp_ratio must be a number in (0, 64], got {self.mlp_ratio!r}")
        if not isinstance(self.patch_hidden, int) or isinstance(self.patch_hidden, bool) \
                or not 0 <= self.patch_hidden <= _INT_LIMITS["width"]:
            raise ValueError(f"patch_hidden must be an integer in 0..{_INT_LIMITS['width']}, got {self.patch_hidden!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {self.name!r}")
        if not isinstance(self.level_grids, (tuple, list)):
            raise ValueError(f"level_grids must be a list of integers, got {self.level_grids!r}")
        object.__setattr__(self, "level_grids", tuple(self.level_grids))  # JSON gives a list
        if self.level_grids:
            if len(self.level_grids) != self.num_levels:
                raise ValueError(f"level_grids needs one grid per level ({self.num_levels}), "
                                 f"got {list(self.level_grids)}")
            for k, g in enumerate(self.level_grids):
                if not isinstance(g, int) or isinstance(g, bool) or g < 1 or g % self.grid:
                    raise ValueError(f"level_grids[{k}] = {g!r} must be a multiple of grid {self.grid}")
                band = self.band_size(k)
                if band % g:
                    raise ValueError(f"level_grids[{k}] = {g}: the level's {band}x{band} bands do not split into it")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % (2 ** self.dwt_levels * self.grid):
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of 2**dwt_levels * grid = {2 ** self.dwt_levels * self.grid}"
            )
        if self.wavelet != "haar":
            raise ValueError(f"only the 'haar' wavelet is supported, got {self.wavelet!r}")

    # --- token layout -------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return self.dwt_levels + 1

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def uniform(self) -> bool:
        """Every level on the same token grid."""
        return all(g == self.grid for g in self.level_grids)

    @property
    def patches_per_level(self) -> int:
        """Patches of every level (a uniform grid only: else ``level_patches``)."""
        self._check_uniform()
        return self.grid * self.grid

    @property
    def tokens_per_level(self) -> int:
        """Tokens each level adds to the sequence: its patches plus its CLS token (a uniform grid only: else
        ``level_tokens``)."""
        self._check_uniform()
        return self.patches_per_level + 1

    def _check_uniform(self) -> None:
        if not self.uniform:
            raise ValueError(f"levels have grids {list(self.level_grids)}: ask per level")

    def level_grid(self, level: int) -> int:
        self._check_level(level)
        return self.level_grids[level] if self.level_grids else self.grid

    def level_patches(self, level: int) -> int:
        return self.level_grid(level) ** 2

    def level_tokens(self, level: int) -> int:
        """Tokens level ``level`` adds to the sequence: its patches plus its CLS token."""
        return self.level_patches(level) + 1

    def band_size(self, level: int) -> int:
        """Side of the wavelet band(s) that level ``level`` tokenizes."""
        self._check_level(level)
        scale = self.dwt_levels if level == 0 else self.dwt_levels - level + 1
        return self.image_size >> scale

    def band_names(self, level: int) -> list[str]:
        self._check_level(level)
        if level == 0:
            return [f"LL{self.dwt_levels}"]
        scale = self.dwt_levels - level + 1
        return [f"LH{scale}", f"HL{scale}", f"HH{scale}"]

    def patch_size(self, level: int) -> int:
        return self.band_size(level) // self.level_grid(level)

    def patch_dim(self, level: int) -> int:
        """Values per token at ``level``: channels x bands x patch_size**2."""
        return self.channels * len(self.band_names(level)) * self.patch_size(level) ** 2

    def past_length(self, level: int) -> int:
        """Cached tokens a level sees from the levels before it."""
        self._check_level(level)
        return sum(self.level_tokens(k) for k in range(level))

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level {level} out of range 0..{self.num_levels - 1}")

    # --- cost ---------------------------------------------------------------------------------------------------
    def level_gflops(self, level: int) -> float:
        """GFLOPs (2 x multiply-adds) of running ``level`` alone with the KV cache of the levels before it."""
        t, w = self.level_tokens(level), self.width
        s = self.past_length(level) + t
        mlp = int(w * self.mlp_ratio)
        per_layer = 2 * t * w * 3 * w + 2 * 2 * t * s * w + 2 * t * w * w + 2 * 2 * t * w * mlp
        d, h = self.patch_dim(level), self.patch_hidden
        embed = 2 * self.level_patches(level) * (d * h + h * w if h else d * w)
        flops = embed + self.layers * per_layer + 2 * w * self.embed_dim
        return flops / 1e9

    def cumulative_gflops(self, level: int) -> float:
        """GFLOPs of a cascade that exits at ``level`` (levels 0..level, each once, with the cache)."""
        return sum(self.level_gflops(k) for k in range(level + 1))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "WaveCLIPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> "WaveCLIPConfig":
        return dataclasses.replace(self, **changes)

    def preprocessing_spec(self) -> dict:
        """The numpy preprocessing contract (stored in the bundle manifest, used by training and the runtime)."""
        return {
            "image_size": self.image_size,
            "resize_shorter": self.image_size,
            "resample": "bicubic",
            "crop": "center",
            "color": "ycbcr_bt601_full",
            "normalize": {"scale": 1.0 / 255.0, "offset": -0.5},
            "wavelet": self.wavelet,
            "dwt_mode": "periodization",
            "dwt_levels": self.dwt_levels,
            "grid": self.grid,
            "patch_order": "token (row-major over grid) x [channel (Y,Cb,Cr), band, row, col]",
            "levels": [
                {
                    "bands": self.band_names(k),
                    "band_size": self.band_size(k),
                    "patch_size": self.patch_size(k),
                    "tokens": self.level_patches(k),
                    "values_per_token": self.patch_dim(k),
                    **({"grid": self.level_grid(k)} if self.level_grids else {}),
                }
                for k in range(self.num_levels)
            ],
        }


def vit_gflops(image_size: int = 224, patch: int = 16, width: int = 768, layers: int = 12, mlp_ratio: float = 4.0,
               embed_dim: int = 512) -> float:
    """GFLOPs of a plain ViT image tower (the baseline every speed claim compares with)."""
    n = (image_size // patch) ** 2
    t = n + 1
    mlp = int(width * mlp_ratio)
    per_layer = 2 * t * width * 3 * width + 2 * 2 * t * t * width + 2 * t * width * width + 2 * 2 * t * width * mlp
    return (2 * n * 3 * patch * patch * width + layers * per_layer + 2 * width * embed_dim) / 1e9


PRESETS: dict[str, WaveCLIPConfig] = {
    # Same blocks as open_clip ViT-B-16; costs about what ViT-B/16 costs when all levels run.
    "waveclip-b16": WaveCLIPConfig(image_size=224, grid=7, width=768, layers=12, heads=12, embed_dim=512,
                                   name="waveclip-b16"),
    # Sized for a 2-core CPU: 64x64 input (Tiny-ImageNet resolution), 4x4 token grid.
    "waveclip-demo": WaveCLIPConfig(image_size=64, grid=4, width=192, layers=6, heads=3, embed_dim=1280,
                                    name="waveclip-demo"),
    # For unit tests.
    "waveclip-tiny": WaveCLIPConfig(image_size=64, grid=4, width=64, layers=2, heads=2, embed_dim=64,
                                    name="waveclip-tiny"),
}


def get_preset(name: str, **overrides) -> WaveCLIPConfig:
    """Look up a preset by name, optionally overriding fields (e.g. ``embed_dim`` to match a teacher)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg
