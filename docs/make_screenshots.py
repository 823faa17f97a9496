"""Screenshots of napari with the ARC sample scan and the lesion the Segment widget finds.

    MESHCHOP_MIRROR=../shared/data python docs/make_screenshots.py [--mask MASK.nii.gz]

Opens the sample and all four widgets through the plugin's manifest in a 1600 x 1000
window (they share one tabbed dock), runs the pretrained MeshNet-26 from the Segment
widget (about 2 minutes on 2 CPU cores), then saves the whole window in 2D (the axial
slice through the lesion's centre) and in 3D (the plugin's default 3D look: a see-through
scan with the lesion inside) to docs/images/napari_2d.png and napari_3d.png. ``--mask``
shows a saved mask instead of running the network. Without a display the script re-runs
itself under ``xvfb-run``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

IMAGES = Path(__file__).resolve().parent / "images"
SIZE = (1600, 1000)
WIDGETS = ("Segment stroke lesion", "Download ARC cohort", "Train MeshNet", "Evaluate MeshNet")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mask", help="a lesion mask (.nii.gz) to show instead of segmenting")
    parser.add_argument("--out", default=str(IMAGES), help="folder for the PNG files")
    args = parser.parse_args()
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
        screen = f"-screen 0 {SIZE[0] + 100}x{SIZE[1] + 100}x24"
        return subprocess.call(["xvfb-run", "-a", "-s", screen, sys.executable, *sys.argv])
    shoot(Path(args.out), args.mask)
    return 0


def shoot(out: Path, mask: str | None) -> None:
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_meshchop.network import registry
    from napari_meshchop.plugin.reader import prefer_for_nifti, read_layer
    from napari_meshchop.plugin.widgets import segment

    prefer_for_nifti()  # its one-time notice goes to the console, not over the picture
    viewer = napari.Viewer(title="napari-meshchop")
    viewer.window._qt_window.resize(*SIZE)
    (image,) = viewer.open_sample("napari-meshchop", "sub-M2265_T2w")
    docked = {name: viewer.window.add_plugin_dock_widget("napari-meshchop", name)[1]
              for name in WIDGETS}
    widget = docked["Segment stroke lesion"]
    _settle()
    widget.native.parent().raise_()  # the Segment tab in front
    if mask:
        data = read_layer(mask)[0]
        lesion = viewer.add_labels(
            data, name=segment.lesion_layer_name(image.name, registry.DEFAULT_MODEL, ()),
            opacity=0.6, colormap=segment._lesion_colors(),
            **segment.Source.of(image).transform)
        segment.show_lesion_in_3d(image, lesion)
    else:
        started = time.time()
        widget.run()
        while widget.worker is not None:  # keep the GUI alive, as napari's own loop would
            QApplication.processEvents()
            time.sleep(0.05)
        lesion = widget.last
        print(f"segmented in {time.time() - started:.0f} s: {lesion.name}, "
              f"{lesion.metadata['lesion_ml']:.1f} mL, {int(lesion.data.sum())} voxels")

    # 2D: the axial slice through the lesion's centre (world axis 0 runs head to foot).
    inside = np.argwhere(lesion.data).mean(axis=0)
    camera = getattr(viewer, "scene", viewer).camera  # napari 0.9 moved it
    overlays = viewer.canvas.overlays if hasattr(viewer, "canvas") else None  # 0.9 too
    scale_bar = overlays.scale_bar if overlays else viewer.scale_bar
    text = overlays.text if overlays else viewer.text_overlay
    viewer.dims.axis_labels = ("I", "P", "L")  # where each world axis points
    viewer.dims.ndisplay = 2
    viewer.dims.set_point(0, lesion.data_to_world(inside)[0])
    scale_bar.visible = text.visible = True
    text.text = "axial slice, radiological: the patient's right is on the left"
    viewer.reset_view()
    _save(viewer, out / "napari_2d.png")

    # 3D as the plugin sets it up: nothing adjusted here but the camera.
    viewer.dims.ndisplay = 3
    axes = overlays.axes if overlays else viewer.axes
    axes.visible = True
    # World axes run (inferior, posterior, left): look down, back and to the right.
    camera.set_view_direction(view_direction=(0.7, 0.5, -0.5), up_direction=(-1, 0, 0))
    text.text = "3D, from above, front left; axes point Inferior, Posterior, Left"
    _save(viewer, out / "napari_3d.png")
    viewer.close()


def _settle() -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(10):  # let Qt lay out and vispy draw
        QApplication.processEvents()
        time.sleep(0.05)


def _save(viewer, path: Path) -> None:
    _settle()
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(path), canvas_only=False)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
