"""Benchmark of the CUDA semantic scale against pure-PyTorch and CuPy baselines, with roofline floors.

Run on a CUDA machine from the repository root (the built module in auvcore/ or auvcore installed):

    python bench/bench_cuda.py              # all cases, about 2-4 minutes on an H100
    python bench/bench_cuda.py --quick      # fewer repetitions, smaller streamed case

Cases (SPEC §2; float32 inputs):
  decoded-small   decoded maps B=2,  K=14, 96³, mode D_HW (m=96, n=9216)
  decoded-stream  decoded maps B=64, K=14, 96³, streamed in batches of --batch samples
  masked          embeddings C=256 at 64³, K=16 classes, B=2

Methods:
  auvcore-cuda     auvcore.semantic_scale / masked_semantic_scale, backend="cuda" (with its error check)
  auvcore-nocheck  the same with nan_to_num=True: no host round trip at the end (decoded only)
  torch-svd-loop   (a) per-map torch.linalg.svdvals on the GPU, float32, one map at a time
  torch-eigvalsh   (b) batched bmm + torch.linalg.eigvalsh: auvcore's backend="torch" (float32 throughout)
  torch-eigvalsh64 (b') the same with the Gram and eigvalsh in float64
  cupy-eigvalsh    (c) CuPy matmul + cupy.linalg.eigvalsh (float64 Gram); skipped without CuPy

Timing: CUDA events around each call, after warm-up; the median of --reps runs. Floors: the input's bytes
over the measured device copy bandwidth, and the Gram FLOPs over the measured FP32 (non-tensor-core) GEMM
rate; "x floor" is the measured time over the larger of the two.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

import auvcore
from auvcore import _torch_impl as T

try:
    import cupy  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "no CuPy"
    cupy = None


# ---------------------------------------------------------------------------------------------------------
def cuda_time(fn, reps: int, warmup: int) -> tuple[float, object]:
    """Median milliseconds of fn() over reps runs, each bracketed by CUDA events; returns the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), out


def measure_copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    n = 256 * 1024 * 1024  # 1 GiB of float32
    x = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    ms, _ = cuda_time(lambda: y.copy_(x), reps=10, warmup=3)
    del x, y
    return 2 * n * 4 / (ms * 1e-3)


def measure_fp32_gemm_rate() -> float:
    """FP32 GEMM FLOP/s on CUDA cores (TF32 off, as the Gram kernel uses plain FP32 FMAs)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        n = 8192
        a = torch.randn(n, n, device="cuda")
        b = torch.randn(n, n, device="cuda")
        ms, _ = cuda_time(lambda: a @ b, reps=5, warmup=2)
        return 2 * n**3 / (ms * 1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


# ---------------------------------------------------------------------------------------------------------
# Baselines
def entropy_from_eigs(lam: torch.Tensor, r: int) -> torch.Tensor:
    S, _ = T.entropy_scale(lam, r, 1e-8, "paper")
    return S


def svd_loop(z: torch.Tensor, mode: str = "D_HW") -> torch.Tensor:
    M = T.class_matrices(z, mode)
    Bn, K = M.shape[:2]
    r = min(M.shape[-2:])
    out = torch.empty(Bn, K, dtype=torch.float64, device=z.device)
    for b in range(Bn):
        for k in range(K):
            x = M[b, k].float()
            x = x - x.mean(0, keepdim=True)
            s = torch.linalg.svdvals(x).double()
            out[b, k] = entropy_from_eigs((s * s).unsqueeze(0), r)[0]
    return out


def eigvalsh64(z: torch.Tensor, mode: str = "D_HW") -> torch.Tensor:
    M = T.class_matrices(z, mode).float()
    M = M - M.mean(-2, keepdim=True)
    m, n = M.shape[-2:]
    G = (M @ M.transpose(-1, -2) if m <= n else M.transpose(-1, -2) @ M).double()
    lam = torch.linalg.eigvalsh(G).flip(-1)
    return entropy_from_eigs(lam, min(m, n))


def cupy_eigvalsh(z: torch.Tensor, mode: str = "D_HW") -> torch.Tensor:
    M = cupy.asarray(T.class_matrices(z, mode).contiguous())
    M = M - M.mean(axis=-2, keepdims=True)
    m, n = M.shape[-2:]
    G = (M @ M.swapaxes(-1, -2) if m <= n else M.swapaxes(-1, -2) @ M).astype(cupy.float64)
    lam = torch.as_tensor(cupy.linalg.eigvalsh(G), device=z.device).flip(-1)
    return entropy_from_eigs(lam, min(m, n))


def masked_torch_loop(f, lab, K):
    return auvcore.masked_semantic_scale(f, lab, K, backend="torch")


def masked_sorted_eigvalsh64(f, lab, K):
    """(b) for masked mode: one argsort by class, per-class bmm-free Grams from contiguous segments, batched
    float64 eigvalsh (the best plain-torch formulation we know)."""
    Bn, C = f.shape[:2]
    F = f.reshape(Bn, C, -1)
    L = lab.reshape(Bn, -1)
    G = torch.zeros(Bn, K, C, C, dtype=torch.float64, device=f.device)
    counts = torch.zeros(Bn, K, dtype=torch.int64, device=f.device)
    for b in range(Bn):
        order = torch.argsort(L[b])
        cnt = torch.bincount(L[b], minlength=K)
        counts[b] = cnt
        X = F[b][:, order]
        start = 0
        for k, nk in enumerate(cnt.tolist()):
            if nk:
                Xk = X[:, start:start + nk]
                Xk = Xk - Xk.mean(1, keepdim=True)
                G[b, k] = (Xk @ Xk.T).double()
            start += nk
    lam = torch.linalg.eigvalsh(G).flip(-1)
    S, _ = T.entropy_scale(lam, counts.clamp(max=C), 1e-8, "paper")
    return S


def masked_cupy(f, lab, K):
    Bn, C = f.shape[:2]
    F = cupy.asarray(f.reshape(Bn, C, -1))
    L = cupy.asarray(lab.reshape(Bn, -1))
    G = cupy.zeros((Bn, K, C, C), dtype=cupy.float64)
    counts = torch.zeros(Bn, K, dtype=torch.int64)
    for b in range(Bn):
        for k in range(K):
            X = F[b][:, L[b] == k]
            counts[b, k] = X.shape[1]
            if X.shape[1]:
                X = X - X.mean(axis=1, keepdims=True)
                G[b, k] = (X @ X.T).astype(cupy.float64)
    lam = torch.as_tensor(cupy.linalg.eigvalsh(G), device=f.device).flip(-1)
    S, _ = T.entropy_scale(lam, counts.to(f.device).clamp(max=C), 1e-8, "paper")
    return S


# ---------------------------------------------------------------------------------------------------------
def decoded_input(B: int, K: int, side: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    # logit-like maps: a per-class offset plus unit noise
    z = torch.randn(B, K, side, side, side, device="cuda", generator=g)
    z += torch.linspace(-4, 2, K, device="cuda").view(1, K, 1, 1, 1)
    return z


def masked_input(B: int, C: int, K: int, side: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    f = torch.randn(B, C, side, side, side, device="cuda", generator=g)
    coarse = torch.randint(0, K, (B, 1, side // 8, side // 8, side // 8), device="cuda", generator=g)
    lab = torch.nn.functional.interpolate(coarse.float(), size=(side,) * 3, mode="nearest").long()[:, 0]
    return f, lab


def floors(nbytes: float, flops: float, bw: float, rate: float) -> tuple[float, float]:
    return nbytes / bw * 1e3, flops / rate * 1e3


def fmt_err(S, ref) -> str:
    if S is None or ref is None:
        return "-"
    S = S.detach().double().reshape(ref.shape)
    ok = ~torch.isnan(ref)
    if not torch.equal(torch.isnan(S), ~ok):
        return "NaN mismatch"
    return f"{float((S[ok] - ref[ok]).abs().max()):.1e}" if ok.any() else "0"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="decoded-small,decoded-stream,masked")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="samples per call in decoded-stream")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-svd-loop", action="store_true", help="skip the slow per-map SVD baseline")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA GPU and a CUDA build of torch")
    if not auvcore.has_cuda_kernels():
        sys.exit("auvcore was built without CUDA kernels (build with -DAUVCORE_CUDA=ON)")
    if args.quick:
        args.reps, args.warmup = 3, 1
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; CuPy {'absent' if cupy is None else cupy.__version__}")
    bw = measure_copy_bandwidth()
    rate = measure_fp32_gemm_rate()
    print(f"measured copy bandwidth {bw / 1e12:.2f} TB/s, FP32 GEMM (no TF32) {rate / 1e12:.1f} TFLOP/s\n")

    rows = []

    def run(case, method, fn, reps, nbytes, flops, ref):
        try:
            ms, S = cuda_time(fn, reps=reps, warmup=min(args.warmup, reps))
        except Exception as exc:  # noqa: BLE001 - a baseline failing must not hide the others
            rows.append((case, method, float("nan"), float("nan"), f"error: {type(exc).__name__}: {exc}"[:60]))
            return None
        fb, ff = floors(nbytes, flops, bw, rate)
        rows.append((case, method, ms, ms / max(fb, ff), fmt_err(S, ref)))
        print(f"  {case:15s} {method:17s} {ms:10.3f} ms", flush=True)
        return ms

    cases = args.cases.split(",")
    if "decoded-small" in cases:
        Bn, K, side = 2, 14, 96
        z = decoded_input(Bn, K, side, 0)
        p, n = side, side * side
        nbytes, flops = z.numel() * 4, Bn * K * 2 * p * p * n
        ref = auvcore.semantic_scale(z.double(), backend="torch")
        case = "decoded-small"
        run(case, "auvcore-cuda", lambda: auvcore.semantic_scale(z, backend="cuda"), args.reps, nbytes, flops, ref)
        run(case, "auvcore-nocheck", lambda: auvcore.semantic_scale(z, nan_to_num=True, backend="cuda"), args.reps,
            nbytes, flops, ref)
        if not args.skip_svd_loop:
            run(case, "torch-svd-loop", lambda: svd_loop(z), max(2, args.reps // 3), nbytes, flops, ref)
        run(case, "torch-eigvalsh", lambda: auvcore.semantic_scale(z, backend="torch"), args.reps, nbytes, flops, ref)
        run(case, "torch-eigvalsh64", lambda: eigvalsh64(z), args.reps, nbytes, flops, ref)
        if cupy is not None:
            run(case, "cupy-eigvalsh", lambda: cupy_eigvalsh(z), args.reps, nbytes, flops, ref)
        del z, ref
        torch.cuda.empty_cache()

    if "decoded-stream" in cases:
        Bn, K, side = (16 if args.quick else 64), 14, 96
        bs = args.batch
        z = decoded_input(Bn, K, side, 1)
        p, n = side, side * side
        nbytes, flops = z.numel() * 4, Bn * K * 2 * p * p * n
        ref = torch.cat([auvcore.semantic_scale(z[i:i + bs].double(), backend="torch") for i in range(0, Bn, bs)])
        case = "decoded-stream"

        def stream(fn):
            return lambda: torch.cat([fn(z[i:i + bs]) for i in range(0, Bn, bs)])

        reps = max(2, args.reps // 3)
        run(case, "auvcore-cuda", stream(lambda x: auvcore.semantic_scale(x, backend="cuda")), reps, nbytes, flops,
            ref)
        run(case, "auvcore-nocheck", stream(lambda x: auvcore.semantic_scale(x, nan_to_num=True, backend="cuda")),
            reps, nbytes, flops, ref)
        if not args.skip_svd_loop:
            run(case, "torch-svd-loop", stream(svd_loop), 1, nbytes, flops, ref)
        run(case, "torch-eigvalsh", stream(lambda x: auvcore.semantic_scale(x, backend="torch")), reps, nbytes, flops,
            ref)
        run(case, "torch-eigvalsh64", stream(eigvalsh64), reps, nbytes, flops, ref)
        if cupy is not None:
            run(case, "cupy-eigvalsh", stream(cupy_eigvalsh), reps, nbytes, flops, ref)
        del z, ref
        torch.cuda.empty_cache()

    if "masked" in cases:
        Bn, C, K, side = 2, 256, 16, 64
        f, lab = masked_input(Bn, C, K, side, 2)
        N = side**3
        nbytes = f.numel() * 4 + lab.numel() * 8
        flops = Bn * 2 * C * C * N  # every voxel lands in exactly one class
        ref = masked_sorted_eigvalsh64(f.double(), lab, K)
        case = "masked"
        run(case, "auvcore-cuda", lambda: auvcore.masked_semantic_scale(f, lab, K, backend="cuda"), args.reps, nbytes,
            flops, ref)
        run(case, "torch-loop", lambda: masked_torch_loop(f, lab, K), max(2, args.reps // 3), nbytes, flops, ref)
        run(case, "torch-sort-eig64", lambda: masked_sorted_eigvalsh64(f, lab, K), max(2, args.reps // 3), nbytes,
            flops, ref)
        if cupy is not None:
            run(case, "cupy-eigvalsh", lambda: masked_cupy(f, lab, K), max(2, args.reps // 3), nbytes, flops, ref)

    print()
    hdr = f"{'case':15s} {'method':17s} {'median ms':>10s} {'x floor':>8s} {'speedup':>8s}  max|S-S64|"
    print(hdr)
    print("-" * len(hdr))
    ours = {r[0]: r[2] for r in rows if r[1] == "auvcore-cuda"}
    for case, method, ms, xf, err in rows:
        sp = ours.get(case, float("nan"))
        speed = ms / sp if (math.isfinite(ms) and math.isfinite(sp) and sp > 0) else float("nan")
        print(f"{case:15s} {method:17s} {ms:10.3f} {xf:8.1f} {speed:8.1f}  {err}")
    print("\nspeedup = that method's time / auvcore-cuda's time (>1: auvcore is faster).")
    print("floors per case: bytes / copy bandwidth and Gram FLOPs / FP32 GEMM rate:")
    for case, (nb, fl) in {
        "decoded-small": (2 * 14 * 96**3 * 4, 2 * 14 * 2 * 96 * 96 * 96**2),
        "decoded-stream": ((16 if args.quick else 64) * 14 * 96**3 * 4, (16 if args.quick else 64) * 14 * 2 * 96**4),
        "masked": (2 * 256 * 64**3 * 4 + 2 * 64**3 * 8, 2 * 2 * 256 * 256 * 64**3),
    }.items():
        if case in cases:
            fb, ff = floors(nb, fl, bw, rate)
            print(f"  {case:15s} {nb / 1e6:9.1f} MB -> {fb:8.3f} ms   {fl / 1e9:8.2f} GFLOP -> {ff:8.3f} ms")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n(total {time.time() - t0:.0f} s)")
