"""DiffUp (Chen et al., "No Re-Train, More Gain", arXiv 2407.16182; METHODS.md §4): the model core.

BAFT priors and frozen encoders live elsewhere; this package holds the configuration, UAPF (Sec. III-C2),
UQDD with SCM and DQM (Sec. III-C3) and the diffusion schedule (annotation synthesis: fsdiff.synth). All
internals are METHODS.md §4.2 reconstructions [R].
"""

from fsdiff.methods.diffup.config import ANNOTATION_TYPES, DEFAULT_START_FRACTIONS, DiffUpConfig
from fsdiff.methods.diffup.schedule import (
    cosine_alpha_bar,
    ddim_step,
    make_generator,
    prior_start,
    q_sample,
    timestep_sequence,
)
from fsdiff.methods.diffup.uapf import UAPF, UAPFOutput, fuse_precision, heteroscedastic_loss
from fsdiff.methods.diffup.uqdd import (
    UQDD,
    UQDDOutput,
    UQDDSampleOutput,
    build_models,
    mask_iou,
    training_losses,
)

__all__ = [
    "ANNOTATION_TYPES",
    "DEFAULT_START_FRACTIONS",
    "DiffUpConfig",
    "cosine_alpha_bar",
    "ddim_step",
    "make_generator",
    "prior_start",
    "q_sample",
    "timestep_sequence",
    "UAPF",
    "UAPFOutput",
    "UQDD",
    "UQDDOutput",
    "UQDDSampleOutput",
    "build_models",
    "fuse_precision",
    "heteroscedastic_loss",
    "mask_iou",
    "training_losses",
]
