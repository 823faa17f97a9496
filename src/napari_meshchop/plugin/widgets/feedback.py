"""How the widgets report a worker's failure: one place, the same words everywhere."""

from __future__ import annotations

import logging

from magicgui.widgets import Label
from napari.utils.notifications import show_error

from napari_meshchop.errors import MeshchopError

log = logging.getLogger(__name__)


def report_error(status: Label, what: str, exc: Exception) -> None:
    """Bad input or a refusal shows the core's own sentence; a bug keeps its traceback."""
    if isinstance(exc, MeshchopError):
        status.value = f"Error: {exc}"
        show_error(str(exc))
    else:
        log.error("%s failed", what, exc_info=exc)
        status.value = f"Failed: {type(exc).__name__}: {exc}"
        show_error(f"{what} failed ({type(exc).__name__}: {exc})")
