"""Per-backend int8 quantization of one level graph, through the libraries (no hand-written quantization).

- onnxruntime / tensorrt: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel int8 weights). The result is
  loaded with its data resolved and re-externalised by the caller into the bundle's shared ``weights.bin``.
- openvino: ``nncf.quantize`` (ModelType.TRANSFORMER) on the fp32 ONNX graph read by OpenVINO; saved as IR.
- weight-only (onnxruntime): ``MatMulNBitsQuantizer`` at 8 bits: int8 weights in blocks, float activations, no
  calibration images (ORT's weight-only path for LLMs; ``MatMulNBits`` is a com.microsoft op).
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

ONNX_METHODS = ("minmax", "entropy", "percentile")
WEIGHT_ONLY = "weight-only"  # a --method that calibrates nothing: int8 weights, float activations
DEFAULT_OPS = ("MatMul", "Gemm")
# Compute ops we report as kept in float (shape/index plumbing is not listed).
COMPUTE_OPS = {"MatMul", "Gemm", "Conv", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Gelu", "Softmax",
               "LayerNormalization", "ReduceMean", "ReduceL2", "Tanh", "Sigmoid", "Multiply", "Subtract", "Divide",
               "Power", "MVN", "Convolution", "Clip", "Clamp", "Concat"}
# ONNX op type -> OpenVINO op type, for --quantize-ops with NNCF's ignored scope.
OV_TYPES = {"Gemm": "MatMul", "Mul": "Multiply", "Sub": "Subtract", "Div": "Divide", "Conv": "Convolution",
            "LayerNormalization": "MVN", "Erf": "Gelu"}
OV_QUANTIZABLE = {"MatMul", "Add", "Multiply", "Subtract", "Divide", "Concat", "MVN", "Softmax", "Convolution",
                  "Gelu", "ReduceMean", "ReduceL2", "Power", "Sqrt"}


@dataclass(frozen=True)
class OnnxScheme:
    """Activation/weight settings for quantize_static."""

    activations: str  # "uint8" | "int8"
    activation_symmetric: bool
    weight_symmetric: bool = True
    per_channel: bool = True
    quantize_outputs: bool = True  # requantize MatMul/Gemm outputs (else their consumers read float)
    weight_matmuls_only: bool = False  # leave activation x activation MatMuls (attention QK^T, PV) float
    float_first_last: bool = False  # leave the patch embedding and the output projection float

    def describe(self) -> dict:
        return {"format": "QDQ", "weights": {"type": "int8", "per_channel": self.per_channel,
                                             "symmetric": self.weight_symmetric},
                "activations": {"type": self.activations, "symmetric": self.activation_symmetric},
                "quantize_outputs": self.quantize_outputs, "weight_matmuls_only": self.weight_matmuls_only,
                "float_first_last": self.float_first_last}

    def extra_options(self, ops: list[str]) -> dict:
        extra = {"ActivationSymmetric": self.activation_symmetric, "WeightSymmetric": self.weight_symmetric}
        if not self.quantize_outputs:
            extra["OpTypesToExcludeOutputQuantization"] = [o for o in ops if o in ("MatMul", "Gemm")]
        return extra


# onnxruntime (x86 CPU, measured on waveclip-demo: 1.7x faster than fp32 vs 0.8x for symmetric int8 activations, and
# the best embedding cosine): uint8 asymmetric activations, MatMul outputs not requantized, attention MatMuls float,
# patch embedding and output projection float (halves the embedding error for a negligible cost).
# tensorrt: explicit quantization wants symmetric int8 Q/DQ on the inputs of the weighted MatMuls; the rest runs in
# fp16 (fused attention) in an engine built with FP16 + INT8.
SCHEMES = {"onnxruntime": OnnxScheme("uint8", False, quantize_outputs=False, weight_matmuls_only=True,
                                     float_first_last=True),
           "tensorrt": OnnxScheme("int8", True, quantize_outputs=False, weight_matmuls_only=True,
                                  float_first_last=True)}


@dataclass(frozen=True)
class WeightOnlyScheme:
    """MatMulNBits settings: int8 weights, symmetric, one scale per ``block_size`` input rows of each column.
    ``accuracy_level`` 4: the kernel quantizes the activations to int8 per block on the fly and computes in int8
    (VNNI/AMX). Measured (AMD EPYC, AVX-512 VNNI, bench/bench_int8.py): 1.33-1.49x fp32's speed at waveclip-b16
    (QDQ 2.3-2.8x), 1.15-1.20x on the 3.5 M-parameter demo (blocks of 16: 0.93x). Level 1 (fp32 compute) agreed a
    little more on the demo (98.9-99.6% against 98.4-98.9%) but ran 3x slower than fp32."""

    block_size: int = 32
    accuracy_level: int = 4

    def describe(self) -> dict:
        return {"library": "onnxruntime.quantization.matmul_nbits_quantizer: MatMulNBitsQuantizer (round to nearest)",
                "format": "MatMulNBits (com.microsoft, weight-only)",
                "weights": {"type": "int8", "per_channel": False, "block_size": self.block_size, "symmetric": True},
                "activations": {"type": "float32",  # in the graph; level 4 quantizes them inside the kernel
                                "kernel_compute": "int8, activations quantized per block on the fly"
                                if self.accuracy_level == 4 else "float"},
                "accuracy_level": self.accuracy_level}


WEIGHT_ONLY_SCHEME = WeightOnlyScheme()


def quantize_weight_only(src: Path, scheme: WeightOnlyScheme = WEIGHT_ONLY_SCHEME) -> onnx.ModelProto:
    """Every MatMul with a constant weight of ``src`` -> MatMulNBits at 8 bits; returns the graph, data in memory."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    proto = onnx.load(str(src), load_external_data=True)
    # The patch embedding (export names its nodes /patch_embed*, /model/patch_embed* in the one-pass graph) stays
    # float, as in the split form, where it is a graph of its own: every graph then quantizes the same MatMuls.
    embed = [n.name for n in proto.graph.node if n.op_type == "MatMul" and "/patch_embed" in n.name]
    config = DefaultWeightOnlyQuantConfig(block_size=scheme.block_size, is_symmetric=True, bits=8,
                                          accuracy_level=scheme.accuracy_level)
    quantizer = MatMulNBitsQuantizer(proto, bits=8, block_size=scheme.block_size, is_symmetric=True,
                                     accuracy_level=scheme.accuracy_level, nodes_to_exclude=embed,
                                     algo_config=config)
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, log.level = log.level, logging.WARNING  # it logs every node it skips at INFO
    try:
        quantizer.process()
    finally:
        log.setLevel(level)
    return quantizer.model.model


def weight_only_summary(proto: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """(MatMuls made MatMulNBits, compute nodes left float) per op type, as :func:`onnx_op_summary`."""
    quant, flt = collections.Counter(), collections.Counter()
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            quant["MatMul"] += 1
        elif n.op_type in COMPUTE_OPS:
            flt[n.op_type] += 1
    return dict(sorted(quant.items())), dict(sorted(flt.items()))


def quantize_onnx(src: Path, reader, dst: Path, scheme: OnnxScheme, method: str, ops: list[str],
                  scratch: Path, skip_symbolic_shape: bool = False, keep_float: Sequence[str] = (),
                  ranges: Path | None = None) -> onnx.ModelProto:
    """quant_pre_process + quantize_static of ``src`` (external data resolved by path); returns the int8 graph with
    its data in memory (``dst`` is a scratch file). ``keep_float``: module paths (``blocks.3/mlp/c_fc``) whose
    MatMuls stay float; ``ranges``: ORT's calibration cache file, written on the first call and read by the next
    (the pre-processed graph is the same, so are its ranges)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    big = _data_bytes(src) > 1.5 * 2**30  # protobuf limit: keep >2 GiB graphs' data external
    pre = scratch / f"{src.stem}.pre.onnx"
    # The optimisation step (ORT_ENABLE_BASIC, standard ops) reads the shared weights.bin through the graph's path.
    quant_pre_process(str(src), str(pre), save_as_external_data=big, all_tensors_to_one_file=True,
                      external_data_location=pre.name + ".data", skip_symbolic_shape=skip_symbolic_shape)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    # (The QDQ quantizer ignores MatMulConstBOnly, so attention MatMuls are excluded by node name instead.)
    exclude = _float_matmuls(pre, scheme) + module_nodes(pre, keep_float)
    extra = scheme.extra_options(list(ops))
    if method != "minmax":
        # The histogram calibrators stack every item's tensors with np.asarray, which fails when shapes differ from
        # item to item (the split body's attention at every level's past length, a last partial batch). Striding
        # one item per collect_data call builds each histogram item by item and merges them (ORT's own option).
        extra["CalibStridedMinMax"] = 1
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their settings
        quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(ops),
                        nodes_to_exclude=exclude, per_channel=scheme.per_channel,
                        activation_type=qtype[scheme.activations], weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], use_external_data_format=big, extra_options=extra,
                        calibration_cache_path=ranges)
    # (No CalibMaxIntermediateOutputs: in onnxruntime 1.31 MinMaxCalibrater.collect_data drops the ranges collected
    # so far instead of merging them.)
    return onnx.load(str(dst))


def module_of(node_name: str) -> str:
    """``/blocks.3/mlp/c_fc/MatMul`` (``/model/blocks.3/...`` in the one-pass graph) -> ``blocks.3/mlp/c_fc``."""
    path = node_name.strip("/").removeprefix("model/")
    return path.rsplit("/", 1)[0] if "/" in path else ""


def module_nodes(path: Path, modules: Sequence[str]) -> list[str]:
    """Names of the MatMul/Gemm nodes of ``modules``: export names a module's nodes after its path, so one module
    path finds them in every form (level graphs, split body, one-pass graph)."""
    wanted = set(modules)
    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and module_of(n.name) in wanted]


def weighted_modules(path: Path) -> list[str]:
    """Module paths of the MatMuls with a constant weight, in graph order (``blocks.0/attn``, ``blocks.0/mlp/c_fc``)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    consts = _constants(graph)
    out: list[str] = []
    for n in graph.node:
        if n.op_type in ("MatMul", "Gemm") and any(i in consts for i in n.input) and module_of(n.name) not in out:
            out.append(module_of(n.name))
    return out


def onnx_op_summary(proto: onnx.ModelProto, ops: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """(nodes of the ``ops`` types that a DequantizeLinear feeds, compute nodes left float) per op type. (With output
    quantization the nodes after a quantized MatMul also read DequantizeLinear outputs, but compute in float.)"""
    dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quant, flt = collections.Counter(), collections.Counter()
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if n.op_type in ops and any(i in dq for i in n.input):
            quant[n.op_type] += 1
        elif n.op_type in COMPUTE_OPS:
            flt[n.op_type] += 1
    return dict(sorted(quant.items())), dict(sorted(flt.items()))


def _float_matmuls(path: Path, scheme: OnnxScheme) -> list[str]:
    """Names of the MatMul/Gemm nodes the scheme keeps float: activation x activation (attention) and/or the first
    (patch embedding: reads a ``patches`` input through no other MatMul, past the patch standardisation) and last
    (output projection: an ``embedding`` output follows it through no other MatMul; every level's in a one-pass
    graph). Found by data flow: names and the order of nodes differ from graph to graph."""
    graph = onnx.load(str(path), load_external_data=False).graph
    consts = _constants(graph)
    mms = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    weighted = [n for n in mms if any(i in consts for i in n.input)]
    names = [n.name for n in mms if n not in weighted] if scheme.weight_matmuls_only else []
    if scheme.float_first_last and weighted:
        readers: dict[str, list] = collections.defaultdict(list)
        writer = {}
        for n in graph.node:
            for i in n.input:
                readers[i].append(n)
            for o in n.output:
                writer[o] = n
        first = _reach({i.name for i in graph.input if i.name.startswith("patches")}, lambda t: readers.get(t, []),
                       lambda n: n.output)
        last = _reach({o.name for o in graph.output if o.name.startswith("embedding")},
                      lambda t: [writer[t]] if t in writer else [], lambda n: n.input)
        names += [n.name for n in weighted if any(i in first for i in n.input) or any(o in last for o in n.output)]
    return names


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Names of the graph's initializers and Constant outputs (a MatMul reading one has a weight)."""
    return {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def _reach(start: set[str], nodes_of, next_of) -> set[str]:
    """Tensors reached from ``start`` through ``nodes_of(tensor)`` and ``next_of(node)`` (along or against the data
    flow) without passing a MatMul/Gemm (nor a Shape: a shape is not data)."""
    seen, todo = set(start), list(start)
    while todo:
        for n in nodes_of(todo.pop()):
            if n.op_type in ("MatMul", "Gemm", "Shape"):
                continue
            for nxt in next_of(n):
                if nxt and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
    return seen


def _data_bytes(path: Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    total = path.stat().st_size
    for t in proto.graph.initializer:
        total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
    return total


def openvino_params(method: str, ops: list[str] | None, ignore_patterns: list[str] | None = None):
    """(advanced parameters, ignored scope) for nncf.quantize: minmax -> MINMAX ranges, percentile -> MEAN_QUANTILE,
    entropy -> HISTOGRAM (histogram-optimal ranges, NNCF's nearest to entropy calibration); ``ignore_patterns``:
    node-name regexes left float."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet as R

    ranges = {"minmax": R.MINMAX, "percentile": R.MEAN_QUANTILE, "entropy": R.HISTOGRAM}[method]
    types = [] if ops is None else sorted(OV_QUANTIZABLE - {OV_TYPES.get(o, o) for o in ops})
    ignored = (nncf.IgnoredScope(types=types, patterns=list(ignore_patterns or []), validate=False)
               if types or ignore_patterns else None)
    return AdvancedQuantizationParameters(activations_range_estimator_params=ranges), ignored


def quantize_openvino(src: Path, items: list[dict[str, np.ndarray]], dst_xml: Path, method: str,
                      ops: list[str] | None, preset: str = "mixed", progress: bool = True,
                      ignore_patterns: list[str] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """nncf.quantize the ONNX level graph read by OpenVINO, save IR (fp32 where not int8); returns the op summary."""
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    model = ov.Core().read_model(str(src))
    advanced, ignored = openvino_params(method, ops, ignore_patterns)
    presets = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    with contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO()):  # NNCF's rich bars
        q = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(items), preset=presets[preset], ignored_scope=ignored,
                          advanced_parameters=advanced)
    ov.save_model(q, str(dst_xml), compress_to_fp16=False)
    return openvino_op_summary(q)


def openvino_op_summary(model) -> tuple[dict[str, int], dict[str, int]]:
    """(nodes fed by a FakeQuantize per op type, compute nodes left float per op type) of an OpenVINO model."""
    quant, flt = collections.Counter(), collections.Counter()
    for op in model.get_ordered_ops():
        t = op.get_type_name()
        if t == "FakeQuantize":
            continue
        if t in COMPUTE_OPS and any(i.get_source_output().get_node().get_type_name() == "FakeQuantize"
                                    for i in op.inputs()):
            quant[t] += 1
        elif t in COMPUTE_OPS:
            flt[t] += 1
    return dict(sorted(quant.items())), dict(sorted(flt.items()))
