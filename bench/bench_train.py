"""Peak memory and time of one MeshNet training step: plain autograd, lean, checkpoint.

A step is forward, weighted cross-entropy with label smoothing, backward and an AdamW step
on one ``size``^3 volume (batch 1), through ``forward(model, x, mode)``:

* ``plain``: autograd as usual, float32 (the baseline);
* ``lean``: one stored activation per block, ReLU outputs recomputed (``lean.py``);
* ``checkpoint``: ``torch.utils.checkpoint`` over each block (recomputes the convolutions).

Each (mode, size) runs in a fresh process, as ``meshchop train`` would run it (a training
process, whose lean step first asks glibc to return freed buffers at once:
``lean.claim_allocator`` and ``lean.return_freed_memory``): a warm-up
step, then ``--rounds`` timed steps. The peak RSS (``ru_maxrss``) above the process's
baseline (model built, input made) is reported, and the median step time; on CUDA, the peak
allocated device memory above the same baseline. Run on a quiet machine (the modes run one
after another), from the repository root::

    python bench/bench_train.py --sizes 64 96 128 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = ("plain", "lean", "checkpoint")


def _setup(size: int, channels: int, device: str):
    import torch

    from napari_meshchop.network.model import Architecture, MeshNet

    torch.manual_seed(0)
    model = MeshNet(Architecture(channels=channels)).train().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=3e-5, eps=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0], device=device),
                                        label_smoothing=0.01)
    x = torch.rand(1, 1, size, size, size, device=device)
    return model, opt, loss_fn, x, (x[:, 0] > 0.9).long()


def _step(mode, model, opt, loss_fn, x, y, device) -> float:
    import torch

    from napari_meshchop.training.memory import forward

    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss_fn(forward(model, x, mode), y).backward()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(mode: str, size: int, channels: int, device: str, rounds: int) -> dict:
    import torch

    from napari_meshchop.training import lean

    if mode == "lean":  # this child process exists to train, as `meshchop train` does
        lean.claim_allocator()
        lean.return_freed_memory()
    model, opt, loss_fn, x, y = _setup(size, channels, device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _step(mode, model, opt, loss_fn, x, y, device)  # warm-up: oneDNN primitives, allocator
    times = [_step(mode, model, opt, loss_fn, x, y, device) for _ in range(rounds)]
    if device == "cuda":
        above = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        above = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"mode": mode, "size": size, "seconds": statistics.median(times),
            "above_baseline_mb": above}


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    p.add_argument("--channels", type=int, default=26)
    p.add_argument("--rounds", type=int, default=2, help="timed steps after the warm-up")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]), args.channels,
                                 args.device, args.rounds)))
        return
    common = ["--channels", str(args.channels), "--device", args.device, "--rounds",
              str(args.rounds)]
    rows = []
    for size in args.sizes:
        done = {m: _child("--worker", m, str(size), *common) for m in args.modes}
        base = done[args.modes[0]]
        for m in args.modes:
            r = done[m]
            rows.append((size, m, r["seconds"], r["above_baseline_mb"],
                         r["seconds"] / base["seconds"],
                         r["above_baseline_mb"] / base["above_baseline_mb"]))
            print(f"{size}^3 {m}: {r['seconds']:.2f} s, {r['above_baseline_mb']:.0f} MB",
                  file=sys.stderr)
    memory_kind = "peak CUDA memory" if args.device == "cuda" else "peak RSS"
    print(f"| volume | step | median step time (s) | {memory_kind} above baseline (MB) | "
          f"time vs {args.modes[0]} | memory vs {args.modes[0]} |")
    print("|---|---|---:|---:|---:|---:|")
    for size, m, s, mb, rt, rm in rows:
        print(f"| {size}^3 | {m} | {s:.2f} | {mb:.0f} | {rt:.2f}x | {rm:.2f}x |")


if __name__ == "__main__":
    main()
