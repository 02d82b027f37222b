"""Episode sources and the benchmark sampler (datasets, folds and protocols: docs/DATASETS.md).

Sources (by name in :data:`SOURCES`): ``coco`` (any COCO-format json; COCO-20i folds), ``pascal``
(PASCAL-5i), ``fss1000`` (FSS-1000), ``folder`` (a user's images/ + masks/). The sampler reproduces
HSNet's and BAM's test episodes and stores them as JSON episode lists.
"""

import inspect

from fsdiff.data.base import SOURCES, SPLITS_ENV, FewShotSource
from fsdiff.data.coco import CocoSource, coco_fold_classes
from fsdiff.data.folder import FolderSource
from fsdiff.data.fss1000 import Fss1000Source
from fsdiff.data.pascal import VOC_CLASSES, PascalSource, pascal_fold_classes
from fsdiff.data.sampler import (
    EpisodeSpec,
    bam_seeds,
    build_episode,
    episode_meta,
    load_episode_list,
    sample_episodes,
    save_episode_list,
)
from fsdiff.errors import FsdiffError


def build_source(name: str, **kwargs) -> FewShotSource:
    """Build the data source registered as ``name`` ('coco', 'pascal', 'fss1000', 'folder')."""
    factory = SOURCES.get(name)
    params = inspect.signature(factory).parameters
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        accepted = ", ".join(p for p in params if p != "self")
        raise FsdiffError(f"the {name} data source does not take {unknown}; it accepts: {accepted}.")
    return factory(**kwargs)


__all__ = [
    "SOURCES",
    "SPLITS_ENV",
    "VOC_CLASSES",
    "CocoSource",
    "EpisodeSpec",
    "FewShotSource",
    "FolderSource",
    "Fss1000Source",
    "PascalSource",
    "bam_seeds",
    "build_episode",
    "build_source",
    "coco_fold_classes",
    "episode_meta",
    "load_episode_list",
    "pascal_fold_classes",
    "sample_episodes",
    "save_episode_list",
]
