"""One export: a folder with the target's model files, a README.md and a metadata.json."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from napari_meshchop import __version__, files
from napari_meshchop.errors import InputError, MeshchopError
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.network import registry
from napari_meshchop.network.export import FORMATS, brainchop, onnx, tfjs
from napari_meshchop.network.export.layers import (
    check_exportable,
    folded,
    receptive_radius,
    reoriented,
)
from napari_meshchop.network.inference import load_model
from napari_meshchop.network.model import count_parameters

FORMAT = "napari-meshchop/export"
METADATA, README = "metadata.json", "README.md"
CLASS_NAMES = ["background", "lesion"]
INTENDED_USE = ("research only: not a medical device, not for clinical decisions or the "
                "care of any patient")
ARC = "Aphasia Recovery Cohort (ARC), OpenNeuro ds004884, CC0"

# What each runtime feeds the network, and which of our preprocessings is exactly that.
CONTRACTS = {
    "onnx": (("the network-grid volume as napari-meshchop's preprocessing makes it (below); "
              "`meshchop segment --model model.onnx` applies it"), None),
    "tfjs": (tfjs.CONTRACT, "conform"),
    "brainchop": (brainchop.CONTRACT, brainchop.MATCHING_SPEC),
}
OUTPUTS = {
    "onnx": (f"`{onnx.LOGITS}` (1, 2, D, H, W) and `{onnx.PROBABILITY}` (1, 1, D, H, W), "
             "the softmax's lesion channel, on the input's grid"),
    "tfjs": ("logits (1, D, H, W, 2), channels last; the app takes their argmax "
             "(0 background, 1 lesion)"),
    "brainchop": ("logits of the 2 classes; brainchop takes their argmax (0 background, "
                  "1 lesion) and keeps the largest connected component"),
}


@dataclass
class ExportResult:
    folder: Path
    format: str
    files: list[Path]
    warnings: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def export(model: str | os.PathLike | ckpt_io.Checkpoint, fmt: str,
           out: str | os.PathLike) -> ExportResult:
    """Write ``model`` (a checkpoint file, a registry name or a Checkpoint) for target
    ``fmt`` into the folder ``out``, whose parent must exist.

    Warnings (a preprocessing the target does not feed) are returned, written into the
    README and the metadata; the caller shows them.
    """
    if fmt not in FORMATS:
        raise MeshchopError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    folder = _destination(out)
    ckpt, label, source = _source(model)
    check_exportable(ckpt, label)
    convs = folded(ckpt)
    spec = ckpt.preprocess
    warnings = _warnings(fmt, spec, label)
    meta = metadata(ckpt, label, source, fmt, warnings)
    fed = {"tfjs": tfjs.AXIS_CODES, "brainchop": brainchop.AXIS_CODES}.get(fmt)
    if fed:  # brainchop's runtimes feed their own voxel order (LIA)
        convs = reoriented(convs, spec.axis_codes, fed)
        meta["kernel_axis_codes"] = fed
    if fmt == "tfjs":
        meta["crop_padding"] = receptive_radius(convs)
    folder.mkdir(exist_ok=True)
    text = readme(meta, folder.name)
    if fmt == "onnx":
        written = onnx.write(convs, folder, _onnx_props(meta), text)
    elif fmt == "tfjs":
        written = tfjs.write(convs, folder, _description(meta))
    else:
        written = brainchop.write(convs, folder)
    written.append(files.write_bytes(folder / README, text.encode()))
    written.append(files.write_json(folder / METADATA, meta))  # last: the export is complete
    for path in written:  # to be served or shared (atomic writes start private)
        path.chmod(0o644)
    return ExportResult(folder, fmt, written, warnings, meta)


def metadata(ckpt: ckpt_io.Checkpoint, label: str, source: Path | None, fmt: str,
             warnings: list[str]) -> dict:
    spec = ckpt.preprocess
    origin = str(ckpt.provenance.get("source", ""))
    sha = files.sha256_file(source) if source else None
    # A pretrained model's file, by whatever name: its licence is the registry's.
    entry = next((e for e in registry.ENTRIES if e.sha256 == sha), None)
    if entry is not None:
        licence = f"{entry.license} (the licence of {entry.name}'s weights, from {origin})"
    else:
        licence = "Apache-2.0, as napari-meshchop, unless the model's author states otherwise"
    trained_on_arc = origin in ("arc-meshchop", "napari-meshchop train")
    return {
        "format": FORMAT,
        "version": 1,
        "target": fmt,
        "napari_meshchop_version": __version__,
        "source_checkpoint": source.name if source else label,
        "source_checkpoint_sha256": sha,
        "architecture": {**ckpt.arch.to_dict(), "parameters": count_parameters(ckpt.build()),
                         "batchnorm": "folded into the convolutions"},
        "preprocessing": spec.to_dict(),
        "preprocessing_summary": spec.summary,
        "network_grid": f"{'x'.join(map(str, spec.shape))} voxels of {spec.voxel_size:g} mm, "
                        f"voxel axes {spec.axis_codes}",
        "kernel_axis_codes": spec.axis_codes,
        "input_contract": CONTRACTS[fmt][0],
        "matches_input_contract": not warnings,
        "output": OUTPUTS[fmt],
        "class_names": CLASS_NAMES,
        "training_data": ARC if trained_on_arc else "not recorded in the checkpoint",
        "licence": licence,
        "intended_use": INTENDED_USE,
        "provenance": _plain(ckpt.provenance),
        "warnings": list(warnings),
    }


def readme(meta: dict, folder_name: str) -> str:
    arch = meta["architecture"]
    sha = meta["source_checkpoint_sha256"] or "not saved to a file"
    spec = meta["preprocessing"]["name"]
    warnings = "".join(f"> **Warning:** {w}\n\n" for w in meta["warnings"])
    return f"""# Stroke-lesion MeshNet-{arch['channels']} for {TARGET_NAMES[meta['target']]}

Exported by napari-meshchop {meta['napari_meshchop_version']} from \
`{meta['source_checkpoint']}` (sha256 `{sha}`).

**Intended use: {meta['intended_use']}.**

## Input

The runtime: {meta['input_contract']}.
The model was trained on: {meta['preprocessing_summary']} (napari-meshchop's `{spec}`
preprocessing; network grid {meta['network_grid']}).

{warnings}## Output

{meta['output']}.

## Run it

{_how_to_run(meta['target'], folder_name)}

## Provenance

- Architecture: MeshNet, {arch['channels']} channels, dilations {arch['dilations']}, \
{arch['parameters']:,} parameters; BatchNorm folded into the convolutions; kernels in voxel \
order {meta['kernel_axis_codes']}.
- Training data: {meta['training_data']}.
- Licence: {meta['licence']}.
- Checkpoint provenance: {meta['provenance'] or 'none recorded'}.
"""


TARGET_NAMES = {"onnx": "ONNX", "tfjs": "brainchop's web app (TensorFlow.js)",
                "brainchop": "brainchop's command line"}


def _how_to_run(fmt: str, folder: str) -> str:
    if fmt == "onnx":
        return f"""With napari-meshchop (`pip install 'napari-meshchop[onnx]'`), with the same \
preprocessing and way back to the scan's grid as the checkpoint:

    meshchop segment scan.nii.gz --model {folder}/model.onnx -o lesion.nii.gz

or with onnxruntime on a volume already on the network grid: input `volume`, (1, 1, D, H, W)
float32. `metadata_props` hold the preprocessing and provenance."""
    if fmt == "tfjs":
        return f"""Copy this folder to brainchop's `public/models/{folder}/` and add the object \
in `model-list-entry.json` to `inferenceModelsList` in `brainchop-parameters.js`, with the
next free `id`. Its `cropPadding` is the network's receptive radius, so the app's crop
changes nothing inside the head; the app's post-processing keeps the largest connected
component."""
    return f"""    brainchop scan.nii.gz --custom {folder} --inverse-conform --no-optimize -o lesion.nii.gz

`--custom` takes this folder: `model.json` is brainchop's MeshNet config, `model.pth` its
weights. `--inverse-conform` writes the mask on the scan's own grid."""


def _warnings(fmt: str, spec, label: str) -> list[str]:
    contract, matching = CONTRACTS[fmt]
    if matching is None or spec.name == matching:
        return []
    turned = (f" Its kernels were turned from {spec.axis_codes} to LIA voxel order."
              if spec.axis_codes != "LIA" else "")
    return [(f"{label} was trained on the '{spec.name}' preprocessing ({spec.summary}), but "
             f"{contract}; its masks there may differ from meshchop's. Train with "
             f"--preprocess {matching} for a model that sees the same input.{turned}")]


def _destination(out: str | os.PathLike) -> Path:
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "exists and is not a folder; export writes a folder")
    if not folder.parent.is_dir():
        raise InputError(folder, f"cannot create the export folder: its parent "
                         f"{folder.parent} does not exist")
    return folder


def _source(model) -> tuple[ckpt_io.Checkpoint, str, Path | None]:
    """The checkpoint, a label for messages and the file it came from (None: in memory)."""
    ckpt, label = load_model(model)
    if isinstance(model, ckpt_io.Checkpoint):
        return ckpt, label, None
    text = os.fspath(model)
    entry = registry.REGISTRY.get(text)
    return ckpt, text, registry.fetch(text) if entry is not None else Path(text)


def _description(meta: dict) -> str:
    arch = meta["architecture"]
    return (f"Stroke-lesion segmentation: MeshNet-{arch['channels']} "
            f"({arch['parameters']:,} parameters) exported by napari-meshchop from "
            f"{meta['source_checkpoint']}. {meta['intended_use'].capitalize()}.")


def _onnx_props(meta: dict) -> dict:
    keys = ("preprocessing", "network_grid", "class_names", "output", "architecture",
            "source_checkpoint", "source_checkpoint_sha256", "training_data", "licence",
            "intended_use", "provenance")
    props = {k: meta[k] for k in keys if meta[k] is not None}
    props["napari_meshchop_version"] = meta["napari_meshchop_version"]
    return props


def _plain(value):
    """JSON-safe: NaN and infinities become None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
