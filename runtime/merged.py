"""All level graphs of a bundle as ONE graph (a ``level`` input selects a branch, as Optimum's merged decoders select
the cache branch), built in memory when a backend loads the bundle; the bundle itself is unchanged.

Why: a runtime holds one copy of each weight per session. With one session per level that is four copies of the
same weights (each level session prepacks its own); the merged graph holds every weight once, as one initializer of
the outer graph that every branch reads, and prepacks it once.

Inputs: ``level`` (int64 scalar), ``patches`` [batch, 49, channels] and every ``past_key_values.*`` [batch, heads,
past, head_dim] (empty, past = 0, for level 0). Outputs: ``embedding`` and every ``present.*``, as the level graphs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from runtime.bundle import Bundle

LEVEL_INPUT = "level"


def external_key(t: TensorProto) -> tuple | None:
    """(location, offset, length, onnx dtype, dims) of an initializer stored as external data, else None."""
    if t.data_location != TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"]), t.data_type, tuple(t.dims)


def _rename_graph(graph: onnx.GraphProto, rename: dict[str, str]) -> None:
    """Rename values referenced by the nodes of ``graph`` (and of its subgraphs) in place."""
    for node in graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_graph(attr.g, rename)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_graph(g, rename)
    for out in graph.output:
        out.name = rename.get(out.name, out.name)


def _typed(name: str, like: onnx.ValueInfoProto, shape=None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, like.type.tensor_type.elem_type, shape)


def _branch(k: int, graph: onnx.GraphProto, shared: dict[tuple, str]) -> onnx.GraphProto:
    """Level k's graph as an If branch: its inputs become outer-scope values, its external weights the outer graph's
    shared initializers, every other value name prefixed ``L{k}/`` (no clash between scopes)."""
    inputs = {i.name for i in graph.input}
    rename: dict[str, str] = {}
    local = []
    for t in graph.initializer:
        key = external_key(t)
        if key is None:  # small inline constants stay in the branch
            rename[t.name] = t.name = f"L{k}/{t.name}"
            local.append(t)
        else:
            rename[t.name] = shared.setdefault(key, f"w/{len(shared)}")
    for node in graph.node:
        for name in node.output:
            rename.setdefault(name, f"L{k}/{name}")
    for name in inputs:
        rename.pop(name, None)
    _rename_graph(graph, rename)
    return helper.make_graph(list(graph.node), f"level{k}", [], [_typed(o.name, o) for o in graph.output], local)


def merge_levels(bundle: Bundle) -> tuple[onnx.ModelProto, list[tuple[str, tuple]]]:
    """The merged graph (weights external, not loaded) and, for each outer initializer, its name and the region of
    the bundle file that holds it: (location, offset, length, onnx dtype, dims)."""
    shared: dict[tuple, str] = {}
    branches, opsets, ir_version = [], {}, 0
    for k in range(bundle.num_levels):
        model = onnx.load(str(bundle.level_path(k)), load_external_data=False)
        ir_version = max(ir_version, model.ir_version)
        for op in model.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
        if k == 0:
            patches_input = next(i for i in model.graph.input if i.name == "patches")
            outputs = [onnx.ValueInfoProto(name=o.name, type=o.type) for o in model.graph.output]
        elif k == 1:
            kv_inputs = [i for i in model.graph.input if i.name != "patches"]
        branches.append(_branch(k, model.graph, shared))
    out_names = [o.name for o in outputs]

    def chain(k: int) -> onnx.GraphProto:
        """The graph that runs level k if ``level == k``, else the levels after it."""
        if k == len(branches) - 1:
            return branches[k]
        names = [f"sel{k}/{n}" for n in out_names]
        const = helper.make_tensor(f"c{k}", TensorProto.INT64, [], [k])
        nodes = [helper.make_node("Constant", [], [f"const{k}"], value=const),
                 helper.make_node("Equal", [LEVEL_INPUT, f"const{k}"], [f"is_level{k}"]),
                 helper.make_node("If", [f"is_level{k}"], names, then_branch=branches[k], else_branch=chain(k + 1))]
        return helper.make_graph(nodes, f"select{k}", [], [_typed(n, o) for n, o in zip(names, outputs)])

    top = chain(0)
    _rename_graph(top, {o.name: n for o, n in zip(top.output, out_names)})  # the outer If yields the level names
    initializers, regions = [], []
    for key, name in shared.items():
        location, offset, length, dtype, dims = key
        t = TensorProto(name=name, data_type=dtype, dims=list(dims), data_location=TensorProto.EXTERNAL)
        for field, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = field, value
        initializers.append(t)
        regions.append((name, key))
    pdims = patches_input.type.tensor_type.shape.dim
    inputs = [helper.make_tensor_value_info(LEVEL_INPUT, TensorProto.INT64, []),
              _typed("patches", patches_input, ["batch", pdims[1].dim_value or "tokens", "channels"])]
    for i in kv_inputs:
        d = i.type.tensor_type.shape.dim
        inputs.append(_typed(i.name, i, ["batch", d[1].dim_value or "heads", "past", d[3].dim_value or "head_dim"]))
    graph = helper.make_graph(list(top.node), "waveclip_levels", inputs, [_typed(o.name, o) for o in outputs],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = ir_version
    return model, regions


def region_array(folder: Path, maps: dict, key: tuple) -> np.ndarray:
    """A read-only view of one initializer's bytes in the bundle's (memory-mapped) data file."""
    location, offset, length, dtype, dims = key
    if location not in maps:
        maps[location] = np.memmap(folder / location, dtype=np.uint8, mode="r")
    return np.ndarray(dims, dtype=helper.tensor_dtype_to_np_dtype(dtype), buffer=maps[location][offset:offset + length])
