"""The evaluation loop end-to-end with tiny fake segmenters, and the report files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from fsdiff.episode import Episode, MaskAnnotation, Query, Shot
from fsdiff.errors import FsdiffError
from fsdiff.evaluate import (
    EvalResult,
    class_rows,
    evaluate,
    format_table,
    summarize_seeds,
    write_report,
)
from fsdiff.protocol import Segmenter
from fsdiff.metrics import FssMeter, resize_for_scoring

I = 255
CLASS_IDS = [1, 2]
NAMES = {1: "cat", 2: "dog"}


class FakeSegmenter:
    """Returns maps derived from the ground truth: 'perfect', 'background' or a constant."""

    def __init__(self, mode: str = "perfect", threshold: float = 0.5, fail_at: int | None = None):
        self.name = f"fake-{mode}"
        self.encoder_name = None
        self.mode = mode
        self.threshold = threshold
        self.fail_at = fail_at
        self.calls = 0

    def predict(self, episode: Episode) -> list[np.ndarray]:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("out of memory")
        out = []
        for q in episode.queries:
            if self.mode == "perfect":
                out.append((q.gt == 1).astype(np.float32))
            elif self.mode == "background":
                out.append(np.zeros(q.shape, np.float32))
            else:
                out.append(np.full(q.shape, float(self.mode), np.float32))
        return out


def image(h=4, w=4):
    return np.zeros((h, w, 3), np.uint8)


def shot():
    m = np.zeros((4, 4), np.uint8)
    m[0, 0] = 1
    return Shot(image(), MaskAnnotation(m))


def episode(class_id, gts, eid=""):
    return Episode(class_id, NAMES[class_id], (shot(),),
                   tuple(Query(image(*g.shape), gt=g, image_id=f"q{i}") for i, g in enumerate(gts)),
                   episode_id=eid)


def gt_class1():
    g = np.zeros((4, 4), np.uint8)
    g[:2, :2] = 1          # 4 fg pixels
    g[3, 2:] = I           # 2 ignore pixels, both background otherwise
    return g


def gt_class2():
    g = np.zeros((4, 4), np.uint8)
    g[:2, :] = 1           # 8 fg pixels
    return g


def episodes():
    return [episode(1, [gt_class1()], "e1"), episode(2, [gt_class2()], "e2")]


def test_fake_is_a_segmenter():
    assert isinstance(FakeSegmenter(), Segmenter)


def test_perfect_segmenter_scores_100():
    r = evaluate(FakeSegmenter("perfect"), episodes(), CLASS_IDS, NAMES, progress=False)
    assert isinstance(r, EvalResult)
    assert r.miou == pytest.approx(100.0) and r.fbiou == pytest.approx(100.0)
    assert r.per_class_iou == {1: pytest.approx(100.0), 2: pytest.approx(100.0)}
    assert r.n_episodes == 2 and r.n_queries == 2
    assert r.per_class_queries == {1: 1, 2: 1}
    assert r.class_names == NAMES
    assert r.seconds > 0 and r.episodes_per_second == pytest.approx(2 / r.seconds)


def test_all_background_known_numbers():
    r = evaluate(FakeSegmenter("background"), episodes(), CLASS_IDS, NAMES, progress=False)
    # fg: nothing predicted -> inter 0 for both classes -> mIoU 0
    assert r.per_class_iou == {1: 0.0, 2: 0.0} and r.miou == 0.0
    # bg: e1 valid 16 - 2 ignore = 14, TN = 14 - 4 = 10, union = 14; e2 TN = 8, union = 16
    # pooled bg = (10 + 8) / (14 + 16) = 18/30 = 60 %; FB-IoU = (60 + 0) / 2 = 30
    assert r.fbiou == pytest.approx(30.0)


def test_threshold_attribute_is_used_strictly():
    # every pixel 0.5: "prob > threshold" -> nothing at 0.5, everything at 0.4
    low = evaluate(FakeSegmenter("0.5", threshold=0.4), episodes(), CLASS_IDS, NAMES, progress=False)
    at = evaluate(FakeSegmenter("0.5", threshold=0.5), episodes(), CLASS_IDS, NAMES, progress=False)
    assert at.miou == 0.0
    # all fg: class 1 -> 4 / 14 valid; class 2 -> 8 / 16
    assert low.per_class_iou[1] == pytest.approx(100 * 4 / 14)
    assert low.per_class_iou[2] == pytest.approx(50.0)
    assert low.threshold == 0.4


def test_multi_query_episode_updates_per_query():
    eps = [episode(1, [gt_class1(), gt_class1()]), episode(2, [gt_class2()])]
    r = evaluate(FakeSegmenter("background"), eps, CLASS_IDS, NAMES, progress=False)
    assert r.n_episodes == 2 and r.n_queries == 3 and r.per_class_queries == {1: 2, 2: 1}
    # bg pooled = (10 + 10 + 8) / (14 + 14 + 16) = 28/44
    assert r.fbiou == pytest.approx(100 * 28 / 44 / 2)


def test_absent_class_counts_zero_in_miou():
    r = evaluate(FakeSegmenter("perfect"), [episode(1, [gt_class1()])], CLASS_IDS, NAMES, progress=False)
    assert r.per_class_iou == {1: pytest.approx(100.0), 2: 0.0}
    assert r.miou == pytest.approx(50.0)
    assert r.per_class_queries[2] == 0


def test_resolution_400_matches_manual_scoring():
    eps = episodes()
    seg = FakeSegmenter("perfect")
    r = evaluate(seg, eps, CLASS_IDS, NAMES, resolution=400, progress=False)
    m = FssMeter(CLASS_IDS)
    for ep in eps:
        for q in ep.queries:
            p, g = resize_for_scoring((q.gt == 1).astype(np.float32), q.gt, 400)
            m.update(ep.class_id, p > 0.5, g)
    assert r.resolution == 400
    assert r.miou == pytest.approx(m.miou()) and r.fbiou == pytest.approx(m.fbiou())


def test_query_without_ground_truth_raises_before_predicting():
    seg = FakeSegmenter()
    ep = Episode(1, "cat", (shot(),), (Query(image()),), episode_id="nolabel")
    with pytest.raises(FsdiffError, match="no ground truth"):
        evaluate(seg, [ep], CLASS_IDS, NAMES, progress=False)
    assert seg.calls == 0


def test_wrong_number_of_maps_and_foreign_class_raise():
    class Short(FakeSegmenter):
        def predict(self, episode):
            return []

    with pytest.raises(FsdiffError, match="0 probability maps for 1 queries"):
        evaluate(Short(), episodes(), CLASS_IDS, NAMES, progress=False)
    with pytest.raises(FsdiffError, match="not one of the evaluated classes"):
        evaluate(FakeSegmenter(), episodes(), [1], NAMES, progress=False)


def test_progress_bar_goes_to_stderr(capsys):
    evaluate(FakeSegmenter(), episodes(), CLASS_IDS, NAMES, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "2/2" in err


def test_generator_of_episodes_is_accepted():
    r = evaluate(FakeSegmenter(), (e for e in episodes()), CLASS_IDS, NAMES, progress=False)
    assert r.n_episodes == 2


def _two_seeds():
    a = evaluate(FakeSegmenter("perfect"), episodes(), CLASS_IDS, NAMES, progress=False)
    b = evaluate(FakeSegmenter("background"), episodes(), CLASS_IDS, NAMES, progress=False)
    return summarize_seeds([a, b], [123, 456])


def test_summarize_seeds():
    s = _two_seeds()
    # mIoU: 100 and 0 -> mean 50, sample std = sqrt((50^2 + 50^2) / 1) = 70.7107
    assert s["miou"] == pytest.approx(50.0) and s["miou_std"] == pytest.approx(math.sqrt(5000))
    # FB-IoU: 100 and 30 -> mean 65, sample std = sqrt((35^2 + 35^2) / 1) = 49.4975
    assert s["fbiou"] == pytest.approx(65.0) and s["fbiou_std"] == pytest.approx(math.sqrt(2450))
    assert s["seeds"] == [123, 456]
    assert [p["seed"] for p in s["per_seed"]] == [123, 456]
    assert [p["miou"] for p in s["per_seed"]] == [pytest.approx(100.0), 0.0]
    pc = {r["class_id"]: r for r in s["per_class"]}
    assert pc[1]["class_name"] == "cat" and pc[1]["iou"] == pytest.approx(50.0)
    assert pc[1]["per_seed"] == [pytest.approx(100.0), 0.0] and pc[1]["queries"] == 2
    assert s["total_episodes"] == 4
    with pytest.raises(FsdiffError):
        summarize_seeds([], [])
    with pytest.raises(FsdiffError, match="seeds"):
        summarize_seeds([EvalResult(1, 1, {1: 1.0}, 1, 1.0, 1.0)], [1, 2])


def test_single_seed_std_is_zero():
    r = evaluate(FakeSegmenter(), episodes(), CLASS_IDS, NAMES, progress=False)
    s = summarize_seeds([r], [0])
    assert s["miou_std"] == 0.0 and s["fbiou_std"] == 0.0


META = {"dataset": "pascal", "fold": 0, "shots": 1, "method": "fake", "encoder": None,
        "protocol": "hsnet", "episodes": 2}


def test_write_report_json_and_csv(tmp_path):
    s = _two_seeds()
    json_path, csv_path = write_report(tmp_path / "run", s, class_rows(s), META)
    doc = json.loads(json_path.read_text())
    for key in ("miou", "fbiou", "miou_std", "fbiou_std", "seeds", "per_seed", "dataset", "fold",
                "shots", "method", "encoder", "episodes", "protocol", "resolution",
                "fsdiff_version", "date"):
        assert key in doc, key
    assert doc["miou"] == pytest.approx(50.0) and doc["fbiou"] == pytest.approx(65.0)
    assert doc["seeds"] == [123, 456] and doc["dataset"] == "pascal" and doc["resolution"] == "original"
    assert doc["episodes"] == 2 and doc["encoder"] is None
    assert doc["fsdiff_version"] == "0.1.0" and doc["date"][:2] == "20"
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class_id", "class_name", "iou", "iou_std", "queries", "iou_seed_123", "iou_seed_456"]
    assert rows[0] == {"class_id": "1", "class_name": "cat", "iou": "50.0000", "iou_std": "70.7107",
                       "queries": "2", "iou_seed_123": "100.0000", "iou_seed_456": "0.0000"}
    assert rows[1]["class_name"] == "dog"
    # no temporary files left beside the report
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["per_class.csv", "summary.json"]


def test_meta_cannot_override_scores(tmp_path):
    s = _two_seeds()
    json_path, _ = write_report(tmp_path, s, None, {**META, "miou": 99.0, "resolution": 400})
    doc = json.loads(json_path.read_text())
    assert doc["miou"] == pytest.approx(50.0) and doc["resolution"] == "original"


def test_failing_segmenter_mid_run_leaves_no_summary(tmp_path):
    out = tmp_path / "run"
    seg = FakeSegmenter("perfect", fail_at=2)
    with pytest.raises(RuntimeError):
        r = evaluate(seg, episodes(), CLASS_IDS, NAMES, progress=False)
        write_report(out, summarize_seeds([r], [0]), None, META)
    assert not (out / "summary.json").exists()


def test_unwritable_report_leaves_nothing(tmp_path):
    s = _two_seeds()
    with pytest.raises(FsdiffError, match="cannot write"):
        write_report(tmp_path / "run", s, None, {**META, "encoder": object()})
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_format_table():
    s = _two_seeds()
    text = format_table(s)
    lines = text.splitlines()
    assert any(line.split()[:2] == ["1", "cat"] and "50.00" in line and "70.71" in line for line in lines)
    assert any(line.split()[0] == "mIoU" and "50.00" in line for line in lines)
    assert any(line.split()[0] == "FB-IoU" and "65.00" in line for line in lines)
    assert "2 seeds (123, 456)" in text
    one = summarize_seeds([evaluate(FakeSegmenter(), [episode(1, [gt_class1()])], CLASS_IDS, NAMES,
                                    progress=False)], [7])
    t1 = format_table(one)
    assert "± std" not in t1 and "no queries" in t1


def test_calibrated_threshold_uses_base_classes_only(shared_data, tmp_path):
    """--calibrate-threshold picks the threshold on the fold's training classes and records it."""
    from fsdiff.api import evaluate_benchmark

    class Constant:
        """Predicts 0.3 on the ground-truth object and 0.1 elsewhere: only thresholds in [0.1, 0.3) are perfect."""

        name = "constant"
        threshold = 0.5
        seen: list = []

        def predict(self, episode):
            Constant.seen.append(episode.class_id)
            return [np.where(q.gt == 1, 0.3, 0.1).astype(np.float32) for q in episode.queries]

    seg = Constant()
    summary, _ = evaluate_benchmark("coco", shared_data / "coco-mini", fold=0, shots=1, episodes=5, segmenter=seg,
                                    calibrate_threshold=4, progress=False)
    cal = summary["threshold_calibrated_on"]
    assert cal["split"] == "trn" and cal["episodes"] == 4
    assert 0.1 <= seg.threshold < 0.3 and summary["miou"] > 0
    from fsdiff.api import open_source

    novel = set(open_source("coco", shared_data / "coco-mini", fold=0).class_ids())  # fold 0's test classes
    calibration, scored = Constant.seen[:4], Constant.seen[4:]  # calibration runs first, one call per episode
    assert len(scored) == 5 and set(scored) <= novel
    assert not set(calibration) & novel, f"calibration used test classes {set(calibration) & novel}"


class Recorder:
    """An exact segmenter (0.9 on the object, 0.1 elsewhere) that records each episode's class and support kinds."""

    name = "recorder"
    threshold = 0.5

    def __init__(self) -> None:
        self.classes: list[int] = []
        self.kinds: list[tuple[str, ...]] = []

    def predict(self, episode):
        self.classes.append(episode.class_id)
        self.kinds.append(tuple(s.annotation.kind for s in episode.shots))
        return [np.where(q.gt == 1, 0.9, 0.1).astype(np.float32) for q in episode.queries]


def test_calibration_sees_the_same_support_kind(shared_data):
    """With --support-annotation box, the base-class calibration episodes get boxes too."""
    from fsdiff.api import evaluate_benchmark

    rec = Recorder()
    summary, _ = evaluate_benchmark("coco", shared_data / "coco-mini", fold=0, shots=1, episodes=3, segmenter=rec,
                                    calibrate_threshold=2, support_annotation="box", progress=False)
    assert summary["threshold_calibrated_on"]["support_annotation"] == "box" and summary["support_annotation"] == "box"
    assert len(rec.kinds) >= 5 and set(rec.kinds) == {("box",)}


def test_split_trn_scores_the_base_classes(shared_data, tmp_path):
    """split='trn' samples the fold's base classes (disjoint from its test classes) and records the split."""
    from fsdiff.api import evaluate_benchmark, open_source

    root = shared_data / "coco-mini"
    rec = Recorder()
    summary, _ = evaluate_benchmark("coco", root, fold=0, shots=1, episodes=6, segmenter=rec, split="trn",
                                    out=tmp_path / "r", progress=False)
    base = set(open_source("coco", root, fold=0, split="trn").class_ids())
    novel = set(open_source("coco", root, fold=0).class_ids())
    assert len(rec.classes) == 6 and set(rec.classes) <= base and not base & novel
    # the recorder is exact on the classes it saw; HSNet-style mIoU averages over all of the fold's classes
    assert summary["split"] == "trn" and summary["miou"] == pytest.approx(100.0 * len(set(rec.classes)) / len(base))
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["split"] == "trn"
    rec = Recorder()
    default, _ = evaluate_benchmark("coco", root, fold=0, shots=1, episodes=2, segmenter=rec, progress=False)
    assert default["split"] == "val" and set(rec.classes) <= novel
