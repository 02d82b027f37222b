"""The one JSON encoder of fsdiff: numpy scalars and arrays, paths, tuples and sets become plain JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, paths, tuples and sets turned into JSON types (dict keys to str)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`jsonable` (``value``); NaN and infinity are refused (``allow_nan=False``)."""
    return json.dumps(jsonable(value), allow_nan=False, **kwargs)
