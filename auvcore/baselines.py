"""Baseline scorers the paper compares AUV with (Tables 1, 3, 4).

* :func:`intensity_variance` — per-class variance of the image intensities (higher = more
  heterogeneous class = more uncertain).
* :class:`MahalanobisScorer` — Mahalanobis distance of a case's class-mean embedding to the data
  set's distribution of that class's mean embeddings (higher = more atypical = more uncertain).

What the Mahalanobis score is: an **image/feature outlier score**. It says how unlike the rest of the set a
case's embeddings are, which unusual or degraded images move more than most label errors do; the main job
presents it as such (the table's ``mahalanobis_score``, ``auvcore filter --score outlier``, its own report
panel). For label errors the out-of-fold score of :mod:`auvcore.qc` is the one that works (bench/RESULTS.md:
AUROC 0.82-0.97 against 0.53-0.80 for this score on the corrupted labels of the demo cohorts).
"""
from __future__ import annotations

import numpy as np
import torch


def intensity_variance(image, label, num_classes: int) -> np.ndarray:
    """Variance of ``image`` intensities inside each class of ``label``: ``[K]`` float64, NaN for
    classes with fewer than 2 voxels. ``image`` and ``label`` (numpy arrays or CPU tensors) share a shape
    (any dimension). Two passes in C++ (the centred sum of squares, exact for HU-sized offsets)."""
    from . import _cpu
    from ._backend import as_tensor

    img, _ = as_tensor(image if isinstance(image, (torch.Tensor, np.ndarray)) else np.asarray(image), "image")
    lab, _ = as_tensor(label if isinstance(label, (torch.Tensor, np.ndarray)) else np.asarray(label), "label")
    if tuple(img.shape) != tuple(lab.shape):
        raise ValueError(f"image and label: shapes differ, {tuple(img.shape)} vs {tuple(lab.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    if lab.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        lab = lab.to(torch.int64)  # e.g. float labels holding class indices, truncated as numpy's astype did
    if img.dtype not in (torch.float32, torch.float64):
        img = img.to(torch.float64)
    n, _, ss = _cpu.class_moments(img.cpu(), lab.cpu(), int(num_classes))
    n, ss = n.numpy(), ss.numpy()
    out = np.full(int(num_classes), np.nan)
    ok = n >= 2
    out[ok] = ss[ok] / (n[ok] - 1)
    return out


def _ledoit_wolf(X: np.ndarray):
    """Ledoit–Wolf shrinkage of the covariance of the rows of ``X`` (n × p), kept in factored form.

    The shrunk covariance is ``Σ = a·I + b·S`` with ``S = Xcᵀ Xc / n`` (Xc: the centred rows), which is well
    conditioned even when n ≪ p (a few dozen cases, 512–1024-dim embeddings). Returns ``(mean, a, b, Q, e)``
    with ``S = Q diag(e / n) Qᵀ`` (Q: p × r orthonormal, e > 0): everything, including Ledoit and Wolf's
    shrinkage intensity, comes from the thin eigendecomposition of the smaller Gram (n × n or p × p), so
    neither the p × p covariance nor its inverse is formed. Why: the dense form cost ~30 ms per case in the
    main job's table (issue 23); this one, microseconds. The dense formula is the oracle in the tests.
    """
    n, p = X.shape
    mean = X.mean(0)
    Xc = X - mean
    if n <= p:  # Xc = V diag(√e) Qᵀ from the n × n Gram
        e, V = np.linalg.eigh(Xc @ Xc.T)
        keep = e > max(e[-1], 0.0) * n * np.finfo(float).eps
        e, V = e[keep], V[:, keep]
        Q = (Xc.T @ V) / np.sqrt(e)
    else:  # Q, e straight from the p × p one
        e, Q = np.linalg.eigh(Xc.T @ Xc)
        keep = e > max(e[-1], 0.0) * p * np.finfo(float).eps
        e, Q = e[keep], Q[:, keep]
    s = e / n  # the nonzero eigenvalues of S
    mu = s.sum() / p  # trace(S) / p
    d2 = (np.sum(s * s) - 2 * mu * s.sum() + mu * mu * p) / p  # ‖S − μI‖² / p
    # b2 = Σ_i ‖x_i x_iᵀ − S‖² / (n² p), expanded: ‖x_i‖⁴ − 2 x_iᵀ S x_i + ‖S‖²
    Y = Xc @ Q
    sq = np.einsum("ij,ij->i", Xc, Xc)
    b2 = (np.sum(sq * sq) - 2 * np.sum((Y * Y) @ s) + n * np.sum(s * s)) / (n * n * p)
    b2 = min(max(b2, 0.0), d2)
    shrink = b2 / d2 if d2 > 0 else 1.0
    return mean, shrink * mu, 1.0 - shrink, Q, e


class MahalanobisScorer:
    """Per-class Mahalanobis distance of class-mean embeddings.

    ``fit(means)`` takes the class-mean embeddings of all cases, ``[N, K, C]`` (NaN rows where a
    case lacks a class; e.g. stacked :func:`auvcore.encoders.class_means`), and estimates, for each
    class, the mean and a Ledoit–Wolf shrunk covariance over the cases that have it (at least 2).
    ``score(case_means [K, C])`` → ``[K]`` distances (NaN for classes absent from the case or
    unfitted). ``fit_score(means)`` → ``[N, K]``. The distance uses the pseudo-inverse of the shrunk
    covariance (its eigenvalues below 1e-15 of the largest dropped, as ``numpy.linalg.pinv``), applied in
    the covariance's eigenbasis: a p × r projection per case rather than a p × p precision matrix.
    """

    def __init__(self):
        self.fits_: list = []

    def fit(self, means) -> "MahalanobisScorer":
        M = _as_np(means)
        if M.ndim != 3:
            raise ValueError(f"means: expected [N, K, C], got shape {M.shape}")
        N, K, C = M.shape
        self.fits_ = []
        for c in range(K):
            X = M[:, c]
            X = X[np.isfinite(X).all(axis=1)]
            if len(X) < 2:
                self.fits_.append(None)
                continue
            mean, a, b, Q, e = _ledoit_wolf(X)
            sig = a + b * e / len(X)  # Σ's eigenvalues on span(Q); a on the rest
            tol = 1e-15 * max(sig.max(initial=0.0), a)
            keep = sig > tol  # all of them when a > tol
            self.fits_.append((mean, Q[:, keep], sig[keep], a if a > tol else 0.0))
        self.num_classes_, self.dim_ = K, C
        return self

    def score(self, case_means) -> np.ndarray:
        if not self.fits_:
            raise RuntimeError("MahalanobisScorer: call fit() first")
        m = _as_np(case_means)
        if m.shape != (self.num_classes_, self.dim_):
            raise ValueError(f"case_means: expected [{self.num_classes_}, {self.dim_}], got {m.shape}")
        return self._distances(m[None])[0]

    def fit_score(self, means) -> np.ndarray:
        self.fit(means)
        return self._distances(_as_np(means))

    def _distances(self, M: np.ndarray) -> np.ndarray:
        """[N, K, C] → [N, K]: dᵀ pinv(Σ) d per case and class, with d = the case's mean − the class mean."""
        out = np.full(M.shape[:2], np.nan)
        for c, fit in enumerate(self.fits_):
            if fit is None:
                continue
            mean, Q, sig, a = fit
            ok = np.isfinite(M[:, c]).all(axis=1)
            d = M[ok, c] - mean
            q = d @ Q
            d2 = (q * q) @ (1.0 / sig)
            if a > 0:  # the complement of span(Q) has eigenvalue a (pinv drops it when a = 0)
                d2 = d2 + np.maximum(np.einsum("ij,ij->i", d, d) - np.sum(q * q, 1), 0.0) / a
            out[ok, c] = np.sqrt(np.maximum(d2, 0.0))
        return out


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
