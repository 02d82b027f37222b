"""fsdiff.app.annotations: the editor's painted layers and the page's clicks into support annotations."""

from __future__ import annotations

import numpy as np
import pytest

from fsdiff.app.annotations import (BACKGROUND_COLOUR, OBJECT_COLOUR, Clicks, box_from_corners, mask_from_editor,
                                    mask_layer, point_to_original, scribble_from_editor, stroke_labels)
from fsdiff.errors import FsdiffError


def layer(shape, strokes):
    """An RGBA layer with rectangles (y0, y1, x0, x1, rgb) painted opaque."""
    out = np.zeros((*shape, 4), np.uint8)
    for y0, y1, x0, x1, rgb in strokes:
        out[y0:y1, x0:x1] = (*rgb, 255)
    return out


def test_stroke_labels_by_colour_later_layers_on_top_eraser_is_alpha_zero():
    first = layer((10, 12), [(0, 5, 0, 6, OBJECT_COLOUR), (6, 8, 0, 12, BACKGROUND_COLOUR)])
    second = layer((10, 12), [(2, 4, 2, 4, BACKGROUND_COLOUR)])
    second[0, 0] = (0, 0, 0, 0)  # erased pixel: leaves the first layer's object label
    labels = stroke_labels([first, second])
    assert labels[0, 0] == 1 and labels[1, 5] == 1
    assert (labels[2:4, 2:4] == 2).all()
    assert (labels[6:8] == 2).all()
    assert labels[9, 0] == 0
    assert set(np.unique(labels)) == {0, 1, 2}


def test_antialiased_brush_colours_go_to_the_nearest_brush():
    lay = layer((4, 4), [(0, 2, 0, 4, (20, 170, 30)), (2, 4, 0, 4, (200, 30, 20))])
    lay[:, :, 3] = 90  # half transparent edge pixels still count as painted
    labels = stroke_labels([lay])
    assert (labels[:2] == 1).all() and (labels[2:] == 2).all()


def test_mask_from_a_downscaled_editor_maps_back_to_the_original_resolution():
    # the page shows a 1000x600 photo at 500x300; the user paints columns 100..199, rows 50..149 of the display
    value = {"background": np.zeros((300, 500, 4), np.uint8), "composite": None,
             "layers": [layer((300, 500), [(50, 150, 100, 200, OBJECT_COLOUR)])]}
    mask = mask_from_editor(value, (600, 1000))
    assert mask.shape == (600, 1000) and mask.dtype == np.uint8
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (100, 300, 200, 400)
    assert mask.sum() == 200 * 200


def test_mask_mode_background_strokes_remove_object_pixels():
    value = {"layers": [layer((20, 20), [(0, 20, 0, 20, OBJECT_COLOUR), (0, 20, 0, 5, BACKGROUND_COLOUR)])]}
    mask = mask_from_editor(value, (20, 20))
    assert mask[:, :5].sum() == 0 and mask[:, 5:].all()


def test_scribble_from_editor_keeps_object_and_background_strokes():
    value = {"layers": [layer((30, 40), [(5, 8, 5, 30, OBJECT_COLOUR), (25, 28, 0, 40, BACKGROUND_COLOUR)])]}
    s = scribble_from_editor(value, (60, 80))
    assert s.shape == (60, 80)
    assert (s[10:16, 10:60] == 1).all() and (s[50:56] == 2).all()
    assert s[30, 30] == 0


def test_nothing_painted_and_foreign_canvas_are_clear_errors():
    with pytest.raises(FsdiffError, match="nothing painted"):
        mask_from_editor({"layers": []}, (10, 10))
    with pytest.raises(FsdiffError, match="proportions"):
        mask_from_editor({"layers": [layer((100, 100), [(0, 10, 0, 10, OBJECT_COLOUR)])]}, (100, 300))


def test_mask_layer_round_trips_through_the_editor_decoding():
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 6:50] = 1  # even edges: exact at half size
    lay = mask_layer(mask, (20, 30))  # shown at half size
    assert lay.shape == (20, 30, 4)
    back = mask_from_editor({"layers": [lay]}, (40, 60))
    assert np.array_equal(back, mask)


def test_box_from_two_corners_scaled_to_the_original_with_exclusive_ends():
    # display 100x50 of a 200x100 image: corners (10, 20) and (30, 40) cover display pixels 10..30 x 20..40
    assert box_from_corners((30, 40), (10, 20), (50, 100), (100, 200)) == (20, 40, 62, 82)
    assert box_from_corners((0, 0), (99, 49), (50, 100), (100, 200)) == (0, 0, 200, 100)


def test_box_of_zero_area_is_refused():
    with pytest.raises(FsdiffError, match="zero area"):
        box_from_corners((10, 5), (10, 40), (50, 100), (50, 100))
    with pytest.raises(FsdiffError, match="share a row"):
        box_from_corners((3, 7), (40, 7), (50, 100), (50, 100))


def test_points_map_pixel_centres_and_clicks_build_one_annotation():
    assert point_to_original(0, 0, (50, 100), (100, 200)) == (0.5, 0.5)
    assert point_to_original(99, 49, (50, 100), (100, 200)) == (198.5, 98.5)
    c = Clicks()
    c.add(10, 10, "object")
    c.add(40, 30, "background")
    ann = c.annotation((50, 100), (50, 100))
    assert ann == {"points": [(10.0, 10.0, 1), (40.0, 30.0, 0)]}
    c.add(1, 1, "box")
    with pytest.raises(FsdiffError, match="not both"):
        c.annotation((50, 100), (50, 100))


def test_box_clicks_third_corner_starts_a_new_box_and_one_corner_is_incomplete():
    c = Clicks()
    c.add(1, 1, "box")
    with pytest.raises(FsdiffError, match="one corner"):
        c.annotation((50, 100), (50, 100))
    c.add(20, 30, "box")
    c.add(5, 6, "box")
    assert c.corners == [(5.0, 6.0)]
    c.add(15, 16, "box")
    assert c.annotation((50, 100), (50, 100)) == {"box": (5, 6, 16, 17)}
    with pytest.raises(FsdiffError, match="click mode"):
        c.add(1, 1, "lasso")
    with pytest.raises(FsdiffError, match="nothing clicked"):
        Clicks().annotation((5, 5), (5, 5))
