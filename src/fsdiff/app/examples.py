"""The bundled example the app opens with: one annotated support and a few queries from ``assets/examples``.

It reads whatever ``examples.json`` provides: the fish manifest (``photos`` + ``cases``, see
:mod:`fsdiff.demo`), or the older person manifest (``episodes``). :data:`EXAMPLE_CASE` names the case to
open with; the first mask case is used when that name is absent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fsdiff.errors import FsdiffError

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
EXAMPLE_CASE = "fish-from-mask"
EXTRA_QUERIES = 1
"""Photos added as queries beyond the case's own (so the gallery shows more than one result)."""


@dataclass(frozen=True)
class Example:
    """A class name, support images with their mask files, and query images."""

    class_name: str
    supports: tuple[tuple[Path, Path], ...]
    queries: tuple[Path, ...]


def _from_cases(raw: dict, root: Path) -> Example:
    photos = {k: (root / v["image"], root / v["mask"]) for k, v in raw["photos"].items()}
    masks = [c for c in raw["cases"] if c.get("annotation") == "mask"]
    case = next((c for c in masks if c.get("name") == EXAMPLE_CASE), masks[0] if masks else None)
    if case is None:
        raise KeyError("no case with a mask annotation")
    shots = [str(s) for s in case["shots"]][:1]
    used = {*shots, str(case["query"])}
    extra = [k for k in sorted(photos) if k not in used][:EXTRA_QUERIES]
    return Example(str(raw["class_name"]), tuple(photos[s] for s in shots),
                   tuple(photos[q][0] for q in [str(case["query"]), *extra]))


def _from_episodes(raw: dict, root: Path) -> Example:
    ep = next(e for e in raw["episodes"] if any("mask" in s for s in e["support"]))
    support = next(s for s in ep["support"] if "mask" in s)
    return Example(str(ep["class_name"]), ((root / support["image"], root / support["mask"]),),
                   tuple(root / q["image"] for q in ep["queries"]))


def bundled_example(examples_dir: str | os.PathLike = EXAMPLES_DIR) -> Example:
    """The example the app opens with (see the module docstring); an FsdiffError if the manifest is unusable."""
    root = Path(examples_dir)
    source = root / "examples.json"
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
        example = _from_cases(raw, root) if "cases" in raw else _from_episodes(raw, root)
    except (OSError, ValueError, KeyError, TypeError, StopIteration, IndexError) as exc:
        raise FsdiffError(f"{source}: no usable example ({type(exc).__name__}: {exc}); reinstall fsdiff.") from None
    missing = [str(p) for pair in example.supports for p in pair if not p.is_file()]
    missing += [str(p) for p in example.queries if not p.is_file()]
    if missing:
        raise FsdiffError(f"{source}: example files are missing: {', '.join(missing)}; reinstall fsdiff.")
    return example
