"""Rendering a ``devices.profile`` report: the markdown tables and the latency plot (matplotlib)."""
from __future__ import annotations

import os

import numpy as np

from devices.machine import describe
from runtime.atomic import write_atomic

STAT_KEYS = ("min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}x"


def format_markdown(r: dict) -> str:
    """The report as Markdown tables."""
    s, b, d = r["settings"], r["bundle"], r["device"]
    lines = [f"# {b['name']} ({b['precision']}) on {d['name']}", "",
             f"- backend: {s['backend']} / {s['execution_provider']}, threads: {s['threads'] or 'all'}, "
             f"runs: {s['runs']} after {s['warmup']} warm-up, batch B = {s['batch']}",
             f"- data: {s['data']} ({s['images']} images); thresholds: {', '.join(f'{t:g}' for t in r['thresholds'])}",
             f"- machine: {describe(r['machine'])}", "",
             "## Each level alone (batch 1, real image, real KV cache)", "",
             "| level | GFLOPs | min ms | p50 ms | p90 ms | p99 ms | max ms | mean ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in r["levels"]:
        lines.append(f"| {lv['level']} | {_g(lv['gflops'])} | " + " | ".join(_f(lv[k]) for k in STAT_KEYS) + " |")
    c, full, vit = r["cascade"], r["baselines"]["always_full"], r["baselines"]["vit_b16"]
    lines += ["", "## End to end (batch 1, per image)", "",
              "| what | GFLOPs | min ms | p50 ms | p90 ms | p99 ms | max ms | mean ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def row(name: str, g: float | None, st: dict) -> str:
        return f"| {name} | {_g(g)} | " + " | ".join(_f(st.get(k)) for k in STAT_KEYS) + " |"
    e = r["expected_latency"]
    lines += [row("preprocess (decode, resize, wavelet)", None, c["preprocess"]),
              row("cascade (bundle thresholds)", e["expected_gflops"], c["cascade"]),
              row("preprocess + cascade", None, c["total"]),
              row("always-full WaveCLIP (all levels)", full["gflops"], full["cascade"])]
    if not vit["skipped"]:
        lines.append(row(f"{vit['name']} baseline", vit.get("gflops"), vit["batch1"]))
    m = r.get("exit_mix")
    if m:
        lines.append(row(f"cascade at exit mix {'/'.join(f'{100 * x:g}' for x in m['mix'])} (forced)", None,
                         m["cascade"]))
    lines += ["", f"Expected cascade latency from the exit rates: {_f(e['expected_ms'])} ms "
                  f"(sum of P(exit at k) x cost of exiting at k); measured mean: {_f(e['measured_mean_ms'])} ms."]
    if m:
        lines.append(f"At the forced exit mix: expected {_f(m['expected_ms'])} ms, measured mean "
                     f"{_f(m['cascade']['mean_ms'])} ms (expected / measured {_x(m['expected_vs_measured'])}); "
                     f"batch {m['throughput']['batch']}: {_f(m['throughput']['images_per_s'], 1)} images/s.")
    lines += ["", "## Cost of exiting at each level (batch 1, real cascade, exit forced)", "",
              "| exit at | p50 ms | mean ms |", "|---:|---:|---:|"]
    lines += [f"| {c['level']} | {_f(c['p50_ms'])} | {_f(c['mean_ms'])} |" for c in r.get("exit_costs", [])]
    lines += ["",
              "## Exits", "", "| level | images | fraction | reached |", "|---:|---:|---:|---:|"]
    lines += [f"| {h['level']} | {h['count']} | {h['fraction']:.3f} | {h['reach_fraction']:.3f} |"
              for h in r["exit_histogram"]]
    t = r["throughput"]
    lines += ["", f"## Throughput (batch {t['batch']})", "", "| what | p50 ms / batch | mean ms / batch | images/s |",
              "|---|---:|---:|---:|"]
    for key, name in (("cascade", "cascade"), ("always_full", "always-full WaveCLIP"),
                      ("vit_b16", f"{vit.get('name')} baseline")):
        if key in t:
            x = t[key]
            lines.append(f"| {name} | {_f(x['p50_ms'])} | {_f(x['mean_ms'])} | {_f(x['images_per_s'], 1)} |")
    q = r["ratios"]
    q, n = r["ratios"], vit.get("name")
    lines += ["", "## Ratios", "", f"Latency at batch 1, model time (preprocessing excluded); < 1 means faster than "
              f"the reference. Throughput at batch {t['batch']}; > 1 means more images/s.", "",
              "| ratio | on means | on p50s |", "|---|---:|---:|"]
    for key, name in (("cascade_vs_vit_b16", f"cascade / {n}"), ("always_full_vs_vit_b16", f"always-full / {n}"),
                      ("cascade_vs_always_full", "cascade / always-full"), ("level0_vs_vit_b16", f"level 0 / {n}")):
        lines.append(f"| {name} | {_x(q[key])} | {_x(q['p50'][key])} |")
    if "exit_mix_vs_vit_b16" in q:
        lines.append(f"| cascade at exit mix / {n} | {_x(q['exit_mix_vs_vit_b16'])} | |")
        lines.append(f"| throughput: exit mix / {n} | {_x(q['throughput_exit_mix_vs_vit_b16'])} | |")
    for key, name in (("throughput_cascade_vs_vit_b16", f"throughput: cascade / {n}"),
                      ("throughput_always_full_vs_vit_b16", f"throughput: always-full / {n}"),
                      ("throughput_cascade_vs_always_full", "throughput: cascade / always-full")):
        lines.append(f"| {name} | {_x(q[key])} | |")
    mem = r.get("memory")
    if mem:
        def mib(x: dict | None) -> str:
            return "-" if not x else f"{_f(x['rss_mib'], 0)} MiB" if x.get("rss_mib") else f"failed ({x.get('error')})"

        lines += ["", "## Resident memory", "", f"{mem['basis']}: the cascade {mib(mem['cascade'])}, "
                  f"{n} {mib(mem['vit_b16'])} (cascade / {n}: {_x(q.get('memory_cascade_vs_vit_b16'))})."]
    if vit.get("note"):
        lines += ["", f"Baseline: {vit['note']}."]
    if r["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def plot_png(r: dict, path: str | os.PathLike) -> None:
    """Latency per level vs cascade vs always-full vs ViT-B-16 (batch 1), and throughput at batch B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, p50, p90, colors = [], [], [], []
    for lv in r["levels"]:
        names.append(f"level {lv['level']} alone")
        p50.append(lv["p50_ms"])
        p90.append(lv["p90_ms"])
        colors.append("#9ecae1")
    c, full, vit = r["cascade"]["cascade"], r["baselines"]["always_full"]["cascade"], r["baselines"]["vit_b16"]
    for name, st, col in (("cascade", c, "#3182bd"), ("always-full", full, "#756bb1")):
        names.append(name)
        p50.append(st["p50_ms"])
        p90.append(st["p90_ms"])
        colors.append(col)
    if not vit["skipped"]:
        names.append(vit["name"])
        p50.append(vit["batch1"]["p50_ms"])
        p90.append(vit["batch1"]["p90_ms"])
        colors.append("#e6550d")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 2.2),
                                  gridspec_kw={"width_ratios": [2, 1]})
    y = np.arange(len(names))[::-1]
    err = np.array([np.zeros(len(p50)), np.maximum(np.array(p90) - np.array(p50), 0)])
    ax.barh(y, p50, xerr=err, color=colors, capsize=3)
    ax.set_yticks(y, names)
    for yi, v, w in zip(y, p50, p90):
        ax.text(max(v, w), yi, f"  {v:.1f}", va="center", fontsize=8)
    ax.axvline(r["expected_latency"]["expected_ms"], color="#3182bd", ls="--", lw=1, label="expected from exit rates")
    ax.set_xlabel("ms at batch 1 (bar: p50, whisker: p90)")
    ax.legend(loc="lower right", fontsize=8)
    t = r["throughput"]
    tn = [("cascade", "cascade", "#3182bd"), ("always_full", "always-full", "#756bb1"),
          ("vit_b16", vit.get("name") or "baseline", "#e6550d")]
    tn = [x for x in tn if x[0] in t]
    y2 = np.arange(len(tn))[::-1]
    vals = [t[k]["images_per_s"] for k, _, _ in tn]
    ax2.barh(y2, vals, color=[col for _, _, col in tn])
    ax2.set_yticks(y2, [n for _, n, _ in tn])
    for yi, v in zip(y2, vals):
        ax2.text(v, yi, f" {v:.1f}", va="center", fontsize=8)
    ax2.set_xlabel(f"images/s at batch {t['batch']}")
    s = r["settings"]
    fig.suptitle(f"{r['bundle']['name']} ({r['bundle']['precision']}) on {r['device']['name']}: {s['backend']}, "
                 f"{s['threads'] or 'all'} threads, {s['runs']} runs", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


# --- CLI ----------------------------------------------------------------------------------------------------------
