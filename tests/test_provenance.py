"""Provenance stays meaningful on another machine: no manifest records a machine's absolute paths."""
import json
from pathlib import Path

import pytest

from conftest import absolute_paths

REPO = Path(__file__).resolve().parents[1]
SHIPPED_JSON = sorted((REPO / "models").rglob("*.json"))


@pytest.mark.parametrize("path", SHIPPED_JSON, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_json_records_no_absolute_path(path):
    assert absolute_paths(json.loads(path.read_text())) == []


def test_exported_bundle_records_no_absolute_path(tiny_bundle):
    for name in ("manifest.json", "validation.json"):
        assert absolute_paths(json.loads((tiny_bundle / name).read_text())) == []


def test_portable_source(tmp_path, monkeypatch):
    from runtime.data import portable_source

    (tmp_path / "data" / "sub").mkdir(parents=True)
    csv = tmp_path / "data" / "sub" / "splits.csv"
    csv.write_text("path\n")
    monkeypatch.delenv("WAVECLIP_DATA", raising=False)
    assert portable_source(csv) == "splits.csv"
    assert portable_source(csv, tmp_path / "data") == "sub/splits.csv"
    assert portable_source(tmp_path / "data") == "data"
    monkeypatch.setenv("WAVECLIP_DATA", str(tmp_path / "data"))
    assert portable_source(csv) == "sub/splits.csv"
    monkeypatch.chdir(tmp_path)
    assert portable_source("data/sub/splits.csv", tmp_path / "elsewhere") == "sub/splits.csv"
