"""CPU benchmark of the semantic scale (issue 2): auvcore's kernels side by side with (a) the authors'
per-map torch.linalg.svd loop and (b) the batched pure-torch path (bmm + eigvalsh), in one run.

    python bench/bench_scale.py            # full sizes: decoded B=2 K=14 96³; masked C=256 48³ K=8
    python bench/bench_scale.py --quick    # small sizes, a smoke run
    python bench/bench_scale.py --isa avx2 avx512 --decoded-only --clock-ghz 3.97

The decoded case runs once per CPU path in --isa (default: the one in force, AUVCORE_ISA or the CPU's best),
side by side with the same torch baselines, and its Gram is set against the FLOP peak of the cores it ran on:
threads x FMA units x vector width x 2 x clock (the clock from --clock-ghz, else /proc/cpuinfo's).
"""
from __future__ import annotations

import argparse
import time

import torch

import auvcore
from _util import cpu_name, timeit
from auvcore import _backend as B


def authors_svd_loop(z):
    """The published snippet: one SVD per (sample, class) map."""
    out = torch.empty(z.shape[:2])
    for b in range(z.shape[0]):
        for k in range(z.shape[1]):
            M = torch.nan_to_num(z[b, k].reshape(z.shape[2], -1))
            s = torch.linalg.svd(M, full_matrices=False).S + 1e-6
            p = s / s.sum()
            out[b, k] = -(p * torch.log(p)).sum() / torch.log(torch.tensor(float(min(M.shape))))
    return out


def authors_svd_loop_masked(f, lab, K):
    out = torch.full((f.shape[0], K), float("nan"))
    for b in range(f.shape[0]):
        F = f[b].reshape(f.shape[1], -1)
        L = lab[b].reshape(-1)
        for k in range(K):
            X = F[:, L == k].T
            if X.shape[0] < 2:
                continue
            s = torch.linalg.svd(X - X.mean(0), full_matrices=False).S
            e = s**2
            p = e / (e.sum() + 1e-8)
            p = p[p > 0]
            out[b, k] = -(p * torch.log(p)).sum() / torch.log(torch.tensor(float(min(X.shape))))
    return out


def blob_labels(s, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s)] * 3, indexing="ij")).float()
    lab = torch.zeros(s, s, s, dtype=torch.long)
    for k in range(1, K):
        c = torch.rand(3, generator=g) * s * 0.6 + s * 0.2
        r = s * (0.12 + 0.1 * torch.rand(1, generator=g))
        lab[((grid - c.view(3, 1, 1, 1)) ** 2).sum(0) < r**2] = k
    return lab[None]


def matmul_peak(n=2048, repeat=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timeit(lambda: a @ b, repeat)
    return 2 * n**3 / t / 1e9


# float32 lanes per vector register of each path (SSE2 has no FMA: its mul and add pipes give the same count).
LANES = {"generic": 4, "avx2": 8, "avx512": 16}


def cpu_time(fn, repeat: int) -> float:
    """Least process CPU time of ``repeat`` calls after a warm-up (for single-threaded calls)."""
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return min(ts)


def cpuinfo_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as fh:
            return max(float(line.split(":")[1]) for line in fh if line.startswith("cpu MHz")) / 1e3
    except (OSError, ValueError):
        return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--isa", nargs="+", choices=B.ISAS, default=None,
                    help="CPU paths to run the decoded case on, in one process (default: the path in force)")
    ap.add_argument("--decoded-only", action="store_true", help="skip the masked cases")
    ap.add_argument("--clock-ghz", type=float, default=None, help="core clock for the FLOP peak")
    ap.add_argument("--fma-units", type=int, default=2, help="FMA pipes per core for the FLOP peak")
    args = ap.parse_args()
    isas = args.isa or [B.isa()]
    clock = args.clock_ghz or cpuinfo_ghz()
    torch.manual_seed(0)
    s = 32 if args.quick else 96
    sm = 24 if args.quick else 48
    C = 64 if args.quick else 256
    nt = torch.get_num_threads()
    rows = []

    # decoded maps: B=2, K=14, s³ float32 logits; the torch baselines once, the library on each path.
    z = torch.randn(2, 14, s, s, s) * 2 + 1
    t_torch = timeit(lambda: auvcore.semantic_scale(z, backend="torch"), args.repeat)
    t_svd = timeit(lambda: authors_svd_loop(z), max(1, args.repeat // 2))
    G = torch.empty(28, s, s, dtype=torch.float64)
    gram_flops = 28 * s * s * s * s  # m² n multiply-adds x 2 flops / 2 (symmetric half) per map
    before = B.isa()
    per_core = []
    for isa in isas:
        B.set_isa(isa)
        t_ours = timeit(lambda: auvcore.semantic_scale(z, backend="cpp"), args.repeat)
        t_gram = timeit(lambda: B._C.decoded_gram(B.view(z), 0, True, False, B.view(G), nt, False), args.repeat)
        peak = nt * args.fma_units * LANES[isa] * 2 * clock
        # The Gram on one thread in CPU time: on a shared machine wall time counts the other jobs' slices too.
        t_cpu = cpu_time(lambda: B._C.decoded_gram(B.view(z), 0, True, False, B.view(G), 1, False), args.repeat)
        per_core.append((isa, t_cpu, gram_flops / t_cpu / 1e9, args.fma_units * LANES[isa] * 2 * clock))
        rows.append((f"decoded 2x14x{s}³ f32, {isa}", t_ours, t_torch, t_svd, gram_flops / t_gram / 1e9, t_gram,
                     peak))
    B.set_isa(before)

    # masked: C embeddings on sm³, K=8 classes. Label maps are blobs (organs, lesions): 7 balls on a
    # background. Per-voxel random labels are the worst case for the class gather; reported too.
    f = torch.randn(1, C, sm, sm, sm)
    for name, lab in () if args.decoded_only else (("blob labels", blob_labels(sm, 8)), ("random labels", torch.randint(0, 8, (1, sm, sm, sm)))):
        t_ours_m = timeit(lambda: auvcore.masked_semantic_scale(f, lab, 8, backend="cpp"), args.repeat)
        t_torch_m = timeit(lambda: auvcore.masked_semantic_scale(f, lab, 8, backend="torch"), args.repeat)
        t_svd_m = timeit(lambda: authors_svd_loop_masked(f, lab, 8), max(1, args.repeat // 2))
        Gm = torch.empty(8, C, C, dtype=torch.float64)
        cnt = torch.empty(8, dtype=torch.int64)
        t_gram_m = timeit(lambda: B._C.masked_gram(B.view(f), B.view(lab), 8, True, False, B.view(Gm),
                                                   B.view(cnt), nt), args.repeat)
        flops_m = C * C * sm**3
        rows.append((f"masked C={C} {sm}³ K=8 f32, {name}, {B.isa()}", t_ours_m, t_torch_m, t_svd_m,
                     flops_m / t_gram_m / 1e9, t_gram_m, nt * args.fma_units * LANES[B.isa()] * 2 * clock))

    # masked, classes smaller than C (deep encoder layers: Merlin layer3 has C=1024 on a coarse grid): the
    # n_c x n_c Gram of the smaller side against the C x C Gram of the same classes, and batched torch.
    small = []
    for Cs, g in () if args.decoded_only else ((256, 6), (512, 12), (1024, 6)) if not args.quick else ((128, 6),):
        f = torch.randn(1, Cs, g, g, g)
        lab = blob_labels(g, 8)
        Gc = torch.empty(8, Cs, Cs, dtype=torch.float64)
        cnt = torch.empty(8, dtype=torch.int64)
        S = torch.empty(8, dtype=torch.float64)

        def cxc():
            B._C.masked_gram(B.view(f), B.view(lab), 8, True, False, B.view(Gc), B.view(cnt), nt)
            r = cnt.clamp(max=Cs)
            B._C.scale_from_gram(B.view(Gc), B.view(r), 1e-8, 0, B.view(S), B.view(None), B.view(None), B.view(None),
                                 nt)

        t_small = timeit(lambda: auvcore.masked_semantic_scale(f, lab, 8, backend="cpp"), args.repeat)
        t_cxc = timeit(cxc, args.repeat)
        t_torch_s = timeit(lambda: auvcore.masked_semantic_scale(f, lab, 8, backend="torch"), args.repeat)
        small.append((f"masked C={Cs} {g}³ K=8 f32, class sizes {int(torch.bincount(lab.flatten()).min())}..{int(torch.bincount(lab.flatten()).max())} voxels",
                      t_small, t_cxc, t_torch_s))

    mm = matmul_peak(1024 if args.quick else 2048)
    print(f"machine: {cpu_name()}, {nt} threads, best CPU path {B.isa_best()}, paths run: {', '.join(isas)}; "
          f"torch {torch.__version__}; float32 matmul (practical peak): {mm:.1f} GFLOP/s; FLOP peak = {nt} threads x "
          f"{args.fma_units} FMA x lanes x 2 x {clock:.2f} GHz")
    print("| case (CPU path) | auvcore (s) | batched torch (s) | authors' SVD loop (s) | vs SVD loop | vs batched torch "
          "| Gram phase (s) | Gram GFLOP/s | FLOP peak (GFLOP/s) | of peak | of matmul |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, to, tt, ts, gf, tg, pk in rows:
        print(f"| {name} | {to:.4f} | {tt:.4f} | {ts:.3f} | {ts / to:.1f}x | {tt / to:.2f}x | {tg:.4f} | {gf:.1f} "
              f"| {pk:.0f} | {100 * gf / pk:.0f}% | {100 * gf / mm:.0f}% |")

    print("\n| Gram alone, 1 thread, CPU time (CPU path) | time (s) | GFLOP/s | one core's FLOP peak (GFLOP/s) | of peak |")
    print("|---|---|---|---|---|")
    for isa, tc, gf, pk in per_core:
        print(f"| decoded 2x14x{s}³ f32, {isa} | {tc:.4f} | {gf:.1f} | {pk:.0f} | {100 * gf / pk:.0f}% |")
    if not small:
        return
    print("\n| case (small classes) | auvcore, smaller side (s) | C x C Gram (s) | batched torch (s) "
          "| vs C x C | vs batched torch |")
    print("|---|---|---|---|---|---|")
    for name, ts, tc, tt in small:
        print(f"| {name} | {ts:.4f} | {tc:.4f} | {tt:.4f} | {tc / ts:.1f}x | {tt / ts:.1f}x |")


if __name__ == "__main__":
    main()
