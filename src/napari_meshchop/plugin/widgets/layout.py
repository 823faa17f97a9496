"""Widgets that fit a laptop screen, and that know when napari has closed them.

napari docks a widget's ``.native`` QWidget; with the four MeshChop widgets docked on one
side of a 1000-pixel screen, each one's minimum height adds up, pushing the status bar
and half the canvas off-screen. :func:`scroll` moves a built widget's contents into a
scroll area, so a dock can be as short as the user makes it; its width still follows the
contents. :func:`when_closed` calls back when the widget is taken out of its dock.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from magicgui.widgets import Container
from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

MIN_HEIGHT = 120  # what a dock keeps of a widget: a few rows, then it scrolls


def scroll(container: Container) -> QScrollArea:
    """Put ``container``'s contents (its layout, with every child) into a vertical scroll
    area that fills the container; later additions to the container land inside too."""
    outer = container.native
    inner = QWidget()
    inner.setLayout(outer.layout())  # Qt moves a layout, children and all, to its new widget
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setWidget(inner)
    area.setMinimumHeight(MIN_HEIGHT)
    # As wide as the contents want: never a horizontal scroll bar inside a dock.
    area.setMinimumWidth(inner.minimumSizeHint().width()
                         + area.verticalScrollBar().sizeHint().width())
    column = QVBoxLayout(outer)
    column.setContentsMargins(0, 0, 0, 0)
    column.addWidget(area)
    return area


class _Closed(QObject):
    def __init__(self, widget: QWidget, callback: Callable[[], None]):
        super().__init__(widget)
        self._callback = callback
        self._docked = widget.parent() is not None

    def eventFilter(self, widget: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.ParentChange and isinstance(widget, QWidget):
            if widget.parent() is not None:
                self._docked = True
            elif self._docked:  # napari's dock close button: the widget is orphaned
                self._docked = False
                self._callback()
        return False


def when_closed(container: Container, method: Callable[[bool], None]) -> None:
    """Call ``method(destroyed)``, a method of ``container``, when the container is taken
    out of its dock (the dock's close button: ``False``, its Qt widgets still exist) or
    when its Qt widget is deleted (the window closed: ``True``; touch no widget then)."""
    owner, name = weakref.ref(container), method.__name__  # no strong reference from Qt

    def call(destroyed: bool) -> None:
        if (alive := owner()) is not None:
            getattr(alive, name)(destroyed)

    native = container.native
    native.installEventFilter(_Closed(native, lambda: call(False)))
    native.destroyed.connect(lambda *_: call(True))
