"""A memory-lean MeshNet training pass: one stored activation per block instead of two.

Plain autograd keeps, for every block, the convolution's input (the previous block's ReLU
output) and the convolution's output (BatchNorm's input): two full-size activations. But
the ReLU output is a cheap elementwise function of the BatchNorm input and its batch
statistics, so here each step "BatchNorm -> ReLU -> next convolution" is one autograd
function (:class:`BnReluConv`) that keeps only the convolution output of the block before
it, plus the per-channel mean and inverse standard deviation. The backward pass recomputes
the ReLU output from them (an elementwise pass, not a convolution), so the time stays close
to the plain step's while the stored activations halve. The first block's output is not
stored at all: it is recomputed from the 1-channel image, a convolution 1/channels as costly
as the others. Gradients equal plain autograd's to
float32 rounding (a test checks it), and BatchNorm running statistics are updated once, in
the forward pass, exactly as ``nn.BatchNorm3d`` does. A BatchNorm in eval mode (frozen, for
fine-tuning) normalises with its running statistics and leaves them alone.

Inside the backward pass the stored convolution output is turned into the normalised
activation in place (it is needed by nothing else), and the convolution's gradients are
computed slab by slab, so that besides the stored activations only the incoming gradient
and the outgoing one are whole volumes. Dropout and fp16 autocast are not supported here;
:func:`train.forward` uses plain autograd or ``torch.utils.checkpoint`` for those.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from napari_meshchop.network.model import MeshNet

_REDUCE = (0, 2, 3, 4)  # all but the channel axis


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1, 1)


SLAB = 16  # output depth slices per convolution call


def _slabs(depth: int, halo: int, slab: int):
    """Output slices [a, b) and the input slices [lo, hi) they read, with the zero padding
    (before, after) that stands in for the input beyond the volume's faces."""
    for a in range(0, depth, slab):
        b = min(a + slab, depth)
        lo, hi = max(a - halo, 0), min(b + halo, depth)
        yield a, b, lo, hi, (lo - (a - halo), (b + halo) - hi)


class BnReluConv(torch.autograd.Function):
    """``conv(relu(batch_norm(z)))`` in training mode, keeping only ``z`` for backward.

    Both passes run ``SLAB`` output slices at a time: a whole-volume Conv3d on the CPU
    holds a hidden buffer as large as its output, and slab by slab neither the ReLU output
    nor that buffer is ever whole.
    """

    @staticmethod
    def forward(ctx, z, gamma, beta, weight, bias, bn, dilation, stem_weight=None,
                stem_bias=None, stem_dilation=1):
        image = None
        if stem_weight is not None:  # z is the first block's conv of the (1-channel) image
            image, z = z, _stem(z, stem_weight, stem_bias, stem_dilation)
        ctx.frozen = not bn.training
        if ctx.frozen:  # BatchNorm in eval mode: its running statistics, left as they are
            mean, var = bn.running_mean.clone(), bn.running_var
        else:
            var, mean = torch.var_mean(z, dim=_REDUCE, correction=0)
            _update_running(bn, z, mean, var)
        invstd = torch.rsqrt(var + bn.eps)
        halo = dilation if weight.shape[-1] > 1 else 0
        scale, shift = invstd * gamma, beta - mean * invstd * gamma
        out = z.new_empty((z.shape[0], weight.shape[0], *z.shape[2:]))
        for a, b, lo, hi, pad in _slabs(z.shape[2], halo, SLAB):
            y = _affine_relu(z[:, :, lo:hi], scale, shift)
            y = F.pad(y, (0, 0, 0, 0, *pad)) if any(pad) else y
            out[:, :, a:b] = F.conv3d(y, weight, bias, padding=(0, halo, halo),
                                      dilation=dilation)
        # The first block's output is recomputed from the image: a 1-channel convolution
        # costs 1/channels of the others, and saves a whole activation.
        ctx.save_for_backward(z if image is None else image, gamma, beta, weight, mean, invstd,
                              stem_weight, stem_bias)
        ctx.conv = (halo, dilation, stem_dilation)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, gamma, beta, weight, mean, invstd, stem_weight, stem_bias = ctx.saved_tensors
        halo, dilation, stem_dilation = ctx.conv
        image = None
        if stem_weight is not None:
            image, z = z, _stem(z, stem_weight, stem_bias, stem_dilation)
        geometry = ([1] * 3, [0, halo, halo], [dilation] * 3, False, [0] * 3, 1)
        # z is ours alone now: normalise it in place (x_hat = (z - mean) / std).
        x_hat = z.sub_(_channel(mean)).mul_(_channel(invstd))
        grad_y = torch.zeros_like(x_hat)
        grad_weight = torch.zeros_like(weight)
        for a, b, lo, hi, pad in _slabs(z.shape[2], halo, SLAB):
            y = _affine_relu(x_hat[:, :, lo:hi], gamma, beta)
            y = F.pad(y, (0, 0, 0, 0, *pad)) if any(pad) else y
            grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
                grad_out[:, :, a:b], y, weight, None, *geometry, [True, True, False])
            grad_weight += grad_w
            # The slab's input gradient spans [a - halo, b + halo): keep what is inside.
            grad_y[:, :, lo:hi] += grad_in[:, :, pad[0]:grad_in.shape[2] - pad[1]]
        del y, grad_in
        # Through the ReLU: no gradient where its input was <= 0.
        for a, b, _, _, _ in _slabs(z.shape[2], 0, SLAB):
            u = torch.addcmul(_channel(beta), x_hat[:, :, a:b], _channel(gamma))
            grad_y[:, :, a:b].mul_(u > 0)
        del u
        grad_bias = grad_out.sum(dim=_REDUCE)
        grad_beta = grad_y.sum(dim=_REDUCE)
        grad_gamma = _channel_dot(grad_y, x_hat)
        if ctx.frozen:  # constant statistics: BatchNorm is a per-channel affine map
            grad_z = grad_y.mul_(_channel(gamma * invstd))
        else:  # BatchNorm backward with batch statistics, in place in grad_y.
            n = grad_y.numel() // grad_y.shape[1]
            grad_z = grad_y.mul_(n).sub_(_channel(grad_beta))
            grad_z.addcmul_(x_hat, _channel(-grad_gamma)).mul_(_channel(gamma * invstd / n))
        grads = (grad_gamma, grad_beta, grad_weight, grad_bias, None, None)
        if image is None:
            return (grad_z, *grads, None, None, None)
        del x_hat, z
        d = stem_dilation
        _, grad_stem_weight, grad_stem_bias = torch.ops.aten.convolution_backward(
            grad_z, image, stem_weight, [stem_weight.shape[0]], [1] * 3, [d] * 3, [d] * 3,
            False, [0] * 3, 1, [False, True, True])
        return (None, *grads, grad_stem_weight, grad_stem_bias, None)


def _update_running(bn, z, mean, var) -> None:
    """BatchNorm's running statistics, updated as ``nn.BatchNorm3d`` does."""
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else \
            1.0 / float(bn.num_batches_tracked)
        n = z.numel() // z.shape[1]
        bn.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        bn.running_var.mul_(1 - momentum).add_(var * (n / max(n - 1, 1)), alpha=momentum)


def _channel_dot(a, b):
    """Per channel, the sum of a * b, without an a * b temporary (a batched dot product)."""
    c = a.shape[1]
    return sum(torch.bmm(a[i].reshape(c, 1, -1), b[i].reshape(c, -1, 1)).view(c)
               for i in range(a.shape[0]))


def _stem(image, weight, bias, dilation):
    return F.conv3d(image, weight, bias, padding=dilation, dilation=dilation)


def _affine_relu(z, scale, shift):
    """relu(scale * z + shift), per channel, as a new tensor."""
    return torch.addcmul(_channel(shift), z, _channel(scale)).relu_()


# Whether this process may change glibc's allocator (see :func:`claim_allocator`).
_ALLOCATOR_OURS = False


def claim_allocator() -> None:
    """Declare this process a training process, whose allocator :func:`return_freed_memory`
    may change, for the whole process and for good.

    Only a process that exists to train calls this (the ``meshchop`` command line, before
    ``train``, ``experiment`` or ``hpo``). napari, a notebook, or any program that trains
    beside other work never does, so their allocator stays as it is.
    """
    global _ALLOCATOR_OURS
    _ALLOCATOR_OURS = True


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """On glibc, serve allocations of ``threshold`` bytes or more with their own mappings,
    if this process is a training process (:func:`claim_allocator`); otherwise do nothing.

    Freed tensors then go back to the system at once. Otherwise the slab buffers of a lean
    step fragment the heap, and its peak RSS carries 2 to 3 activations that are free but not
    returned (measured at 96^3: 12.4 activations instead of 10.4). ``mallopt`` changes the
    whole process and cannot be undone (glibc's sliding threshold stays off), which is why
    it needs the claim. Returns whether it took.
    """
    if not _ALLOCATOR_OURS:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False


def forward(model: MeshNet, x: torch.Tensor) -> torch.Tensor:
    """The logits of ``model`` (training mode), keeping one activation per block but the
    first (recomputed from ``x``) for the backward pass."""
    convs = [b.conv for b in model.blocks[1:]] + [model.head]
    stem = model.blocks[0].conv
    z = x
    for i, (block, conv) in enumerate(zip(model.blocks, convs)):
        extra = (stem.weight, stem.bias, stem.dilation[0]) if i == 0 else ()
        z = BnReluConv.apply(z, block.bn.weight, block.bn.bias, conv.weight, conv.bias,
                             block.bn, conv.dilation[0], *extra)
    return z
