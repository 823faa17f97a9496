"""The MeshNet pass for inference: BatchNorm folded, ReLU fused, about one activation of memory.

On the CPU, oneDNN computes each layer slab by slab straight into one activation buffer,
with the bias and the ReLU fused into the convolution (its sum and eltwise post-ops):

- The buffer holds ``depth + slab + 3 * max(dilation)`` planes. A layer reads its input at
  one offset and writes its output ``shift = slab + max(dilation)`` planes away, on the
  side its input has already been consumed from: each output slab lands on planes no later
  slab still reads. One layer sweeps down, the next up, so the activation moves back and
  forth and never leaves the buffer. Nothing is copied, and the peak is about 1.3
  activations (256^3: 2.1 GB for MeshNet-26) where a whole-volume ``conv3d`` holds three.
- The ``dilation`` planes on either side of a layer's input are zeroed before it runs:
  they are the convolution's 'same' padding in depth, so every slab reads a plain view.
- Each slab's output planes are zeroed, then the convolution adds into them (oneDNN's sum
  post-op is how an output lands in a given tensor); the weights are reordered once per
  layer, not once per slab.

Elsewhere (CUDA, MPS, or a PyTorch without oneDNN) each layer is one ``conv3d`` + in-place
ReLU in channels-last layout, on the whole volume or in slabs (:func:`conv_relu_in_slabs`).
On CUDA the pass runs in float16 with cuDNN's autotuner; the first volume is also run on a
central probe block in float32 on the CPU, and a pass that disagrees is redone in float32.

On any device the network skips the air: it runs on the box of voxels the scan covers (input
above 0; conform, padding and defacing leave exact zeros) grown by half the receptive field's
radius, and P(lesion) is 0 outside. The margin keeps the box's own zero padding away from the
brain: on the sample scan the mask agrees with the whole-grid pass at Dice 0.99992 (13
voxels of 85,034) in 0.7 of its time (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch
import torch.nn.functional as F

from napari_meshchop.errors import MeshchopError
from napari_meshchop.events import Progress, StopFlag, check_stop, run
from napari_meshchop.network.model import MeshNet

PRECISIONS = ("auto", "float32", "float16", "bfloat16")
ONEDNN_SLAB = 16  # output planes per oneDNN call (bench/bench_inference.py --slabs)
GENERIC_SLAB = 32  # planes per conv3d where a whole-volume conv3d may not fit (MPS)
PROBE = 32  # edge of the central block that checks a reduced-precision pass
PROBE_TOLERANCE = 0.02  # largest P(lesion) difference from float32 on the probe block
CHANNELS_LAST = torch.channels_last_3d
AIR_MARGIN = 0.5  # of the receptive field's radius, kept around the scanned box


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """float16 on CUDA for ``auto``, float32 elsewhere (the CPU's fused path is float32)."""
    if precision not in PRECISIONS:
        raise MeshchopError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, precision)


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the in-place oneDNN path runs here: the CPU, float32, oneDNN enabled."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    ops = torch.ops.mkldnn
    try:  # PyTorch's own oneDNN operators (what torch.compile emits on the CPU)
        return bool(ops._convolution_pointwise_ and ops._reorder_convolution_weight)
    except (AttributeError, RuntimeError):
        return False


class FusedMeshNet:
    """A MeshNet for inference only: each Conv3d+BatchNorm3d folded into one conv.

    ``slab`` is the number of output planes per convolution call (None: the device's
    default: 16 with oneDNN, the whole volume on CUDA, 32 elsewhere). ``precision`` is
    one of :data:`PRECISIONS`. ``skip_air=False`` runs the network on the whole grid.
    Setting ``onednn`` to False on the CPU runs the generic path instead (the reference
    that tests and benchmarks compare with).
    """

    def __init__(self, model: MeshNet, device: torch.device | str = "cpu",
                 slab: int | None = None, precision: str = "auto", skip_air: bool = True):
        if model.head.out_channels != 2:
            raise MeshchopError(f"P(lesion) needs a two-class MeshNet, not "
                                f"{model.head.out_channels} classes")
        self.device = torch.device(device)
        self.slab = slab
        self.skip_air = skip_air
        self._model = model
        self.checked = False  # a reduced precision was compared with float32
        self._set_dtype(compute_dtype(self.device, precision))

    def _set_dtype(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.onednn = onednn_available(self.device, dtype)
        self.layers: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        with torch.no_grad():
            for block in self._model.blocks:
                conv, bn = block.conv, block.bn
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                weight = conv.weight * scale.view(-1, 1, 1, 1, 1)
                bias = (conv.bias - bn.running_mean) * scale + bn.bias
                self.layers.append((self._put(weight), self._put(bias), conv.dilation[0]))
            # Two-class softmax, class 1 = sigmoid of the logit difference: one output channel.
            head = self._model.head
            self.head = (self._put(head.weight[1:] - head.weight[:1]),
                         self._put(head.bias[1:] - head.bias[:1]))

    def _put(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().to(self.device, self.dtype)
        return t.contiguous(memory_format=CHANNELS_LAST) if t.dim() == 5 else t

    @property
    def n_steps(self) -> int:
        return len(self.layers) + 1

    @property
    def margin(self) -> int:
        """Voxels of air kept around the scanned box (see :data:`AIR_MARGIN`)."""
        return int(np.ceil(AIR_MARGIN * sum(d for *_, d in self.layers)))

    def lesion_probability(self, volume: np.ndarray, stop: StopFlag = None
                           ) -> Generator[Progress, None, np.ndarray]:
        """Yield after each layer; return P(lesion) on the network grid as float32."""
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        box = scanned_box(volume, self.margin) if self.skip_air else None
        if box is None:
            prob = yield from self._probability(volume, stop)
        else:
            prob = np.zeros(volume.shape, np.float32)
            if box:  # else nothing was scanned: all air
                part = np.ascontiguousarray(volume[box])
                prob[box] = yield from self._probability(part, stop)
        yield Progress("network", self.n_steps, self.n_steps, "output")
        return prob

    def _probability(self, volume: np.ndarray, stop: StopFlag):
        if self.dtype != torch.float32 and not self.checked:
            error = self.probe_error(volume)
            self.checked = True
            if not error <= PROBE_TOLERANCE:  # NaN too
                yield self._fall_back(f"differs from float32 by {error:.3g}")
        with torch.inference_mode():
            if self.onednn:
                prob = yield from self._onednn_pass(volume, stop)
            else:
                prob = yield from self._generic_pass(volume, stop)
        if self.dtype != torch.float32 and not np.isfinite(prob).all():
            yield self._fall_back("overflowed outside the probe block")
            return (yield from self._probability(volume, stop))
        return prob

    def _fall_back(self, why: str) -> Progress:
        name = str(self.dtype).removeprefix("torch.")
        self._set_dtype(torch.float32)
        return Progress("network", 0, self.n_steps, f"{name} {why}; using float32")

    def probe_error(self, volume: np.ndarray) -> float:
        """The largest P(lesion) difference between this pass and a float32 pass on the
        CPU, on the volume's central :data:`PROBE`^3 block (NaN if this pass overflows)."""
        lo = [max(0, (s - PROBE) // 2) for s in volume.shape]
        block = np.ascontiguousarray(volume[tuple(slice(a, a + PROBE) for a in lo)])
        reference = FusedMeshNet(self._model, "cpu", precision="float32", skip_air=False)
        expected = run(reference.lesion_probability(block))
        with torch.inference_mode():
            got = run(self._generic_pass(block, None))
        return float(np.abs(got - expected).max())

    def _onednn_pass(self, volume: np.ndarray, stop: StopFlag):
        depth = volume.shape[0]
        slab = self.slab or ONEDNN_SLAB
        guard = max(d for _, _, d in self.layers)
        shift = slab + guard
        weight, bias, d = self.layers[0]
        channels = weight.shape[0]
        # The network's input, with d zero planes on either side.
        source = torch.zeros((1, weight.shape[1], depth + 2 * d, *volume.shape[1:]))
        source = source.contiguous(memory_format=CHANNELS_LAST)  # a view: one channel
        source[0, 0, d:d + depth] = torch.from_numpy(volume)
        buffer = torch.empty((1, channels, depth + shift + 2 * guard, *volume.shape[1:]),
                             memory_format=CHANNELS_LAST)
        at = guard + shift  # where the activation starts; the first layer sweeps down
        _sweep(source, d, buffer, at, depth, weight, bias, d, slab, descending=False,
               stop=stop)
        del source
        yield Progress("network", 1, self.n_steps, "layer 1")
        check_stop(stop)
        for i, (weight, bias, d) in enumerate(self.layers[1:], start=2):
            down = at == guard + shift
            target = guard if down else guard + shift
            buffer[:, :, at - d:at].zero_()  # the 'same' padding in depth
            buffer[:, :, at + depth:at + depth + d].zero_()
            _sweep(buffer, at, buffer, target, depth, weight, bias, d, slab, descending=not down,
                   stop=stop)
            at = target
            yield Progress("network", i, self.n_steps, f"layer {i}")
            check_stop(stop)
        prob = torch.empty(volume.shape)
        voxels = buffer[0, :, at:at + depth].permute(1, 2, 3, 0)  # (depth, H, W, channels) view
        w, b = self.head[0].reshape(-1), self.head[1]
        for z0 in range(0, depth, slab):
            out = prob[z0:z0 + slab].view(-1)
            torch.mv(voxels[z0:z0 + slab].reshape(-1, channels), w, out=out)
            out.add_(b).sigmoid_()
        return prob.numpy()

    def _generic_pass(self, volume: np.ndarray, stop: StopFlag):
        x = torch.from_numpy(volume)[None, None].to(self.device, self.dtype)
        x = x.contiguous(memory_format=CHANNELS_LAST)
        slab = self.slab or (volume.shape[0] if self.device.type == "cuda" else GENERIC_SLAB)
        cudnn = torch.backends.cudnn
        autotune = cudnn.benchmark
        cudnn.benchmark = autotune or self.device.type == "cuda"  # fixed shapes: tune once
        try:
            for i, (weight, bias, d) in enumerate(self.layers):
                x = conv_relu_in_slabs(x, weight, bias, d, slab, stop)
                yield Progress("network", i + 1, self.n_steps, f"layer {i + 1}")
                check_stop(stop)
            logit = F.conv3d(x, *self.head)
        finally:
            cudnn.benchmark = autotune
        del x
        return torch.sigmoid(logit[0, 0]).float().cpu().numpy()


def scanned_box(volume: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """The voxels above 0 as a box grown by ``margin`` (clipped to the grid); None when
    that is the whole grid, () when no voxel is above 0."""
    scanned = volume > 0
    box = []
    for axis, n in enumerate(volume.shape):
        hit = np.flatnonzero(scanned.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return ()
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, n)))
    return None if all(b.stop - b.start == n for b, n in zip(box, volume.shape)) else tuple(box)


def _sweep(source: torch.Tensor, source_at: int, target: torch.Tensor, target_at: int,
           depth: int, weight: torch.Tensor, bias: torch.Tensor, d: int, slab: int,
           descending: bool, stop: StopFlag = None) -> None:
    """relu(conv3d(source planes [source_at, +depth), dilation d)) into target planes
    [target_at, +depth), slab by slab; the d planes around the source must be zero. The
    stop flag is checked before each slab: a stop lands within a slab's time."""
    planes = (1, source.shape[1], min(slab, depth) + 2 * d, *source.shape[3:])
    packed = torch.ops.mkldnn._reorder_convolution_weight(
        weight, [0, d, d], [1, 1, 1], [d, d, d], 1, list(planes))
    starts = range(0, depth, slab)
    for z0 in reversed(starts) if descending else starts:
        check_stop(stop)
        z1 = min(z0 + slab, depth)
        out = target[:, :, target_at + z0:target_at + z1]
        out.zero_()
        torch.ops.mkldnn._convolution_pointwise_.binary(
            out, source[:, :, source_at + z0 - d:source_at + z1 + d], packed, bias,
            [0, d, d], [1, 1, 1], [d, d, d], 1, "add", 1.0, "relu", [None], "")


def conv_relu_in_slabs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       d: int, slab: int, stop: StopFlag = None) -> torch.Tensor:
    """relu(conv3d(x, dilation d, 'same' padding)), computed ``slab`` output slices at a time.

    A whole-volume conv3d on the CPU holds a hidden output-sized buffer besides its
    output (3 activations at the peak); slab by slab, that buffer is one slab. The stop
    flag is checked before each slab.
    """
    depth = x.shape[2]
    if slab >= depth:
        return F.conv3d(x, weight, bias, padding=d, dilation=d).relu_()
    out = torch.empty((1, weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device,
                      memory_format=CHANNELS_LAST)
    for z0 in range(0, depth, slab):
        check_stop(stop)
        z1 = min(z0 + slab, depth)
        lo, hi = max(z0 - d, 0), min(z1 + d, depth)
        part = x[:, :, lo:hi]
        if lo > z0 - d or hi < z1 + d:  # zero padding in depth at the volume's faces
            part = F.pad(part, (0, 0, 0, 0, lo - (z0 - d), (z1 + d) - hi))
        out[:, :, z0:z1] = F.conv3d(part, weight, bias, padding=(0, d, d), dilation=d).relu_()
    return out

