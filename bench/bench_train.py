"""Peak memory and time of one MeshNet training step: ours (checkpointed) against plain.

"plain" is a float32 step of the model as it stands: forward, weighted cross-entropy with
label smoothing, backward, AdamW step. "checkpointed" is the same step through
``train.forward(..., checkpointing=True)``: each block recomputed in the backward pass,
with BatchNorm running statistics updated once. The first step of each process is a
warm-up; the time is the median of the others. Each measurement runs in a fresh process,
so peak RSS (``ru_maxrss``) belongs to that step alone; the peak above the process's
baseline (model built, input made) is reported; on CUDA, the peak allocated device memory
above the same baseline. Run from the repository root::

    python bench/bench_train.py --sizes 64 96 --channels 26
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def worker(mode: str, size: int, channels: int, steps: int, device: str = "cpu") -> dict:
    import torch

    from napari_meshchop import train
    from napari_meshchop.model import Architecture, MeshNet

    torch.manual_seed(0)
    model = MeshNet(Architecture(channels=channels)).train().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=3e-5, eps=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0], device=device),
                                        label_smoothing=0.01)
    x = torch.rand(1, 1, size, size, size, device=device)
    y = (x[:, 0] > 0.9).long()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(train.forward(model, x, mode == "checkpointed"), y)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:  # device memory: the peak allocated above what was there before the steps
        above = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        above = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"mode": mode, "size": size, "seconds": statistics.median(times[1:] or times),
            "above_baseline_mb": above}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    p.add_argument("--channels", type=int, default=26)
    p.add_argument("--steps", type=int, default=2, help="steps per process (median time)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.channels, args.steps,
                                args.device)))
        return
    rows = []
    for size in args.sizes:
        for mode in ("plain", "checkpointed"):
            out = subprocess.run([sys.executable, __file__, "--worker", mode, str(size),
                                  "--channels", str(args.channels), "--steps", str(args.steps),
                                  "--device", args.device],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{size}^3 {mode}: {rows[-1]['seconds']:.2f} s, peak above baseline "
                  f"{rows[-1]['above_baseline_mb']:.0f} MB", file=sys.stderr)
    memory = "peak CUDA memory" if args.device == "cuda" else "peak RSS"
    print(f"| volume | step | median step time (s) | {memory} above baseline (MB) |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['size']}^3 | {r['mode']} | {r['seconds']:.2f} | "
              f"{r['above_baseline_mb']:.0f} |")


if __name__ == "__main__":
    main()
