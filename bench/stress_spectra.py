"""Stress run of the eigensolver behind S (issue: never fail on a real input): a million adversarial
symmetric matrices of sizes 2..1024 (``auvcore.testing``: zeros, rank 1, all equal, clusters, repeated
values, 1e-30..1e30, denormal and 1e30 entries, indefinite, few-sample Grams with an offset, diagonal,
Wilkinson, zero) through the C++ solver; reports failures (an exception, a non-finite or unsorted
spectrum: must be 0), the worst eigenvalue error in units of n·eps·max|a_ij| and the worst error of S.

Sizes: the number of matrices per octave falls by 3x per octave (2-3: 2/3 of them, ..., 512-1024: about
100 in a million), so the large sizes, which cost n³, fit in minutes on a laptop. Reference: LAPACK
(numpy.linalg.eigvalsh) for n <= 128; above, the spectrum the matrix was built from (Q diag(λ) Qᵀ with Q
a product of Householder reflectors), whose own rounding is within the same bound.

    python bench/stress_spectra.py                    # 1,000,000 matrices
    python bench/stress_spectra.py --count 20000      # a quick run
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np
import torch

from _util import cpu_name
from auvcore import _C, testing
from auvcore import _torch_impl as T

EPS = np.finfo(np.float64).eps
KNOWN = [k for k in testing.KINDS if k not in ("gram", "diagonal", "wilkinson", "zero")]


def sizes(rng, count, max_n):
    octaves = np.arange(1, int(np.log2(max_n)) + 1)  # octave k holds 2^k .. 2^(k+1)-1
    w = 3.0 ** -(octaves - 1.0)
    k = rng.choice(octaves, size=count, p=w / w.sum())
    n = rng.integers(2 ** k, 2 ** (k + 1))
    return np.minimum(n, max_n)


def scale_of(lam):
    """S (paper, eps = 0) of each row of descending spectra, in torch (the one Python formula)."""
    t = torch.from_numpy(np.ascontiguousarray(lam))
    return T.entropy_scale(t, t.shape[-1], 0.0, "paper")[0].numpy()


def run_group(rng, n, count, threads, stats):
    big = n > 128
    kinds = rng.choice(KNOWN if big else testing.KINDS, size=count)
    A = np.empty((count, n, n))
    lam_known = np.empty((count, n)) if big else None
    for i, kind in enumerate(kinds):
        if big:
            lam = testing.spectrum(rng, n, kind)
            A[i] = testing.reflected(rng, lam)
            A[i] = (A[i] + A[i].T) / 2
            lam_known[i] = np.sort(lam)[::-1]
        else:
            A[i] = testing.matrix(rng, n, kind)
    t0 = time.perf_counter()
    try:
        w, _ = _C.eigh(A, False, False, threads)
    except ValueError:  # find the matrices that failed one by one
        w = np.full((count, n), np.nan)
        for i in range(count):
            try:
                w[i] = _C.eigh(A[i:i + 1], False, False, 1)[0][0]
            except ValueError as e:
                stats["errors"].append(f"n={n} kind={kinds[i]}: {e}")
    stats["solve_s"] += time.perf_counter() - t0
    ref = lam_known if big else np.linalg.eigvalsh(A)[:, ::-1]
    scale = np.maximum(np.abs(A).max(axis=(1, 2)), np.finfo(float).tiny)
    bad = ~np.isfinite(w).all(axis=1) | (np.diff(w, axis=1) > 0).any(axis=1)
    stats["failures"] += int(bad.sum())
    for i in np.flatnonzero(bad)[:5]:
        stats["examples"].append(f"n={n} kind={kinds[i]}")
    err = np.abs(w - ref).max(axis=1) / (n * EPS * scale)
    ok = ~bad & (scale > 1e-250)  # S of a matrix of denormals is all rounding
    dS = np.abs(scale_of(w[ok] / scale[ok, None]) - scale_of(ref[ok] / scale[ok, None])) if n >= 2 else np.zeros(0)
    for kind in set(kinds):
        m = kinds == kind
        e = err[m & ~bad]
        s = dS[(m & ok)[ok]] if len(dS) else np.zeros(0)
        st = stats["kinds"][kind]
        st["count"] += int(m.sum())
        st["worst_eig"] = max(st["worst_eig"], float(e.max()) if len(e) else 0.0)
        st["worst_S"] = max(st["worst_S"], float(s.max()) if len(s) else 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--max-n", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    ns = sizes(rng, args.count, args.max_n)
    stats = {"failures": 0, "errors": [], "examples": [], "solve_s": 0.0,
             "kinds": defaultdict(lambda: {"count": 0, "worst_eig": 0.0, "worst_S": 0.0})}
    t0 = time.perf_counter()
    values, counts = np.unique(ns, return_counts=True)
    for n, c in zip(values, counts):
        per = max(1, min(int(c), (1 << 24) // (n * n)))  # batches of at most 128 MiB
        for start in range(0, int(c), per):
            run_group(rng, int(n), min(per, int(c) - start), args.threads, stats)
    wall = time.perf_counter() - t0
    failures = stats["failures"] + len(stats["errors"])
    summary = {"matrices": int(args.count), "sizes": f"2..{args.max_n}", "n>=512": int((ns >= 512).sum()),
               "failures": failures, "errors": stats["errors"][:10], "examples": stats["examples"][:10],
               "worst_eig_error_n_eps": max(k["worst_eig"] for k in stats["kinds"].values()),
               "worst_S_error": max(k["worst_S"] for k in stats["kinds"].values()),
               "kinds": dict(stats["kinds"]), "solve_s": round(stats["solve_s"], 1), "wall_s": round(wall, 1),
               "machine": f"{cpu_name()}, {args.threads} threads", "seed": args.seed}
    print(f"{'kind':<12} {'count':>8} {'worst |w-ref|/(n eps |A|)':>26} {'worst |dS|':>11}")
    for kind, k in sorted(stats["kinds"].items()):
        print(f"{kind:<12} {k['count']:>8} {k['worst_eig']:>26.3g} {k['worst_S']:>11.2e}")
    print(f"{args.count} matrices of sizes 2..{args.max_n} ({summary['n>=512']} of 512 or more): "
          f"failures {failures}, worst eigenvalue error {summary['worst_eig_error_n_eps']:.3g} n·eps·max|a|, "
          f"worst S error {summary['worst_S_error']:.2e}; solver {summary['solve_s']} s, wall {summary['wall_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
