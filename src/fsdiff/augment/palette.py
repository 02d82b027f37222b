"""ADE20K colours for DifFSS seg controls (DifFSS ``constant.py`` [C]).

The ControlNet-1.0 seg model was trained on maps painted with the mmseg ADE20K palette. DifFSS
paints a support's class pixels with the ADE colour of a mapped ADE class and everything else with
``palette[0]``. This module holds:

* ``ADE_PALETTE``: the 150-entry mmseg palette indexed from 0, so ``ADE_PALETTE[0] == (120, 120, 120)``
  ('wall'). Copied from ``mmseg/datasets/ade.py``, which is also what ControlNet's
  ``get_palette('ade')`` returns. **Pitfall:** some palettes (e.g. the one in the Hugging Face docs)
  have 151 entries with a leading black; with those, every index below needs +1.
* ``ADE_CLASSES`` (mmseg short names) and ``ADE_FULL_NAMES`` (objectInfo150 names with synonyms,
  e.g. 'building, edifice').
* ``PASCAL_TO_ADE`` / ``COCO_TO_ADE``: the official DifFSS tables (``pascal_mapper`` /
  ``coco_mapper`` in ControlNet4FSS ``constant.py``), verbatim, keyed by the datasets' contiguous
  class index (PASCAL 1..20, COCO 1..80), plus name-keyed views.
* ``resolve_class(name)``: the class -> colour rule for any name (dataset tables, then ADE names and
  synonyms, then a deterministic hashed colour).
* ``prompt_name(name)``: the class name DifFSS puts in its prompt (e.g. COCO 'mouse' -> 'computer mouse').
"""

from __future__ import annotations

import colorsys
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fsdiff.errors import FsdiffError

# --------------------------------------------------------------------------------------------
# ADE20K (mmseg ``ADE20KDataset``: 150 classes, indexed from 0)
# --------------------------------------------------------------------------------------------

ADE_CLASSES: tuple[str, ...] = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair',
    'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion',
    'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper',
    'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case', 'pool table',
    'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind', 'coffee table',
    'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm', 'kitchen island',
    'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel', 'light',
    'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman',
    'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy',
    'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag',
    'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot',
    'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce',
    'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)
"""mmseg's 150 ADE20K class names (mmseg writes 'bed ' with a trailing space; stripped here)."""

ADE_FULL_NAMES: tuple[str, ...] = (
    "wall", "building, edifice", "sky", "floor, flooring", "tree", "ceiling", "road, route", "bed",
    "windowpane, window", "grass", "cabinet", "sidewalk, pavement",
    "person, individual, someone, somebody, mortal, soul", "earth, ground", "door, double door",
    "table", "mountain, mount", "plant, flora, plant life", "curtain, drape, drapery, mantle, pall",
    "chair", "car, auto, automobile, machine, motorcar", "water", "painting, picture",
    "sofa, couch, lounge", "shelf", "house", "sea", "mirror", "rug, carpet, carpeting", "field",
    "armchair", "seat", "fence, fencing", "desk", "rock, stone", "wardrobe, closet, press", "lamp",
    "bathtub, bathing tub, bath, tub", "railing, rail", "cushion", "base, pedestal, stand", "box",
    "column, pillar", "signboard, sign", "chest of drawers, chest, bureau, dresser", "counter", "sand",
    "sink", "skyscraper", "fireplace, hearth, open fireplace", "refrigerator, icebox",
    "grandstand, covered stand", "path", "stairs, steps", "runway",
    "case, display case, showcase, vitrine", "pool table, billiard table, snooker table", "pillow",
    "screen door, screen", "stairway, staircase", "river", "bridge, span", "bookcase",
    "blind, screen", "coffee table, cocktail table",
    "toilet, can, commode, crapper, pot, potty, stool, throne", "flower", "book", "hill", "bench",
    "countertop", "stove, kitchen stove, range, kitchen range, cooking stove", "palm, palm tree",
    "kitchen island",
    "computer, computing machine, computing device, data processor, electronic computer, "
    "information processing system",
    "swivel chair", "boat", "bar", "arcade machine", "hovel, hut, hutch, shack, shanty",
    "bus, autobus, coach, charabanc, double-decker, jitney, motorbus, motorcoach, omnibus, "
    "passenger vehicle",
    "towel", "light, light source", "truck, motortruck", "tower", "chandelier, pendant, pendent",
    "awning, sunshade, sunblind", "streetlight, street lamp", "booth, cubicle, stall, kiosk",
    "television receiver, television, television set, tv, tv set, idiot box, boob tube, telly, "
    "goggle box",
    "airplane, aeroplane, plane", "dirt track", "apparel, wearing apparel, dress, clothes", "pole",
    "land, ground, soil", "bannister, banister, balustrade, balusters, handrail",
    "escalator, moving staircase, moving stairway", "ottoman, pouf, pouffe, puff, hassock", "bottle",
    "buffet, counter, sideboard", "poster, posting, placard, notice, bill, card", "stage", "van",
    "ship", "fountain", "conveyer belt, conveyor belt, conveyer, conveyor, transporter", "canopy",
    "washer, automatic washer, washing machine", "plaything, toy",
    "swimming pool, swimming bath, natatorium", "stool", "barrel, cask", "basket, handbasket",
    "waterfall, falls", "tent, collapsible shelter", "bag", "minibike, motorbike", "cradle", "oven",
    "ball", "food, solid food", "step, stair", "tank, storage tank",
    "trade name, brand name, brand, marque", "microwave, microwave oven", "pot, flowerpot",
    "animal, animate being, beast, brute, creature, fauna", "bicycle, bike, wheel, cycle", "lake",
    "dishwasher, dish washer, dishwashing machine", "screen, silver screen, projection screen",
    "blanket, cover", "sculpture", "hood, exhaust hood", "sconce", "vase",
    "traffic light, traffic signal, stoplight", "tray",
    "ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, "
    "trash bin",
    "fan", "pier, wharf, wharfage, dock", "crt screen", "plate", "monitor, monitoring device",
    "bulletin board, notice board", "shower", "radiator", "glass, drinking glass", "clock", "flag",
)
"""The objectInfo150 names (synonyms separated by ', '), same order as ``ADE_CLASSES``."""

ADE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)
"""mmseg ADE20K palette, 150 RGB entries indexed from 0 (no leading black)."""

BACKGROUND_INDEX = 0
"""DifFSS paints background and ignore pixels with ``ADE_PALETTE[0]`` ('wall'), not black."""
BACKGROUND_COLOR: tuple[int, int, int] = ADE_PALETTE[BACKGROUND_INDEX]
ANIMAL_INDEX = 126
"""ADE 'animal': DifFSS maps every animal class here."""

# --------------------------------------------------------------------------------------------
# Dataset tables (official DifFSS constant.py, verbatim)
# --------------------------------------------------------------------------------------------

PASCAL_CLASSES: tuple[str, ...] = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "television",
)
"""PASCAL VOC classes 1..20 as DifFSS names them in its prompts (``pascal_name``)."""

PASCAL_TO_ADE: dict[int, int] = {
    1: 90,    # airplane -> 'airplane'
    2: 127,   # bicycle -> 'bicycle'
    3: 126,   # bird -> 'animal'
    4: 76,    # boat -> 'boat'
    5: 98,    # bottle -> 'bottle'
    6: 80,    # bus -> 'bus'
    7: 20,    # car -> 'car'
    8: 126,   # cat -> 'animal'
    9: 19,    # chair -> 'chair'
    10: 126,  # cow -> 'animal'
    11: 15,   # dining table -> 'table'
    12: 126,  # dog -> 'animal'
    13: 126,  # horse -> 'animal'
    14: 116,  # motorbike -> 'minibike, motorbike'
    15: 12,   # person -> 'person'
    16: 17,   # potted plant -> 'plant' (not 125 'pot, flowerpot')
    17: 126,  # sheep -> 'animal'
    18: 23,   # sofa -> 'sofa'
    19: 20,   # train -> 'car' (ADE has no train; official choice)
    20: 89,   # tv/monitor -> 'television receiver'
}
"""PASCAL class index (1..20) -> ADE index, as in DifFSS ``pascal_mapper``."""

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
"""COCO's 80 category names (as in ``instances.json``) in contiguous order 1..80."""

COCO_PROMPT_OVERRIDES: dict[str, str] = {"mouse": "computer mouse", "remote": "remote controller"}
"""Where DifFSS's ``coco_name`` prompt name differs from COCO's category name."""

COCO_TO_ADE: dict[int, int] = {
    1: 12,    # person -> 'person'
    2: 127,   # bicycle -> 'bicycle'
    3: 20,    # car -> 'car'
    4: 116,   # motorcycle -> 'minibike, motorbike'
    5: 90,    # airplane -> 'airplane'
    6: 80,    # bus -> 'bus'
    7: 20,    # train -> 'car' (as for PASCAL)
    8: 83,    # truck -> 'truck'
    9: 76,    # boat -> 'boat'
    10: 136,  # traffic light -> 'traffic light'
    11: 6,    # fire hydrant -> 'road'. Official, marked '?' by its authors: ADE has no hydrant.
    12: 43,   # stop sign -> 'signboard, sign'
    13: 6,    # parking meter -> 'road'. Official, marked '?' (ADE has no meter).
    14: 69,   # bench -> 'bench'
    15: 126,  # bird -> 'animal'
    16: 126,  # cat -> 'animal'
    17: 126,  # dog -> 'animal'
    18: 126,  # horse -> 'animal'
    19: 126,  # sheep -> 'animal'
    20: 126,  # cow -> 'animal'
    21: 126,  # elephant -> 'animal'
    22: 126,  # bear -> 'animal'
    23: 126,  # zebra -> 'animal'
    24: 126,  # giraffe -> 'animal'
    25: 115,  # backpack -> 'bag'
    26: 108,  # umbrella -> 'plaything, toy'. Official, marked '?' (ADE has no umbrella).
    27: 115,  # handbag -> 'bag'
    28: 92,   # tie -> 'apparel'
    29: 41,   # suitcase -> 'box'
    30: 108,  # frisbee -> 'plaything, toy'
    31: 108,  # skis -> 'plaything, toy'
    32: 108,  # snowboard -> 'plaything, toy'
    33: 108,  # sports ball -> 'plaything, toy' (official; ADE 119 'ball' exists but was not used)
    34: 108,  # kite -> 'plaything, toy'
    35: 108,  # baseball bat -> 'plaything, toy'
    36: 108,  # baseball glove -> 'plaything, toy'
    37: 108,  # skateboard -> 'plaything, toy'
    38: 108,  # surfboard -> 'plaything, toy'
    39: 108,  # tennis racket -> 'plaything, toy'
    40: 98,   # bottle -> 'bottle'
    41: 147,  # wine glass -> 'glass, drinking glass'
    42: 108,  # cup -> 'plaything, toy' (official catch-all for small objects)
    43: 108,  # fork -> 'plaything, toy'
    44: 108,  # knife -> 'plaything, toy'
    45: 108,  # spoon -> 'plaything, toy'
    46: 108,  # bowl -> 'plaything, toy'
    47: 120,  # banana -> 'food'
    48: 120,  # apple -> 'food'
    49: 120,  # sandwich -> 'food'
    50: 120,  # orange -> 'food'
    51: 120,  # broccoli -> 'food'
    52: 120,  # carrot -> 'food'
    53: 120,  # hot dog -> 'food'
    54: 120,  # pizza -> 'food'
    55: 120,  # donut -> 'food'
    56: 120,  # cake -> 'food'
    57: 19,   # chair -> 'chair'
    58: 23,   # couch -> 'sofa, couch, lounge'
    59: 17,   # potted plant -> 'plant'
    60: 7,    # bed -> 'bed'
    61: 15,   # dining table -> 'table'
    62: 65,   # toilet -> 'toilet'
    63: 89,   # tv -> 'television receiver'
    64: 74,   # laptop -> 'computer'
    65: 74,   # mouse -> 'computer'
    66: 74,   # remote -> 'computer'
    67: 74,   # keyboard -> 'computer'
    68: 74,   # cell phone -> 'computer'
    69: 124,  # microwave -> 'microwave'
    70: 118,  # oven -> 'oven'
    71: 71,   # toaster -> 'stove'
    72: 47,   # sink -> 'sink'
    73: 50,   # refrigerator -> 'refrigerator'
    74: 67,   # book -> 'book'
    75: 148,  # clock -> 'clock'
    76: 135,  # vase -> 'vase'
    77: 108,  # scissors -> 'plaything, toy'
    78: 108,  # teddy bear -> 'plaything, toy'
    79: 108,  # hair drier -> 'plaything, toy'. Official, marked '?'.
    80: 108,  # toothbrush -> 'plaything, toy'. Official, marked '?'.
}
"""COCO contiguous class index (1..80) -> ADE index, as in DifFSS ``coco_mapper`` (verbatim)."""

PASCAL_NAME_TO_ADE: dict[str, int] = {n: PASCAL_TO_ADE[i + 1] for i, n in enumerate(PASCAL_CLASSES)}
COCO_NAME_TO_ADE: dict[str, int] = {n: COCO_TO_ADE[i + 1] for i, n in enumerate(COCO_CLASSES)}

_ALIASES: dict[str, str] = {
    # PASCAL VOC spellings (VOC class_names.txt, SBD, HSNet) -> the names above
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tv monitor": "television",
    "tvmonitor": "television",
    "motorcycle": "motorbike",
    # COCO spellings and the DifFSS prompt names
    "computer mouse": "mouse",
    "remote controller": "remote",
    "hair dryer": "hair drier",
    "doughnut": "donut",
    "cellphone": "cell phone",
    "mobile phone": "cell phone",
}

_PROMPT_NAMES: dict[str, str] = {
    **{n: n for n in PASCAL_CLASSES},
    **{n: COCO_PROMPT_OVERRIDES.get(n, n) for n in COCO_CLASSES},
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tv monitor": "television",
    "tvmonitor": "television",
}

ANIMAL_WORDS: frozenset[str] = frozenset(
    """animal bird cat dog horse sheep cow elephant bear zebra giraffe lion tiger leopard cheetah
    jaguar panther wolf fox deer moose elk reindeer camel llama alpaca goat pig boar rabbit hare
    squirrel mouse rat hamster monkey ape gorilla chimpanzee orangutan panda koala kangaroo
    raccoon skunk otter beaver seal walrus whale dolphin shark fish frog toad turtle tortoise snake
    lizard crocodile alligator dinosaur chicken hen rooster duck goose swan owl eagle hawk falcon
    parrot penguin pigeon sparrow crow flamingo ostrich peacock butterfly bee insect spider crab
    lobster octopus bison buffalo ox bull calf puppy kitten donkey mule pony hippopotamus hippo
    rhinoceros rhino antelope gazelle hedgehog bat""".split()
)
"""Names mapped to ADE 'animal' by the fallback rule (DifFSS maps every animal class there)."""


def normalize_name(name: str) -> str:
    """Lower-case a class name and turn '_', '-', '/' and runs of spaces into single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-/]", " ", str(name))).strip().lower()


def _build_lookup() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(dataset names + aliases, ADE primary names, ADE secondary synonyms) -> ADE index."""
    known: dict[str, int] = {}
    for table in (PASCAL_NAME_TO_ADE, COCO_NAME_TO_ADE):
        for n, idx in table.items():
            known[normalize_name(n)] = idx
    for alias, target in _ALIASES.items():
        known[normalize_name(alias)] = known[normalize_name(target)]
    primary: dict[str, int] = {}
    secondary: dict[str, int] = {}
    for idx, (short, full) in enumerate(zip(ADE_CLASSES, ADE_FULL_NAMES)):
        primary.setdefault(normalize_name(short), idx)
        syns = [normalize_name(s) for s in full.split(",")]
        primary.setdefault(syns[0], idx)
        for s in syns[1:]:
            secondary.setdefault(s, idx)  # first ADE class (lowest index) wins on shared synonyms
    return known, primary, secondary


_KNOWN, _ADE_PRIMARY, _ADE_SECONDARY = _build_lookup()


@dataclass(frozen=True)
class ResolvedClass:
    """How a class name maps to a seg-control colour."""

    name: str
    rgb: tuple[int, int, int]
    ade_index: int | None
    rule: str

    @property
    def ade_name(self) -> str | None:
        """The mmseg name of the ADE class, or None for a hashed colour."""
        return None if self.ade_index is None else ADE_CLASSES[self.ade_index]


def hashed_color(name: str) -> tuple[int, int, int]:
    """A deterministic, saturated colour for a name ADE cannot express (sha256 of the normalised name).

    Hue from the first two digest bytes, saturation in [0.65, 1] and value in [0.75, 1], so it is
    never the background grey. Stable across runs and machines (unlike Python's ``hash``). The
    ControlNet seg model never saw such a colour, so it conditions layout but not semantics.
    """
    d = hashlib.sha256(normalize_name(name).encode("utf-8")).digest()
    h = int.from_bytes(d[0:2], "big") / 65536.0
    s = 0.65 + 0.35 * d[2] / 255.0
    v = 0.75 + 0.25 * d[3] / 255.0
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


def _lookup(key: str, table: Mapping[str, int] | None) -> tuple[int, str] | None:
    """Exact lookups of one normalised key: user table, dataset tables, ADE names, ADE synonyms."""
    candidates = (key, key.replace(" ", ""))
    if table:
        for k in candidates:
            if k in table:
                return table[k], "table"
    for k in candidates:
        if k in _KNOWN:
            return _KNOWN[k], "dataset"
    for k in candidates:
        if k in _ADE_PRIMARY:
            return _ADE_PRIMARY[k], "ade-name"
    for k in candidates:
        if k in _ADE_SECONDARY:
            return _ADE_SECONDARY[k], "ade-synonym"
    return None


def _singulars(word: str) -> list[str]:
    """Naive English singular forms to try for a plural name."""
    out = []
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        out.append(word[:-1])
    return out


def _resolve_key(key: str, table: Mapping[str, int] | None) -> tuple[int, str] | None:
    """Exact lookup, then singular forms, then the animal vocabulary."""
    hit = _lookup(key, table)
    if hit:
        return hit
    for s in _singulars(key):
        hit = _lookup(s, table)
        if hit:
            return hit[0], hit[1] + "+singular"
    if key in ANIMAL_WORDS or any(s in ANIMAL_WORDS for s in _singulars(key)):
        return ANIMAL_INDEX, "animal"
    return None


def _normalize_table(table: Mapping[str, int] | None) -> dict[str, int] | None:
    """Normalise a user name->ADE-index table's keys and check its indices."""
    if not table:
        return None
    out = {}
    for k, v in table.items():
        if not isinstance(v, int) or not 0 <= v < len(ADE_PALETTE):
            raise FsdiffError(f"ADE mapping for {k!r} is {v!r}; ADE indices run 0..149 (mmseg, 0 = wall).")
        out[normalize_name(k)] = v
    return out


def resolve_class(name: str, *, table: Mapping[str, int] | None = None) -> ResolvedClass:
    """Map a class name to its seg-control colour (rules in order; the first hit wins).

    1. ``table`` (e.g. DifFSS's ``fss2ade.txt`` via :func:`load_name_table`), if given;
    2. the official PASCAL / COCO tables, by name or a known spelling ('aeroplane', 'tvmonitor', ...);
    3. an ADE class's own name, then an ADE synonym ('couch' -> sofa; a synonym shared by several ADE
       classes goes to the lowest index);
    4. the same after a naive singular ('skis' -> 'ski');
    5. an animal word -> 126 'animal' (as DifFSS does for every animal);
    6. for multi-word names, rules 1-5 on the last word, the English head noun ('fire truck' ->
       truck, 'sea lion' -> animal);
    7. otherwise :func:`hashed_color`.
    """
    if not isinstance(name, str) or not normalize_name(name):
        raise FsdiffError(f"class name must be a non-empty string, got {name!r}.")
    key = normalize_name(name)
    t = _normalize_table(table)
    hit = _resolve_key(key, t)
    if hit is None and " " in key:
        head = key.rsplit(" ", 1)[1]
        hit = _resolve_key(head, t)
        if hit:
            hit = (hit[0], hit[1] + "+head-word")
    if hit is None:
        return ResolvedClass(name, hashed_color(key), None, "hash")
    idx, rule = hit
    return ResolvedClass(name, ADE_PALETTE[idx], idx, rule)


def class_color(name: str, *, table: Mapping[str, int] | None = None) -> tuple[int, int, int]:
    """The RGB colour DifFSS paints ``name``'s pixels with in a seg control."""
    return resolve_class(name, table=table).rgb


def ade_index(name: str, *, table: Mapping[str, int] | None = None) -> int | None:
    """The ADE index (0..149) for a class name, or None when it falls back to a hashed colour."""
    return resolve_class(name, table=table).ade_index


def prompt_name(name: str) -> str:
    """The class name DifFSS writes in its prompt ('tvmonitor' -> 'television', COCO 'mouse' -> 'computer mouse').

    Names outside the PASCAL/COCO tables come back with '_' turned into spaces and outer blanks
    stripped, case kept.
    """
    key = normalize_name(name)
    if key in _PROMPT_NAMES:
        return _PROMPT_NAMES[key]
    if key.replace(" ", "") in _PROMPT_NAMES:
        return _PROMPT_NAMES[key.replace(" ", "")]
    return re.sub(r"\s+", " ", str(name).replace("_", " ")).strip()


def load_name_table(path: str | os.PathLike) -> dict[str, int]:
    """Read a class -> ADE index table: DifFSS's ``name#name#ade_name#ade_idx`` lines or ``name<TAB>idx``."""
    p = Path(path)
    if not p.is_file():
        raise FsdiffError(f"ADE mapping file not found: {p}. Pass a file of 'name#name#ade_name#ade_idx' lines.")
    out: dict[str, int] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("//"):
            continue
        parts = line.split("#") if "#" in line else line.split("\t")
        try:
            idx = int(parts[-1])
        except ValueError:
            raise FsdiffError(
                f"{p} line {n}: {line!r} does not end in an ADE index; expected 'name#name#ade_name#ade_idx'."
            ) from None
        if len(parts) < 2 or not 0 <= idx < len(ADE_PALETTE):
            raise FsdiffError(f"{p} line {n}: {line!r}; expected a class name and an ADE index 0..149.")
        out[normalize_name(parts[0])] = idx
    return out
