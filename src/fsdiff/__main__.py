"""``python -m fsdiff`` runs the ``fsdiff`` command (also under ``accelerate launch -m fsdiff``)."""

import sys

from fsdiff.cli import main

sys.exit(main())
