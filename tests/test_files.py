"""files.exclusive: a folder lock that another process sees, and that dies with its holder."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from napari_meshchop import files
from napari_meshchop.errors import MeshchopError

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from napari_meshchop import files

    folder = Path(sys.argv[1])
    with files.exclusive(folder, "download"):
        (folder / "held").touch()
        while not (folder / "release").exists():
            time.sleep(0.05)
""")


def hold(folder) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until ``folder/release`` appears."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (folder / "held").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.05)
    return proc


def test_a_folder_held_by_another_process_is_refused_until_it_lets_go(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(MeshchopError) as refused:
            with files.exclusive(tmp_path, "download"):
                pytest.fail("entered a folder another process holds")
        assert str(refused.value) == (f"{tmp_path}: another download is writing here; wait "
                                      "for it to finish (or stop it) and run again")
    finally:
        (tmp_path / "release").touch()
        assert holder.wait(timeout=60) == 0, holder.stderr.read()
    with files.exclusive(tmp_path, "download"):  # free again
        pass


def test_the_lock_dies_with_a_killed_holder(tmp_path):
    holder = hold(tmp_path)
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=60) == -signal.SIGKILL
    with files.exclusive(tmp_path, "experiment run"):  # no stale lock left behind
        with pytest.raises(MeshchopError, match="another ensemble evaluation is writing"):
            with files.exclusive(tmp_path, "ensemble evaluation"):  # held by us, now
                pass
