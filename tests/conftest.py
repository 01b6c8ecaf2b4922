import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WAVECLIP_DATA", REPO.parent / "shared" / "data"))


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
