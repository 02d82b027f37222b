"""DifFSS control maps and the ADE palette tables (DifFSS code: ``FSSpregenerate.py``, ``constant.py``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fsdiff.augment import controls as C
from fsdiff.augment import palette as P
from fsdiff.episode import BoxAnnotation, PointsAnnotation, ScribbleAnnotation, TextAnnotation
from fsdiff.errors import FsdiffError

WALL = (120, 120, 120)

# ----------------------------------------------------------------------------------------------
# palette and tables
# ----------------------------------------------------------------------------------------------


def test_palette_is_the_150_entry_mmseg_palette_indexed_from_zero():
    assert len(P.ADE_PALETTE) == len(P.ADE_CLASSES) == len(P.ADE_FULL_NAMES) == 150
    assert P.ADE_PALETTE[0] == WALL and P.ADE_CLASSES[0] == "wall"
    assert P.BACKGROUND_COLOR == WALL
    # well-known ControlNet seg colours
    assert P.ADE_PALETTE[12] == (150, 5, 61) and P.ADE_CLASSES[12] == "person"
    assert P.ADE_PALETTE[20] == (0, 102, 200) and P.ADE_CLASSES[20] == "car"
    assert P.ADE_PALETTE[4] == (4, 200, 3) and P.ADE_CLASSES[4] == "tree"
    assert P.ADE_CLASSES[126] == "animal" and P.ADE_PALETTE[126] == (255, 0, 122)
    assert P.ADE_PALETTE[-1] == (92, 0, 255) and P.ADE_CLASSES[-1] == "flag"
    for short, full in zip(P.ADE_CLASSES, P.ADE_FULL_NAMES):
        assert full.split(",")[0] == short


@pytest.mark.parametrize(
    "name,idx",
    [("airplane", 90), ("aeroplane", 90), ("bicycle", 127), ("bird", 126), ("dog", 126), ("boat", 76),
     ("bottle", 98), ("bus", 80), ("car", 20), ("chair", 19), ("diningtable", 15), ("dining table", 15),
     ("motorbike", 116), ("person", 12), ("pottedplant", 17), ("potted plant", 17), ("sofa", 23),
     ("train", 20), ("tvmonitor", 89), ("tv/monitor", 89), ("television", 89)],
)
def test_pascal_names_and_spellings_map_like_the_official_table(name, idx):
    r = P.resolve_class(name)
    assert r.ade_index == idx and r.rule == "dataset"
    assert r.rgb == P.ADE_PALETTE[idx]


def test_pascal_table_covers_20_classes_and_agrees_with_voc_class_names(shared_data):
    assert sorted(P.PASCAL_TO_ADE) == list(range(1, 21))
    names = [n for n in (shared_data / "voc-mini/VOC2012/class_names.txt").read_text().splitlines() if n.strip()]
    assert names[0] == "_background_" and len(names) == 21
    for i, n in enumerate(names[1:], 1):
        assert P.ade_index(n) == P.PASCAL_TO_ADE[i], n


def test_coco_table_covers_all_80_classes_of_the_real_json(shared_data):
    cats = json.loads((shared_data / "coco-mini/instances.json").read_text())["categories"]
    names = [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
    assert len(names) == 80 and tuple(names) == P.COCO_CLASSES
    for i, n in enumerate(names, 1):
        r = P.resolve_class(n)
        assert r.rule == "dataset" and r.ade_index == P.COCO_TO_ADE[i], n


def test_coco_table_hard_coded_facts():
    assert len(P.COCO_CLASSES) == 80 and sorted(P.COCO_TO_ADE) == list(range(1, 81))
    for n in ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"):
        assert P.COCO_NAME_TO_ADE[n] == P.ANIMAL_INDEX
    assert P.ADE_CLASSES[P.COCO_NAME_TO_ADE["truck"]] == "truck"
    assert P.ADE_CLASSES[P.COCO_NAME_TO_ADE["couch"]] == "sofa"
    assert P.ADE_CLASSES[P.COCO_NAME_TO_ADE["tv"]] == "television receiver"
    # PASCAL and COCO agree on every shared class
    shared = {"bicycle": "bicycle", "car": "car", "motorbike": "motorcycle", "airplane": "airplane", "bus": "bus",
              "train": "train", "boat": "boat", "bottle": "bottle", "chair": "chair", "sofa": "couch",
              "potted plant": "potted plant", "dining table": "dining table", "television": "tv", "person": "person"}
    for p, c in shared.items():
        assert P.PASCAL_NAME_TO_ADE[p] == P.COCO_NAME_TO_ADE[c]


def test_fallback_rules_for_other_names():
    assert P.resolve_class("Couch").ade_index == 23
    assert P.resolve_class("window").ade_name == "windowpane"  # ADE synonym
    assert P.resolve_class("flowers").ade_name == "flower"  # singular
    assert P.resolve_class("pot").ade_name == "pot"  # primary name beats toilet's synonym 'pot'
    assert P.resolve_class("sea lion").ade_index == P.ANIMAL_INDEX  # head word, animal
    assert P.resolve_class("fire truck").ade_name == "truck"
    assert P.resolve_class("golden_retriever").rule == "hash"
    assert P.resolve_class("box turtle", table={"box turtle": 41}).rule == "table"


def test_hashed_colour_is_deterministic_and_never_background():
    a = P.class_color("xyzzy widget")
    assert a == P.class_color("XYZZY_widget") == P.hashed_color("xyzzy widget")
    assert a != P.class_color("another widget")
    # fixed value: sha256-based, identical on every machine and run
    import colorsys
    import hashlib

    d = hashlib.sha256(b"xyzzy widget").digest()
    rgb = colorsys.hsv_to_rgb(int.from_bytes(d[:2], "big") / 65536, 0.65 + 0.35 * d[2] / 255, 0.75 + 0.25 * d[3] / 255)
    assert a == tuple(int(round(v * 255)) for v in rgb)
    for i in range(200):
        c = P.hashed_color(f"class {i}")
        assert max(c) >= 191 and c != WALL and max(c) - min(c) > 60


def test_prompt_names_and_template():
    assert P.prompt_name("mouse") == "computer mouse"
    assert P.prompt_name("remote") == "remote controller"
    assert P.prompt_name("tvmonitor") == "television"
    assert P.prompt_name("aeroplane") == "airplane"
    assert P.prompt_name("golden_retriever") == "golden retriever"
    assert C.build_prompt("dog") == "a real shot photo of dog,, best quality, extremely detailed"
    assert C.build_prompt("dog", fix_double_comma=True) == "a real shot photo of dog, best quality, extremely detailed"
    assert C.NEGATIVE_PROMPT == (
        "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
        "worst quality, low quality, artwork"
    )


def test_load_name_table(tmp_path):
    f = tmp_path / "fss2ade.txt"
    f.write_text("taxi#taxi#truck;motortruck#83\nbox turtle#box turtle#box#41\n")
    t = P.load_name_table(f)
    assert t == {"taxi": 83, "box turtle": 41}
    assert P.resolve_class("taxi", table=t).ade_name == "truck"
    f.write_text("taxi#taxi#truck#xx\n")
    with pytest.raises(FsdiffError, match="line 1"):
        P.load_name_table(f)
    with pytest.raises(FsdiffError, match="not found"):
        P.load_name_table(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hw,expected",
    [((375, 500), (512, 704)), ((480, 640), (512, 704)), ((500, 333), (768, 512)), ((512, 512), (512, 512)),
     ((100, 150), (512, 768)), ((1024, 1024), (512, 512)),
     ((512, 544), (512, 512)),  # 544/64 = 8.5 -> np.round half to even -> 8
     ((512, 608), (512, 640))],  # 9.5 -> 10
)
def test_generation_size_rounds_like_resize_image(hw, expected):
    assert C.generation_size(*hw) == expected
    h, w = expected
    assert h % 64 == 0 and w % 64 == 0
    img = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    out = C.resize_for_generation(img)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8


def test_resize_is_identity_when_already_aligned():
    img = np.random.default_rng(1).integers(0, 256, (512, 640, 3), dtype=np.uint8)
    assert np.array_equal(C.resize_for_generation(img), img)


def test_resize_rejects_absurd_aspect_ratio():
    with pytest.raises(FsdiffError, match="aspect ratio"):
        C.resize_for_generation(np.zeros((2, 400, 3), np.uint8))


# ----------------------------------------------------------------------------------------------
# seg control
# ----------------------------------------------------------------------------------------------


def test_seg_control_paints_class_and_wall_grey_with_nearest_resize():
    mask = np.zeros((4, 4), np.uint8)
    mask[0:2, 0:2] = 1
    mask[3, 3] = 255  # ignore -> background grey, as palette[(mask == c) * idx] does
    out = C.seg_control(mask, "dog", (8, 8))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    expected = np.empty((8, 8, 3), np.uint8)
    expected[...] = WALL
    expected[0:4, 0:4] = P.ADE_PALETTE[126]  # animal
    assert np.array_equal(out, expected)
    car = C.seg_control(mask, "car", (4, 4))
    assert tuple(car[0, 0]) == (0, 102, 200) and tuple(car[3, 3]) == WALL


def test_seg_control_default_size_is_generation_size():
    mask = np.zeros((375, 500), np.uint8)
    mask[100:200, 100:300] = 1
    out = C.seg_control(mask, "person")
    assert out.shape == (512, 704, 3)
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert colours == {WALL, (150, 5, 61)}


def test_empty_support_mask_is_an_error():
    with pytest.raises(FsdiffError, match="empty"):
        C.seg_control(np.zeros((8, 8), np.uint8), "dog", (8, 8))
    with pytest.raises(FsdiffError, match="empty"):
        C.hed_control(np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8))


# ----------------------------------------------------------------------------------------------
# hed / scribble controls
# ----------------------------------------------------------------------------------------------


def _cv2_ellipse(size: int) -> np.ndarray:
    """The MORPH_ELLIPSE construction of OpenCV's getStructuringElement, re-implemented."""
    r = c = size // 2
    k = np.zeros((size, size), np.uint8)
    for i in range(size):
        dy = i - r
        if abs(dy) <= r:
            dx = int(round(c * math.sqrt((r * r - dy * dy) / (r * r))))
            k[i, max(c - dx, 0): min(c + dx + 1, size)] = 1
    return k


def _numpy_dilate(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """dst(y, x) = max over kernel taps (i, j) of src(y + i - ay, x + j - ax), anchor at the centre."""
    kh, kw = kernel.shape
    ay, ax = kh // 2, kw // 2
    h, w = mask.shape
    pad = np.zeros((h + kh, w + kw), np.uint8)
    pad[ay: ay + h, ax: ax + w] = mask
    out = np.zeros_like(mask)
    for i, j in zip(*np.nonzero(kernel)):
        out = np.maximum(out, pad[i: i + h, j: j + w])
    return out


def test_ellipse_kernel_matches_hand_construction():
    k = C.ellipse_kernel(14)
    assert np.array_equal(k, _cv2_ellipse(14))
    assert k.shape == (14, 14) and k[0].tolist() == [0] * 7 + [1] + [0] * 6
    assert k[7].all()


def test_mask_is_dilated_exactly_once_with_14x14_ellipse():
    mask = np.zeros((40, 40), np.uint8)
    mask[20, 20] = 1
    mask[5, 30:33] = 1
    got = C.dilate_once(mask)
    assert np.array_equal(got, _numpy_dilate(mask, _cv2_ellipse(14)))
    # a single pixel grows into the reflected kernel: 6 rows up, 7 rows down (one pixel)
    ys, xs = np.nonzero(_numpy_dilate((np.arange(1600).reshape(40, 40) == 20 * 40 + 20).astype(np.uint8), _cv2_ellipse(14)))
    assert ys.min() == 14 and ys.max() == 27 and xs.min() == 14 and xs.max() == 27
    # ten iterations (the misread of cv2.dilate(m, k, 10)) would grow far more
    import cv2

    ten = cv2.dilate(mask, C.ellipse_kernel(14), iterations=10)
    assert ten.sum() > got.sum()


def test_hed_control_masks_edges_with_the_dilated_mask():
    edge = np.random.default_rng(2).integers(0, 256, (40, 40), dtype=np.uint8)
    mask = np.zeros((20, 20), np.uint8)  # half the edge map's size: nearest-resized first
    mask[10, 10] = 1
    out = C.hed_control(edge, mask)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    up = np.zeros((40, 40), np.uint8)
    up[20:22, 20:22] = 1
    expected = edge * _numpy_dilate(up, _cv2_ellipse(14))
    assert np.array_equal(out[..., 0], expected)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_scribble_threshold_is_strictly_above_127():
    edge = np.zeros((512, 512), np.uint8)
    edge[:, :128] = 127
    edge[:, 128:256] = 128
    edge[:, 256:] = 255
    mask = np.ones((512, 512), np.uint8)
    out = C.scribble_control(edge, mask)
    assert out.shape == (512, 512, 3)
    assert set(np.unique(out).tolist()) == {0, 255}
    assert (out[:, :128] == 0).all()
    assert (out[:, 128:] == 255).all()


def test_scribble_is_zero_outside_the_dilated_mask():
    edge = np.full((512, 512), 255, np.uint8)
    mask = np.zeros((512, 512), np.uint8)
    mask[100:200, 100:200] = 1
    out = C.scribble_control(edge, mask)[..., 0]
    dil = _numpy_dilate(mask, _cv2_ellipse(14))
    assert np.array_equal(out == 255, dil == 1)


def test_edge_map_validation():
    mask = np.ones((8, 8), np.uint8)
    with pytest.raises(FsdiffError, match="uint8"):
        C.hed_control(np.zeros((8, 8), np.float32), mask)
    with pytest.raises(FsdiffError, match="single-channel"):
        C.hed_control(np.zeros((8, 8, 3), np.uint8), mask)


# ----------------------------------------------------------------------------------------------
# box / scribble / points supports
# ----------------------------------------------------------------------------------------------


def test_box_support_seg_is_the_filled_box_and_gates_hed():
    box = BoxAnnotation((2.0, 1.0, 6.0, 4.0))
    seg = C.seg_control(box, "car", (8, 8), image_shape=(8, 8))
    expected = np.empty((8, 8, 3), np.uint8)
    expected[...] = WALL
    expected[1:4, 2:6] = (0, 102, 200)
    assert np.array_equal(seg, expected)
    edge = np.full((64, 64), 200, np.uint8)
    gate = np.zeros((64, 64), np.uint8)
    gate[8:32, 16:48] = 1
    hed = C.hed_control(edge, box, image_shape=(8, 8))
    assert np.array_equal(hed[..., 0], 200 * _numpy_dilate(gate, _cv2_ellipse(14)))
    with pytest.raises(FsdiffError, match="image_shape"):
        C.seg_control(box, "car", (8, 8))


def test_scribble_and_points_supports():
    strokes = np.zeros((100, 100), np.uint8)
    strokes[50, 30:70] = 1
    regions = C.support_regions(ScribbleAnnotation(strokes))
    assert regions.seg[50, 30:70].all() and regions.seg.sum() > strokes.sum()
    assert regions.seg[50 - 3: 50 + 4, 40].all()  # thickened by >= 3 px
    # gate: strokes' box grown by 10 % of the image per side
    ys, xs = np.nonzero(regions.gate)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (40, 60, 20, 79)
    pts = PointsAnnotation(np.array([[20.0, 30.0]]), np.array([1]))
    r2 = C.support_regions(pts, (100, 100))
    assert r2.seg[30, 20] == 1
    with pytest.raises(FsdiffError, match="spatial"):
        C.support_regions(TextAnnotation(), (100, 100))


# ----------------------------------------------------------------------------------------------
# tensors, specs, dispatch
# ----------------------------------------------------------------------------------------------


def test_control_to_tensor():
    import torch

    ctrl = np.zeros((4, 6, 3), np.uint8)
    ctrl[0, 0] = (255, 0, 51)
    t = C.control_to_tensor(ctrl)
    assert t.shape == (1, 3, 4, 6) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert t[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])


@pytest.mark.parametrize(
    "spec,expected",
    [("hed:4", ("hed", 4)), ("seg", ("seg", 4)), ("scribble:2", ("scribble", 2)), (" SEG : 3 ", ("seg", 3))],
)
def test_parse_condition(spec, expected):
    assert C.parse_condition(spec) == expected


@pytest.mark.parametrize("spec,msg", [("depth:2", "seg, hed, scribble"), ("hed:x", "whole number"), ("seg:0", "at least 1"), ("", "empty")])
def test_parse_condition_errors(spec, msg):
    with pytest.raises(FsdiffError, match=msg):
        C.parse_condition(spec)


def test_build_control_dispatch():
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 1
    edge = np.full((512, 512), 200, np.uint8)
    assert C.build_control("seg", mask, class_name="cat").shape == (512, 512, 3)
    assert np.array_equal(C.build_control("hed", mask, edge_map=edge), C.hed_control(edge, mask))
    with pytest.raises(FsdiffError, match="edge map"):
        C.build_control("scribble", mask)
    with pytest.raises(FsdiffError, match="class name"):
        C.build_control("seg", mask)
    with pytest.raises(FsdiffError, match="unknown condition"):
        C.build_control("canny", mask)
    assert C.CONDITIONS == ("seg", "hed", "scribble")
