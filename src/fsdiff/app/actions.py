"""What each control of the page does, on one session, without gradio: the page (:mod:`fsdiff.app.ui`) and the
scripting API call these and only show their results.

They assemble supports and queries into the library's objects (:func:`fsdiff.api.load_shot`,
:class:`fsdiff.episode.Query`) and run the library's segmenters through :mod:`fsdiff.app.jobs`; every bad
input is an :class:`~fsdiff.errors.FsdiffError` whose message the page shows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fsdiff.api import load_shot
from fsdiff.app import jobs, render
from fsdiff.app.annotations import mask_from_editor, mask_layer, scribble_from_editor
from fsdiff.app.config import AppConfig
from fsdiff.app.examples import Example, bundled_example
from fsdiff.app.export import ExportItem, write_export
from fsdiff.app.models import ModelCache
from fsdiff.app.session import AppSession, Picture, QueryItem, SupportItem
from fsdiff.app.uploads import check_file_size, picture, read_image_file, read_query_uploads, upload_name
from fsdiff.episode import Query
from fsdiff.errors import FsdiffError
from fsdiff.inputs import to_mask

TOOLS = ("paint", "clicks", "mask file")
PAINT_MODES = ("mask", "scribbles")
CLICK_MODES = {"box corners": "box", "object point": "object", "background point": "background"}
VIEWS = ("overlay", "probability", "uncertainty")
Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------- supports
def load_example(session: AppSession, config: AppConfig, example: Example | None = None) -> None:
    """Fill an empty session with the bundled example (annotated supports and queries)."""
    with session.lock:
        if session.supports or session.queries:
            return
        ex = example or bundled_example()
        for image_path, mask_path in ex.supports:
            pic = picture(read_image_file(image_path, image_path.name, config), image_path.name, config)
            mask = to_mask(os.fspath(mask_path), None, f"mask {mask_path.name}")
            _append_support(session, pic, {"mask": mask}, config, origin="example")
        for path in ex.queries:
            session.queries.append(QueryItem(picture(read_image_file(path, path.name, config), path.name, config),
                                             session.unique_stem(path.name)))
        session.class_name = ex.class_name


def set_support_image(session: AppSession, path: str | os.PathLike, config: AppConfig) -> Picture:
    """Validate an uploaded support image and make it the one being annotated."""
    name = upload_name(path)
    pic = picture(read_image_file(path, name, config), name, config)
    with session.lock:
        session.draft = pic
        session.clicks.corners.clear()
        session.clicks.points.clear()
    return pic


def _draft(session: AppSession) -> Picture:
    if session.draft is None:
        raise FsdiffError("no support image: upload a support image first, then annotate it.")
    return session.draft


def click(session: AppSession, x: float, y: float, mode: str) -> np.ndarray:
    """Record a click on the support picture; returns the picture with the clicks drawn."""
    _draft(session)
    if mode not in CLICK_MODES:
        raise FsdiffError(f"click mode {mode!r}: choose one of {', '.join(CLICK_MODES)}.")
    with session.lock:
        session.clicks.add(x, y, CLICK_MODES[mode])
    return clicks_picture(session)


def clicks_picture(session: AppSession) -> np.ndarray | None:
    """The support picture with its clicks (corners, box, points) drawn, or None without a support image."""
    pic = session.draft
    if pic is None:
        return None
    c = session.clicks
    ann: dict[str, Any] = {"points": c.points}
    if len(c.corners) == 2:
        (xa, ya), (xb, yb) = c.corners
        ann["box"] = (min(xa, xb), min(ya, yb), max(xa, xb) + 1, max(ya, yb) + 1)
    else:
        ann["corners"] = c.corners
    return render.annotation_picture(pic.display, ann)


def clear_clicks(session: AppSession) -> np.ndarray | None:
    """Forget the clicks on the support picture."""
    with session.lock:
        session.clicks.corners.clear()
        session.clicks.points.clear()
    return clicks_picture(session)


def _append_support(session: AppSession, pic: Picture, annotation: dict, config: AppConfig,
                    origin: str = "upload") -> SupportItem:
    if len(session.supports) >= config.max_supports:
        raise FsdiffError(f"this session holds {config.max_supports} supports, the limit; remove one first.")
    shot = load_shot(pic.image, name=pic.name, **annotation)
    item = SupportItem(pic, annotation, shot, origin=origin)
    session.supports.append(item)
    return item


def annotation_from_tool(session: AppSession, tool: str, paint_mode: str, editor_value: Mapping | None,
                         mask_path: str | os.PathLike | None, config: AppConfig) -> dict:
    """The ``load_shot`` annotation the chosen tool holds for the support picture, at its original size."""
    pic = _draft(session)
    if tool == "paint":
        if paint_mode == "scribbles":
            return {"scribble": scribble_from_editor(editor_value, pic.shape)}
        return {"mask": mask_from_editor(editor_value, pic.shape)}
    if tool == "clicks":
        return session.clicks.annotation(pic.display_shape, pic.shape)
    if tool == "mask file":
        if not mask_path:
            raise FsdiffError("mask file: no mask uploaded; upload a binary mask PNG (0/255 or 0/1) of the support.")
        name = upload_name(mask_path)
        check_file_size(mask_path, name, config)
        try:
            return {"mask": to_mask(os.fspath(mask_path), None, f"mask {name}")}
        except FsdiffError as exc:
            raise FsdiffError(str(exc).replace(os.fspath(mask_path), name)) from None
    raise FsdiffError(f"annotation tool {tool!r}: choose one of {', '.join(TOOLS)}.")


def add_support(session: AppSession, tool: str, paint_mode: str, editor_value: Mapping | None,
                mask_path: str | os.PathLike | None, config: AppConfig) -> SupportItem:
    """Turn the support picture and the chosen tool's annotation into a support shot (validated by the library)."""
    with session.lock:
        pic = _draft(session)
        annotation = annotation_from_tool(session, tool, paint_mode, editor_value, mask_path, config)
        item = _append_support(session, pic, annotation, config)
        session.draft = None
        session.clicks.corners.clear()
        session.clicks.points.clear()
        return item


def describe(item: SupportItem) -> str:
    """A support's annotation in words: its kind, and the box or point count in original pixels."""
    ann = item.annotation
    if ann.get("box") is not None:
        return "box ({}, {}, {}, {})".format(*(int(round(v)) for v in ann["box"]))
    if ann.get("points") is not None:
        n = len(ann["points"])
        return f"{n} point{'s' if n != 1 else ''}"
    region = ann.get("mask") if ann.get("mask") is not None else ann.get("scribble")
    if region is not None:
        ys, xs = np.nonzero(np.asarray(region) == 1)
        kind = "mask" if ann.get("mask") is not None else "scribble"
        return f"{kind} of {len(ys):,} object pixels in ({xs.min()}, {ys.min()}, {xs.max() + 1}, {ys.max() + 1})"
    return item.shot.annotation.kind


def remove_support(session: AppSession, index: int | None) -> None:
    """Remove support ``index`` (the one selected in the gallery)."""
    with session.lock:
        if index is None or not 0 <= index < len(session.supports):
            raise FsdiffError("remove support: select a support in the gallery first.")
        del session.supports[index]
        session.selected_support = None


def support_pictures(session: AppSession) -> list[tuple[np.ndarray, str]]:
    """Each support with its annotation drawn and, where the weak-label step ran, its estimated mask in yellow."""
    out = []
    for i, s in enumerate(session.supports, start=1):
        pic = s.picture
        ann = render.scale_annotation(s.annotation, pic.shape, pic.display_shape)
        caption = f"{i}: {pic.name} ({s.shot.annotation.kind}{', corrected query' if s.origin.startswith('corrected') else ''})"
        if s.estimate is not None:
            caption += "; estimated mask in yellow"
        out.append((render.annotation_picture(pic.display, ann, s.estimate), caption))
    return out


# ---------------------------------------------------------------------------------------------- queries
def add_queries(session: AppSession, paths: Sequence[str | os.PathLike], config: AppConfig) -> int:
    """Validate uploaded query images (or zips of images) and add them; returns how many were added."""
    if not paths:
        raise FsdiffError("queries: no file uploaded; upload images (JPEG, PNG, ...) or a zip of images.")
    with session.lock:
        room = config.max_queries - len(session.queries)
        if room <= 0:
            raise FsdiffError(f"this session holds {config.max_queries} queries, the limit; export and clear them first.")
        pictures = read_query_uploads(paths, config, room)
        for pic in pictures:
            session.queries.append(QueryItem(pic, session.unique_stem(pic.name)))
        return len(pictures)


def clear_queries(session: AppSession) -> None:
    """Remove every query and its results."""
    with session.lock:
        session.queries.clear()
        session.selected_query = None


def segment(session: AppSession, models: ModelCache, method: str, encoder: str, class_name: str,
            progress: Progress | None = None) -> str:
    """Segment every query that has no corrected mask with all supports; returns a summary line."""
    with session.lock:
        if not session.supports:
            raise FsdiffError("no support: add at least one annotated support image before segmenting.")
        targets = [q for q in session.queries if q.corrected is None]
        if not session.queries:
            raise FsdiffError("no query: upload the images to segment first.")
        shots = [s.shot for s in session.supports]
        session.class_name = class_name.strip()
    seg = models.get(method, encoder)
    queries = [Query(q.picture.image, image_id=q.picture.name) for q in targets]
    start = time.perf_counter()
    result = jobs.run(seg, shots, queries, session.class_name, progress)
    seconds = time.perf_counter() - start
    with session.lock:
        session.check_open()
        for q, (prob, unc) in zip(targets, result.maps):
            q.prob, q.uncertainty = prob, unc
        for s, est in zip(session.supports, result.estimates):
            if est is not None:
                s.estimate = est
        if session.result_method != method:
            session.threshold = float(seg.threshold)
            session.result_method = method
    k = len(shots)
    return (f"Segmented {len(targets)} quer{'y' if len(targets) == 1 else 'ies'} with {k} support{'s' if k != 1 else ''} "
            f"({method}) in {seconds:.1f} s.")


def _caption(q: QueryItem, view: str, has_map: bool) -> str:
    if q.corrected is not None:
        return f"{q.picture.name} (corrected)"
    if q.prob is None:
        return f"{q.picture.name} (not segmented yet)"
    if view == "uncertainty" and not has_map:
        return f"{q.picture.name} (this method gives no uncertainty map)"
    return f"{q.picture.name} ({view})"


def result_pictures(session: AppSession) -> list[tuple[np.ndarray, str]]:
    """Each query as the chosen view shows it, from the cached maps (no model runs)."""
    out = []
    with session.lock:
        view, t = session.view, session.threshold
        for q in session.queries:
            pic = q.picture
            mask = q.mask(t)
            if mask is None:
                out.append((pic.display, _caption(q, view, False)))
                continue
            shown_mask = render.fit_map(mask.astype(np.uint8), pic.display_shape, nearest=True) > 0
            if view == "probability" and q.corrected is None and q.prob is not None:
                image = render.probability_picture(render.fit_map(q.prob, pic.display_shape))
            elif view == "uncertainty" and q.corrected is None and q.uncertainty is not None:
                image = render.uncertainty_picture(render.fit_map(q.uncertainty, pic.display_shape))
            else:
                image = render.result_picture(pic.display, shown_mask)
            out.append((image, _caption(q, view, q.uncertainty is not None)))
    return out


def set_threshold(session: AppSession, threshold: float) -> None:
    """Set the decision threshold of the shown masks (re-rendered from cached probabilities)."""
    t = float(threshold)
    if not 0.0 < t < 1.0:
        raise FsdiffError(f"threshold={threshold!r}: must lie strictly between 0 and 1.")
    with session.lock:
        session.threshold = t


def set_view(session: AppSession, view: str) -> None:
    """Choose what the result gallery shows: overlay, probability or uncertainty."""
    if view not in VIEWS:
        raise FsdiffError(f"view {view!r}: choose one of {', '.join(VIEWS)}.")
    with session.lock:
        session.view = view


# ---------------------------------------------------------------------------------------------- correct and add
def select_result(session: AppSession, index: int) -> dict:
    """Open query ``index`` for correction: the editor value with its current mask as the painted layer."""
    with session.lock:
        if not 0 <= index < len(session.queries):
            raise FsdiffError("correct: select a result in the gallery first.")
        q = session.queries[index]
        mask = q.mask(session.threshold)
        if mask is None:
            raise FsdiffError(f"{q.picture.name} is not segmented yet; press Segment first.")
        session.selected_query = index
        pic = q.picture
        return {"background": pic.display, "layers": [mask_layer(mask, pic.display_shape)], "composite": None}


def add_corrected(session: AppSession, editor_value: Mapping | None, models: ModelCache, method: str, encoder: str,
                  class_name: str, config: AppConfig, progress: Progress | None = None) -> str:
    """The corrected mask of the selected query becomes a new support; the other queries are segmented again."""
    with session.lock:
        index = session.selected_query
        if index is None or not 0 <= index < len(session.queries):
            raise FsdiffError("correct: select a result in the gallery first.")
        q = session.queries[index]
        mask = mask_from_editor(editor_value, q.picture.shape)
        _append_support(session, q.picture, {"mask": mask}, config, origin=f"corrected {q.picture.name}")
        q.corrected = mask
        session.selected_query = None
    summary = segment(session, models, method, encoder, class_name, progress)
    return f"{q.picture.name} added as support {len(session.supports)}. {summary}"


# ---------------------------------------------------------------------------------------------- export
def export(session: AppSession) -> Path:
    """Write the session's masks and COCO files into its folder as one zip; returns its path."""
    with session.lock:
        session.check_open()
        items = []
        for q in session.queries:
            mask = q.mask(session.threshold)
            if mask is None:
                continue
            if q.corrected is not None:
                score = 1.0
            else:
                score = float(q.prob[mask].mean()) if mask.any() else 0.0  # type: ignore[index]
            items.append(ExportItem(q.picture.name, q.stem, mask.astype(np.uint8), score))
        return write_export(session.folder, items, session.class_name)


# ---------------------------------------------------------------------------------------------- scripting API
def parse_annotations(text: str | None, n_supports: int, n_files: int) -> list[dict]:
    """The API's per-support annotations: a JSON list with one of ``{"mask": i}``, ``{"scribble": i}`` (index
    into the annotation files), ``{"box": [x0, y0, x1, y1]}`` or ``{"points": [[x, y, label], ...]}`` per
    support; empty means support i uses annotation file i as its mask."""
    if not text or not text.strip():
        if n_files != n_supports:
            raise FsdiffError(f"annotations: none given, so each support needs one mask file; got {n_supports} "
                              f"support(s) and {n_files} annotation file(s).")
        return [{"mask": i} for i in range(n_supports)]
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise FsdiffError(f"annotations: not valid JSON ({exc}).") from None
    if not isinstance(items, list) or len(items) != n_supports or not all(isinstance(a, dict) and len(a) == 1
                                                                          for a in items):
        raise FsdiffError(f"annotations: expected a JSON list with one single-key object per support ({n_supports}), "
                          'e.g. [{"mask": 0}, {"box": [30, 40, 380, 300]}].')
    for a in items:
        (key, value), = a.items()
        if key not in ("mask", "scribble", "box", "points"):
            raise FsdiffError(f"annotations: {key!r} is not an annotation; use mask, scribble, box or points.")
        if key in ("mask", "scribble") and not (isinstance(value, int) and 0 <= value < n_files):
            raise FsdiffError(f"annotations: {key} {value!r} must index the annotation files (0..{n_files - 1}).")
    return items


def segment_files(session: AppSession, models: ModelCache, config: AppConfig, supports: Sequence[str],
                  annotation_files: Sequence[str], annotations: str | None, queries: Sequence[str], class_name: str,
                  method: str, encoder: str, threshold: float | None,
                  progress: Progress | None = None) -> tuple[Path, dict]:
    """One call for scripts: annotated supports and queries in, the export zip and a summary out.

    The session's earlier supports and queries are replaced.
    """
    if not supports:
        raise FsdiffError("supports: no support image given; pass at least one.")
    specs = parse_annotations(annotations, len(supports), len(annotation_files or ()))
    files = list(annotation_files or ())
    new_supports = []
    for path, spec in zip(supports, specs):
        name = upload_name(path)
        pic = picture(read_image_file(path, name, config), name, config)
        (key, value), = spec.items()
        if key in ("mask", "scribble"):
            fname = upload_name(files[value])
            check_file_size(files[value], fname, config)
            try:
                ann = {"mask": to_mask(files[value], None, f"mask {fname}")} if key == "mask" else \
                    {"scribble": load_shot(pic.image, scribble=files[value], name=name).annotation.strokes}
            except FsdiffError as exc:
                raise FsdiffError(str(exc).replace(os.fspath(files[value]), fname)) from None
        else:
            ann = {key: value}
        new_supports.append((pic, ann))
    with session.lock:
        session.supports.clear()
        session.queries.clear()
        for pic, ann in new_supports:
            _append_support(session, pic, ann, config)
    add_queries(session, list(queries), config)
    summary = segment(session, models, method, encoder, class_name, progress)
    if threshold is not None:
        set_threshold(session, threshold)
    path = export(session)
    rows = [{"query": q.picture.name, "mask_file": f"{q.stem}_mask.png",
             "foreground_fraction": round(float(q.mask(session.threshold).mean()), 4)}  # type: ignore[union-attr]
            for q in session.queries]
    return path, {"summary": summary, "threshold": session.threshold, "method": method, "queries": rows}

