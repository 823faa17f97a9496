import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SAMPLE_SCAN, phantom

from napari_meshchop.cli import main
from napari_meshchop.errors import InputError, MeshchopError
from napari_meshchop.network import registry


def _nifti(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _truncated(tmp_path):
    good = _nifti(tmp_path / "good.nii.gz", phantom())
    raw = good.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    return bad


def _nan(tmp_path):
    data = phantom()
    data[3, 4, 5] = np.nan
    return _nifti(tmp_path / "nan.nii.gz", data)


def _inf(tmp_path):
    data = phantom()
    data[1, 2, 3] = np.inf
    return _nifti(tmp_path / "inf.nii", data)


def _text(tmp_path):
    path = tmp_path / "notes.nii.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("this is not an image\n" * 50)
    return path


BAD_INPUTS = {
    "missing": (lambda t: t / "nowhere.nii.gz", "file not found"),
    "not nifti": (_text, "not a readable NIfTI"),
    "truncated gzip": (_truncated, "truncated or corrupt"),
    "4D": (lambda t: _nifti(t / "4d.nii.gz", np.stack([phantom()] * 3, -1)), "has 3 volumes"),
    "2D": (lambda t: _nifti(t / "2d.nii.gz", phantom()[:, :, 0]), "2D"),
    "one slice": (lambda t: _nifti(t / "slice.nii.gz", phantom()[:, :, :1]), "2D"),
    "NaN": (_nan, "1 NaN or infinite"),
    "inf": (_inf, "1 NaN or infinite"),
    "all zero": (lambda t: _nifti(t / "zero.nii.gz", np.zeros((20, 20, 20), np.float32)),
                 "blank"),
    "a folder": (lambda t: t, "folder"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_clear_error(case, tmp_path, tiny_checkpoint, capsys):
    make, message = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / "out" / "mask.nii.gz"
    code = main(["segment", str(path), "-o", str(out), "--model", str(tiny_checkpoint), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("meshchop: error: ") and str(path) in err and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_single_volume_4d_is_fine(tmp_path, tiny_checkpoint, capsys):
    path = _nifti(tmp_path / "4d1.nii.gz", phantom()[..., None])
    out = tmp_path / "mask.nii.gz"
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_checkpoint),
                 "-q"]) == 0
    assert nib.load(out).shape == phantom().shape
    assert "lesion volume:" in capsys.readouterr().out


def test_checkpoint_of_another_architecture(tmp_path, tiny_checkpoint, capsys):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["state_dict"]["blocks.1.0.weight"] = torch.zeros(4, 4, 5, 5, 5)
    torch.save(raw, tmp_path / "other.pt")
    img = _nifti(tmp_path / "img.nii.gz", phantom())
    code = main(["segment", str(img), "-o", str(tmp_path / "m.nii.gz"), "--model",
                 str(tmp_path / "other.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "other.pt" in err and "blocks.1.0.weight" in err


def test_unknown_model_name(tmp_path, capsys):
    img = _nifti(tmp_path / "img.nii.gz", phantom())
    assert main(["segment", str(img), "-o", str(tmp_path / "m.nii.gz"), "--model", "meshnet-99"]) == 2
    assert "neither a checkpoint file nor a known model" in capsys.readouterr().err


def test_output_must_be_nifti(tmp_path, tiny_checkpoint, capsys):
    img = _nifti(tmp_path / "img.nii.gz", phantom())
    assert main(["segment", str(img), "-o", str(tmp_path / "mask.png"), "--model",
                 str(tiny_checkpoint), "-q"]) == 2
    assert "must end in .nii or .nii.gz" in capsys.readouterr().err


def test_registry_uses_and_verifies_the_mirror(real_data, tmp_path, monkeypatch):
    monkeypatch.setenv(registry.MIRROR_ENV, str(real_data))
    assert registry.fetch(registry.SAMPLE_SCAN) == real_data / "sub-M2265_T2w.nii.gz"
    assert registry.fetch(registry.DEFAULT_MODEL).name.endswith(".pt")
    corrupt = tmp_path / "mirror"
    corrupt.mkdir()
    shutil.copy(SAMPLE_SCAN, corrupt / "sub-M2265_T2w.nii.gz")
    with open(corrupt / "sub-M2265_T2w.nii.gz", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02")
    monkeypatch.setenv(registry.MIRROR_ENV, str(corrupt))
    with pytest.raises(InputError, match="does not match"):
        registry.fetch(registry.SAMPLE_SCAN)
    with pytest.raises(InputError, match="not in the mirror"):
        registry.fetch(registry.DEFAULT_MODEL)
    with pytest.raises(MeshchopError, match="unknown model or sample"):
        registry.fetch("nothing")


def test_fetch_and_models_commands(real_data, capsys):
    assert main(["fetch", "-q", registry.SAMPLE_SCAN]) == 0
    assert capsys.readouterr().out.strip().endswith("sub-M2265_T2w.nii.gz")
    assert main(["models"]) == 0
    assert registry.DEFAULT_MODEL in capsys.readouterr().out


def test_convert_writes_our_format(real_data, tmp_path, capsys):
    from conftest import ARC_CHECKPOINT

    from napari_meshchop.network import checkpoint

    out = tmp_path / "meshnet26.pt"
    assert main(["convert", str(ARC_CHECKPOINT), str(out)]) == 0
    assert "preprocessing=ras-minmax" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["format"] == checkpoint.FORMAT
