"""float16 graphs with float32 I/O (onnxruntime.transformers.float16), topologically sorted for onnx.checker: the
export's ``--fp16`` bundles and the fp16 copies TensorRT 11 builds from (``runtime.backends.trt_precision``). Needs
the ``onnx`` package, which the runtime alone does not install."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx


def toposort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its inputs' producers (the converter appends its input Casts last)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a dangling input at node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and compute in float16; inputs and outputs stay float32 (keep_io_types)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(proto, keep_io_types=True)
    toposort(proto.graph)
    return proto
