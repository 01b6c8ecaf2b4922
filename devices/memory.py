"""Resident memory of a loaded model, each in a fresh process (``python -m devices.memory SPEC_JSON``): VmRSS and
VmHWM of a process that loaded the model and ran one real image, so that nothing else the caller holds (its other
sessions, its data, torch) is counted. Host memory only: on a discrete GPU the engines' device memory is not in it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> dict[str, float | None]:
    """This process's resident (VmRSS) and peak resident (VmHWM) memory in MiB; None where /proc cannot tell."""
    fields: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    fields[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return {"rss_mib": fields.get("VmRSS"), "peak_mib": fields.get("VmHWM")}


def _image(path: str):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """In this process: load what ``spec`` names, run its image once, report the memory.

    ``{"what": "cascade", "bundle", "profile", "threads", "batch", "weights", "inference_precision", "image"}``: the
    gated cascade as ``devices.profile`` builds it; ``{"what": "vit", "path", "backend", "provider", "threads",
    "precision", "inference_precision", "spinning", "image"}``: a single-input ONNX baseline as it is timed."""
    if spec["what"] == "cascade":
        from devices.profile import make_backend
        from devices.profile_config import load_profile
        from runtime.bundle import load_bundle
        from runtime.cascade import Cascade

        bundle = load_bundle(spec["bundle"], verify=False)
        backend = make_backend(bundle, load_profile(spec["profile"]), spec["threads"], spec["batch"],
                               spec["weights"], spec["inference_precision"])
        Cascade(bundle, backend).classify([spec["image"]])
    elif spec["what"] == "vit":
        from devices.baseline import OnnxTimer

        timer = OnnxTimer(spec["path"], spec["backend"], spec["provider"], spec["threads"], spec["precision"],
                          spec["inference_precision"], spec["spinning"])
        timer.run(timer.feed(1, _image(spec["image"])[None]))
    else:
        raise ValueError(f"unknown memory probe {spec['what']!r}")
    import gc

    gc.collect()
    return rss_mib()


def in_fresh_process(spec: dict[str, Any], command: Sequence[str] = ("-m", "devices.memory"),
                     timeout: float = 900) -> dict[str, Any]:
    """``python COMMAND SPEC_JSON`` in a new process (default: :func:`probe`), which prints its memory as its last
    line of JSON; ``{"rss_mib": None, ..., "error": ...}`` when it fails."""
    try:
        out = subprocess.run([sys.executable, *command, json.dumps(spec)], capture_output=True, text=True, cwd=REPO,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rss_mib": None, "peak_mib": None, "error": f"no answer in {timeout:g} s"}
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["exit status %d" % out.returncode])[-1]
        return {"rss_mib": None, "peak_mib": None, "error": last}
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
