"""Time of the two live corrections in napari at 256^3, against what they replace.

On the ARC sample (256^3) with the pretrained MeshNet-26:

* the threshold slider (``ThresholdControl.apply``: the Labels layer redrawn from the kept
  P(lesion)), against running the segmentation again (``inference.segment``);
* the statistics panel's update (``LesionPanel.refresh``: ``lesion_stats`` labelling the
  lesion's bounding box), against labelling the whole grid (``scipy.ndimage.label``).

Both run in a real napari viewer, in one process; each time is the median of ``--rounds``.
napari needs a display: run from the repository root with ``xvfb-run`` where there is none::

    MESHCHOP_MIRROR=../shared/data xvfb-run -a python bench/bench_corrections.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    import napari
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from napari_meshchop import events
    from napari_meshchop.network import registry
    from napari_meshchop.network.inference import segment
    from napari_meshchop.plugin.widgets.lesions import LesionPanel, geometry_of
    from napari_meshchop.plugin.widgets.threshold import ThresholdControl

    viewer = napari.Viewer(show=False)
    (image,) = viewer.open_sample("napari-meshchop", registry.SAMPLE_SCAN)
    img = nib.Nifti1Image(np.asarray(image.data, dtype=np.float32), geometry_of(image).affine)
    start = time.perf_counter()
    result = events.run(segment(img, registry.DEFAULT_MODEL, "cpu"))
    network = time.perf_counter() - start
    transform = {k: getattr(image, k) for k in ("scale", "translate", "rotate", "shear",
                                                "units")}
    labels = viewer.add_labels(result.mask, name=f"{image.name} lesion", **transform)
    control = ThresholdControl(viewer)
    control.show(result, labels, transform)
    thresholds = iter(np.tile([0.3, 0.4, 0.6, 0.7], args.rounds))
    slider = timed(lambda: control.apply(next(thresholds)), args.rounds)
    control.apply(0.5)
    viewer.layers.selection.active = labels
    panel = LesionPanel(viewer)
    stats = timed(panel.refresh, args.rounds)
    whole = timed(lambda: ndimage.label(np.asarray(labels.data) > 0,
                                        structure=np.ones((3, 3, 3))), args.rounds)
    shape = "x".join(map(str, labels.data.shape))
    print(f"| {shape} | what | time (s) | vs baseline |")
    print("|---|---|---:|---:|")
    print(f"| threshold | segmentation again (baseline) | {network:.1f} | 1 |")
    print(f"| threshold | slider: redraw from P(lesion) | {slider:.3f} | {slider / network:.5f}x |")
    print(f"| statistics | label the whole grid (baseline) | {whole:.3f} | 1 |")
    print(f"| statistics | panel update ({len(panel.stats.components)} components) | "
          f"{stats:.3f} | {stats / whole:.2f}x |")
    viewer.close()


if __name__ == "__main__":
    main()
