"""The lean step's allocator setting stays in processes that exist to train.

glibc's ``mallopt(M_MMAP_THRESHOLD)`` changes the whole process for good, so training in
napari's process (the Train widget) must leave it alone; only a process that claimed its
allocator (the command line) gets it. The oracle is glibc's own accounting
(``mallinfo2``, read in a fresh interpreter: ``hblks`` counts the blocks that have their own
mapping). By default glibc's threshold slides up to the largest mapped block freed, so once
a 30 MiB block was freed, blocks of 1.5 MiB come from the heap: none is mapped, even when
more of them are asked for than the free heap holds (``fordblks``). With the threshold
fixed at 1 MiB, those that the free heap cannot hold each get a mapping.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="the setting exists on glibc only")

SCRIPT = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from napari_meshchop.training import lean
    from napari_meshchop.training.config import TrainConfig
    from napari_meshchop.training.loop import fit

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = Mallinfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def threshold_fixed() -> bool:
        libc.free(libc.malloc(30 << 20))  # a sliding threshold rises to 30 MiB at least
        size = 3 << 19  # 1.5 MiB
        count = libc.mallinfo2().fordblks // size + 2  # more than the free memory holds
        before = libc.mallinfo2().hblks
        blocks = [libc.malloc(size) for _ in range(count)]
        mapped = libc.mallinfo2().hblks - before
        for block in blocks:
            libc.free(block)
        return mapped > 0

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            image = torch.rand(1, 12, 12, 12, generator=g)
            return image, (image[0] > 0.7).to(torch.uint8)

    config = TrainConfig(channels=2, dilations=(1, 2, 1), epochs=1, device="cpu",
                         activation_checkpointing="on", amp="off",
                         preprocess={"name": "ras-minmax", "shape": [12, 12, 12],
                                     "voxel_size": 1.0})
    out = {"before": threshold_fixed()}
    notes = []
    for run, claim in (("napari", False), ("cli", True)):
        if claim:
            lean.claim_allocator()
        for event in fit(Items(), f"{sys.argv[1]}/{run}", config):
            notes.append(str(getattr(event, "message", "")))
        out[run] = threshold_fixed()
    out["lean"] = any("activation memory: lean" in n for n in notes)
    print(json.dumps(out))
""")


def test_only_a_process_that_claimed_its_allocator_gets_the_lean_setting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["lean"]  # both runs took the lean step, which asks for the setting
    assert seen == {"before": False, "napari": False, "cli": True, "lean": True}


@pytest.mark.parametrize("command", [["train", "--resume"], ["experiment", "--report-only"],
                                     ["hpo", "--trials", "0"]])
def test_the_training_commands_claim_the_allocator(tmp_path, monkeypatch, command):
    from napari_meshchop import cli
    from napari_meshchop.training import lean

    claimed = []
    monkeypatch.setattr(lean, "claim_allocator", lambda: claimed.append(True))
    # Each stops at once (nothing to resume, no plan, no trials), after the claim.
    assert cli.main([*command, "--out", str(tmp_path / "run")]) == 2
    assert claimed == [True]
