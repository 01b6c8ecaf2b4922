"""One external-data file shared by every graph of a bundle: identical tensors are stored once."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx import numpy_helper

WEIGHTS_FILE = "weights.bin"
ALIGN_LARGE, LARGE = 1 << 16, 1 << 20  # as onnx's align_offset: tensors >= 1 MiB start on 64 KiB (mmap-friendly)
ALIGN_SMALL = 64
INLINE_BELOW = 1024  # as onnx's size_threshold: tiny constants (shapes, axes) stay inline for shape inference


class SharedWeights:
    """Appends tensor bytes to ``folder/weights.bin``, deduplicated by content across all graphs it is given."""

    def __init__(self, folder: str | os.PathLike, name: str = WEIGHTS_FILE) -> None:
        self.name = name
        self.path = Path(folder) / name
        self.path.touch()
        self.size = self.path.stat().st_size
        self._index: dict[str, tuple[int, int]] = {}
        self.tensors = 0  # tensor references written (graphs x initializers)

    def _store(self, data: bytes) -> tuple[int, int]:
        key = hashlib.sha256(data).hexdigest()
        if key not in self._index:
            align = ALIGN_LARGE if len(data) >= LARGE else ALIGN_SMALL
            offset = -(-self.size // align) * align
            with open(self.path, "r+b") as f:
                f.seek(offset)
                f.write(data)
            self.size = offset + len(data)
            self._index[key] = (offset, len(data))
        return self._index[key]

    def externalize(self, proto: onnx.ModelProto) -> onnx.ModelProto:
        """Move the data of every initializer of ``proto`` (in memory) but tiny ones into the shared file."""
        for tensor in proto.graph.initializer:
            if tensor.data_type == onnx.TensorProto.STRING:
                continue
            if not tensor.HasField("raw_data"):
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
            if len(tensor.raw_data) < INLINE_BELOW:
                continue
            offset, length = self._store(tensor.raw_data)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", self.name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            self.tensors += 1
        return proto

    @property
    def unique(self) -> int:
        return len(self._index)


def save_graph(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write a graph whose initializers are already external (no onnx.save side effects on the data file)."""
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())


def external_key(t: onnx.TensorProto) -> tuple | None:
    """(location, offset, length, onnx dtype, dims) of an initializer stored as external data, else None."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"]), t.data_type, tuple(t.dims)
