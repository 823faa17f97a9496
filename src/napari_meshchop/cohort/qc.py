"""Pictures for a person to check a cohort at a glance: a mosaic per image, a plot of the
volumes, and one HTML page that shows them all (fMRIPrep's way).

Everything is drawn with matplotlib's object API on the Agg canvas (no pyplot, no display),
so that the writer thread of a cohort run may draw while the network runs.
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_meshchop import __version__, files
from napari_meshchop.cohort import derivatives
from napari_meshchop.cohort.derivatives import Record

OUTLINE = "#ff2a2a"
COLUMNS, ROWS = 6, 2
PANEL_INCHES = 1.6
DPI = 100


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, facecolor="black")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor=fig.get_facecolor())
    return buffer.getvalue()


def axial_slices(mask: np.ndarray, head: np.ndarray, n: int) -> list[int]:
    """``n`` axial slice numbers (third axis of a RAS volume): evenly through the lesion,
    or through the head when there is none."""
    where = mask if mask.any() else head
    if not where.any():
        where = np.ones_like(mask, dtype=bool)
    z = np.flatnonzero(where.any(axis=(0, 1)))
    lo, hi = int(z[0]), int(z[-1])
    if where is head:  # the middle of the head, where the brain is
        lo, hi = lo + (hi - lo) // 6, hi - (hi - lo) // 6
    return sorted(set(np.linspace(lo, hi, n).round().astype(int).tolist()))


def mosaic(scan: np.ndarray, affine: np.ndarray, mask: np.ndarray, title: str) -> bytes:
    """A PNG: axial slices through the lesion, the mask's outline in red over the scan,
    neurological convention (the patient's right on the right)."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(np.asarray(scan, dtype=np.float32), ornt)
    lesion = nib.orientations.apply_orientation(np.asarray(mask) > 0, ornt)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[ornt[:, 0].astype(int).argsort()]
    positive = ras[ras > 0]
    lo = float(np.percentile(positive, 1)) if positive.size else float(ras.min())
    hi = float(np.percentile(positive, 99.5)) if positive.size else float(ras.max())
    head = ras > (lo + 0.1 * (hi - lo))
    x, y = (np.flatnonzero(head.any(axis=(1, 2))), np.flatnonzero(head.any(axis=(0, 2))))
    xs = slice(x[0], x[-1] + 1) if x.size else slice(None)
    ys = slice(y[0], y[-1] + 1) if y.size else slice(None)
    slices = axial_slices(lesion, head, COLUMNS * ROWS)
    rows = max(1, -(-len(slices) // COLUMNS))
    fig = _figure(COLUMNS * PANEL_INCHES, rows * PANEL_INCHES + 0.45)
    fig.suptitle(title, color="white", fontsize=9, y=0.995, va="top")
    grid = fig.add_gridspec(rows, COLUMNS, left=0.005, right=0.995, bottom=0.005,
                            top=1 - 0.4 / (rows * PANEL_INCHES + 0.45), wspace=0.02, hspace=0.02)
    for i in range(rows * COLUMNS):
        ax = fig.add_subplot(grid[i // COLUMNS, i % COLUMNS])
        ax.set_axis_off()
        if i >= len(slices):
            continue
        z = slices[i]
        ax.imshow(ras[xs, ys, z].T, origin="lower", cmap="gray", vmin=lo, vmax=hi,
                  aspect=zooms[1] / zooms[0], interpolation="nearest")
        cut = lesion[xs, ys, z]
        if cut.any():
            ax.contour(cut.T.astype(np.float32), levels=[0.5], colors=[OUTLINE],
                       linewidths=0.9)
        ax.text(0.03, 0.03, f"z={z}", color="yellow", fontsize=6, transform=ax.transAxes)
        if i == 0:
            ax.text(0.97, 0.97, "R", color="yellow", fontsize=7, ha="right", va="top",
                    transform=ax.transAxes)
    return _png(fig)


def volume_plot(records: Sequence[Record]) -> bytes:
    """A PNG: each segmented image's lesion volume, smallest to largest, and their histogram."""
    done = [r for r in records if r.ok and r.measures is not None]
    volumes = np.array(sorted(r.measures.lesion_ml for r in done))
    fig = _figure(8.0, 3.2)
    fig.set_facecolor("white")
    rank, hist = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    others = len(records) - len(done)
    rank.set_title(f"Lesion volume of {len(done)} image{'s' * (len(done) != 1)}"
                   + (f" ({others} failed or missing)" if others else ""), fontsize=9)
    if volumes.size:
        rank.plot(np.arange(1, volumes.size + 1), volumes, "o", color="#c0392b", markersize=3)
        hist.hist(volumes, bins=min(30, max(5, volumes.size // 3)), color="#c0392b")
    rank.set_xlabel("image, by volume", fontsize=8)
    rank.set_ylabel("lesion volume (mL)", fontsize=8)
    hist.set_xlabel("lesion volume (mL)", fontsize=8)
    hist.set_ylabel("images", fontsize=8)
    for ax in (rank, hist):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def write_volume_plot(out_dir: str | os.PathLike, records: Sequence[Record]) -> Path:
    return files.write_bytes(Path(out_dir) / derivatives.VOLUME_PLOT, volume_plot(records))


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { padding: 0.15em 0.6em; border-bottom: 1px solid #ddd; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.failed { color: #b00; } .missing { color: #888; }
figure { margin: 1em 0 2em 0; } figcaption { font-size: 0.9em; margin-bottom: 0.3em; }
figure img { max-width: 100%; background: black; }
"""


def report_html(out_dir: str | os.PathLike, records: Sequence[Record], title: str) -> str:
    """One page: counts, the volume plot, the table, then every image's mosaic."""
    out = Path(out_dir)
    counts = {s: sum(r.status == s for r in records) for s in derivatives.STATUSES}
    e = html.escape
    head = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>")
    summary = (f"<p>{len(records)} images: {counts['done']} segmented, {counts['failed']} "
               f"failed, {counts['missing']} not segmented yet. Made by napari-meshchop "
               f"{e(__version__)}; the mask's red outline is drawn over axial slices through "
               "the lesion, the patient's right on the right.</p>")
    header = ("<h2>Images</h2><table><tr><th>image</th><th>lesion (mL)</th><th>voxels</th>"
              "<th>components</th><th>model</th><th>status</th></tr>")
    parts = [head, f"<h1>{e(title)}</h1>", summary,
             f"<img src='{e(derivatives.VOLUME_PLOT)}' alt='lesion volumes' width='800'>",
             header]
    for i, r in enumerate(records):
        m = r.measures
        name = f"<a href='#image-{i}'>{e(r.image.key)}</a>" if r.ok else e(r.image.key)
        status = r.status if not r.error else f"{r.status}: {r.error}"
        parts.append(
            f"<tr class='{r.status}'><td>{name}</td>"
            f"<td class='n'>{'' if m is None else f'{m.lesion_ml:.2f}'}</td>"
            f"<td class='n'>{'' if m is None else m.voxels}</td>"
            f"<td class='n'>{'' if m is None else m.components}</td>"
            f"<td>{e(r.model)}</td><td>{e(status)}</td></tr>")
    parts.append("</table><h2>Mosaics</h2>")
    for i, r in enumerate(records):
        if not r.ok:
            continue
        picture = derivatives.outputs(r.image, out).mosaic
        m = r.measures
        caption = (f"{e(r.image.key)}: {m.lesion_ml:.2f} mL, {m.voxels} voxels, "
                   f"{m.components} component{'s' * (m.components != 1)}")
        if m.disagreement_ml is not None:
            caption += f"; the models disagree on {m.disagreement_ml:.2f} mL"
        parts.append(f"<figure id='image-{i}'><figcaption>{caption}</figcaption>"
                     f"<img loading='lazy' src='{e(picture.relative_to(out).as_posix())}' "
                     f"alt='{e(r.image.key)}'></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(out_dir: str | os.PathLike, records: Sequence[Record], title: str) -> Path:
    text = report_html(out_dir, records, title)
    return files.write_bytes(Path(out_dir) / derivatives.REPORT, text.encode())
