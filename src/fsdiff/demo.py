"""The bundled demo: one class (fish) segmented in other photos from a mask, a box, a scribble, clicks or 5 masks.

The photos, their reference masks and the cases are in ``fsdiff/assets/examples/`` (``examples.json``;
sources and licences in ``LICENSES.md``; rebuilt by ``benchmarks/make_demo_assets.py``). No case is
tuned to its photo: every weak support annotation is derived from the support's reference mask by a fixed
rule, the same as the weak-label benchmarks use (:mod:`fsdiff.synth`, after DiffUp Sec. IV):

* box: the mask's tight box (:meth:`fsdiff.episode.BoxAnnotation.from_mask`);
* scribble: :func:`fsdiff.synth.synthesize_scribble` with the case's seed (a random sub-path of the eroded
  mask's skeleton, 5 px wide);
* points: two positive clicks, see :func:`click_points`.

:func:`run_demo` segments each case's query, scores it against the query's reference mask (IoU in percent),
and writes per-case prediction files, ``demo.json`` and one ``contact_sheet.png``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fsdiff.episode import Annotation, BoxAnnotation, Episode, MaskAnnotation, PointsAnnotation, Query, Shot
from fsdiff.errors import FsdiffError
from fsdiff.io import read_image, read_mask, write_image, write_text
from fsdiff.metrics import binary_iou
from fsdiff.output import OutputFolder, WrittenPrediction
from fsdiff.render import PREDICTION, draw_annotation, fit, outline
from fsdiff.synth import synthesize_scribble

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
DEMO_KINDS = ("mask", "box", "scribble", "points")

TILE_H = 160  # every photo is shown at this height
TITLE_H = 26  # a row's title line
LABEL_H = 18  # the label above each tile
GAP = 8  # between tiles and below each row
HEADER_H = 30  # the legend at the top of the sheet
ROW_H = TITLE_H + LABEL_H + TILE_H + GAP
REFERENCE = (255, 230, 0)
"""Outline colour of the reference mask (yellow); supports use fsdiff.render's green / red, predictions orange."""
DEMO_JSON = "demo.json"
CONTACT_SHEET = "contact_sheet.png"


@dataclass(frozen=True)
class DemoCase:
    """One row of the demo: support photos, how they are annotated, and the query photo."""

    name: str
    annotation: str
    shots: tuple[str, ...]
    query: str
    seed: int = 0


@dataclass(frozen=True)
class DemoManifest:
    """The parsed ``examples.json``: the class, the photos (image and reference mask paths) and the cases."""

    class_name: str
    photos: dict[str, tuple[Path, Path]]
    cases: tuple[DemoCase, ...]


@dataclass(frozen=True)
class DemoRecord:
    """One case's result: its query's IoU against the reference mask (percent) and the files written."""

    name: str
    annotation: str
    shots: tuple[str, ...]
    query: str
    iou: float
    files: WrittenPrediction

    def to_json(self, root: Path) -> dict:
        """A JSON-ready dict; file paths relative to ``root`` (the output folder)."""
        files = {k: Path(os.path.relpath(getattr(self.files, k), root)).as_posix() for k in ("mask", "prob", "overlay")}
        return {"name": self.name, "annotation": self.annotation, "shots": list(self.shots), "query": self.query,
                "iou": round(self.iou, 2), "files": files}


# ----------------------------------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------------------------------
def _parse_case(raw: dict, photos: dict, source: Path) -> DemoCase:
    """One validated case of the manifest."""
    name = str(raw.get("name", ""))
    kind = raw.get("annotation")
    if kind not in DEMO_KINDS:
        raise FsdiffError(f"{source}: case {name!r} has annotation {kind!r}; use one of {', '.join(DEMO_KINDS)}.")
    shots = tuple(str(s) for s in raw.get("shots", ()))
    unknown = [p for p in (*shots, str(raw.get("query"))) if p not in photos]
    if not name or not shots or unknown:
        raise FsdiffError(f"{source}: case {name!r} needs a name, at least one shot and photos listed under "
                          f"'photos'; unknown: {unknown}.")
    return DemoCase(name, kind, shots, str(raw["query"]), int(raw.get("seed", 0)))


def load_manifest(examples_dir: str | os.PathLike = EXAMPLES_DIR) -> DemoManifest:
    """Read and validate ``examples.json`` in ``examples_dir``; every listed file must exist."""
    root = Path(examples_dir)
    source = root / "examples.json"
    if not source.is_file():
        raise FsdiffError(f"demo manifest not found: {source}; reinstall fsdiff or pass examples_dir=FOLDER.")
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
        photos = {k: (root / v["image"], root / v["mask"]) for k, v in raw["photos"].items()}
        raw_cases, class_name = list(raw["cases"]), str(raw["class_name"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FsdiffError(f"{source}: not a demo manifest ({type(exc).__name__}: {exc}); it needs 'class_name', "
                          "'photos' {name: {image, mask}} and 'cases'.") from None
    missing = [str(p) for pair in photos.values() for p in pair if not p.is_file()]
    if missing:
        raise FsdiffError(f"{source}: listed files are missing: {', '.join(missing)}; reinstall fsdiff.")
    cases = tuple(_parse_case(c, photos, source) for c in raw_cases)
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise FsdiffError(f"{source}: case names must be unique, got {names}.")
    return DemoManifest(class_name, photos, cases)


# ----------------------------------------------------------------------------------------------------
# annotations derived from the reference masks
# ----------------------------------------------------------------------------------------------------
def click_points(mask: np.ndarray) -> list[tuple[float, float, int]]:
    """Two positive clicks (x, y, 1) on the mask's class pixels by a fixed rule.

    The first is the pixel farthest from the mask's border (exact Euclidean distance to the nearest
    non-class pixel, the image edge counting as one). The second is, among the pixels at least half as
    far from the border as the first, the one farthest from the first: well inside the object (not on a
    fin tip) and at its other end. Ties go to the first pixel in row-major order.
    """
    fg = (np.asarray(mask) == 1).astype(np.uint8)
    if not fg.any():
        raise FsdiffError("cannot place clicks on an empty mask.")
    dist = cv2.distanceTransform(np.pad(fg, 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    y1, x1 = np.unravel_index(int(np.argmax(dist)), dist.shape)
    ys, xs = np.mgrid[: fg.shape[0], : fg.shape[1]]
    far = np.where(dist >= dist[y1, x1] / 2, np.hypot(ys - y1, xs - x1), -1.0)
    y2, x2 = np.unravel_index(int(np.argmax(far)), far.shape)
    clicks = [(float(x1), float(y1), 1)]
    if far[y2, x2] > 0:
        clicks.append((float(x2), float(y2), 1))
    return clicks


def derive_annotation(mask: np.ndarray, kind: str, seed: int = 0) -> Annotation:
    """The support annotation of ``kind`` derived from a {0,1} reference mask (see the module docstring)."""
    if kind == "mask":
        return MaskAnnotation(mask.copy())
    if kind == "box":
        return BoxAnnotation.from_mask(mask)
    if kind == "scribble":
        return synthesize_scribble(mask, int(seed))
    if kind == "points":
        pts = click_points(mask)
        return PointsAnnotation(np.asarray([p[:2] for p in pts], np.float64), np.asarray([p[2] for p in pts], np.int64))
    raise FsdiffError(f"demo annotation {kind!r}: use one of {', '.join(DEMO_KINDS)}.")


def build_case_episode(manifest: DemoManifest, case: DemoCase) -> Episode:
    """The episode of one case: derived support annotations and the query with its reference mask."""
    shots = []
    for photo in case.shots:
        image_path, mask_path = manifest.photos[photo]
        ann = derive_annotation(read_mask(mask_path), case.annotation, case.seed)
        shots.append(Shot(read_image(image_path), ann, image_id=photo))
    image_path, mask_path = manifest.photos[case.query]
    query = Query(read_image(image_path), read_mask(mask_path), image_id=case.query)
    return Episode(class_id=0, class_name=manifest.class_name, shots=tuple(shots), queries=(query,), episode_id=case.name)


# ----------------------------------------------------------------------------------------------------
# contact sheet (numpy / OpenCV only)
# ----------------------------------------------------------------------------------------------------
def support_tile(shot: Shot) -> np.ndarray:
    """A support photo with its annotation drawn (mask outline, box, strokes or clicks), TILE_H rows high."""
    return fit(draw_annotation(shot.image, shot.annotation), TILE_H)


def prediction_tile(image: np.ndarray, pred: np.ndarray, reference: np.ndarray, iou: float) -> np.ndarray:
    """The query with the prediction tinted, the reference outlined, and the IoU written in a corner."""
    out = np.ascontiguousarray(fit(outline(outline(image, pred, PREDICTION, fill=0.5), reference, REFERENCE), TILE_H))
    text = f"IoU {iou:.1f}%"
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.55, 1)
    cv2.rectangle(out, (0, 0), (tw + 8, th + 10), (0, 0, 0), -1)
    cv2.putText(out, text, (4, th + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _text(canvas: np.ndarray, text: str, x: int, y: int, scale: float = 0.5) -> None:
    """Black text with its baseline at ``y``."""
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)


def render_row(title: str, tiles: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """One row of the sheet: a title line, then labelled tiles left to right on white."""
    width = GAP + sum(t.shape[1] + GAP for _, t in tiles)
    row = np.full((ROW_H, width, 3), 255, np.uint8)
    _text(row, title, GAP, TITLE_H - 8, 0.6)
    x = GAP
    for label, tile in tiles:
        _text(row, label, x, TITLE_H + LABEL_H - 5, 0.42)
        row[TITLE_H + LABEL_H : TITLE_H + LABEL_H + TILE_H, x : x + tile.shape[1]] = tile
        x += tile.shape[1] + GAP
    return row


def contact_sheet(rows: Sequence[np.ndarray], legend: str) -> np.ndarray:
    """Rows stacked under a legend line, padded with white to the widest row."""
    width = max(r.shape[1] for r in rows)
    sheet = np.full((HEADER_H + ROW_H * len(rows), width, 3), 255, np.uint8)
    _text(sheet, legend, GAP, HEADER_H - 10, 0.5)
    for i, row in enumerate(rows):
        sheet[HEADER_H + i * ROW_H : HEADER_H + (i + 1) * ROW_H, : row.shape[1]] = row
    return sheet


def case_row(case: DemoCase, episode: Episode, pred: np.ndarray, iou: float) -> np.ndarray:
    """The contact-sheet row of one case: supports with annotations, the query, prediction vs reference."""
    query = episode.queries[0]
    tiles = [(f"support {s.image_id} ({case.annotation})", support_tile(s)) for s in episode.shots]
    tiles.append((f"query {case.query}", fit(query.image, TILE_H)))
    tiles.append(("prediction vs reference", prediction_tile(query.image, pred, query.gt == 1, iou)))
    title = f"{case.name}: {len(episode.shots)}-shot, {case.annotation} annotation -> query {case.query}   IoU {iou:.1f}%"
    return render_row(title, tiles)


# ----------------------------------------------------------------------------------------------------
# running and reporting
# ----------------------------------------------------------------------------------------------------
def run_demo(out_dir: str | os.PathLike, seg, *, examples_dir: str | os.PathLike = EXAMPLES_DIR,
             overwrite: bool = False) -> list[DemoRecord]:
    """Segment every demo case with ``seg`` (an :class:`fsdiff.api.Segmenter`); write predictions, ``demo.json``
    and ``contact_sheet.png`` under ``out_dir``.

    Every output name is checked before any work (no file fsdiff did not write is replaced unless
    ``overwrite``). Returns one record per case, IoU in percent.
    """
    manifest = load_manifest(examples_dir)
    out = Path(out_dir)
    top = OutputFolder(out, [], extra=(DEMO_JSON, CONTACT_SHEET), overwrite=overwrite)
    for case in manifest.cases:  # refuse a conflicting file before anything runs
        OutputFolder(out / case.name, [case.query], overwrite=overwrite)
    records, rows = [], []
    for case in manifest.cases:
        episode = build_case_episode(manifest, case)
        query = episode.queries[0]
        result = seg.segment(episode.shots, [query], class_name=manifest.class_name, out=out / case.name,
                             overwrite=overwrite)[0]
        iou = 100.0 * binary_iou(result.mask, query.gt == 1, query.gt != 255)
        records.append(DemoRecord(case.name, case.annotation, case.shots, case.query, iou, result.files))
        rows.append(case_row(case, episode, result.mask, iou))
    legend = (f"fsdiff demo, class '{manifest.class_name}', method {seg.name}:  green = support annotation,  "
              "orange = prediction,  yellow = reference mask")
    top.write_file(CONTACT_SHEET, lambda p: write_image(p, contact_sheet(rows, legend)))
    summary = {"class_name": manifest.class_name, "method": seg.name, "threshold": seg.threshold,
               "cases": [r.to_json(out) for r in records]}
    top.write_file(DEMO_JSON, lambda p: write_text(p, json.dumps(summary, indent=2) + "\n"))
    return records


def format_demo_table(records: Sequence[DemoRecord]) -> str:
    """The terminal table: one line per case (annotation, shots, query, IoU %) and the mean IoU."""
    name_w = max([len("case")] + [len(r.name) for r in records])
    lines = [f"{'case':<{name_w}}  {'annotation':<10}  {'shots':>5}  {'query':<8}  {'IoU %':>6}"]
    for r in records:
        lines.append(f"{r.name:<{name_w}}  {r.annotation:<10}  {len(r.shots):>5}  {r.query:<8}  {r.iou:>6.1f}")
    if records:
        mean = sum(r.iou for r in records) / len(records)
        lines.append(f"{'mean':<{name_w}}  {'':<10}  {'':>5}  {'':<8}  {mean:>6.1f}")
    return "\n".join(lines)

