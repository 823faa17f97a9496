"""One real 256^3 MeshNet pass, shared by the tests that need a real segmentation.

The network pass is what makes a real segmentation slow (minutes on 2 CPU cores); the
rest (reading, preprocessing, mapping back, writing, the widget) takes seconds. So the
session fixture ``real_segmentation`` records its pass with :func:`recording`, and the
other tests (the widget, the user guide's `meshchop segment`) run their whole path with
:func:`replaying`: a pass whose weights and input are byte for byte the recorded ones
returns the recorded output instead of computing it again, and counts a hit. Every other
pass is computed as usual. A test that expects the replay asserts the hit, which also
proves that it fed the network exactly the numbers the CLI's core did.

A subprocess replays too when ``tests/memo_site`` leads its PYTHONPATH and
``MESHCHOP_TEST_MEMO`` names the memo folder (see memo_site/sitecustomize.py). It may start
before the recording is done (the README's set-up takes minutes, in parallel with it): while
a folder is marked as being recorded (:func:`announce`), a pass not found there waits for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

import numpy as np

from napari_meshchop.events import Progress, check_stop
from napari_meshchop.network.inference import FusedMeshNet

ENV = "MESHCHOP_TEST_MEMO"
HITS = "hits.log"
PENDING = "recording"  # present while a recording is to come or under way
WAIT_S = 1800.0


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def key(net: FusedMeshNet, volume: np.ndarray) -> str:
    """Names a pass by the folded weights (and dilations) and the input's bytes."""
    tensors = [t for weight, bias, _ in net.layers for t in (weight, bias)] + list(net.head)
    weights = _digest([t.detach().cpu().contiguous().numpy() for t in tensors]
                      + [np.array([d for *_, d in net.layers])])
    return _digest([np.frombuffer(weights.encode(), np.uint8),
                    np.asarray(volume, dtype=np.float32)])[:32]


def _recorder(folder: Path, original):
    def lesion_probability(self, volume, stop=None):
        prob = yield from original(self, volume, stop)
        np.save(folder / f"{key(self, volume)}.npy", prob)
        return prob
    return lesion_probability


def _replayer(folder: Path, original):
    def lesion_probability(self, volume, stop=None):
        name = key(self, volume)
        recorded = folder / f"{name}.npy"
        deadline = time.monotonic() + WAIT_S
        while not recorded.is_file() and (folder / PENDING).exists() \
                and time.monotonic() < deadline:
            time.sleep(1.0)
        if not recorded.is_file():
            return (yield from original(self, volume, stop))
        for i in range(1, self.n_steps):  # the same progress as a real pass
            yield Progress("network", i, self.n_steps, f"layer {i}")
            check_stop(stop)
        with open(folder / HITS, "a") as log:
            log.write(name + "\n")
        yield Progress("network", self.n_steps, self.n_steps, "output")
        return np.load(recorded)
    return lesion_probability


def hits(folder: Path) -> int:
    """How many passes were replayed from ``folder`` so far."""
    log = Path(folder) / HITS
    return len(log.read_text().splitlines()) if log.is_file() else 0


@contextlib.contextmanager
def _patched(make, folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    original = FusedMeshNet.lesion_probability
    FusedMeshNet.lesion_probability = make(folder, original)
    try:
        yield folder
    finally:
        FusedMeshNet.lesion_probability = original


def announce(folder) -> Path:
    """Mark ``folder`` as about to be recorded, so that replays wait for it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PENDING).touch()
    return folder


@contextlib.contextmanager
def recording(folder):
    """Within: every MeshNet pass is computed and saved in ``folder``."""
    try:
        with _patched(_recorder, announce(folder)) as folder:
            yield folder
    finally:
        (Path(folder) / PENDING).unlink(missing_ok=True)


def replaying(folder):
    """Within: a pass recorded in ``folder`` is replayed (see the module's docstring)."""
    return _patched(_replayer, folder)


def install(folder) -> None:
    """Replay for the rest of this process (a subprocess's sitecustomize)."""
    FusedMeshNet.lesion_probability = _replayer(Path(folder), FusedMeshNet.lesion_probability)
