"""DiffUp (Chen et al., "No Re-Train, More Gain", arXiv 2407.16182): the model core.

BAFT priors and frozen encoders live elsewhere; this package holds the configuration, UAPF (the paper's
Fig. 3, "uncertainty-aware prior fusion"), UQDD with SCM and DQM (Fig. 4 and Fig. 5) and the diffusion
schedule (annotation synthesis: fsdiff.synth). Tags in the docstrings: [P] stated in the paper (its abstract
and figure captions: Fig. 2 overview, Fig. 3 BAFT/UAPF, Fig. 4 SCM, Fig. 5 DQM); [R] fsdiff's reconstruction
where the paper gives no detail (sizes, losses, schedule), with the reason where one is known.
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
