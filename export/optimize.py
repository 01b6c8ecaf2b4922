"""Optional graph optimisation, kept per graph only when it keeps the outputs and measurably pays.

The pass is ONNX Runtime's ORT_ENABLE_BASIC level saved offline: constant folding and redundant-node elimination that
keep standard ONNX ops, so the graphs stay portable to OpenVINO and TensorRT (the EXTENDED/transformers fusions
emit com.microsoft ops and are left to each runtime's own load-time optimiser).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

PASS = "onnxruntime ORT_ENABLE_BASIC (offline, standard ops only)"
MIN_SPEEDUP = 1.05
MAX_DIFF = 1e-5


def _save(proto: onnx.ModelProto, path: Path) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # onnx.save moves the data of the proto it is given
    onnx.save(copy, str(path), save_as_external_data=True, location=path.name + ".data")


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _median_ms(sessions: list[ort.InferenceSession], feeds: dict, runs: int, budget_s: float = 0.5) -> list[float]:
    """Median latency of each session, runs interleaved so that load from other processes hits all alike; at least
    ``runs`` rounds, more (up to 10x) for fast graphs so the rounds take about ``budget_s``."""
    start = time.perf_counter()
    for s in sessions:
        s.run(None, feeds)
    once = time.perf_counter() - start
    runs = int(min(10 * runs, max(runs, budget_s / max(once, 1e-6))))
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for s, t in zip(sessions, times):
            start = time.perf_counter()
            s.run(None, feeds)
            t.append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e3 for t in times]


def optimize_graph(proto: onnx.ModelProto, inputs: list[dict], threads: int = 1, runs: int = 20
                   ) -> tuple[onnx.ModelProto, dict]:
    """Try the pass on one graph (weights in memory). Returns (graph to keep, record)."""
    rng = np.random.default_rng(0)
    feeds = {i["name"]: rng.standard_normal([1 if d == "batch" else d for d in i["shape"]]).astype(np.float32)
             for i in inputs}
    with tempfile.TemporaryDirectory(prefix="waveclip-opt-") as tmp:
        src, dst = Path(tmp) / "src.onnx", Path(tmp) / "opt.onnx"
        _save(proto, src)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(dst)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        opts.log_severity_level = 3
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        candidate = onnx.load(str(dst), load_external_data=True)
        base, opt = _session(src, threads), _session(dst, threads)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(base.run(None, feeds), opt.run(None, feeds)))
        base_ms, opt_ms = _median_ms([base, opt], feeds, runs)
    speedup = base_ms / opt_ms
    keep = diff <= MAX_DIFF and speedup >= MIN_SPEEDUP
    record = {"nodes": [len(proto.graph.node), len(candidate.graph.node)], "baseline_ms": round(base_ms, 3),
              "optimized_ms": round(opt_ms, 3), "speedup": round(speedup, 3), "max_abs_diff": diff, "kept": keep}
    return (candidate if keep else proto), record


def summarize(records: list[dict], threads: int) -> dict:
    """The manifest's ``optimization`` entry."""
    kept = [r for r in records if r["kept"]]
    if not records:
        return {"applied": [], "note": "none: disabled with --no-optimize"}
    note = (f"kept where median batch-1 latency improved >= {MIN_SPEEDUP}x with outputs within {MAX_DIFF:g}; "
            f"timed with {threads} thread(s)")
    if not kept:
        note = ("none: it did not pay (ONNX Runtime applies the same rewrites when it loads a graph); " + note)
    return {"applied": [PASS] if kept else [], "tried": PASS, "levels": records, "note": note}
