"""Screenshots of napari with the ARC sample scan and the lesion the Segment widget finds.

    MESHCHOP_MIRROR=../shared/data python docs/make_screenshots.py [--mask MASK.nii.gz]

Opens the sample and the widget through the plugin's manifest, runs the pretrained
MeshNet-26 (about 2 minutes on 2 CPU cores), then saves the whole window in 2D (the axial
slice through the lesion's centre) and in 3D to docs/images/napari_2d.png and
napari_3d.png. ``--mask`` shows a saved mask instead of running the network. Without a
display the script re-runs itself under ``xvfb-run``.
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
SIZE = (1500, 900)


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

    viewer = napari.Viewer(title="napari-meshchop")
    viewer.window._qt_window.resize(*SIZE)
    (image,) = viewer.open_sample("napari-meshchop", "sub-M2265_T2w")
    _, widget = viewer.window.add_plugin_dock_widget("napari-meshchop")
    if mask:
        (lesion,) = viewer.open(mask, plugin="napari-meshchop", name=f"{image.name} lesion")
        lesion.colormap = {None: "transparent", 0: "transparent", 1: (1.0, 0.3, 0.1, 1.0)}
    else:
        started = time.time()
        widget.run()
        while widget.worker is not None:  # keep the GUI alive, as napari's own loop would
            QApplication.processEvents()
            time.sleep(0.05)
        lesion = viewer.layers[f"{image.name} lesion"]
        print(f"segmented in {time.time() - started:.0f} s: "
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

    # 3D: the axial plane through the lesion's centre and the lesion as a surface,
    # seen from above, in front and to the patient's left.
    viewer.dims.ndisplay = 3
    image.depiction = "plane"
    image.plane.position = tuple(inside)
    image.plane.normal = (1, 0, 0)
    image.blending = "translucent"  # depth-tested: the plane hides the lesion below it
    axes = overlays.axes if overlays else viewer.axes
    axes.visible = True
    # World axes run (inferior, posterior, left): look down, back and to the right.
    camera.set_view_direction(view_direction=(0.7, 0.5, -0.5), up_direction=(-1, 0, 0))
    text.text = "3D, from above, front left; axes point Inferior, Posterior, Left"
    _save(viewer, out / "napari_3d.png")
    viewer.close()


def _save(viewer, path: Path) -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(10):  # let vispy draw before grabbing the window
        QApplication.processEvents()
        time.sleep(0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(path), canvas_only=False)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
