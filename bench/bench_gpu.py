"""The GPU figures of docs/benchmarks.md in one time-boxed run (a lent H200, or any CUDA GPU).

1. MeshNet-26 inference on a 256^3 volume, float32 and float16 (``FusedMeshNet`` as
   ``meshchop segment`` runs it on CUDA: channels last, cuDNN autotuning, the float16 pass
   checked against a CPU float32 pass on a probe block): warm-up, ``--repeats`` timed passes,
   peak GPU memory, and the largest P(lesion) difference between the two precisions.
2. One training step at 256^3, whole volume, batch 1 (forward, weighted cross-entropy,
   backward, AdamW): plain, lean and checkpointed in float32, and checkpointed with fp16
   autocast and a gradient scaler (how ``meshchop train`` runs on CUDA); median step time
   and peak GPU memory above the model and the batch.
3. The hours for the paper's schedule, 50 epochs of 148 subjects, from each step's time
   (training steps only: loading and validation come on top).

Each part stops starting new measurements once ``--budget`` seconds have passed, so that the
run fits the time it was lent. From the repository root, on the GPU machine::

    python bench/bench_gpu.py --budget 420

``--device cpu --size 32`` runs the same code on a small volume anywhere (a smoke check).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from bench_train import _setup  # bench/ is on the path when this script runs

from napari_meshchop.events import run
from napari_meshchop.network.fused import FusedMeshNet
from napari_meshchop.network.model import MeshNet
from napari_meshchop.training.memory import forward

CHANNELS = 26  # MeshNet-26
EPOCHS, SUBJECTS = 50, 148  # the paper's schedule: 50 epochs over the 148 training subjects
START = time.monotonic()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_mb(device: torch.device, base: int) -> float:
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" \
        else float("nan")


def inference(device, size, repeats, budget):
    print("| precision | median s (runs) | peak GPU MB | largest P difference vs float32 |")
    print("|---|---|---:|---:|")
    torch.manual_seed(0)
    model = MeshNet().eval()
    volume = np.random.default_rng(0).random((size,) * 3, dtype=np.float32)
    reference = None
    for precision in ("float32", "float16"):
        if time.monotonic() - START > budget:
            print(f"| {precision} | (out of time) | | |")
            continue
        net = FusedMeshNet(model, device, precision=precision)
        run(net.lesion_probability(volume))  # warm-up: cuDNN autotuning, the probe check
        base = _reset_peak(device)
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            prob = run(net.lesion_probability(volume))
            _sync(device)
            times.append(time.perf_counter() - start)
        reference = prob if reference is None else reference
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(f"| {str(net.dtype).removeprefix('torch.')} | {statistics.median(times):.2f} "
              f"({runs}) | {_peak_mb(device, base):.0f} "
              f"| {np.abs(prob - reference).max():.2g} |", flush=True)


def training(device, size, repeats, budget):
    print("\n| step | median s | peak GPU MB above model and batch | hours for "
          f"{EPOCHS} epochs x {SUBJECTS} subjects |")
    print("|---|---:|---:|---:|")
    for mode, amp in (("plain", False), ("lean", False), ("checkpoint", False),
                      ("checkpoint", True)):
        name = mode + (" + fp16 autocast" if amp else "")
        if time.monotonic() - START > budget:
            print(f"| {name} | (out of time) | | |")
            continue
        model, opt, loss_fn, x, y = _setup(size, CHANNELS, device)  # bench_train's step
        scaler = torch.amp.GradScaler(device.type, enabled=amp)
        base = _reset_peak(device)

        def step() -> float:
            _sync(device)
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = loss_fn(forward(model, x, mode), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            _sync(device)
            return time.perf_counter() - start

        try:
            step()  # warm-up
            seconds = statistics.median(step() for _ in range(repeats))
        except torch.OutOfMemoryError:
            print(f"| {name} | out of GPU memory | | |", flush=True)
            continue
        hours = seconds * EPOCHS * SUBJECTS / 3600
        print(f"| {name} | {seconds:.2f} | {_peak_mb(device, base):.0f} | {hours:.2f} |",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds after which no new measurement starts")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"{torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}, "
              f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}\n")
    inference(device, args.size, args.repeats, args.budget)
    training(device, args.size, args.repeats, args.budget)


if __name__ == "__main__":
    main()
