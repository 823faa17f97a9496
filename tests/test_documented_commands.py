"""Every command in README.md and docs/ runs as written, and does what it says."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.slow
def test_readme_quick_start_on_a_fresh_copy(tmp_path, real_data):
    """The README's main command, in a copy of the project with ../shared/data beside it."""
    project = tmp_path / "project"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name, follow_symlinks=False)
    (tmp_path / "shared").symlink_to(real_data.parent)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_command("main")],
                          cwd=project, env=_clean_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reported = float(re.search(r"lesion volume: ([\d.]+) mL", proc.stdout).group(1))
    ml = assert_left_hemisphere_stroke(project / "sub-M2265_lesion.nii.gz")
    assert reported == pytest.approx(ml, abs=0.01)


def _doc_blocks():
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            yield pytest.param(block, id=f"{page.name}:{block.strip().splitlines()[-1][:40]}")


@pytest.mark.slow
@pytest.mark.parametrize("block", list(_doc_blocks()))
def test_docs_commands_run_as_written(block, real_data):
    env = _clean_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if "meshchop segment" in block:
        out = re.search(r"-o (\S+)", block).group(1)
        assert_left_hemisphere_stroke(Path(out))


def _console_commands():
    found = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```console\n(.*?)```", page.read_text(), flags=re.S):
            found.update(line.strip() for line in block.splitlines() if line.strip())
    return sorted(found)


@pytest.mark.parametrize("command", _console_commands())
def test_gui_commands_start_napari_with_our_widget(command, tmp_path):
    """GUI commands block until the window is closed: start one, let it settle, close it."""
    assert command.startswith("napari ")
    env = _clean_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env["NAPARI_CONFIG"] = str(tmp_path / "napari.yaml")  # leave the user's settings alone
    log = tmp_path / "napari.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", f"{command} & pid=$!; sleep 40; "
                                 "kill -0 $pid && echo ALIVE; kill $pid"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        proc.wait(timeout=120)
    text = log.read_text()
    assert "ALIVE" in text, text[-3000:]
    assert "Traceback" not in text and "Error" not in text, text[-3000:]


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
