"""The napari plugin: reader, writer, sample data, layer conversion and the dock widgets.

Only this package imports napari, Qt or magicgui; the rest of napari_meshchop never does."""
