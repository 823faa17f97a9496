"""``python -m napari_meshchop.cli``: the same as the ``meshchop`` command."""

import sys

from napari_meshchop.cli import console

sys.exit(console())
