import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WAVECLIP_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state, so a statistical assertion passes or fails on every run alike."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    try:
        import torch
    except ImportError:  # the runtime-only install
        return
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data (or $WAVECLIP_DATA); tests that need it skip where it is absent."""
    if not DATA.is_dir():
        pytest.skip(f"real image data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def sample_images(data_dir) -> list[Path]:
    """A handful of real full-resolution photos (imagenet-sample)."""
    return sorted((data_dir / "imagenet-sample").glob("*.JPEG"))[:16]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised waveclip-tiny checkpoint with a 10-class head."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import get_preset
    from model.waveclip import WaveCLIP

    torch.manual_seed(0)
    cfg = get_preset("waveclip-tiny")
    head = {"class_names": [f"class {i}" for i in range(10)], "labels": [f"c{i}" for i in range(10)],
            "weight": torch.nn.functional.normalize(torch.randn(10, cfg.embed_dim), dim=-1),
            "bias": torch.zeros(10), "logit_scale": 30.0}
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, WaveCLIP(cfg).eval(), head, teacher="random", provenance={"note": "random init for tests"})
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported (and validated) to a bundle."""
    from export.onnx import main as export_main

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    assert export_main([str(tiny_checkpoint), "-o", str(out), "--images", str(REPO / "examples" / "images")]) == 0
    return out


def absolute_paths(obj) -> list[str]:
    """Every string in a JSON document that is an absolute (POSIX, home or Windows) path."""
    from pathlib import PurePosixPath, PureWindowsPath

    if isinstance(obj, dict):
        return [s for v in obj.values() for s in absolute_paths(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in absolute_paths(v)]
    if isinstance(obj, str) and (PurePosixPath(obj).is_absolute() or obj.startswith("~")
                                 or PureWindowsPath(obj).drive):
        return [obj]
    return []


def write_noise_images(root, height: int, width: int, seed: int = 0, count: int = 6) -> list:
    """``count`` random-noise PNGs of height x width in ``root``, as ImageRecords."""
    import numpy as np
    from PIL import Image

    from runtime.data import ImageRecord

    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(path))
    return records


@pytest.fixture(scope="module")
def noise_images(tmp_path_factory) -> list:
    """Six random-noise 48x40 PNGs as ImageRecords (for teacher-cache and augmentation tests)."""
    return write_noise_images(tmp_path_factory.mktemp("noise_imgs"), 40, 48)
