"""Reports of a gate calibration: the Pareto curve (CSV + PNG) and a short table."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from calibration.gate_search import NEVER, Choice, LevelStats, pareto_front, simulate_many
from runtime.atomic import write_atomic

METRICS = ("expected_gflops", "expected_ms", "accuracy", "agreement")


def curve_rows(choice: Choice, fit: LevelStats, holdout: LevelStats) -> list[dict]:
    """Rows of gate_curve.csv: the Pareto front(s) on the fit split (by GFLOPs, and by latency when known), the
    always-exit-at-level-k points and the chosen point, each with its metrics on the fit and held-apart splits."""
    grid, L = choice.grid, fit.levels
    groups = [("front_gflops", grid.thresholds[pareto_front(grid, choice.target.reference, "gflops")])]
    if grid.ms is not None:
        groups.append(("front_ms", grid.thresholds[pareto_front(grid, choice.target.reference, "ms")]))
    fixed = np.full((L, L - 1), NEVER)
    for k in range(L - 1):
        fixed[k, k] = 0.0
    groups += [(f"exit_at_{k}", fixed[k:k + 1]) for k in range(L)]
    groups.append(("chosen", np.array([choice.thresholds])))
    rows = []
    for name, T in groups:
        cols = {}
        for split, stats in (("fit", fit), ("holdout", holdout)):
            g = simulate_many(stats, T) if stats.n else None
            for m in METRICS:
                v = None if g is None else {"expected_gflops": g.gflops, "expected_ms": g.ms,
                                            "accuracy": g.accuracy, "agreement": g.agreement}[m]
                cols[f"{split}_{m}"] = [None] * len(T) if v is None else [round(float(x), 6) for x in v]
        rows += [{"curve": name, "thresholds": " ".join(f"{t:.6g}" for t in T[i]),
                  **{c: v[i] for c, v in cols.items()}} for i in range(len(T))]
    return rows


def write_curve_csv(path: Path, rows: list[dict]) -> None:
    keep = [c for c in rows[0] if any(r[c] is not None for r in rows)]  # no ms / accuracy columns when unknown

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, keep, extrasaction="ignore")
            w.writeheader()
            w.writerows({c: "" if r[c] is None else r[c] for c in keep} for r in rows)
    write_atomic(path, write)


def plot_curve(path: Path, rows: list[dict], reference: str, title: str) -> None:
    """Score vs expected GFLOPs (and vs latency when known): front on fit, same thresholds on held-apart, the
    always-exit-at-k points and the chosen point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = "accuracy" if reference == "labels" else "agreement"
    axes = ["gflops"] + (["ms"] if any(r["curve"] == "front_ms" for r in rows) else [])
    fig, axs = plt.subplots(1, len(axes), figsize=(6.4 * len(axes), 4.6), squeeze=False)
    for ax, cost in zip(axs[0], axes):
        x, y = f"expected_{cost}", score

        def pts(curve: str, split: str) -> tuple[list, list]:
            sel = [r for r in rows if r["curve"].startswith(curve) and r[f"{split}_{x}"] is not None]
            return [r[f"{split}_{x}"] for r in sel], [r[f"{split}_{y}"] for r in sel]

        ax.plot(*pts(f"front_{cost}", "fit"), "o-", ms=3, label="Pareto front (fit)")
        if rows[0]["holdout_agreement"] is not None:
            ax.plot(*pts(f"front_{cost}", "holdout"), ".--", ms=3, alpha=0.7, label="same thresholds (held-apart)")
            ax.plot(*pts("chosen", "holdout"), "*", ms=14, color="tab:orange", label="chosen (held-apart)")
        ex, ey = pts("exit_at_", "fit")
        ax.plot(ex, ey, "s", color="grey", label="always exit at level k (fit)")
        for k, (a, b) in enumerate(zip(ex, ey)):
            ax.annotate(f"L{k}", (a, b), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.plot(*pts("chosen", "fit"), "*", ms=14, color="tab:red", label="chosen (fit)")
        ax.set_xlabel("expected GFLOPs / image" if cost == "gflops" else "expected latency / image (ms)")
        ax.set_ylabel(score if score == "accuracy" else "agreement with the full model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def format_table(fit: dict, holdout: dict | None) -> str:
    """One line per split: images, full accuracy, accuracy, agreement, GFLOPs, saved, ms, exit histogram."""
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"{'split':<11}{'images':>7}{'full acc':>10}{'accuracy':>10}{'agreement':>11}{'GFLOPs':>9}"
             f"{'saved':>8}{'ms':>8}  exits per level"]
    for name, m in (("fit", fit), ("held-apart", holdout)):
        if m is None:
            lines.append(f"{name:<11}{0:>7}")
            continue
        lines.append(f"{name:<11}{m['images']:>7}{f(m['full_accuracy'], '.4f'):>10}{f(m['accuracy'], '.4f'):>10}"
                     f"{f(m['agreement'], '.4f'):>11}{f(m['expected_gflops'], '.4g'):>9}"
                     f"{f(m['compute_saved'], '.1%'):>8}{f(m['expected_ms'], '.3g'):>8}  "
                     + "/".join(map(str, m["exit_histogram"])))
    return "\n".join(lines)
