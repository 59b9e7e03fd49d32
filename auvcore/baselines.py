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
    classes with fewer than 2 voxels. ``image`` and ``label`` share a shape (any dimension)."""
    img = np.asarray(image, dtype=np.float64)
    lab = np.asarray(label)
    if img.shape != lab.shape:
        raise ValueError(f"image and label: shapes differ, {img.shape} vs {lab.shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    lab = lab.astype(np.int64).ravel()
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"label: values must lie in 0..{num_classes - 1}")
    x = img.ravel()
    n = np.bincount(lab, minlength=num_classes).astype(np.float64)
    s = np.bincount(lab, weights=x, minlength=num_classes)
    mu = np.divide(s, n, out=np.zeros_like(s), where=n > 0)
    # two-pass (centred) sum of squares: exact enough for HU-sized values
    ss = np.bincount(lab, weights=(x - mu[lab]) ** 2, minlength=num_classes)
    out = np.full(num_classes, np.nan)
    ok = n >= 2
    out[ok] = ss[ok] / (n[ok] - 1)
    return out


def _ledoit_wolf(X: np.ndarray) -> np.ndarray:
    """Ledoit–Wolf shrunk covariance of the rows of ``X`` (n × p): well conditioned even when
    n ≪ p, as with a few dozen cases and 512–1024-dim embeddings."""
    n, p = X.shape
    Xc = X - X.mean(0)
    S = Xc.T @ Xc / n
    mu = np.trace(S) / p
    d2 = np.sum((S - mu * np.eye(p)) ** 2) / p
    b2 = sum(np.sum((np.outer(x, x) - S) ** 2) for x in Xc) / (n * n * p)
    b2 = min(b2, d2)
    shrink = b2 / d2 if d2 > 0 else 1.0
    return shrink * mu * np.eye(p) + (1 - shrink) * S


class MahalanobisScorer:
    """Per-class Mahalanobis distance of class-mean embeddings.

    ``fit(means)`` takes the class-mean embeddings of all cases, ``[N, K, C]`` (NaN rows where a
    case lacks a class; e.g. stacked :func:`auvcore.encoders.class_means`), and estimates, for each
    class, the mean and a Ledoit–Wolf shrunk covariance over the cases that have it (at least 2).
    ``score(case_means [K, C])`` → ``[K]`` distances (NaN for classes absent from the case or
    unfitted). ``fit_score(means)`` → ``[N, K]``.
    """

    def __init__(self):
        self.mean_: list = []
        self.prec_: list = []

    def fit(self, means) -> "MahalanobisScorer":
        M = _as_np(means)
        if M.ndim != 3:
            raise ValueError(f"means: expected [N, K, C], got shape {M.shape}")
        N, K, C = M.shape
        self.mean_, self.prec_ = [], []
        for c in range(K):
            X = M[:, c]
            X = X[np.isfinite(X).all(axis=1)]
            if len(X) < 2:
                self.mean_.append(None)
                self.prec_.append(None)
                continue
            cov = _ledoit_wolf(X)
            self.mean_.append(X.mean(0))
            self.prec_.append(np.linalg.pinv(cov, hermitian=True))
        self.num_classes_, self.dim_ = K, C
        return self

    def score(self, case_means) -> np.ndarray:
        if not self.mean_:
            raise RuntimeError("MahalanobisScorer: call fit() first")
        m = _as_np(case_means)
        if m.shape != (self.num_classes_, self.dim_):
            raise ValueError(f"case_means: expected [{self.num_classes_}, {self.dim_}], got {m.shape}")
        out = np.full(self.num_classes_, np.nan)
        for c in range(self.num_classes_):
            if self.mean_[c] is None or not np.isfinite(m[c]).all():
                continue
            d = m[c] - self.mean_[c]
            out[c] = float(np.sqrt(max(d @ self.prec_[c] @ d, 0.0)))
        return out

    def fit_score(self, means) -> np.ndarray:
        self.fit(means)
        return np.stack([self.score(m) for m in _as_np(means)])


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
