"""Pooled early exit for a stream of batches: the rows a level does not decide wait, with their KV cache, for rows
of later batches at the same level, so that every level runs full batches.

A batch-by-batch cascade runs each batch's few undecided rows through the deep levels on their own, at a fraction of
the batch, where a CPU's matrix units run far below their rate. Pooled, level k runs once per ``batch_size`` rows
that reach it, so throughput follows the exit mix. Each row's answer is what the batch-by-batch cascade gives (the
same graphs and gate, at other batch compositions); answers come back in the order rows are decided, each with its
position in the stream.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from runtime.cascade import Cascade, Result, margins
from runtime.threads import host_single_threaded


@dataclass
class _Rows:
    """Rows waiting at a level: their stream positions, patches of this level on, forced exits, the time of each
    level call they took part in, and their KV cache: ``rows`` of the backend cache ``past`` (``whole``: all of it,
    in order), gathered only when the rows run, so that a row's cache is copied once per level."""

    keys: np.ndarray
    levels: list[np.ndarray]
    forced: np.ndarray | None
    level_ms: list[list[float]]
    past: Any = None
    rows: np.ndarray | None = None
    whole: bool = True

    def __len__(self) -> int:
        return len(self.keys)


class PooledCascade:
    """``submit(levels)`` a batch of per-level patches, then ``flush()`` at the end of the stream; both return the
    ``(position, Result)`` pairs decided so far. ``exit_levels`` forces exits (one per row) as in
    ``Cascade.classify_levels``, so that a mix can be timed without a trained model."""

    def __init__(self, cascade: Cascade, batch_size: int, keep_embeddings: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size}: need at least 1")
        self.cascade, self.batch_size, self.keep_embeddings = cascade, batch_size, keep_embeddings
        self.backend = cascade.backend
        self.queues: list[list[_Rows]] = [[] for _ in range(cascade.max_level + 1)]
        self.submitted = 0

    def pending(self) -> int:
        """Rows submitted and not yet decided."""
        return sum(len(g) for q in self.queues for g in q)

    def submit(self, levels: Sequence[np.ndarray], exit_levels: Sequence[int] | None = None
               ) -> list[tuple[int, Result]]:
        n = levels[0].shape[0]
        forced = None if exit_levels is None else np.asarray(exit_levels, dtype=int)
        if forced is not None and (forced.shape != (n,) or forced.min(initial=0) < 0
                                   or forced.max(initial=0) > self.cascade.max_level):
            raise ValueError(f"exit_levels must hold one level in 0..{self.cascade.max_level} per row")
        keys = np.arange(self.submitted, self.submitted + n)
        self.submitted += n
        if forced is None and self.cascade._no_early_exit():  # nothing exits early: the batch in one pass
            return list(zip(keys.tolist(), self.cascade.classify_full(list(levels), self.keep_embeddings)))
        self.queues[0].append(_Rows(keys, list(levels[:self.cascade.max_level + 1]), forced, [[] for _ in range(n)]))
        return self._drain(flush=False)

    def flush(self) -> list[tuple[int, Result]]:
        """Run every waiting row to its exit (partial batches) and return the rest of the answers."""
        return self._drain(flush=True)

    def _drain(self, flush: bool) -> list[tuple[int, Result]]:
        out: list[tuple[int, Result]] = []
        with host_single_threaded():
            while True:
                sizes = [sum(len(g) for g in q) for q in self.queues]
                if flush:  # lowest level first: a level runs once nothing more can reach it
                    ready = [k for k, s in enumerate(sizes) if s]
                    level = ready[0] if ready else None
                else:  # deepest full level first: its cache is the largest to hold
                    ready = [k for k, s in enumerate(sizes) if s >= self.batch_size]
                    level = ready[-1] if ready else None
                if level is None:
                    return out
                out += self._run(level, self._take(level))

    def _take(self, level: int) -> tuple[_Rows, Any]:
        """Up to ``batch_size`` waiting rows of a level (the last group split if needed) and their joined cache."""
        queue, taken, need = self.queues[level], [], self.batch_size
        while queue and need:
            g = queue.pop(0)
            if len(g) > need:
                queue.insert(0, self._subset(g, np.arange(need, len(g))))
                g = self._subset(g, np.arange(need))
            taken.append(g)
            need -= len(g)
        rows = taken[0] if len(taken) == 1 else _Rows(
            np.concatenate([g.keys for g in taken]), [np.concatenate(p) for p in zip(*(g.levels for g in taken))],
            None if taken[0].forced is None else np.concatenate([g.forced for g in taken]),
            [ms for g in taken for ms in g.level_ms])
        if level == 0:
            return rows, None
        if len(taken) == 1 and taken[0].whole:
            return rows, taken[0].past
        return rows, self.backend.gather_rows([(g.past, g.rows) for g in taken])

    @staticmethod
    def _subset(g: _Rows, idx: np.ndarray) -> _Rows:
        return _Rows(g.keys[idx], [p[idx] for p in g.levels], None if g.forced is None else g.forced[idx],
                     [g.level_ms[j] for j in idx], g.past, None if g.rows is None else g.rows[idx], False)

    def _run(self, level: int, taken: tuple[_Rows, Any]) -> list[tuple[int, Result]]:
        c, (rows, past) = self.cascade, taken
        t0 = time.perf_counter()
        emb, present = self.backend.run_level(level, rows.levels[0], past)
        probs = c._probabilities(emb)
        margin = margins(probs)
        if level == c.max_level:
            done = np.ones(len(rows), bool)
        elif rows.forced is None:
            done = margin >= c.thresholds[level]
        else:
            done = rows.forced == level
        go_on = np.flatnonzero(~done)
        if len(go_on):
            if getattr(self.backend, "fresh_outputs", False):  # the rows' cache is gathered when they run next
                cache, kept, whole = present, go_on, len(go_on) == len(rows)
            else:  # copied now: the backend's next run may overwrite its outputs while the rows wait
                cache, kept, whole = self.backend.take_rows(present, go_on), np.arange(len(go_on)), True
        ms = (time.perf_counter() - t0) * 1e3
        history = [h + [ms] for h in rows.level_ms]
        if len(go_on):
            self.queues[level + 1].append(_Rows(rows.keys[go_on], [p[go_on] for p in rows.levels[1:]],
                                                None if rows.forced is None else rows.forced[go_on],
                                                [history[j] for j in go_on], cache, kept, whole))
        return [(int(rows.keys[j]), c._result(probs[j], float(margin[j]), level, history[j],
                                              emb[j] if self.keep_embeddings else None))
                for j in np.flatnonzero(done)]


def classify_stream(cascade: Cascade, batches: Iterable[Sequence[np.ndarray]], batch_size: int,
                    keep_embeddings: bool = False) -> Iterator[tuple[int, Result]]:
    """Pooled early exit over an iterable of per-level patch batches: ``(stream position, Result)`` as decided."""
    pool = PooledCascade(cascade, batch_size, keep_embeddings)
    for levels in batches:
        yield from pool.submit(levels)
    yield from pool.flush()
