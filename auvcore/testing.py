"""Test material: the oracles the tests hold every backend to (``svd_reference``, the float64 SVD of S, and
``duo_loss_reference``, the DUO loss), and adversarial symmetric matrices for the eigensolver's tests and
``bench/stress_spectra.py``. Nothing in the package imports this module.

Each kind is a spectrum that has broken real eigensolvers: exact zeros (rank-deficient Grams), one
non-zero eigenvalue, all equal, tight clusters, repeated values, a dynamic range of 1e-30..1e30, entries
near the denormal range or near 1e30, and Grams of few samples with a large common offset, which is what
masked mode hands the solver for a small class. The matrix is ``Q diag(λ) Qᵀ`` with a Haar-random
orthogonal ``Q``, or a Gram ``X Xᵀ`` built the way the kernels build one.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _torch_impl as T


def svd_reference(M, center=True, eps=1e-8, variant="paper") -> float:
    """The oracle: S of one class matrix M (m x n) from float64 singular values, straight from docs/method.md §1."""
    M = np.asarray(M, dtype=np.float64)
    m, n = M.shape
    r = min(m, n)
    if r < 2:
        return float("nan")
    if variant == "official":
        sigma = np.linalg.svd(np.nan_to_num(M, nan=0.0, posinf=0.0, neginf=0.0), compute_uv=False)
        q = sigma + T.OFFICIAL_SHIFT
        p = q / q.sum()
    else:
        if center:
            M = M - M.mean(axis=0, keepdims=True)
        sigma = np.linalg.svd(M, compute_uv=False)
        energy = sigma**2
        p = energy / (energy.sum() + eps)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(r))


KINDS = ("random", "zeros", "rank1", "equal", "cluster", "repeated", "range", "tiny", "huge", "indefinite",
         "gram", "diagonal", "wilkinson", "zero")


def spectrum(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Eigenvalues (any order) of one adversarial matrix of size n."""
    if kind == "random":
        return rng.standard_normal(n) ** 2
    if kind == "zeros":  # rank r < n: the rank-deficient Gram of a class with r voxels
        lam = np.zeros(n)
        r = int(rng.integers(0, n))
        lam[:r] = rng.exponential(size=r)
        return lam
    if kind == "rank1":
        lam = np.zeros(n)
        lam[0] = rng.exponential() * 10.0 ** rng.uniform(-3, 3)
        return lam
    if kind == "equal":
        return np.full(n, 10.0 ** rng.uniform(-5, 5))
    if kind == "cluster":  # a few centres, each eigenvalue within a relative 1e-14..1e-6 of its centre
        centres = 10.0 ** rng.uniform(-4, 4, size=int(rng.integers(1, 4)))
        c = centres[rng.integers(0, len(centres), size=n)]
        return c * (1.0 + 10.0 ** rng.uniform(-14, -6) * rng.standard_normal(n))
    if kind == "repeated":
        return rng.choice(np.array([0.0, 1.0, 2.0, 1e-8]), size=n)
    if kind == "range":
        return 10.0 ** rng.uniform(-30, 30, size=n)
    if kind == "tiny":  # entries in the denormal range
        return rng.exponential(size=n) * 1e-310
    if kind == "huge":
        return rng.exponential(size=n) * 1e30
    if kind == "indefinite":
        return rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, size=n)
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def haar_orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def reflected(rng: np.random.Generator, lam: np.ndarray, reflectors: int = 4) -> np.ndarray:
    """``Q diag(λ) Qᵀ`` with ``Q`` a product of random Householder reflectors: dense, O(n²) each, for sizes
    where a Haar ``Q`` (a QR of n x n) costs more than the solve under test."""
    a = np.diag(lam.astype(np.float64))
    for _ in range(reflectors):
        u = rng.standard_normal(len(lam))
        u /= np.linalg.norm(u)
        au = a @ u
        a = a - 2.0 * np.outer(u, au) - 2.0 * np.outer(au, u) + 4.0 * (u @ au) * np.outer(u, u)
    return a


def matrix(rng: np.random.Generator, n: int, kind: str, haar: bool = True) -> np.ndarray:
    """One symmetric n x n float64 matrix of the given kind (both triangles equal); ``haar=False`` mixes the
    spectrum with a few reflectors instead of a Haar-random rotation (large n)."""
    if kind == "zero":
        return np.zeros((n, n))
    if kind == "gram":  # few samples, a large offset, uncentred or centred: masked mode's small classes
        k = int(rng.integers(1, 2 * n + 1))
        x = rng.standard_normal((n, k)) * rng.uniform(0.1, 3) + rng.uniform(-50, 50)
        if rng.random() < 0.5:
            x = x - x.mean(axis=1, keepdims=True)
        a = x @ x.T
    elif kind == "diagonal":
        a = np.diag(spectrum(rng, n, "repeated") * rng.standard_normal(n))
    elif kind == "wilkinson":  # W_n^+: pairs of eigenvalues agreeing to many digits
        h = (n - 1) / 2.0
        a = np.diag(np.abs(np.arange(n) - h)) + np.diag(np.ones(n - 1), 1) + np.diag(np.ones(n - 1), -1)
    else:
        lam = spectrum(rng, n, kind)
        if haar:
            q = haar_orthogonal(rng, n)
            a = (q * lam) @ q.T
        else:
            a = reflected(rng, lam)
    return (a + a.T) / 2.0


def duo_loss_reference(z, n, y, c0=1, alpha=0.5, lambda_bce=1.0, tau=0.1, sigma0=0.1, beta=0.1, smooth=1e-5,
                       layout="D_HW", detach_scale=False, variant="paper", eps=1e-8):
    """The DUO loss straight from docs/method.md §3, composed of torch ops independently of ``DUOLoss``: the
    tests' oracle for both of its paths.

    ``z``, ``n``: ``[B, K, *spatial]`` logits; ``y``: one-hot ``[B, K, *spatial]`` in [0, 1]; classes ``c0..K-1``
    are included. Returns the per-(b, c) losses ``[B, K - c0]``, whose mean is the loss.
    """
    import torch.nn.functional as F

    zc, nc, yc = z[:, c0:], n[:, c0:], y[:, c0:].to(z.dtype)
    Bn, C = zc.shape[:2]
    zf, nf, yf = (t.reshape(Bn, C, -1) for t in (zc, nc, yc))
    if variant == "official":
        # The authors' snippet: detached soft target, BCE only, w from the snippet's S.
        yt = (yf - torch.sigmoid(nf) * yf).detach()
        S = T.semantic_scale(zc, layout, False, eps, "official", True).to(z.dtype)
        S = S.detach() if detach_scale else S
        return F.binary_cross_entropy_with_logits(zf, yt, reduction="none").mean(-1) / (1 + alpha * S)
    g = torch.tanh(nf)
    yt = torch.clamp(yf - tau * g, 0, 1)
    bce = F.binary_cross_entropy_with_logits(zf, yt, reduction="none").mean(-1)
    s = torch.sigmoid(zf)
    dice = 1 - (2 * (s * yt).sum(-1) + smooth) / (s.sum(-1) + yt.sum(-1) + smooth)
    S = T.semantic_scale(zc, layout, True, eps, "paper", False)
    S = torch.where(torch.isnan(S), torch.zeros_like(S), S)
    if detach_scale:
        S = S.detach()
    R = (g.mean(dim=(0, 2)) ** 2 + ((g * g).mean(dim=(0, 2)) - sigma0**2) ** 2).sum()
    return (lambda_bce * bce + dice) / (1 + alpha * S) + beta * R


def resample_reference(array, affine, spacing, order):
    """``auvcore.data.io.resample`` as scipy computed it before it moved to torch (commit 72045eb:
    ``scipy.ndimage.affine_transform``, one thread): the oracle the torch resampling must equal bit for bit, and
    the "before" of bench/bench_host.py. ``order`` 0 (nearest, integer labels kept) or 1 (linear, float32)."""
    from scipy import ndimage

    from .data.io import voxel_spacing

    old, new = np.asarray(voxel_spacing(affine)), np.asarray(spacing)
    shape_out = tuple(np.maximum(1, np.round(np.asarray(array.shape) * old / new)).astype(int))
    scale = new / old
    offset = 0.5 * (scale - 1.0)
    if order == 0 and not np.issubdtype(array.dtype, np.floating):
        return ndimage.affine_transform(array, scale, offset=offset, output_shape=shape_out, order=0, mode="nearest")
    return ndimage.affine_transform(array.astype(np.float32), scale, offset=offset, output_shape=shape_out,
                                    order=order, mode="nearest", prefilter=False)


def mahalanobis_reference(X) -> np.ndarray:
    """The oracle of :class:`auvcore.baselines.MahalanobisScorer` for one class: the distance of each row of X
    (n × p) from the rows' mean under the dense Ledoit–Wolf shrunk covariance, inverted with ``pinv``."""
    X = np.asarray(X, dtype=np.float64)
    n, p = X.shape
    Xc = X - X.mean(0)
    S = Xc.T @ Xc / n
    mu = np.trace(S) / p
    d2 = np.sum((S - mu * np.eye(p)) ** 2) / p
    b2 = min(sum(np.sum((np.outer(x, x) - S) ** 2) for x in Xc) / (n * n * p), d2)
    shrink = b2 / d2 if d2 > 0 else 1.0
    prec = np.linalg.pinv(shrink * mu * np.eye(p) + (1 - shrink) * S, hermitian=True)
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", Xc, prec, Xc), 0.0))
