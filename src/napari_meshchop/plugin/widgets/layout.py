"""Widgets that fit a laptop screen, and that know when napari has closed them.

napari docks a widget's ``.native`` QWidget; with the four MeshChop widgets docked on one
side of a 1000-pixel screen, each one's minimum height adds up, pushing the status bar
and half the canvas off-screen. :func:`fit_dock` moves a built widget's contents into a
scroll area, so a dock can be as short as the user makes it; its width still follows the
contents, and a MeshChop widget docked beside another one joins it as a tab
(:func:`tab_with_siblings`), each then getting the dock's full height.
:func:`when_closed` calls back when the widget is taken out of its dock.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from magicgui.widgets import Container
from qtpy.QtCore import QEvent, QObject, QSize, Qt, QTimer
from qtpy.QtWidgets import (
    QDockWidget,
    QFrame,
    QMainWindow,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

MIN_HEIGHT = 120  # what a dock keeps of a widget: a few rows, then it scrolls
SIBLING = "napari_meshchop_widget"  # a Qt property that marks our widgets


def fit_dock(container: Container, grow: QWidget | None = None) -> QScrollArea:
    """Put ``container``'s contents (its layout, with every child) into a vertical scroll
    area that fills the container (later additions land inside too), and make it a tab of
    the MeshChop widget docked beside it, if any. Spare height goes to ``grow`` (a plot, a
    table), or else below the contents."""
    outer = container.native
    layout = outer.layout()
    if grow is not None:
        layout.setStretchFactor(grow, 1)
    else:
        layout.addStretch(1)
    inner = QWidget()
    inner.setLayout(layout)  # Qt moves a layout, children and all, to its new widget
    area = _VerticalScroll()
    area.setWidget(inner)
    column = QVBoxLayout(outer)
    column.setContentsMargins(0, 0, 0, 0)
    column.addWidget(area)
    tab_with_siblings(container)
    return area


class _VerticalScroll(QScrollArea):
    """Scrolls up and down only: as wide as its contents need (whatever they show now),
    as short as :data:`MIN_HEIGHT`."""

    def __init__(self):
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def _width(self, contents: QSize) -> int:
        return contents.width() + self.verticalScrollBar().sizeHint().width()

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        return QSize(self._width(self.widget().minimumSizeHint()), MIN_HEIGHT)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        hint = self.widget().sizeHint()
        return QSize(self._width(hint), hint.height())

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802
        if watched is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()  # the contents changed what they need: tell the dock
        return super().eventFilter(watched, event)


def tab_with_siblings(container: Container) -> None:
    """When napari docks ``container`` in an area that already holds a MeshChop widget,
    make it a tab of that dock (what ``napari -w napari-meshchop __all__`` does)."""
    native = container.native
    native.setProperty(SIBLING, True)
    native.installEventFilter(_Docked(native))


class _Docked(QObject):
    def eventFilter(self, widget: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.ParentChange and isinstance(widget, QWidget) \
                and widget.parent() is not None:
            # napari puts the widget in its dock first, then the dock in the window.
            QTimer.singleShot(0, lambda: _tabify(widget))
        return False


def _tabify(widget: QWidget) -> None:
    """All MeshChop docks in ``widget``'s dock area become tabs of the first one; the
    newly docked widget's tab is shown."""
    try:
        dock = widget.parent()
    except RuntimeError:  # deleted before the event loop came round
        return
    window = dock.parent() if isinstance(dock, QDockWidget) else None
    if not isinstance(window, QMainWindow):
        return
    area = window.dockWidgetArea(dock)
    group = [d for d in window.findChildren(QDockWidget)
             if d.widget() is not None and d.widget().property(SIBLING)
             and window.dockWidgetArea(d) == area and not d.isFloating()]
    first = group[0]
    for other in group[1:]:
        if other not in window.tabifiedDockWidgets(first):
            window.tabifyDockWidget(first, other)
    dock.show()
    dock.raise_()


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
