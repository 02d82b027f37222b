"""The DiffUp checkpoints shipped inside the package (issue #3 "shipped checkpoints"), and the export step
that makes them (float16 safetensors + config.json, loaded back as float32).

Which checkpoint a run gets when it names none (:func:`shipped_checkpoint`):

* ``fsdiff segment`` / ``fsdiff demo`` / the Python API without a benchmark: ``diffup-coco-all``, trained
  on every coco-mini class (the deployment model);
* ``fsdiff eval --dataset coco --fold I`` (interleaved COCO-20i, the default convention):
  ``diffup-coco-foldI``, trained on coco-mini's base classes of fold I only, so fold I's classes are
  novel to it (an honest few-shot test);
* ``--dataset folder`` (a user's own classes): ``diffup-coco-all``;
* the contiguous COCO-20i convention, PASCAL-5i and FSS-1000 have no shipped checkpoint that keeps the
  test classes unseen (every PASCAL class is a COCO class; the contiguous folds mix the interleaved
  ones), so they need ``--checkpoint DIR``; the error says how to train one.

The training commands that reproduce each checkpoint are in docs/BENCHMARKS.md (section DiffUp) and in
each checkpoint's ``fsdiff_checkpoint.json`` (``provenance``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

from fsdiff.checkpoint import INFO_FILE
from fsdiff.errors import FsdiffError

SHIPPED_FOLDS = (0, 1, 2, 3)
"""Interleaved COCO-20i folds with a shipped checkpoint."""
ALL_CLASSES = "diffup-coco-all"
"""The checkpoint trained on every coco-mini class (segment / demo default)."""


def shipped_root() -> Path:
    """The folder of the shipped checkpoints inside the installed package."""
    return Path(str(resources.files("fsdiff") / "assets" / "checkpoints"))


def fold_name(fold: int) -> str:
    """Folder name of the fold-``fold`` checkpoint."""
    return f"diffup-coco-fold{int(fold)}"


def _train_hint(dataset: str, fold: int | None) -> str:
    fold_arg = f"fold={fold}" if fold is not None else "fold=I"
    return (f"train one on its base classes (fsdiff.api.train('diffup', {dataset!r}, DATA, DIR, {fold_arg}) or "
            "`fsdiff train diffup`) and pass checkpoint=DIR/final")


def shipped_checkpoint(
    dataset: str | None = None, fold: int | None = None, convention: str = "interleaved"
) -> Path:
    """The shipped checkpoint directory for a benchmark (see the module docstring), or an FsdiffError."""
    if dataset in (None, "folder"):
        name = ALL_CLASSES
    elif dataset == "coco":
        if convention != "interleaved":
            raise FsdiffError(
                f"the shipped DiffUp checkpoints hold out the interleaved COCO-20i folds; with convention={convention!r} "
                f"fold {fold}'s classes were seen in training: {_train_hint('coco', fold)} (with convention="
                f"{convention!r})."
            )
        if fold not in SHIPPED_FOLDS:
            raise FsdiffError(f"there is no shipped DiffUp checkpoint for COCO-20i fold {fold!r}; use a fold in 0..3.")
        name = fold_name(int(fold))
    elif dataset == "pascal":
        raise FsdiffError(
            "the shipped DiffUp checkpoints were trained on COCO classes, which include every PASCAL VOC class, so "
            f"they cannot be scored on PASCAL-5i novel classes; {_train_hint('pascal', fold)}."
        )
    else:
        raise FsdiffError(
            f"there is no shipped DiffUp checkpoint for {dataset!r} novel-class evaluation (the shipped ones saw "
            f"COCO's classes); {_train_hint(str(dataset), fold)}."
        )
    path = shipped_root() / name
    if not (path / INFO_FILE).is_file():
        raise FsdiffError(
            f"the shipped DiffUp checkpoint {name} is missing from this installation ({path}); reinstall fsdiff, "
            f"or {_train_hint(dataset or 'coco', fold)}."
        )
    return path


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Copy a DiffUp checkpoint with its weights cast to ``dtype`` (float16 halves the size); atomic."""
    from fsdiff.methods.diffup.checkpoint import load_diffup, save_diffup

    config, uapf, uqdd, meta = load_diffup(src)
    info = dict(meta)
    info["exported_dtype"] = str(dtype).replace("torch.", "")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        save_diffup(tmp / "ckpt", config, uapf.to(dtype), uqdd.to(dtype), info)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp / "ckpt", dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def status():
    """Whether DiffUp runs here: the shipped checkpoints (in the package) and the default encoder's weights."""
    from fsdiff.methods import WeightsStatus, _encoder_status
    from fsdiff.methods.diffup.checkpoint import check_checkpoint

    try:
        check_checkpoint(shipped_root() / ALL_CLASSES)
    except FsdiffError as exc:
        return WeightsStatus(False, f"the shipped checkpoints are missing or damaged ({exc}); reinstall fsdiff.")
    enc = _encoder_status()
    if not enc.ready:
        return enc
    return WeightsStatus(True, f"shipped checkpoints in {shipped_root()} (all classes + 4 COCO-20i folds)")


def main(argv: list[str] | None = None) -> int:
    """``python -m fsdiff.methods.diffup.shipped SRC DST``: export SRC as a float16 checkpoint to DST."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m fsdiff.methods.diffup.shipped SRC_CHECKPOINT DST_DIR", file=sys.stderr)
        return 2
    try:
        out = export_checkpoint(args[0], args[1])
    except FsdiffError as exc:
        print(f"fsdiff: error: {exc}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
