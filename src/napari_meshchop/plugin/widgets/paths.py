"""Path fields that show the whole path, and the folders the widgets start from.

A path field keeps its full text (what magicgui reads and writes); while it does not have
the keyboard focus it *draws* the path elided in the middle, so that the start (which
disk, which home) and the end (which file) both stay visible in a narrow dock, and the
whole path is its tooltip. Clicking in it shows the text as it is, to edit.

Default folders live under the user's data folder (``platformdirs``), not wherever napari
happened to be started from.
"""

from __future__ import annotations

from pathlib import Path

import platformdirs
from magicgui.widgets import FileEdit
from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtGui import QPainter
from qtpy.QtWidgets import QLineEdit, QStyle, QStyleOptionFrame

APP = "napari-meshchop"


def data_home() -> Path:
    """Where the widgets put and look for data and runs by default."""
    return Path(platformdirs.user_data_dir(APP, appauthor=False))


def default_folder(*parts: str) -> Path:
    """A folder under :func:`data_home`, e.g. ``default_folder("arc")``."""
    return data_home().joinpath(*parts)


class _ElideWhenIdle(QObject):
    """Paints a line edit's text elided in the middle while it is not being edited."""

    def eventFilter(self, edit: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt's name
        if event.type() != QEvent.Type.Paint or not isinstance(edit, QLineEdit):
            return False
        if edit.hasFocus() or not edit.text():
            return False
        option = QStyleOptionFrame()
        option.initFrom(edit)
        option.lineWidth = edit.style().pixelMetric(QStyle.PixelMetric.PM_DefaultFrameWidth,
                                                    option, edit)
        option.midLineWidth = 0
        option.state |= QStyle.StateFlag.State_Sunken
        painter = QPainter(edit)
        edit.style().drawPrimitive(QStyle.PrimitiveElement.PE_PanelLineEdit, option,
                                   painter, edit)
        area = edit.style().subElementRect(QStyle.SubElement.SE_LineEditContents, option,
                                           edit).adjusted(3, 0, -3, 0)
        text = _elided(edit, area.width())
        painter.setPen(edit.palette().color(edit.foregroundRole()))
        painter.drawText(area, int(Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignLeft),
                         text)
        painter.end()
        return True


_ELIDER = _ElideWhenIdle()


def elide_path(field: FileEdit, *, min_chars: int = 12) -> FileEdit:
    """Make a magicgui FileEdit show its whole path (elided in the middle) with the full
    path as its tooltip, and let the dock be narrow (the field shrinks, it does not crop)."""
    edit: QLineEdit = field.line_edit.native
    edit.installEventFilter(_ELIDER)
    edit.setMinimumWidth(edit.fontMetrics().averageCharWidth() * min_chars)
    button = field.choose_btn  # "Choose directory" would take half the row from the path
    button.tooltip, button.text = button.text, "…"
    button.native.setMaximumWidth(button.native.fontMetrics().horizontalAdvance(" … ") + 16)

    about = field.tooltip  # what the field is for, kept above the path

    def show_tooltip(*_):
        paths = edit.text().replace(", ", "\n")  # several files: one a line
        field.tooltip = "\n".join(t for t in (about, paths) if t) or None

    field.changed.connect(show_tooltip)
    show_tooltip()
    return field


def shown_text(field: FileEdit, width: int) -> str:
    """The text ``field`` draws when it is not being edited, ``width`` pixels wide."""
    return _elided(field.line_edit.native, width)


def _elided(edit: QLineEdit, width: int) -> str:
    return edit.fontMetrics().elidedText(edit.text(), Qt.TextElideMode.ElideMiddle, width)
