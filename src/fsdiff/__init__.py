"""fsdiff: few-shot semantic segmentation with diffusion models.

One currency (:class:`fsdiff.episode.Episode`), data flowing one way:
source -> episode -> augmenter -> segmenter -> metrics / output.
"""

from fsdiff.episode import (
    BoxAnnotation,
    Episode,
    MaskAnnotation,
    PointsAnnotation,
    Query,
    ScribbleAnnotation,
    Shot,
    TextAnnotation,
)
from fsdiff.errors import FsdiffError

__version__ = "0.1.0"

__all__ = [
    "BoxAnnotation",
    "Episode",
    "FsdiffError",
    "MaskAnnotation",
    "PointsAnnotation",
    "Query",
    "ScribbleAnnotation",
    "Shot",
    "TextAnnotation",
    "__version__",
]
