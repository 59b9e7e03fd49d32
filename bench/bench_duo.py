"""CPU benchmark of the DUO loss (issue 3): forward + backward time and peak memory of ``DUOLoss`` (fused C++
kernel + analytic S backward) side by side with the pure-torch composition of the same formula
(``DUOLoss(backend="torch")``), in one run.

    python bench/bench_duo.py                 # B=2 K=4 96³ float32, integer labels (to_onehot_y=True)
    python bench/bench_duo.py --target onehot # the same with a float one-hot target
    python bench/bench_duo.py --quick         # small sizes, a smoke run
    python bench/bench_duo.py --device cuda --K 14 --size 128   # GPU: see gpu_main

On a GPU (``--device cuda``) it compares, side by side in one run, plain Dice+BCE (torch), ``DUOLoss`` on the
CUDA fused kernels (``backend="auto"``) and ``DUOLoss(backend="torch")``: forward + backward time (CUDA
events, median) and peak allocated memory on top of the inputs (issue 12's targets: DUO ≤ 1.3× the time and
≤ 1.2× the memory of Dice+BCE).

Peak memory: each variant runs in a fresh child process with glibc's mmap threshold pinned low, so that
every large tensor is its own mapping and the resident set follows live memory; the peak is VmHWM (reset
through /proc/self/clear_refs right before the step) minus the resident set before it, i.e. the extra
memory one forward + backward needs on top of the inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from _util import cpu_name
from auvcore import DUOLoss


def inputs(B, K, size, target, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, K, size, size, size)
    z = torch.randn(*shape, generator=g).requires_grad_()
    n = (0.1 * torch.randn(*shape, generator=g)).requires_grad_()
    lab = torch.randint(0, K, (B, 1, size, size, size), generator=g)
    # contiguous, as MONAI's one_hot builds it (a movedim view would be copied by the reshape to [B, K, N])
    y = lab if target == "labels" else torch.nn.functional.one_hot(lab[:, 0], K).movedim(-1, 1).float().contiguous()
    return z, n, y


def step(loss, z, n, y):
    z.grad = n.grad = None
    loss(z, n, y).backward()


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(args):
    """One variant in this process: the extra resident memory of one forward + backward."""
    z, n, y = inputs(args.B, args.K, args.size, args.target)
    loss = DUOLoss(to_onehot_y=args.target == "labels", backend=args.child)
    step(loss, z, n, y)  # warm-up: thread pools, first-touch of the gradients' storage
    z.grad = n.grad = None
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step(loss, z, n, y)
    peak = rss_kib("VmHWM")
    print(json.dumps({"peak_extra_mib": (peak - before) / 1024}))


def peak_memory(args, backend):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", backend, "--B", str(args.B), "--K", str(args.K),
           "--size", str(args.size), "--target", args.target]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_mib"]


def dice_bce(z, y_onehot, smooth=1e-5):
    """The plain baseline: BCE with logits plus soft Dice per (b, c), mean over both."""
    s = torch.sigmoid(z)
    dims = tuple(range(2, z.dim()))
    dice = 1 - (2 * (s * y_onehot).sum(dims) + smooth) / (s.sum(dims) + y_onehot.sum(dims) + smooth)
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y_onehot) + dice.mean()


def gpu_main(args):
    """Time and peak memory of one forward + backward on a CUDA device, each variant after a warm-up."""
    dev = torch.device("cuda")
    z, n, y = (t.to(dev) for t in inputs(args.B, args.K, args.size, args.target))
    z, n = z.detach().requires_grad_(), n.detach().requires_grad_()
    labels = args.target == "labels"
    onehot = torch.nn.functional.one_hot(y[:, 0], args.K).movedim(-1, 1).float() if labels else y
    losses = {
        "DUOLoss (CUDA fused)": DUOLoss(to_onehot_y=labels),
        "DUO detach_scale": DUOLoss(to_onehot_y=labels, detach_scale=True),
        "DUO alpha=0": DUOLoss(to_onehot_y=labels, alpha=0.0),
        "DUO no input checks": DUOLoss(to_onehot_y=labels, check_inputs=False),
        "DUOLoss (torch path)": DUOLoss(to_onehot_y=labels, backend="torch"),
    }
    variants = {"Dice+BCE (torch)": lambda zz, nn_: dice_bce(zz, onehot)}
    variants.update({k: (lambda zz, nn_, l=l: l(zz, nn_, y)) for k, l in losses.items()})

    def step(fn):
        if args.dtype == "float32":
            return fn(z, n)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # the training step: logits reach the loss in bf16
            return fn(z.to(torch.bfloat16), n.to(torch.bfloat16))

    res = {}
    for name, fn in variants.items():
        for _ in range(2):  # warm-up: kernels loaded, allocator and workspace pools filled
            z.grad = n.grad = None
            step(fn).backward()
        times = []
        for _ in range(args.repeat):
            z.grad = n.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            step(fn).backward()
            t1.record()
            torch.cuda.synchronize()
            times.append(t0.elapsed_time(t1))
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        res[name] = (statistics.median(times), peak)
    ref_t, ref_m = res["Dice+BCE (torch)"]
    shape = f"B={args.B} K={args.K} {args.size}³ {args.dtype}, target={args.target}"
    print(f"DUO loss forward+backward on {torch.cuda.get_device_name(dev)}, {shape}")
    print(f"{'':24}{'median [ms]':>12}{'peak extra [MiB]':>18}{'time ratio':>12}{'memory ratio':>14}")
    for name, (t, m) in res.items():
        print(f"{name:24}{t:>12.2f}{m:>18.1f}{t / ref_t:>11.2f}x{m / ref_m:>13.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--target", choices=["labels", "onehot"], default="labels")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="cuda: bfloat16 runs every variant under torch.autocast (the logits cast to bfloat16)")
    ap.add_argument("--child", choices=["cpp", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.size, args.repeat = 32, 3
    if args.child:
        return child(args)
    if args.device == "cuda":
        return gpu_main(args)

    z, n, y = inputs(args.B, args.K, args.size, args.target)
    fused = DUOLoss(to_onehot_y=args.target == "labels")
    composed = DUOLoss(to_onehot_y=args.target == "labels", backend="torch")
    # same value and gradients before timing anything
    step(fused, z, n, y)
    gz, gn = z.grad.clone(), n.grad.clone()
    step(composed, z, n, y)
    dz = float((gz - z.grad).abs().max() / z.grad.abs().max())
    dn = float((gn - n.grad).abs().max() / n.grad.abs().max())
    # interleaved repeats, so that a busy machine slows both alike
    times = {"fused": [], "torch": []}
    for _ in range(args.repeat):
        for name, loss in (("fused", fused), ("torch", composed)):
            t0 = time.perf_counter()
            step(loss, z, n, y)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    mem = {"fused": peak_memory(args, "cpp"), "torch": peak_memory(args, "torch")}

    shape = f"B={args.B} K={args.K} {args.size}³ {args.dtype}, target={args.target}"
    print(f"DUO loss forward+backward, {shape}, threads={torch.get_num_threads()}, CPU: {cpu_name()}")
    print(f"gradient agreement (max rel. diff): seg_logits {dz:.2e}, noise_logits {dn:.2e}")
    print(f"{'':28}{'DUOLoss (fused C++)':>22}{'pure-torch composition':>26}{'ratio':>9}")
    print(f"{'time, median of ' + str(args.repeat) + ' [s]':28}{med['fused']:>22.3f}{med['torch']:>26.3f}"
          f"{med['torch'] / med['fused']:>8.2f}x")
    print(f"{'time, best [s]':28}{best['fused']:>22.3f}{best['torch']:>26.3f}{best['torch'] / best['fused']:>8.2f}x")
    print(f"{'peak extra memory [MiB]':28}{mem['fused']:>22.1f}{mem['torch']:>26.1f}"
          f"{mem['torch'] / mem['fused']:>8.2f}x")
    inp = (z.numel() * 2 * 4 + y.numel() * y.element_size()) / 2**20
    print(f"(inputs: {inp:.1f} MiB; the gradients of seg_logits and noise_logits alone are "
          f"{z.numel() * 2 * 4 / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
