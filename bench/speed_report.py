"""bench/speed.py's report: the per-setup summary of one run (ratios to the ViT at the same backend and precision,
the expected mix from the exit costs, throughput, resident memory) and its markdown table."""
from __future__ import annotations

import numpy as np

from runtime.timing import expected_ms


def summarize(run: list, t1: dict, tb: dict, mem: dict, mix: np.ndarray, args, L: int, per_call: int) -> dict:
    """The report of one run: per setup its timings (ms per image), ratios to its ViT row, throughput and memory."""
    def stat(v: list[float]) -> dict:
        return {"p50_ms": round(float(np.median(v)), 2), "mean_ms": round(float(np.mean(v)), 2), "runs": len(v)}

    rows = []
    for s in run:
        vit = stat(t1[f"{s.vit_row}|vit"])
        costs = [stat(t1[f"{s.label}|exit{k}"]) for k in range(L)]
        measured = stat(t1[f"{s.label}|mix"])
        exp = expected_ms(mix, [c["mean_ms"] for c in costs])
        vit_mem = mem.get(f"{s.vit_row}|vit", {}).get("rss_mib")
        casc_mem = mem.get(s.label, {}).get("rss_mib")
        row = {"setup": s.label, "agreement_top1": s.agreement, "vit": vit, "exit_costs": costs, "mix": measured,
               "expected_mix_ms": round(exp, 2),
               "expected_vs_measured": round(exp / measured["mean_ms"], 3),
               "ratios": {"level0_vs_vit": round(costs[0]["mean_ms"] / vit["mean_ms"], 3),
                          "always_full_vs_vit": round(costs[-1]["mean_ms"] / vit["mean_ms"], 3),
                          "mix_vs_vit": round(measured["mean_ms"] / vit["mean_ms"], 3)},
               "memory": {"cascade": mem.get(s.label), "vit": mem.get(f"{s.vit_row}|vit"),
                          "one_pass": mem.get(f"{s.label}|onepass"),
                          "ratio": round(casc_mem / vit_mem, 3) if casc_mem and vit_mem else None}}
        if f"{s.label}|onepass" in t1:
            row["one_pass"] = stat(t1[f"{s.label}|onepass"])
            row["ratios"]["one_pass_vs_vit"] = round(row["one_pass"]["mean_ms"] / vit["mean_ms"], 3)
        if f"{s.label}|mix" in tb:
            vb = float(np.mean(tb[f"{s.vit_row}|vit"]))
            cb = float(np.mean(tb[f"{s.label}|mix"]))
            row["throughput"] = {"batch": args.batch, "vit_images_per_s": round(args.batch * 1e3 / vb, 2),
                                 "mix_images_per_s": round(args.batch * 1e3 / cb, 2), "ratio": round(vb / cb, 3)}
            if f"{s.label}|pooled" in tb:
                pb = float(np.mean(tb[f"{s.label}|pooled"]))
                row["throughput"].update(pooled_images_per_s=round(args.batch * 1e3 / pb, 2),
                                         pooled_ratio=round(vb / pb, 3))
        rows.append(row)
    from devices.machine import describe, machine_record

    return {"tool": "bench/speed.py", "mix": [round(float(m), 4) for m in mix], "threads": args.threads,
            "rounds": args.rounds, "images_per_timed_call": per_call, "batch": args.batch,
            "machine": describe(machine_record(args.threads)), "rows": rows}


def format_table(r: dict) -> str:
    """The report as the README's markdown table and its legend."""
    mix = "/".join(f"{100 * m:g}" for m in r["mix"])
    lines = [f"batch 1, {r['threads']} threads, {r['rounds']} rounds interleaved within each backend, "
             f"{r['images_per_timed_call']} images a timed call; machine: {r['machine']}", "",
             f"| backend / precision | top-1 agree | ViT-B-16 ms | level 0 ms | always-full ms (one pass) | "
             f"cascade {mix} ms (expected) | "
             f"level 0 / ViT | always-full / ViT (one pass) | cascade / ViT | b{r['batch']} img/s ViT → cascade "
             "(ratio) | RSS MiB ViT → cascade (ratio) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        c, q, m, t = row["exit_costs"], row["ratios"], row["memory"], row.get("throughput")
        tp = (f"{t['vit_images_per_s']:.1f} → {t['mix_images_per_s']:.1f} ({t['ratio']:.2f}x)"
              + (f"; pooled {t['pooled_images_per_s']:.1f} ({t['pooled_ratio']:.2f}x)" if "pooled_ratio" in t else "")
              if t else "-")
        mm = (f"{m['vit']['rss_mib']:.0f} → {m['cascade']['rss_mib']:.0f} ({m['ratio']:.2f}x)"
              if m["ratio"] else "-")
        if m["ratio"] and (m.get("one_pass") or {}).get("rss_mib"):
            mm += f"; gate off (one pass) {m['one_pass']['rss_mib']:.0f} ({m['one_pass']['rss_mib'] / m['vit']['rss_mib']:.2f}x)"
        one = row.get("one_pass")
        full_ms = f"{c[-1]['mean_ms']:.1f}" + (f" ({one['mean_ms']:.1f})" if one else "")
        full_x = f"{q['always_full_vs_vit']:.2f}x" + (f" ({q['one_pass_vs_vit']:.2f}x)" if one else "")
        lines.append(f"| {row['setup']} | {row['agreement_top1']:.0%} | {row['vit']['mean_ms']:.1f} | "
                     f"{c[0]['mean_ms']:.1f} | {full_ms} "
                     f"| {row['mix']['mean_ms']:.1f} ({row['expected_mix_ms']:.1f}) | {q['level0_vs_vit']:.2f}x | "
                     f"{full_x} | {q['mix_vs_vit']:.2f}x | {tp} | {mm} |")
    lines += ["", "Means of per-image latency (model time, preprocessing excluded). 'expected' = sum over k of "
              "P(exit at k) x the mean cost of an image exiting at k (the cascade forced to exit there), the cost "
              "model of calibration.gate --budget-ms. always-full (one pass): every level from the bundle's "
              "one-pass graph (export/full.py), what the runtime runs when no image can exit early. top-1 agree: "
              "the lowest, over levels, share of the images whose head top-1 matches the first setup's (fp32) at "
              f"that level. b{r['batch']}: batch by batch, and pooled (runtime.stream: undecided images wait for "
              "later batches' at the same level, so every level runs full batches). RSS: VmRSS of a fresh process "
              "holding the loaded model, after its first image (the cascade's sessions; gate off: the runtime with "
              "no early exit possible, the one-pass session alone)."]
    return "\n".join(lines)
