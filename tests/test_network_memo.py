"""The test harness's record and replay of MeshNet passes (tests/network_memo.py)."""

import threading
import time

import network_memo
import numpy as np

from napari_meshchop.events import run
from napari_meshchop.network import checkpoint
from napari_meshchop.network.inference import FusedMeshNet


def test_only_the_same_weights_and_input_are_replayed(tiny_checkpoint, tmp_path):
    net = FusedMeshNet(checkpoint.load(tiny_checkpoint).build())
    volume = np.random.default_rng(0).random((12, 10, 8), dtype=np.float32)
    with network_memo.recording(tmp_path) as memo:
        recorded = run(net.lesion_probability(volume))
    np.save(next(memo.glob("*.npy")), np.full_like(recorded, 0.25))  # marks what is replayed
    with network_memo.replaying(memo):
        assert np.all(run(net.lesion_probability(volume)) == 0.25)
        other = volume.copy()
        other[0, 0, 0] += 1e-6  # one value off: computed, not replayed
        computed = run(net.lesion_probability(other))
        assert not np.all(computed == 0.25)
        np.testing.assert_allclose(computed, recorded, atol=1e-4)
    assert network_memo.hits(memo) == 1
    assert run(net.lesion_probability(volume)).tolist() == recorded.tolist()  # unpatched


def test_a_replay_waits_for_a_recording_announced_but_not_done(tiny_checkpoint, tmp_path):
    net = FusedMeshNet(checkpoint.load(tiny_checkpoint).build())
    volume = np.zeros((6, 6, 6), np.float32)
    memo = network_memo.announce(tmp_path)

    def record_later():
        time.sleep(1.0)
        np.save(memo / f"{network_memo.key(net, volume)}.npy", np.full(volume.shape, 0.25))
        (memo / network_memo.PENDING).unlink()

    thread = threading.Thread(target=record_later)
    thread.start()
    with network_memo.replaying(memo):
        assert np.all(run(net.lesion_probability(volume)) == 0.25)
    thread.join()
    assert network_memo.hits(memo) == 1
