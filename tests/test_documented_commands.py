"""Every command in README.md and docs/ runs as written, and does what it says."""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import network_memo
import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, SAMPLE_SCAN

sys.path.insert(0, str(ROOT / ".ci"))
from readme_command import readme_command  # noqa: E402


def _clean_env() -> dict:
    """The environment of a fresh shell: no active venv, no mirror set by the test session."""
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "MESHCHOP_MIRROR"}}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not p.startswith(sys.prefix))
    return env


def assert_left_hemisphere_stroke(mask_path: Path) -> float:
    """What we saw on the sample scan: one large lesion in the left hemisphere."""
    scan, mask = nib.load(SAMPLE_SCAN), nib.load(mask_path)
    np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-5)
    assert mask.shape == scan.shape and mask.get_data_dtype() == np.uint8
    lesion = np.asarray(mask.dataobj) > 0
    ml = lesion.sum() * abs(np.linalg.det(scan.affine[:3, :3])) / 1000
    assert 50 < ml < 150, ml
    head = np.asarray(scan.dataobj) > 20
    assert (lesion & head).sum() / lesion.sum() > 0.97  # inside the head
    world = lambda m: nib.affines.apply_affine(scan.affine, np.argwhere(m).mean(axis=0))  # noqa
    # RAS world: x grows to the patient's right; the lesion is >15 mm left of the head's centre.
    assert world(lesion)[0] < world(head)[0] - 15, (world(lesion), world(head))
    return ml


def _replaying(env: dict, memo: Path) -> dict:
    """``env`` in which Python replays the MeshNet passes recorded in ``memo``."""
    return {**env, "MESHCHOP_TEST_MEMO": str(memo), "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "tests" / "memo_site"), *filter(None, [env.get("PYTHONPATH")])])}


def _same_lesion(a: Path, b: Path) -> float:
    """Lesion Dice of two masks on the same grid."""
    x, y = (np.asarray(nib.load(m).dataobj) > 0 for m in (a, b))
    return 2 * np.count_nonzero(x & y) / (np.count_nonzero(x) + np.count_nonzero(y))


@pytest.mark.slow
def test_readme_quick_start_on_a_fresh_copy(tmp_path, real_data, request):
    """The README's main command as written, in a copy of the project with ../shared/data
    beside it: a new virtual environment, the install, the fetch and `meshchop segment`.

    Everything runs for real there, the network pass included: this is the test that a new
    machine does the main job. Its set-up takes minutes, in which the session's own real
    segmentation runs, to compare with."""
    project = tmp_path / "project"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name, follow_symlinks=False)
    (tmp_path / "shared").symlink_to(real_data.parent)
    fresh = {k: v for k, v in _clean_env().items() if k != "PYTHONPATH"}  # the copy's code
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", readme_command("main")],
                                cwd=project, env=fresh,
                                stdout=out, stderr=err, start_new_session=True)
        try:
            ours = request.getfixturevalue("real_segmentation")
            proc.wait(timeout=1200)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    stdout, stderr = ((tmp_path / name).read_text() for name in ("stdout", "stderr"))
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    reported = float(re.search(r"lesion volume: ([\d.]+) mL", stdout).group(1))
    mask = project / "sub-M2265_lesion.nii.gz"
    ml = assert_left_hemisphere_stroke(mask)
    assert reported == pytest.approx(ml, abs=0.01)
    # The same lesion as the test environment's segmentation.
    assert _same_lesion(mask, ours.mask) > 0.999


def _doc_blocks():
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            yield pytest.param(block, id=f"{page.name}:{block.strip().splitlines()[-1][:40]}")


@pytest.mark.slow
@pytest.mark.parametrize("block", list(_doc_blocks()))
def test_docs_commands_run_as_written(block, real_data, request):
    """Each bash block of docs/, as written. A `meshchop segment` of the sample runs its
    whole path but replays the network pass of the session's real segmentation, which it
    must feed exactly the same numbers (tests/network_memo.py)."""
    env = _clean_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    segments = "meshchop segment" in block
    # A model exported to ONNX runs in onnxruntime: no torch pass to reuse, and its mask is
    # compared with the session's by Dice rather than voxel for voxel.
    onnx = ".onnx" in block
    if segments and not onnx:
        memo = request.getfixturevalue("real_segmentation").memo
        before = network_memo.hits(memo)
        env = _replaying(env, memo)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if segments:
        out = Path(re.search(r"-o (\S+)", block).group(1))
        assert_left_hemisphere_stroke(out)
        ours = request.getfixturevalue("real_segmentation").mask
        if onnx:
            assert _same_lesion(out, ours) > 0.999
        else:
            assert network_memo.hits(memo) == before + block.count("meshchop segment")
            assert np.array_equal(np.asarray(nib.load(out).dataobj),
                                  np.asarray(nib.load(ours).dataobj))


def _console_commands():
    found = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```console\n(.*?)```", page.read_text(), flags=re.S):
            found.update(line.strip() for line in block.splitlines() if line.strip())
    return sorted(found)


@pytest.mark.parametrize("command", _console_commands())
def test_gui_commands_start_napari_with_our_widget(command, tmp_path):
    """GUI commands block until the window is closed: start one, wait until it has settled
    (its process tree uses no CPU for 3 s: start-up done, the event loop idle), close it."""
    import psutil

    assert command.startswith("napari ")
    env = _clean_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env["NAPARI_CONFIG"] = str(tmp_path / "napari.yaml")  # leave the user's settings alone
    log = tmp_path / "napari.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            settled = _settles(psutil.Process(proc.pid), quiet_s=3.0, limit_s=120.0)
            alive = proc.poll() is None
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)
    text = log.read_text()
    assert alive and settled, text[-3000:]
    assert "Traceback" not in text and "Error" not in text, text[-3000:]


def _settles(process, quiet_s: float, limit_s: float, step_s: float = 0.5) -> bool:
    """Whether ``process`` and its children, still running, go ``quiet_s`` without CPU time
    within ``limit_s`` (start-up takes 10 to 40 s on 2 busy cores)."""
    import psutil

    def cpu() -> float:
        total = 0.0
        for p in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    deadline, last, quiet = time.monotonic() + limit_s, cpu(), 0.0
    while time.monotonic() < deadline and process.is_running() and process.status() != "zombie":
        time.sleep(step_s)
        now = cpu()
        quiet = quiet + step_s if now - last < 0.02 else 0.0
        last = now
        if quiet >= quiet_s:
            return True
    return False


def _documented_meshchop_lines():
    """Every `meshchop ...` line in a code block of README.md or docs/ (run or not)."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), flags=re.S):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                line = line.strip().removeprefix("$ ")
                if line.startswith("meshchop "):
                    found.append(pytest.param(line, id=f"{page.name}:{line[:50]}"))
    return found


@pytest.mark.parametrize("line", _documented_meshchop_lines())
def test_documented_meshchop_commands_parse(line):
    """Commands that need a downloaded cohort are not run here, but their flags are real:
    each parses with the CLI's own parser."""
    import shlex

    from napari_meshchop import cli

    argv = shlex.split(line, comments=True)
    argv = argv[:argv.index("&&")] if "&&" in argv else argv
    argv = ["PATH" if a.startswith("$(") else a for a in argv]  # a substitution: a path
    try:
        cli.build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"{line!r} does not parse (exit {exc.code})")


def _named_in_docs(pattern: str) -> set[str]:
    """What ``pattern`` finds in README.md and docs/napari.md, line breaks undone."""
    text = " ".join((ROOT / page).read_text() for page in ("README.md", "docs/napari.md"))
    return set(re.findall(pattern, " ".join(text.split())))


def test_napari_menu_names_in_the_docs_are_napari_s(make_napari_viewer, tmp_path):
    """File > Open Sample's item and the Save dialog's file type, as napari shows them."""
    import napari
    from napari._app_model import get_app_model
    from napari._app_model.constants import MenuId
    from napari.plugins import _npe2

    viewer = make_napari_viewer()
    samples = {item.command.title for item in get_app_model().menus.get_menu(MenuId.FILE_SAMPLES)
               if hasattr(item, "command")}
    documented = _named_in_docs(r"\*\*File > Open Sample > (.+?)\*\*")
    assert documented and documented <= samples, (documented, samples)

    labels = viewer.add_labels(np.zeros((4, 4, 4), np.uint8))
    filters, writers = _npe2.file_extensions_string_for_layers([labels])
    types = [entry.rsplit(" (*", 1)[0] for entry in filters.split(";;")]
    named = _named_in_docs(r"file type (?:to )?\*\*(.+?)\*\*")
    assert named and all(any(t.startswith(n) for t in types) for n in named), (named, types)
    # What the docs say of the dialog's first file type: it cannot write NIfTI.
    assert not types[0].startswith("MeshChop")
    viewer.layers.selection = {labels}
    with pytest.warns(UserWarning, match="did not return any written paths"):
        saved = viewer.layers.save(str(tmp_path / "a.nii.gz"), selected=True,
                                   _writer=writers[0])
    assert saved == [] and not (tmp_path / "a.nii.gz").exists()
    # ... and of Python: naming the plugin gets our writer (a label map, by its intent).
    napari.save_layers(str(tmp_path / "b.nii.gz"), [labels], plugin="napari-meshchop")
    assert nib.load(tmp_path / "b.nii.gz").header.get_intent()[0] == "label"
