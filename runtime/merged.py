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


def merge_levels(bundle: Bundle) -> tuple[onnx.ModelProto, list[tuple[str, tuple]]]:
    """The merged graph (weights external, not loaded) and, for each outer initializer, its name and the region of
    the bundle file that holds it: (location, offset, length, onnx dtype, dims)."""
    shared: dict[tuple, str] = {}
    branches, opsets, ir_version = [], {}, 0
    outputs: list[onnx.ValueInfoProto] = []
    kv_inputs: list[onnx.ValueInfoProto] = []
    patches_input = None
    for k in range(bundle.num_levels):
        model = onnx.load(str(bundle.level_path(k)), load_external_data=False)
        ir_version = max(ir_version, model.ir_version)
        for op in model.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
        g = model.graph
        inputs = {i.name for i in g.input}
        if k == 0:
            patches_input = next(i for i in g.input if i.name == "patches")
            outputs = [onnx.ValueInfoProto(name=o.name, type=o.type) for o in g.output]
        elif not kv_inputs:
            kv_inputs = [i for i in g.input if i.name != "patches"]
        rename: dict[str, str] = {}
        local_inits = []
        for t in g.initializer:
            key = external_key(t)
            if key is None:  # small inline constants stay in the branch
                rename[t.name] = f"L{k}/{t.name}"
                t.name = rename[t.name]
                local_inits.append(t)
            else:
                rename[t.name] = shared.setdefault(key, f"w/{len(shared)}")
        for node in g.node:
            for name in node.output:
                rename.setdefault(name, f"L{k}/{name}")
        for out in g.output:  # a graph output that is directly an input or initializer goes through an Identity
            rename.setdefault(out.name, f"L{k}/{out.name}")
        for name in inputs:
            rename.pop(name, None)
        _rename_graph(g, rename)
        body = helper.make_graph(list(g.node), f"level{k}", [], [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in g.output],
                                 local_inits)
        branches.append(body)
    out_names = [o.name for o in outputs]

    def chain(k: int) -> onnx.GraphProto:
        """Branch graph that runs level k if ``level == k`` else the levels after it."""
        if k == len(branches) - 1:
            return branches[k]
        cond, names = f"is_level{k}", [f"sel{k}/{n}" for n in out_names]
        nodes = [helper.make_node("Constant", [], [f"const{k}"], value=helper.make_tensor(f"c{k}", TensorProto.INT64, [], [k])),
                 helper.make_node("Equal", [LEVEL_INPUT, f"const{k}"], [cond]),
                 helper.make_node("If", [cond], names, then_branch=branches[k], else_branch=chain(k + 1))]
        return helper.make_graph(nodes, f"select{k}", [], [helper.make_tensor_value_info(n, o.type.tensor_type.elem_type, None) for n, o in zip(names, outputs)])

    top = chain(0)
    # the outermost selector's outputs carry the level graphs' output names
    _rename_graph(top, {o.name: n for o, n in zip(top.output, out_names)})
    initializers = []
    regions = []
    for key, name in shared.items():
        location, offset, length, dtype, dims = key
        t = TensorProto(name=name, data_type=dtype, dims=list(dims), data_location=TensorProto.EXTERNAL)
        for kk, vv in (("location", location), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = kk, vv
        initializers.append(t)
        regions.append((name, key))
    level_in = helper.make_tensor_value_info(LEVEL_INPUT, TensorProto.INT64, [])
    pdims = patches_input.type.tensor_type.shape.dim
    patches = helper.make_tensor_value_info("patches", patches_input.type.tensor_type.elem_type,
                                            ["batch", pdims[1].dim_value or "tokens", "channels"])
    kv = [helper.make_tensor_value_info(i.name, i.type.tensor_type.elem_type, ["batch", i.type.tensor_type.shape.dim[1].dim_value or "heads", "past", i.type.tensor_type.shape.dim[3].dim_value or "head_dim"]) for i in kv_inputs]
    outs = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in outputs]
    graph = helper.make_graph(list(top.node), "waveclip_levels", [level_in, patches, *kv], outs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = ir_version
    return model, regions


def region_array(folder: Path, maps: dict, key: tuple) -> np.ndarray:
    """A read-only view of one initializer's bytes in the bundle's (memory-mapped) data file."""
    location, offset, length, dtype, dims = key
    if location not in maps:
        maps[location] = np.memmap(folder / location, dtype=np.uint8, mode="r")
    return np.ndarray(dims, dtype=helper.tensor_dtype_to_np_dtype(dtype), buffer=maps[location][offset:offset + length])
