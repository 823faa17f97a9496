"""Export a trained MeshNet to run elsewhere: ONNX, brainchop's web app, brainchop's CLI.

Every export is a folder: the target's model files (:mod:`.onnx`, :mod:`.tfjs`,
:mod:`.brainchop`), a ``README.md`` for the person who receives it and a ``metadata.json``
(source checkpoint and its sha256, architecture, preprocessing, what the target feeds the
network, training data, licence, intended use). BatchNorm is folded into the kernels.

ONNX keeps our network grid and voxel order: ``meshchop segment --model model.onnx``
applies the checkpoint's own preprocessing. brainchop's runtimes apply theirs, in LIA
voxel order, so for them the kernels are turned to LIA, and a model whose preprocessing
is not what that runtime feeds is exported with a warning that names the difference.
"""

FORMATS = ("onnx", "tfjs", "brainchop")
