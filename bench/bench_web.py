"""Per-level latency of the web app (onnxruntime-web WASM in headless Chromium) against the Python runtime.

    python bench/bench_web.py [BUNDLE] [--runs 50] [--threads 1 2] [--screenshot docs/web-demo.png]

Both sides get the same decoded RGB of the shipped images (the page decodes the file itself; Pillow decodes it for
Python), run every level (gate forced open) at batch 1, and time each level including the head and gate, warm-up
excluded ("level k": the cascade's time for that level, head and gate included; "graph only": the level's session
run alone, fed the real KV cache). Medians over images x runs, side by side in one run. Needs node,
apps/web/node_modules and chromium.
"""
from __future__ import annotations

import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.bundle import load_bundle  # noqa: E402
from runtime.cascade import Cascade  # noqa: E402
from runtime.cli import ArgumentParser, integer, output_file  # noqa: E402
from runtime.preprocess import image_to_array, load_image  # noqa: E402
from runtime.timing import level_times, time_calls  # noqa: E402
from runtime.wavelet import images_to_levels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "apps" / "web"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def python_side(bundle_dir: Path, images: list[Path], threads: int, runs: int) -> dict:
    bundle = load_bundle(bundle_dir)
    spec = bundle.preprocessing
    cascade = Cascade(bundle, "onnxruntime", thresholds=2.0, threads=threads)  # a margin never reaches 2: all levels
    per_level: list[list[float]] = [[] for _ in range(bundle.num_levels)]
    pre: list[float] = []
    graph_only: list[list[float]] = [[] for _ in range(bundle.num_levels)]
    for path in images:
        rgb = load_image(path)
        levels = images_to_levels(image_to_array(rgb, spec)[None], spec)
        pre += time_calls(lambda: images_to_levels(image_to_array(rgb, spec)[None], spec), runs, warmup=1)
        cascade.classify_levels(levels)  # warm-up
        for _ in range(runs):
            for k, ms in enumerate(cascade.classify_levels(levels)[0].level_ms):
                per_level[k].append(ms)
        for k, times in enumerate(level_times(cascade.backend, levels, runs, warmup=1)):
            graph_only[k] += times
    return {"preprocess": pre, "perLevel": per_level, "graphOnly": graph_only}


def browser_side(node: str, chromium: str, images: list[Path], threads: list[int], runs: int,
                 screenshot: Path | None, work: Path) -> dict:
    cases = []
    for t in threads:
        uploads = [{"name": f"t{t}:{p.name}", "file": str(p), "bench": runs} for p in images]
        cases.append({"name": f"t{t}", "query": f"?ep=wasm&threads={t}", "uploads": uploads})
    if screenshot:
        cases.append({"name": "shot", "uploads": [{"name": "shot:img", "file": str(images[0]),
                                                   "screenshot": str(screenshot.resolve())}]})
    (work / "cases.json").write_text(json.dumps(cases))
    server = subprocess.Popen([node, str(WEB / "serve.js"), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split(" at ")[1].strip()
        subprocess.run([node, str(WEB / "test" / "browser.js"), "--chromium", chromium, "--url", url,
                        "--cases", str(work / "cases.json"), "--out", str(work / "out.json")], check=True, cwd=WEB,
                       stdout=subprocess.DEVNULL)
    finally:
        server.terminate()
        server.wait(timeout=10)
    out = {c["name"]: c for c in json.loads((work / "out.json").read_text())}
    result = {}
    for t in threads:
        benches = [out[f"t{t}:{p.name}"].get("bench") for p in images]
        if not all(benches):
            raise SystemExit(f"error: the page did not classify every image: {out}")
        levels = len(benches[0]["perLevel"])
        result[t] = {"preprocess": [ms for b in benches for ms in b["preprocess"]],
                     "perLevel": [[ms for b in benches for ms in b["perLevel"][k]] for k in range(levels)],
                     "graphOnly": [[ms for b in benches for ms in b["graphOnly"][k]] for k in range(levels)],
                     "threads_reported": benches[0]["threads"], "isolated": benches[0]["isolated"]}
    return result


def main() -> int:
    p = ArgumentParser(prog="python bench/bench_web.py", description=__doc__.splitlines()[0])
    p.add_argument("bundle", nargs="?", default=str(REPO / "models" / "waveclip-demo" / "bundle"))
    p.add_argument("--runs", type=integer(1), default=50, help="timed runs per image (default 50)")
    p.add_argument("--threads", type=integer(1), nargs="+", default=[1, 2],
                   help="thread counts to compare (default 1 2)")
    p.add_argument("--screenshot", type=output_file,
                   help="also save a screenshot of the page with a result (PNG)")
    args = p.parse_args()
    node = shutil.which("node")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not node or not chromium or not (WEB / "node_modules").is_dir():
        print("error: needs node, chromium and `npm ci` in apps/web", file=sys.stderr)
        return 2
    images = sorted((REPO / "examples" / "images").glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        browser = browser_side(node, chromium, images, args.threads, args.runs,
                               Path(args.screenshot) if args.screenshot else None, Path(tmp))
    med = statistics.median
    print(f"CPU: {cpu_name()}; {len(images)} images x {args.runs} runs, batch 1, every level run; median ms")
    print("| threads | step | Python onnxruntime | browser WASM | browser / Python |")
    print("|---|---|---|---|---|")
    for t in args.threads:
        py = python_side(Path(args.bundle), images, t, args.runs)
        web = browser[t]
        rows = [("preprocess", py["preprocess"], web["preprocess"])]
        rows += [(f"level {k}", py["perLevel"][k], web["perLevel"][k]) for k in range(len(py["perLevel"]))]
        rows.append(("all levels", [sum(x) for x in zip(*py["perLevel"])], [sum(x) for x in zip(*web["perLevel"])]))
        rows += [(f"level {k} graph only", py["graphOnly"][k], web["graphOnly"][k]) for k in range(len(py["graphOnly"]))]
        for name, a, b in rows:
            print(f"| {t} (page: {web['threads_reported']}) | {name} | {med(a):.3f} | {med(b):.3f} | "
                  f"{med(b) / med(a):.2f}x |")
    return 0


if __name__ == "__main__":
    from cli_errors import run_main

    sys.exit(run_main(main))
