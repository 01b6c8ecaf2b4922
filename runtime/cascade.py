"""The early-exit cascade: level 0 on the whole batch, then only undecided rows (with their KV rows) go on."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from runtime.backends import ONE_PASS, Backend, create_backend
from runtime.bundle import Bundle, load_bundle
from runtime.preprocess import preprocess
from runtime.threads import host_single_threaded


@dataclass
class Result:
    """One image's answer: label, score, margin at exit, exit level and time per level run."""

    label: str  # label id (e.g. a wnid)
    class_name: str
    score: float
    margin: float
    exit_level: int
    top_k: list[tuple[str, float]]
    level_ms: list[float] = field(default_factory=list)
    preprocess_ms: float = 0.0
    embedding: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {"label": self.label, "class_name": self.class_name, "score": self.score, "margin": self.margin,
                "exit_level": self.exit_level, "top_k": [{"class_name": n, "score": s} for n, s in self.top_k],
                "level_ms": self.level_ms, "preprocess_ms": self.preprocess_ms}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def margins(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row."""
    if probs.shape[-1] < 2:
        return np.ones(probs.shape[0], dtype=probs.dtype)
    top2 = np.partition(probs, -2, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def normalize_thresholds(thresholds: float | Sequence[float] | None, bundle: Bundle) -> list[float]:
    """A single float applies to every level; a list gives one per level before the last."""
    n = bundle.num_levels - 1
    if thresholds is None:
        values = bundle.thresholds
    elif isinstance(thresholds, (int, float)):
        values = [float(thresholds)] * n
    else:
        values = [float(t) for t in thresholds]
    if len(values) != n:
        raise ValueError(f"need {n} thresholds (one per level before the last), got {len(values)}")
    bad = [t for t in values if not math.isfinite(t) or t < 0]
    if bad:
        raise ValueError(f"threshold {bad[0]:g}: a gate threshold is a softmax margin, a finite number >= 0")
    return values


class Cascade:
    """Classify images with early exit over a bundle.

    ``thresholds``: None (the manifest's), one float, or one per level before the last. ``max_level`` caps the depth
    (that level always exits). ``labels``: restrict the head to a subset of class names or label ids. ``one_pass``:
    when every level is wanted (no gate, ``run_all_levels``), run the bundle's one-pass graph where the bundle and the
    backend have it: None (default) with the gate off, and in ``run_all_levels`` only where it gives the level graphs'
    embeddings (a float bundle, validated at export; an int8 bundle's one-pass graph is quantized on its own, so
    calibration and evaluation of an int8 cascade run the levels it exits from); True: in ``run_all_levels`` too
    (the quantization report's check of that graph); False: never. When no image can exit early (every threshold above 1)
    and the cascade makes its backend, the level sessions are left unmade until a run needs them, so that the
    process holds the weights once.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, backend: str | Backend = "onnxruntime",
                 thresholds: float | Sequence[float] | None = None, max_level: int | None = None,
                 labels: Sequence[str] | None = None, top_k: int = 5, one_pass: bool | None = None,
                 **backend_options) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.thresholds = normalize_thresholds(thresholds, self.bundle)
        last = self.bundle.num_levels - 1
        self.max_level = last if max_level is None else max_level
        if not 0 <= self.max_level <= last:
            raise ValueError(f"max level {max_level} out of range 0..{last}")
        self.top_k = top_k
        asked, one_pass = one_pass, one_pass is not False and self.bundle.has_full and self.max_level == last
        full_only = one_pass and self._no_early_exit()
        if isinstance(backend, str):
            if full_only and backend in ONE_PASS:  # the level sessions are made only if a run ever needs them
                backend_options.setdefault("load_levels", False)
            backend = create_backend(self.bundle, backend, **backend_options)
        self.backend = backend
        self.one_pass = one_pass and hasattr(self.backend, "run_full")
        self.all_levels_in_one_pass = self.one_pass and (asked or self.bundle.manifest["precision"] != "int8")
        if self.one_pass and full_only:
            self.backend.load_full()  # every image will run it: load it now, not inside the first image's time
        self.class_index = self._select_classes(labels)
        self.weight = self.bundle.head_weight[self.class_index]
        self.bias = self.bundle.head_bias[self.class_index]

    def _select_classes(self, labels: Sequence[str] | None) -> np.ndarray:
        if not labels:
            return np.arange(len(self.bundle.class_names))
        lookup = {name: i for i, name in enumerate(self.bundle.class_names)}
        lookup.update({lab: i for i, lab in enumerate(self.bundle.labels)})
        missing = [lab for lab in labels if lab not in lookup]
        if missing:
            raise ValueError(f"labels not in the bundle's head: {', '.join(missing[:5])}")
        if len(labels) < 2:
            raise ValueError("a label subset needs at least two labels")
        return np.array([lookup[lab] for lab in labels])

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """Softmax over the head's logits, on one host thread (see runtime.threads)."""
        with host_single_threaded():
            return self._probabilities(embeddings)

    def _probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        return softmax(self.bundle.logit_scale * (embeddings @ self.weight.T) + self.bias)

    def preprocess(self, images: Sequence) -> list[np.ndarray]:
        return preprocess(images, self.bundle.preprocessing)

    def classify(self, images: Sequence) -> list[Result]:
        """Images (paths, PIL images or HxWx3 uint8 arrays) -> one Result each, in input order."""
        t0 = time.perf_counter()
        levels = self.preprocess(images)
        pre_ms = (time.perf_counter() - t0) * 1e3 / max(len(images), 1)
        results = self.classify_levels(levels)
        for r in results:
            r.preprocess_ms = pre_ms
        return results

    def classify_levels(self, levels: list[np.ndarray], keep_embeddings: bool = False,
                        exit_levels: Sequence[int] | np.ndarray | None = None) -> list[Result]:
        """Run the cascade on preprocessed per-level patches ``[B, tokens, values]``.

        ``exit_levels`` (one per row) forces where each row exits instead of the gate: the head, softmax, margins
        and KV row gathering still run as they would, so an operating point's latency can be timed without a
        trained model. The host work between levels runs single-threaded (runtime.threads).
        """
        forced = None if exit_levels is None else np.asarray(exit_levels, dtype=int)
        if forced is not None and (forced.shape != (levels[0].shape[0],) or forced.min(initial=0) < 0
                                   or forced.max(initial=0) > self.max_level):
            raise ValueError(f"exit_levels must hold one level in 0..{self.max_level} per row")
        if forced is None and self._no_early_exit():
            return self.classify_full(levels, keep_embeddings)
        with host_single_threaded():
            return self._classify_levels(levels, keep_embeddings, forced)

    def _no_early_exit(self) -> bool:
        """No threshold before ``max_level`` can be met (a margin is at most 1)."""
        return 0 < self.max_level and min(self.thresholds[:self.max_level]) > 1.0

    def classify_full(self, levels: list[np.ndarray], keep_embeddings: bool = False) -> list[Result]:
        """Every row to ``max_level`` with no gate: one block-causal pass over all the levels' tokens where
        ``one_pass`` (the ViT's shape of work instead of one small pass per level), else the levels one by one."""
        if not self.one_pass:
            return self.classify_levels(levels, keep_embeddings, exit_levels=[self.max_level] * levels[0].shape[0])
        t0 = time.perf_counter()
        with host_single_threaded():
            emb = self.backend.run_full(levels)[-1]
            probs = self._probabilities(emb)
            margin = margins(probs)
        ms = [(time.perf_counter() - t0) * 1e3]
        return [self._result(probs[j], float(margin[j]), self.max_level, ms, emb[j] if keep_embeddings else None)
                for j in range(len(emb))]

    def _classify_levels(self, levels: list[np.ndarray], keep_embeddings: bool,
                         forced: np.ndarray | None) -> list[Result]:
        batch = levels[0].shape[0]
        results: list[Result | None] = [None] * batch
        active = np.arange(batch)
        past, level_ms = None, []
        for k in range(self.max_level + 1):
            t0 = time.perf_counter()
            emb, present = self.backend.run_level(k, levels[k][active], past)
            probs = self._probabilities(emb)
            margin = margins(probs)
            if k == self.max_level:
                done = np.ones(len(active), bool)
            else:
                done = margin >= self.thresholds[k] if forced is None else forced[active] == k
            go_on = np.flatnonzero(~done)
            if len(go_on):
                past = present if len(go_on) == len(active) else self.backend.take_rows(present, go_on)
            level_ms.append((time.perf_counter() - t0) * 1e3)
            for j in np.flatnonzero(done):
                results[active[j]] = self._result(probs[j], float(margin[j]), k, list(level_ms),
                                                  emb[j] if keep_embeddings else None)
            active = active[go_on]
            if not len(active):
                break
        return results  # type: ignore[return-value]

    def run_all_levels(self, levels: list[np.ndarray]) -> list[np.ndarray]:
        """Embeddings of every level for every row (no gate): what calibration and evaluation measure once (in one
        pass where ``all_levels_in_one_pass``)."""
        with host_single_threaded():
            if self.all_levels_in_one_pass:
                return list(self.backend.run_full(levels))
            past, out = None, []
            for k in range(self.max_level + 1):
                emb, past = self.backend.run_level(k, levels[k], past)
                out.append(emb)
        return out

    def _result(self, probs: np.ndarray, margin: float, level: int, level_ms: list[float],
                embedding: np.ndarray | None) -> Result:
        order = np.argsort(-probs)[: self.top_k]
        best = self.class_index[order[0]]
        return Result(label=self.bundle.labels[best], class_name=self.bundle.class_names[best],
                      score=float(probs[order[0]]), margin=margin, exit_level=level,
                      top_k=[(self.bundle.class_names[self.class_index[i]], float(probs[i])) for i in order],
                      level_ms=level_ms, embedding=embedding)

    def expected_gflops(self, results: Sequence[Result]) -> float:
        """Mean GFLOPs per image of these results (cumulative GFLOPs of each exit level)."""
        cum = [lv["cumulative_gflops"] for lv in self.bundle.manifest["levels"]]
        return float(np.mean([cum[r.exit_level] for r in results])) if results else 0.0
