"""brainchop's own pipeline up to its network's logits, on one block (test_export_runtimes.py).

    python brainchop_block.py SCAN MODEL_FOLDER OUT.npy I J K SIZE

brainchop conforms SCAN with niimath, orders the voxels and normalises the whole volume as
`brainchop --custom MODEL_FOLDER` does, then its MeshNet (tinygrad) runs on the SIZE^3
block at voxel (I, J, K); the logits (2, SIZE, SIZE, SIZE) go to OUT.npy. Run it with HOME
set to a folder that holds .cache/brainchop/models.json: brainchop reads its model list at
import and would fetch it from the network otherwise.
"""

import sys

import numpy as np
from brainchop import load
from brainchop.api import (
    _load_model,  # what `brainchop --custom FOLDER` loads a folder with
)
from brainchop.tiny_meshnet import chunked_conv
from tinygrad import nn

scan, folder, out = sys.argv[1:4]
i, j, k, n = (int(a) for a in sys.argv[4:8])
volume = load(scan)  # niimath -conform, uint8, in the file's byte order
x = volume.data.permute(2, 1, 0).cast("float32").rearrange("... -> 1 1 ...")  # as segment()
model = _load_model(folder)
x = model.normalize(x)[:, :, i:i + n, j:j + n, k:k + n]
for layer in model.model:
    x = chunked_conv(x, layer) if isinstance(layer, nn.Conv2d) else layer(x)
np.save(out, x.numpy()[0])
