"""DifFSS support augmentation (Tan, Chen, Yan, "DifFSS: Diffusion Model for Few-Shot Semantic Segmentation",
arXiv 2307.00773): control maps, ADE palette, generation cache.

The paper describes the idea; the exact generation and loading rules come from the authors' code
(github.com/TrinitialChan/DifFSS: ``FSSpregenerate.py`` and ``constant.py`` of ControlNet4FSS, and
``util/dataset.py`` of DifFSS-BAM). Tags in this package: [C] taken from that code, [R] fsdiff's own
reconstruction or addition (with its reason).

Submodules are imported on demand (``fsdiff.augment.controls``, ``.palette``, ``.cache``) so that
importing this package stays cheap.
"""
