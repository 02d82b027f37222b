"""DifFSS support augmentation (METHODS.md §2): control maps, ADE palette, generation cache.

Submodules are imported on demand (``fsdiff.augment.controls``, ``.palette``, ``.cache``) so that
importing this package stays cheap.
"""
