"""benchmarks/weak_supports.py: the support-mask scores and the oracle edits of an estimate."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_benchmark

from fsdiff.episode import BoxAnnotation, ScribbleAnnotation


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("weak_supports")


def _masks():
    truth = np.zeros((40, 40), np.uint8)
    truth[10:30, 10:30] = 1  # 400 object pixels
    truth[0, :] = 255
    est = np.zeros((40, 40), np.uint8)
    est[15:35, 10:30] = 1  # 300 hit, 100 false (rows 30-34)
    return truth, est


def test_precision_recall_by_hand(bench):
    truth, est = _masks()
    p, r = bench.precision_recall(est == 1, truth)
    assert p == pytest.approx(300 / 400) and r == pytest.approx(300 / 400)
    assert bench.iou(est == 1, truth) == pytest.approx(300 / 500)
    assert bench.precision_recall(np.zeros_like(est, bool), truth) == (1.0, 0.0)


def test_oracle_edits_ignore_exactly_the_errors(bench):
    truth, est = _masks()
    box = BoxAnnotation(np.array([8, 8, 32, 36], np.float64))
    out = bench.oracle_masks(est, truth, box)
    assert set(out) == {"estimate", "missed-ignored", "false-ignored", "inner-band-ignored", "box-inside-ignored"}
    np.testing.assert_array_equal(out["estimate"], est)
    np.testing.assert_array_equal(out["missed-ignored"] == 255, (est == 0) & (truth == 1))
    np.testing.assert_array_equal(out["false-ignored"] == 255, (est == 1) & (truth == 0))
    inside = np.zeros_like(est, bool)
    inside[8:36, 8:32] = True
    np.testing.assert_array_equal(out["box-inside-ignored"] == 255, inside & (est == 0))
    band = out["inner-band-ignored"] == 255
    assert band.any() and not (band & (est != 1)).any()  # only the estimate's own object pixels
    assert (out["inner-band-ignored"] == 1).any()
    for name, m in out.items():  # the edits never change which pixels are object, only ignore some
        assert not ((m == 1) & (est != 1)).any(), name


def test_oracle_edit_that_would_empty_the_object_keeps_the_estimate(bench):
    truth = np.zeros((20, 20), np.uint8)
    truth[2:6, 2:6] = 1
    est = np.zeros((20, 20), np.uint8)
    est[10:15, 10:15] = 1  # every object pixel is false
    strokes = np.zeros((20, 20), np.uint8)
    strokes[12, 10:15] = 1
    out = bench.oracle_masks(est, truth, ScribbleAnnotation(strokes))
    np.testing.assert_array_equal(out["false-ignored"], est)
    ring = out["ring-ignored"] == 255
    assert ring.any() and not (ring & (est == 1)).any()


def _run(fold, variants):
    return {"fold": fold, "class_ids": [0], "classes": [0] * len(variants["mask"]), "variants": variants,
            "est_cpu_s": {k: 0.0 for k in variants}}


def test_table_joins_split_runs_and_pairs_against_default(bench, tmp_path):
    # two horse episodes per file, one query each: (intersection, union) per query
    a = {"dataset": "horse", "runs": [_run(None, {"mask": [[(8, 10)], [(6, 10)]], "box|default": [[(5, 10)], [(5, 10)]],
                                                  "box|x": [[(6, 10)], [(7, 10)]]})]}
    b = {"dataset": "horse", "runs": [_run(None, {"mask": [[(9, 10)], [(9, 10)]], "box|default": [[(4, 10)], [(8, 10)]],
                                                  "box|x": [[(4, 10)], [(8, 10)]]})]}
    for name, r in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(__import__("json").dumps(r))
    joined = bench.read_results([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert len(joined["runs"]) == 2
    assert bench._units(joined, "box|x") == [60.0, 70.0, 40.0, 80.0]
    row = next(line for line in bench.e2e_table(joined).splitlines() if "`x`" in line)
    cells = [c.strip() for c in row.split("|")]
    assert cells[5].startswith("+7.5")  # vs default: mean of (+10, +20, 0, 0)
    assert cells[6].startswith("-17.5")  # vs mask: mean of (60-80, 70-60, 40-90, 80-90)
