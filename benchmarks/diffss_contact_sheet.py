"""Contact sheet of the DifFSS plumbing end to end: real supports, their controls, and generated images.

One row per real weizmann-horse support: real image | mask | seg control | hed control | scribble control |
two generated images. The controls are exactly what :class:`fsdiff.augment.generate.ControlNetGenerator` feeds
the ControlNet (``generator.control()``: ADE-palette seg map, masked HED edges from the bundled BSDS500 HED,
thresholded scribble), built at DifFSS's 512 px. The generated images come from the TINY RANDOM test models
(:mod:`fsdiff.diffusion.tiny`: SD 1.5 layout + ControlNet with random weights, seg control, DifFSS sampler
settings: DDIM, guidance 9, eta 0) through ``ControlNetGenerator.generate``, so they are noise-like by
construction: the sheet shows that the pieces connect (support -> control -> pipeline -> image resized back
to the support's size), not image quality. No real SD/ControlNet weights can be downloaded here.

    PYTHONPATH=src python benchmarks/diffss_contact_sheet.py --out docs/images/diffss_contact_sheet.png
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "weizmann-horse"
CELL_W, CELL_H, LABEL_H, TITLE_H = 136, 104, 16, 34
FONT = cv2.FONT_HERSHEY_SIMPLEX


def thumb(img: np.ndarray, w: int = CELL_W, h: int = CELL_H) -> np.ndarray:
    """RGB uint8 (or 2-D) image letterboxed into a w x h cell on white."""
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    ih, iw = img.shape[:2]
    k = min(w / iw, h / ih)
    nw, nh = max(1, round(iw * k)), max(1, round(ih * k))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_NEAREST)
    cell = np.full((h, w, 3), 255, np.uint8)
    y, x = (h - nh) // 2, (w - nw) // 2
    cell[y:y + nh, x:x + nw] = small
    return cell


def labelled(img: np.ndarray, text: str) -> np.ndarray:
    """A cell with a text label above it (cv2.putText), plus a 2 px white gutter."""
    band = np.full((LABEL_H, CELL_W, 3), 255, np.uint8)
    cv2.putText(band, text, (3, LABEL_H - 4), FONT, 0.36, (0, 0, 0), 1, cv2.LINE_AA)
    cell = np.concatenate([band, thumb(img)], 0)
    return np.pad(cell, ((0, 2), (0, 2), (0, 0)), constant_values=255)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("FSDIFF_WEIZMANN_HORSE", str(DEFAULT_DATA)))
    ap.add_argument("--images", nargs="+", default=["horse001", "horse052", "horse120"])
    ap.add_argument("--gen-resolution", type=int, default=128, help="short side for the tiny models (default 128)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of the tiny models (DifFSS default 20)")
    ap.add_argument("--out", default="docs/images/diffss_contact_sheet.png")
    ap.add_argument("--max-kb", type=int, default=290, help="quantise colours until the PNG is under this size")
    args = ap.parse_args()

    import torch

    from fsdiff.augment.generate import ControlNetGenerator, GenerationConfig, as_annotation, load_generator
    from fsdiff.diffusion.tiny import build_tiny_controlnet, build_tiny_stable_diffusion
    from fsdiff.features.hed import HEDDetector
    from fsdiff.io import read_image, read_mask

    torch.manual_seed(0)
    data = Path(args.data)
    t0 = time.perf_counter()
    hed = HEDDetector.from_offline()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sd = build_tiny_stable_diffusion(Path(tmp) / "sd")
        cn = build_tiny_controlnet(Path(tmp) / "cn")
        # Controls at DifFSS's 512 px, from the same generator code that feeds the pipeline (no model run).
        shown = {kind: ControlNetGenerator(object(), kind, hed=hed, config=GenerationConfig())
                 for kind in ("seg", "hed", "scribble")}
        gen = load_generator("seg", model=sd, controlnet=cn, hed=hed,
                             config=GenerationConfig(steps=args.steps, seed=0).replace(resolution=args.gen_resolution))
        for name in args.images:
            img = read_image(data / "images" / f"{name}.jpg")
            mask = read_mask(data / "masks" / f"{name}.png")
            ann = as_annotation(mask, img.shape[:2])
            controls = {k: g.control(img, ann, "horse") for k, g in shown.items()}
            outs = gen.generate(img, ann, "horse", n=2)
            vis_mask = np.where(mask == 1, 255, np.where(mask == 255, 128, 0)).astype(np.uint8)
            h, w = img.shape[:2]
            row = [labelled(img, f"{name} {w}x{h}"), labelled(vis_mask, "mask (reused)")]
            for k in ("seg", "hed", "scribble"):
                c = controls[k]
                row.append(labelled(c, f"{k} control {c.shape[1]}x{c.shape[0]}"))
            for o in outs:
                gh, gw = o.generated_size
                row.append(labelled(o.image, f"tiny rnd #{o.index} {gw}x{gh}"))
            rows.append(np.concatenate(row, 1))
    sheet = np.concatenate(rows, 0)
    title = np.full((TITLE_H, sheet.shape[1], 3), 255, np.uint8)
    cv2.putText(title, "DifFSS plumbing: weizmann-horse support -> seg/hed/scribble controls (512 px, as fed to "
                "ControlNet) -> generated", (4, 13), FONT, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(title, f"Generated = TINY RANDOM SD1.5-layout + ControlNet (seg, DDIM {args.steps} steps, guidance 9, "
                f"{args.gen_resolution} px): noise by design, NOT a quality sample", (4, 28), FONT, 0.38,
                (180, 0, 0), 1, cv2.LINE_AA)
    sheet = np.concatenate([title, sheet], 0)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(sheet)
    data_png = b""
    for colors in (256, 192, 128, 96, 64):
        buf = io.BytesIO()
        pil.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buf, format="PNG", optimize=True)
        data_png = buf.getvalue()
        if len(data_png) <= args.max_kb * 1024:
            break
    out.write_bytes(data_png)
    print(f"wrote {out}: {sheet.shape[1]}x{sheet.shape[0]} px, {len(data_png) / 1024:.0f} KB, {colors} colours, "
          f"{time.perf_counter() - t0:.1f} s; generator: {gen.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
