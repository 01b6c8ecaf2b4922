"""Pooled early exit (runtime.stream): rows that a level does not decide wait for later batches' rows at the same
level, so every level runs full batches; each row's answer is the batch-by-batch cascade's."""
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import create_backend
from runtime.bundle import load_bundle
from runtime.cascade import Cascade
from runtime.stream import PooledCascade, classify_stream

ROOT = Path(__file__).resolve().parents[1]
IMAGES = sorted((ROOT / "examples" / "images").glob("*.jpg"))


class CountingBackend:
    """Wraps a backend; records the rows of every level call."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.calls = inner, inner.name, []

    def run_level(self, level, patches, past):
        self.calls.append((level, patches.shape[0]))
        return self.inner.run_level(level, patches, past)

    def take_rows(self, present, rows):
        return self.inner.take_rows(present, rows)

    def gather_rows(self, parts):
        return self.inner.gather_rows(parts)

    @property
    def fresh_outputs(self):
        return self.inner.fresh_outputs

    def to_numpy(self, present):
        return self.inner.to_numpy(present)


def _stream(levels: list[np.ndarray], sizes: list[int]):
    """The rows of ``levels`` cut into consecutive batches of ``sizes``."""
    start = 0
    for n in sizes:
        yield [p[start:start + n] for p in levels]
        start += n


@pytest.mark.parametrize("backend,weights", [("onnxruntime", "levels"), ("onnxruntime", "split"),
                                             ("openvino", "levels"), ("openvino", "split")])
def test_pooled_rows_get_the_cascades_answers(tiny_bundle, backend, weights):
    """Forced exits across batches of uneven size: every row's exit embedding equals running all its levels (the KV
    rows that waited, were split and joined are the right ones, also where the backend reuses its output tensors),
    every level call but the last at each level is a full batch, and every row is answered once."""
    pytest.importorskip(backend)
    bundle = load_bundle(tiny_bundle)
    wrapped = CountingBackend(create_backend(bundle, backend, weights=weights))
    cascade = Cascade(bundle, wrapped, thresholds=0.0)
    levels = [np.concatenate([p] * 3) for p in cascade.preprocess(IMAGES)]  # 24 rows
    n = levels[0].shape[0]
    forced = np.where(np.arange(n) < 12, 3, (np.arange(n) * 7 + 1) % 4)  # the first rows all go on
    full = cascade.run_all_levels(levels)
    pool = PooledCascade(cascade, batch_size=5, keep_embeddings=True)
    answers, start = {}, 0
    for size in (3, 8, 1, 7, 5):
        wrapped.calls.clear()
        for key, result in pool.submit([p[start:start + size] for p in levels], exit_levels=forced[start:start + size]):
            assert key not in answers
            answers[key] = result
        assert all(rows == 5 for _, rows in wrapped.calls)  # before the flush: full batches only
        start += size
    wrapped.calls.clear()
    for key, result in pool.flush():
        answers[key] = result
    assert pool.pending() == 0 and sorted(answers) == list(range(n))
    per_level = [[rows for k, rows in wrapped.calls if k == level] for level in range(4)]
    assert all(len(calls) <= 1 + sum(calls) // 5 for calls in per_level)
    for key, result in answers.items():
        assert result.exit_level == forced[key]
        assert len(result.level_ms) == forced[key] + 1
        np.testing.assert_allclose(result.embedding, full[result.exit_level][key], atol=1e-4)


def test_pooled_gate_equals_the_batch_cascade(tiny_bundle):
    """With the gate deciding, labels, scores and exit levels are the batch-by-batch cascade's."""
    cascade = Cascade(tiny_bundle, thresholds=[0.02, 0.05, 0.1])
    levels = [np.concatenate([p] * 2) for p in cascade.preprocess(IMAGES)]
    reference = cascade.classify_levels(levels)
    assert len({r.exit_level for r in reference}) > 1  # the test needs rows that go on
    pooled = dict(classify_stream(cascade, _stream(levels, [4, 4, 4, 4]), batch_size=3))
    assert sorted(pooled) == list(range(len(reference)))
    for key, ref in enumerate(reference):
        got = pooled[key]
        assert (got.label, got.exit_level) == (ref.label, ref.exit_level)
        assert got.score == pytest.approx(ref.score, abs=1e-4)


def test_no_early_exit_runs_each_batch_in_one_pass(tiny_bundle):
    """Thresholds above 1: nothing can wait for anything, so each batch runs at once (the one-pass graph), in order."""
    cascade = Cascade(tiny_bundle, thresholds=2.0)
    levels = cascade.preprocess(IMAGES)
    pool = PooledCascade(cascade, batch_size=8)
    got = pool.submit([p[:3] for p in levels])
    assert [k for k, _ in got] == [0, 1, 2] and all(r.exit_level == 3 for _, r in got)
    assert pool.flush() == []


def test_bad_values_are_refused(tiny_bundle):
    cascade = Cascade(tiny_bundle)
    with pytest.raises(ValueError, match="batch size 0"):
        PooledCascade(cascade, 0)
    levels = cascade.preprocess(IMAGES[:2])
    with pytest.raises(ValueError, match="one level in 0..3 per row"):
        PooledCascade(cascade, 2).submit(levels, exit_levels=[0, 4])
