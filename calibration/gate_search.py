"""Gate threshold search on per-level measurements (numpy only): exact, vectorised evaluation of threshold grids.

Every image was run through every level once; for thresholds ``t`` an image exits at the first level ``k`` with
``margin_k >= t_k`` (the last level always exits), so accuracy, agreement with the full model and expected cost of
any threshold combination are sums over images, computed for a whole grid of combinations with a few matmuls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NEVER = 1.01  # a threshold above any softmax margin: never exit at that level
TOL = 1e-9


class GateError(ValueError):
    """A calibration that cannot be done (impossible target, unusable data); the message is one line."""


@dataclass
class LevelStats:
    """Per image per level, measured once: predicted head column, softmax margin; plus labels and level costs."""

    pred: np.ndarray  # [L, N] int: predicted column of the head
    margin: np.ndarray  # [L, N] float: softmax top-1 minus top-2
    target: np.ndarray | None  # [N] int: the label's column, None without labels
    cum_gflops: np.ndarray  # [L] cumulative GFLOPs of exiting at each level
    cum_ms: np.ndarray | None = None  # [L] cumulative latency (ms) of exiting at each level, when known
    paths: list[str] = field(default_factory=list)
    skipped: int = 0  # unreadable images
    dropped: int = 0  # images whose label is not in the head

    @property
    def levels(self) -> int:
        return self.pred.shape[0]

    @property
    def n(self) -> int:
        return self.pred.shape[1]

    @property
    def correct(self) -> np.ndarray | None:
        """[L, N] bool: level prediction equals the label."""
        return None if self.target is None else self.pred == self.target[None]

    @property
    def agree(self) -> np.ndarray:
        """[L, N] bool: level prediction equals the last level's (the always-full model's)."""
        return self.pred == self.pred[-1:]

    def subset(self, idx: np.ndarray) -> "LevelStats":
        return LevelStats(self.pred[:, idx], self.margin[:, idx], None if self.target is None else self.target[idx],
                          self.cum_gflops, self.cum_ms, [self.paths[i] for i in idx] if self.paths else [])


@dataclass(frozen=True)
class Target:
    """What to choose: ``max_drop`` (least cost with score >= full score - value), ``gflops`` or ``ms`` (best score
    with expected cost <= value). ``reference``: score = accuracy vs ``labels`` or agreement with the ``full`` model.
    ``confidence`` (max_drop only): the drop must hold with that many paired standard errors to spare on the fit
    images, so that thresholds picked out of many combinations still hold on new images."""

    kind: str
    value: float
    reference: str = "labels"
    confidence: float = 0.0

    def describe(self) -> str:
        score = "accuracy" if self.reference == "labels" else "agreement with full"
        if self.kind == "max_drop":
            margin = f" with {self.confidence:g} standard errors to spare" if self.confidence else ""
            return f"{score} drop <= {self.value:g} vs always-full{margin}, least expected cost"
        unit = "GFLOPs" if self.kind == "gflops" else "ms"
        return f"best {score} with expected {unit} <= {self.value:g}"


@dataclass
class Grid:
    """Metrics of every threshold combination (rows of ``thresholds``) on one set of images."""

    thresholds: np.ndarray  # [M, L-1]
    gflops: np.ndarray  # [M] expected GFLOPs per image
    ms: np.ndarray | None  # [M] expected latency per image
    accuracy: np.ndarray | None  # [M]
    agreement: np.ndarray  # [M]
    exits: np.ndarray  # [M, L] fraction of images exiting at each level
    changed: np.ndarray | None = None  # [M] fraction whose correctness differs from the full model's (labels)

    def drop_se(self, reference: str, n: int) -> np.ndarray:
        """Paired standard error of (score - full score) over ``n`` images, per image d in {-1, 0, 1}; for a grid of
        ``evaluate_grid``, whose last point (every threshold NEVER) is the full model."""
        diff = self.score(reference) - self.score(reference)[-1]
        second = self.changed if reference == "labels" else 1 - self.agreement  # E[d^2]
        return np.sqrt(np.maximum(second - diff ** 2, 0) / max(n, 1))

    def score(self, reference: str) -> np.ndarray:
        return self.accuracy if reference == "labels" else self.agreement

    def cost(self, axis: str) -> np.ndarray:
        return self.gflops if axis == "gflops" else self.ms


@dataclass
class Choice:
    thresholds: list[float]
    target: Target
    grid: Grid
    index: int
    candidates: list[np.ndarray]


def candidate_thresholds(stats: LevelStats, max_combos: int = 1 << 18) -> list[np.ndarray]:
    """Per level before the last: 0 (always exit), midpoints between sorted distinct margins (every one, or evenly
    spaced by rank so the grid has <= ``max_combos`` points), and NEVER. Midpoints keep small numeric differences
    between runs from flipping a decision."""
    q = max(3, int(max_combos ** (1 / max(stats.levels - 1, 1)) + 1e-9))
    out = []
    for k in range(stats.levels - 1):
        s = np.unique(stats.margin[k].astype(np.float64))
        mids = (s[:-1] + s[1:]) / 2
        if len(mids) > q - 2:
            mids = mids[np.unique(np.linspace(0, len(mids) - 1, q - 2).round().astype(int))]
        out.append(np.concatenate([[0.0], mids, [NEVER]]))
    return out


def evaluate_grid(stats: LevelStats, candidates: list[np.ndarray], chunk: int = 2048) -> Grid:
    """Metrics of the full product of ``candidates``: exits at level k are counted as ``P_k @ (A_k * w)^T`` where
    ``A_k[q, n] = margin_k[n] >= cand_k[q]`` and ``P_k`` (the images still running) is the product of ``1 - A_j``
    over j < k; cost O(M * N) multiply-adds in BLAS, memory O(M / Q * N)."""
    L, n = stats.levels, stats.n
    if L < 2 or n == 0:
        raise GateError("need at least two levels and one image to calibrate a gate")
    shape = tuple(len(c) for c in candidates)
    correct = stats.correct if stats.target is not None else np.zeros_like(stats.pred, bool)
    changed = correct != correct[-1:]
    w = np.stack([np.ones_like(stats.agree), correct, stats.agree, changed], 1).astype(np.float32)  # [L, 4, N]
    counts = np.zeros((L, 4) + shape)
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        P = np.ones((1, len(stats.margin[0, sl])), np.float32)
        for k, cand in enumerate(candidates):
            A = (stats.margin[k, sl][None] >= cand[:, None]).astype(np.float32)  # [Q, n]
            here = P @ (A[None] * w[k, :, None, sl]).reshape(-1, A.shape[1]).T  # [lead, 4 * Q]
            counts[k] += np.moveaxis(here.reshape(shape[:k] + (4, len(cand))), k, 0).reshape(
                (4,) + shape[:k + 1] + (1,) * (L - 2 - k))
            if k == L - 2:
                last = P @ ((1 - A)[None] * w[L - 1, :, None, sl]).reshape(-1, A.shape[1]).T
                counts[L - 1] += np.moveaxis(last.reshape(shape[:k] + (4, len(cand))), k, 0)
            else:
                P = (P[:, None, :] * (1 - A)[None]).reshape(-1, P.shape[1])
    frac = counts.reshape(L, 4, -1) / n  # [L, 4, M]
    grids = np.meshgrid(*candidates, indexing="ij")
    return Grid(thresholds=np.stack([g.ravel() for g in grids], 1), gflops=stats.cum_gflops @ frac[:, 0],
                ms=None if stats.cum_ms is None else stats.cum_ms @ frac[:, 0],
                accuracy=None if stats.target is None else frac[:, 1].sum(0), agreement=frac[:, 2].sum(0),
                exits=frac[:, 0].T, changed=None if stats.target is None else frac[:, 3].sum(0))


def exit_levels(margin: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """[L, N] margins, [M, L-1] thresholds -> [M, N] exit level (first k with margin_k >= t_k, else the last)."""
    go = margin[None, :-1] >= np.asarray(thresholds, np.float64)[:, :, None]
    go = np.concatenate([go, np.ones((go.shape[0], 1, go.shape[2]), bool)], 1)
    return go.argmax(1)


def simulate_many(stats: LevelStats, thresholds: np.ndarray) -> Grid:
    """The metrics of each row of ``thresholds`` [M, L-1] (direct simulation; what the cascade would do)."""
    T = np.atleast_2d(np.asarray(thresholds, np.float64))
    ex = exit_levels(stats.margin, T)
    cols = np.arange(stats.n)[None]
    return Grid(thresholds=T, gflops=stats.cum_gflops[ex].mean(1),
                ms=None if stats.cum_ms is None else stats.cum_ms[ex].mean(1),
                accuracy=None if stats.target is None else stats.correct[ex, cols].mean(1),
                agreement=stats.agree[ex, cols].mean(1),
                exits=np.stack([(ex == k).mean(1) for k in range(stats.levels)], 1),
                changed=None if stats.target is None else (stats.correct[ex, cols] != stats.correct[-1][None]).mean(1))


def simulate(stats: LevelStats, thresholds: list[float] | np.ndarray) -> dict | None:
    """Metrics of one set of thresholds: accuracy, agreement, expected GFLOPs/ms, compute saved, exit histogram,
    and the always-full model's accuracy. None for an empty set of images."""
    if stats.n == 0:
        return None
    g = simulate_many(stats, np.asarray(thresholds)[None])
    full = None if stats.target is None else float(stats.correct[-1].mean())
    r = lambda x: None if x is None else round(float(x[0]), 6)  # noqa: E731
    return {"images": stats.n, "accuracy": r(g.accuracy), "agreement": r(g.agreement), "full_accuracy": full,
            "expected_gflops": r(g.gflops), "expected_ms": r(g.ms),
            "compute_saved": round(1 - float(g.gflops[0]) / float(stats.cum_gflops[-1]), 6) + 0.0,
            "exit_histogram": [int(round(f * stats.n)) for f in g.exits[0]]}


def pareto_front(grid: Grid, reference: str = "labels", cost: str = "gflops") -> np.ndarray:
    """Indices of the grid points no other point beats (cheaper and at least as good): cost strictly increasing and
    score strictly increasing along the returned order."""
    score, c = grid.score(reference), grid.cost(cost)
    order = np.lexsort((-score, c))
    s = score[order]
    best_before = np.concatenate([[-np.inf], np.maximum.accumulate(s)[:-1]])
    return order[s > best_before + TOL]


def choose_thresholds(stats: LevelStats, target: Target, max_combos: int = 1 << 18) -> Choice:
    """Search the threshold grid of ``stats`` for ``target``. ``max_drop`` minimises expected latency when latencies
    are known, else expected GFLOPs; ties go to the higher score, then to the larger (safer) thresholds."""
    if target.reference == "labels" and stats.target is None:
        raise GateError("--reference labels needs labelled images (use --reference full)")
    if target.kind == "ms" and stats.cum_ms is None:
        raise GateError("a latency budget needs per-level latencies (--device / --latency-json)")
    if target.kind in ("gflops", "ms"):
        floor = float((stats.cum_gflops if target.kind == "gflops" else stats.cum_ms)[0])
        if target.value < floor * (1 - TOL):
            unit = "GFLOPs" if target.kind == "gflops" else "ms"
            raise GateError(f"budget {target.value:g} {unit} is below level 0's cost ({floor:.4g} {unit}): "
                            "no thresholds can meet it")
    candidates = candidate_thresholds(stats, max_combos)
    grid = evaluate_grid(stats, candidates)
    best = pick(grid, target, stats.n)
    return Choice([float(t) for t in grid.thresholds[best]], target, grid, best, candidates)


def pick(grid: Grid, target: Target, n: int) -> int:
    """The index of the grid point ``target`` chooses among the metrics of ``n`` images (see ``choose_thresholds``)."""
    score = grid.score(target.reference)
    primary = grid.ms if grid.ms is not None else grid.gflops
    safe = -grid.thresholds.sum(1)
    if target.kind == "max_drop":
        spare = target.confidence * grid.drop_se(target.reference, n) if target.confidence else 0.0
        ok = np.flatnonzero(score - spare >= score[-1] - target.value - TOL)  # the last point is all-NEVER: full
        best = ok[np.lexsort((safe[ok], -score[ok], primary[ok]))[0]]
    else:
        budget = grid.cost(target.kind)
        ok = np.flatnonzero(budget <= target.value * (1 + TOL) + 1e-12)
        best = ok[np.lexsort((safe[ok], primary[ok], -score[ok]))[0]]
    return int(best)
