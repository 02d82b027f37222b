"""benchmarks/paired.py: the paired per-class comparison of two benchmark runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def paired():
    return load_benchmark("paired")


def _write(folder: Path, setting: str, rows: list[tuple[int, float]]) -> None:
    (folder / setting).mkdir(parents=True)
    lines = ["class_id,class_name,iou,iou_std,queries,iou_seed_0"]
    lines += [f"{c},c{c},{iou:.4f},0.0000,3,{iou:.4f}" for c, iou in rows]
    (folder / setting / "per_class.csv").write_text("\n".join(lines) + "\n")


def test_paired_stats_by_hand(paired):
    s = paired.paired_stats(np.array([10.0, 20.0, 30.0]), np.array([12.0, 20.0, 27.0]))
    assert s["n"] == 3 and s["a"] == 20.0 and s["b"] == pytest.approx(59 / 3)
    assert s["diff"] == pytest.approx(-1 / 3) and (s["wins"], s["losses"]) == (1, 1)
    assert -3.0 <= s["low"] <= s["diff"] <= s["high"] <= 2.0  # resampled means lie within the differences' range
    const = paired.paired_stats(np.zeros(5), np.full(5, 1.5))
    assert const["low"] == const["high"] == const["diff"] == 1.5  # every resample has the same mean
    assert paired.paired_stats(np.arange(9.0), np.arange(9.0)[::-1], seed=3) == \
        paired.paired_stats(np.arange(9.0), np.arange(9.0)[::-1], seed=3)
    with pytest.raises(ValueError):
        paired.paired_stats(np.zeros(2), np.zeros(3))


def test_compare_pairs_classes_by_fold_and_setting(paired, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "efficientnet-lite0-mask-1shot-fold0", [(0, 10.0), (4, 20.0)])
    _write(a, "efficientnet-lite0-mask-1shot-fold1", [(1, 30.0)])
    _write(a, "efficientnet-lite0-box-1shot-fold0", [(0, 5.0)])  # no B counterpart: not reported
    _write(b, "efficientnet-lite0-mask-1shot-fold0", [(0, 14.0), (4, 18.0), (8, 50.0)])  # class 8 unpaired
    _write(b, "efficientnet-lite0-mask-1shot-fold1", [(1, 33.0)])
    rows = paired.compare(paired.read_run([a]), paired.read_run([b]))
    assert len(rows) == 1
    r = rows[0]
    assert (r["support"], r["shots"], r["folds"], r["n"]) == ("mask", 1, [0, 1], 3)
    assert r["a"] == pytest.approx(20.0) and r["b"] == pytest.approx(65 / 3) and r["diff"] == pytest.approx(5 / 3)
    assert (r["wins"], r["losses"]) == (2, 1)
    assert paired.main([str(a), str(b)]) == 0
    assert "| efficientnet-lite0 | mask | 1 | 0,1 | 3 | 20.0 | 21.7 | +1.67" in capsys.readouterr().out


def test_bad_folders_are_named(paired, tmp_path):
    with pytest.raises(SystemExit, match="no-such"):
        paired.read_run([tmp_path / "no-such"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="per_class.csv"):
        paired.read_run([tmp_path / "empty"])
