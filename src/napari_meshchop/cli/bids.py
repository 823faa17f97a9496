"""``meshchop bids``: a BIDS App (``BIDS_DIR OUTPUT_DIR participant|group``), and the
cohort form of ``meshchop segment`` (several files or folders, ``-o OUTDIR``).

Exit status: 0 when every image was segmented, 1 when some failed (their errors are in
the output and in lesions.tsv), 2 for an error that stopped the run, 130 when stopped.
"""

from __future__ import annotations

import argparse

from napari_meshchop.cli.progress import StopOnCtrlC, drive, say
from napari_meshchop.errors import Cancelled
from napari_meshchop.network import registry
from napari_meshchop.network.devices import DEVICES
from napari_meshchop.studies import engine

KEY_WIDTH = 36  # image names are padded to this in the per-image lines


def register(subparsers) -> None:
    b = subparsers.add_parser(
        "bids", help="segment every T2w image of a BIDS dataset into BIDS derivatives (a "
        "BIDS App: participant level, then group level); resumable; shared by many "
        "workers with --storage", description="Segment the stroke lesions of a BIDS "
        "dataset: the participant level writes each image's mask, sidecar and QC mosaic; "
        "the group level writes lesions.tsv, a plot of the volumes and report.html. See "
        "docs/bids.md.")
    b.add_argument("bids_dir", help="the BIDS dataset (with dataset_description.json)")
    b.add_argument("output_dir", help="where the derivatives go (e.g. "
                   "BIDS_DIR/derivatives/meshchop); a rerun reuses what is done")
    b.add_argument("analysis_level", choices=["participant", "group"])
    b.add_argument("--participant-label", nargs="+", action="extend", default=None,
                   metavar="LABEL", help="only these participants (01 or sub-01; default all)")
    b.add_argument("--session-label", nargs="+", action="extend", default=None,
                   metavar="LABEL", help="only these sessions (default all)")
    b.add_argument("--suffix", default="T2w", help="the images to segment (default T2w)")
    add_segment_flags(b)
    b.add_argument("--storage", default=None, help="share the images between workers on "
                   "many machines: a database URL (postgresql://user:password@host/db) or a "
                   "journal file on a shared disk; every worker runs the same command")
    b.add_argument("--study", default=None, help="study name with --storage (default: made "
                   "from the images and the settings)")
    b.add_argument("--heartbeat", type=int, default=engine.HEARTBEAT,
                   help=f"with --storage: seconds between a worker's heartbeats (default "
                   f"{engine.HEARTBEAT})")
    b.add_argument("--grace", type=int, default=None, help="with --storage: seconds without "
                   "a heartbeat after which a worker's image is given to another (default "
                   f"{engine.GRACE_BEATS} heartbeats)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bids)


def add_segment_flags(p: argparse.ArgumentParser) -> None:
    """How each image is segmented; `bids` and the cohort form of `segment` share them."""
    p.add_argument("--model", nargs="+", action="extend", default=None, metavar="NAME|PATH",
                   help=f"a checkpoint file or a pretrained name (default "
                   f"{registry.DEFAULT_MODEL}); several make an ensemble")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--threshold", type=float, default=0.5,
                   help="lesion where P(lesion) > THRESHOLD (default 0.5)")
    p.add_argument("--save-probability", action="store_true",
                   help="also write P(lesion) (and an ensemble's disagreement) as probseg")


def options(args):
    from napari_meshchop.cohort import run  # deferred: torch

    return run.Options(tuple(str(m) for m in (args.model or [registry.DEFAULT_MODEL])),
                       args.device, getattr(args, "threshold", 0.5),
                       getattr(args, "save_probability", False))


def cmd_bids(args) -> int:
    from napari_meshchop.cohort import find, run  # deferred: pybids, nibabel, torch

    cohort = find.bids_images(args.bids_dir, args.participant_label, args.session_label,
                              args.suffix)
    if args.analysis_level == "group":
        result = drive(run.group(cohort, args.output_dir), args.quiet)
        print(f"{len(result.records)} images: {result.count('done')} segmented, "
              f"{result.count('failed')} failed, {result.count('missing')} not segmented yet")
        print(f"table: {result.table}\nreport: {result.report}")
        return 0
    with StopOnCtrlC() as stop:
        result = _drive(run.participant(cohort, args.output_dir, options(args), args.storage,
                                        args.study, args.heartbeat, args.grace, stop=stop),
                        args.quiet)
    if result is None:
        return 130
    print(_summary(result.records))
    if result.records and not result.failed:
        print(f"next: meshchop bids {args.bids_dir} {args.output_dir} group")
    return 1 if result.failed else 0


def cmd_segment_many(args) -> int:
    """`meshchop segment IN [IN ...] -o OUTDIR`: each file, and each NIfTI file under each
    folder, segmented into OUTDIR (folders' layout kept), then lesions.tsv and report.html."""
    from napari_meshchop.cohort import find, run  # deferred: nibabel, torch

    inputs = args.input if isinstance(args.input, list) else [args.input]
    cohort = find.file_images(inputs, exclude=args.output)
    with StopOnCtrlC() as stop:
        result = _drive(run.both_levels(cohort, args.output, options(args), stop=stop),
                        args.quiet)
    if result is None:
        return 130
    print(_summary(result.records))
    print(f"table: {result.table}\nreport: {result.report}")
    return 1 if result.count("failed") else 0


def _drive(job, quiet: bool):
    """Run a cohort job on the terminal, a line per image; None when stopped."""
    from napari_meshchop.cohort.run import ImageDone  # deferred: torch

    try:
        return drive(job, quiet, lines={ImageDone: lambda event: image_line(event.record)})
    except (Cancelled, KeyboardInterrupt):
        say("meshchop: stopped; finished images are kept: run the same command again to go on")
        return None


def image_line(record) -> str:
    """One image's line: its key, then its volume and components, or why it failed."""
    if record.status == "failed":
        return f"{record.image.key:<{KEY_WIDTH}}  failed: {record.error}"
    m = record.measures
    when = "done earlier" if record.reused else f"done in {record.seconds:.1f} s"
    parts = [f"{m.lesion_ml:8.2f} mL", f"{m.components:3d} component" + "s" * (m.components != 1)]
    if m.disagreement_ml is not None:
        parts.append(f"models disagree on {m.disagreement_ml:.2f} mL")
    return f"{record.image.key:<{KEY_WIDTH}}  {'  '.join(parts)}  ({when})"


def _summary(records) -> str:
    done = [r for r in records if r.ok]
    reused = sum(r.reused for r in done)
    failed = len(records) - len(done)
    return (f"{len(records)} image{'s' * (len(records) != 1)}: {len(done)} segmented"
            + (f" ({reused} earlier)" if reused else "")
            + (f", {failed} failed (see above)" if failed else ""))
