"""Build the photos and reference masks of ``fsdiff demo`` (src/fsdiff/assets/examples/) from their source.

Source: the Debian package ``gcompris-qt-data`` 3.1-2 (Debian 12 "bookworm", ``apt-get download
gcompris-qt-data=3.1-2``; sha256 below). GCompris's "categorization" activity ships 28 photos of fish
in the Qt resource file ``usr/share/gcompris-qt/rcc/categorization.rcc`` (folder
``gcompris/src/activities/categorization/resource/images/fishes/``), each public domain or CC0 according
to the README beside them in the same folder (photographer and Wikimedia Commons page per file). This
script reads the .deb (an ``ar`` archive holding ``data.tar.xz``) and the .rcc (Qt's resource format,
zlib-compressed entries) with the standard library alone, so it needs no Qt and no dpkg.

Each chosen photo is kept at its shipped size (320 px wide) and re-encoded as JPEG quality 90. Its
reference mask (0/255 PNG) is made with OpenCV GrabCut (Rother et al., SIGGRAPH 2004) from seeds placed
by hand on the photo and kept below as data: a rectangle around the fish (outside it is background),
and optional foreground / background strokes (polylines, 3 px wide) where GrabCut alone got it wrong.
GrabCut runs 10 iterations with OpenCV's RNG seeded to 0; the result keeps the largest connected
component and fills its holes. The seeds were checked by rendering overlays (``--check DIR``) and
looking at them; the masks are approximate (fins and thin rays are the least accurate parts).

    apt-get download gcompris-qt-data=3.1-2
    python benchmarks/make_demo_assets.py --deb gcompris-qt-data_3.1-2_all.deb \
        --out src/fsdiff/assets/examples --check /tmp/demo-check
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

DEB_SHA256 = "e9cf06ab2105529068df73085784e835d2ff03f870d2a8091f09125d40abac9f"
RCC_MEMBER = "./usr/share/gcompris-qt/rcc/categorization.rcc"
FISH_DIR = "/gcompris/src/activities/categorization/resource/images/fishes/"
JPEG_QUALITY = 90
STROKE_WIDTH = 3
GRABCUT_ITERATIONS = 10

# Hand-placed seeds per photo, in pixels of the 320-px-wide photo: rect = (x0, y0, x1, y1) around the fish;
# fg / bg = polylines [(x, y), ...] drawn 3 px wide as sure foreground / sure background.
SEEDS: dict[str, dict] = {
    "fish1": {"rect": (44, 8, 284, 198), "fg": [[(268, 100), (278, 103)], [(238, 128), (248, 133)]], "bg": []},
    "fish12": {"rect": (55, 55, 282, 157),
               "fg": [[(235, 100), (275, 95)], [(245, 88), (262, 110)], [(140, 66), (190, 68)], [(128, 135), (136, 150)]],
               "bg": []},
    "fish13": {"rect": (26, 33, 308, 198),
               "fg": [[(150, 45), (200, 55), (240, 75), (258, 100)], [(210, 70), (245, 110), (270, 140)],
                      [(250, 140), (292, 178)], [(265, 135), (300, 165)]],
               "bg": []},
    "fish16": {"rect": (28, 52, 318, 145),
               "fg": [[(255, 100), (300, 84)], [(255, 102), (300, 128)], [(270, 100), (305, 105)]], "bg": []},
    "fish19": {"rect": (26, 22, 302, 185),
               "fg": [[(245, 90), (292, 30)], [(245, 92), (296, 112)], [(130, 56), (180, 50), (225, 60)]], "bg": []},
    "fish21": {"rect": (28, 78, 278, 158), "fg": [[(100, 110), (40, 97)], [(97, 118), (48, 150)], [(85, 112), (105, 115)]],
               "bg": [[(42, 118), (82, 117)], [(62, 110), (62, 128)], [(110, 135), (150, 150)], [(80, 140), (105, 140)],
                      [(72, 95), (98, 98)]]},
    "fish22": {"rect": (26, 66, 308, 166), "fg": [], "bg": []},
    "fish27": {"rect": (55, 60, 295, 135),
               "fg": [[(75, 72), (150, 80), (240, 103)], [(100, 85), (200, 100), (245, 115)], [(252, 115), (285, 100)],
                      [(252, 118), (283, 128)]],
               "bg": [[(85, 118), (170, 128)]]},
    "fish28": {"rect": (35, 55, 235, 172), "fg": [[(130, 160), (200, 162)], [(85, 145), (98, 160)]], "bg": []},
}


def ar_members(blob: bytes) -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (a .deb) by name."""
    if blob[:8] != b"!<arch>\n":
        raise SystemExit("not an ar archive (expected a .deb file)")
    out, pos = {}, 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return out


def rcc_files(blob: bytes) -> dict[str, bytes]:
    """Every file of a Qt binary resource (.rcc, format versions 1-3, zlib or no compression) by path."""
    if blob[:4] != b"qres":
        raise SystemExit("not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    node = 14 if version == 1 else 22

    def name_at(off: int) -> str:
        (n,) = struct.unpack(">H", blob[names + off : names + off + 2])
        return blob[names + off + 6 : names + off + 6 + 2 * n].decode("utf-16-be")

    out: dict[str, bytes] = {}
    stack = [(0, "")]
    while stack:
        idx, prefix = stack.pop()
        p = tree + idx * node
        name_off, flags = struct.unpack(">IH", blob[p : p + 6])
        name = name_at(name_off) if idx else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", blob[p + 6 : p + 14])
            stack.extend((c, prefix + name + "/") for c in range(first, first + count))
            continue
        (off,) = struct.unpack(">I", blob[p + 10 : p + 14])
        (length,) = struct.unpack(">I", blob[data + off : data + off + 4])
        raw = blob[data + off + 4 : data + off + 4 + length]
        if flags & 4:
            raise SystemExit("zstd-compressed resource: not supported")
        out[prefix + name] = zlib.decompress(raw[4:]) if flags & 1 else raw
    return out


def fish_files(deb: Path) -> dict[str, bytes]:
    """The fish folder of GCompris's categorization resource, read from the .deb."""
    blob = deb.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != DEB_SHA256:
        print(f"warning: {deb} has sha256 {digest}, not the 3.1-2 package's {DEB_SHA256}", file=sys.stderr)
    data = ar_members(blob)["data.tar.xz"]
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data))) as tar:
        member = tar.extractfile(RCC_MEMBER)
        if member is None:
            raise SystemExit(f"{RCC_MEMBER} not found in {deb}")
        rcc = member.read()
    return {k[len(FISH_DIR) :]: v for k, v in rcc_files(rcc).items() if k.startswith(FISH_DIR)}


def seed_mask(shape: tuple[int, int], seeds: dict) -> np.ndarray:
    """GrabCut's initial label map: background outside the rect, probable foreground inside, then the strokes."""
    init = np.full(shape, cv2.GC_BGD, np.uint8)
    x0, y0, x1, y1 = seeds["rect"]
    init[y0:y1, x0:x1] = cv2.GC_PR_FGD
    for key, label in (("bg", cv2.GC_BGD), ("fg", cv2.GC_FGD)):
        for line in seeds.get(key, []):
            pts = np.asarray(line, np.int32).reshape(-1, 1, 2)
            cv2.polylines(init, [pts], False, int(label), STROKE_WIDTH)
    return init


def grabcut(image: np.ndarray, seeds: dict) -> np.ndarray:
    """A boolean object mask from GrabCut on the seeds: largest component, holes filled."""
    cv2.setRNGSeed(0)
    labels = seed_mask(image.shape[:2], seeds)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(image[:, :, ::-1].copy(), labels, None, bgd, fgd, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    fg = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n > 1:
        fg = (comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros_like(fg)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return filled.astype(bool)


def check_overlay(image: np.ndarray, mask: np.ndarray, seeds: dict, scale: int = 3) -> np.ndarray:
    """The photo enlarged with the mask tinted, its outline, the rect and the strokes, for a visual check."""
    out = image.astype(np.float32)
    out[mask] = 0.6 * out[mask] + 0.4 * np.array([255, 0, 255], np.float32)
    big = cv2.resize(out.astype(np.uint8), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(cv2.resize(mask.astype(np.uint8), None, fx=scale, fy=scale,
                                              interpolation=cv2.INTER_NEAREST), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(big, contours, -1, (255, 255, 0), 1)
    x0, y0, x1, y1 = seeds["rect"]
    cv2.rectangle(big, (x0 * scale, y0 * scale), (x1 * scale, y1 * scale), (0, 255, 255), 1)
    for key, colour in (("fg", (0, 255, 0)), ("bg", (255, 0, 0))):
        for line in seeds.get(key, []):
            pts = (np.asarray(line, np.int32) * scale).reshape(-1, 1, 2)
            cv2.polylines(big, [pts], False, colour, 2)
    return big


def main() -> int:
    """Extract, encode and mask every photo in SEEDS."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deb", type=Path, required=True, help="gcompris-qt-data_3.1-2_all.deb")
    ap.add_argument("--out", type=Path, default=Path("src/fsdiff/assets/examples"))
    ap.add_argument("--check", type=Path, default=None, help="also write enlarged overlays here for a visual check")
    ap.add_argument("--only", nargs="*", default=None, help="photos to build (default: all)")
    args = ap.parse_args()
    files = fish_files(args.deb)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, seeds in SEEDS.items():
        if args.only and name not in args.only:
            continue
        image = np.asarray(Image.open(io.BytesIO(files[f"{name}.webp"])).convert("RGB"))
        mask = grabcut(image, seeds)
        Image.fromarray(image).save(args.out / f"{name}.jpg", quality=JPEG_QUALITY)
        Image.fromarray(mask.astype(np.uint8) * 255).save(args.out / f"{name}_mask.png", optimize=True)
        if args.check is not None:
            args.check.mkdir(parents=True, exist_ok=True)
            Image.fromarray(check_overlay(image, mask, seeds)).save(args.check / f"{name}.png")
        print(f"{name}: {image.shape[1]}x{image.shape[0]}, mask covers {mask.mean():.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
