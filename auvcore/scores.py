"""From scales to the Aleatoric Uncertainty Value and the filter (docs/method.md §2).

These work on small per-case tables ([N] or [N, K]) and run in float64 numpy; torch in, torch out.
"""
from __future__ import annotations

import numpy as np
import torch

DELTA = 1e-8


def _to_numpy(x, name: str, ndim: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    was_torch = isinstance(x, torch.Tensor)
    a = x.detach().cpu().double().numpy() if was_torch else np.asarray(x, dtype=np.float64)
    if a.ndim not in ndim:
        raise ValueError(f"{name}: expected {' or '.join(f'{d}-D' for d in ndim)} input, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: empty input of shape {a.shape}")
    if np.isinf(a).any():
        raise ValueError(f"{name}: contains Inf")
    return a, was_torch


def _back(a: np.ndarray, was_torch: bool):
    return torch.from_numpy(a) if was_torch else a


def _select(K: int, classes) -> list[int]:
    if classes is None:
        return list(range(1, K)) if K > 1 else [0]
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("classes: expected at least one class index")
    bad = [c for c in classes if not 0 <= c < K]
    if bad:
        raise ValueError(f"classes: indices {bad} are outside 0..{K - 1}")
    return classes


def sample_scale(S, classes=None, reduction: str = "mean"):
    """Sample scale S_i from per-class scales ``S`` [N, K]: mean (default) or sum over ``classes``
    (default: the foreground 1..K-1), NaN (absent classes) skipped; NaN if no selected class is present."""
    a, was_torch = _to_numpy(S, "S", (2,))
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    sel = a[:, _select(a.shape[1], classes)]
    present = ~np.isnan(sel)
    total = np.where(present, sel, 0.0).sum(axis=1)
    n = present.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / n if reduction == "mean" else total
    out = np.where(n > 0, out, np.nan)
    return _back(out, was_torch)


def _normalised_log(x: np.ndarray) -> np.ndarray:
    """AUV = 1 - (log(x+δ) - min) / (max - min + δ) over the finite entries of x; NaN stays NaN."""
    out = np.full_like(x, np.nan)
    ok = ~np.isnan(x)
    if not ok.any():
        return out
    if (x[ok] < 0).any():
        raise ValueError("sample_scales: expected scales >= 0 (S is an entropy ratio in [0, 1])")
    lg = np.log(x[ok] + DELTA)
    lo, hi = lg.min(), lg.max()
    out[ok] = 1.0 - (lg - lo) / (hi - lo + DELTA)
    return out


def auv(sample_scales):
    """AUV_i of every case from the sample scales [N] of the **whole** scored set (docs/method.md §2). 1 = most
    uncertain. Cases with a NaN scale get NaN. Given [N, K], the per-class AUV over the cases holding
    each class."""
    a, was_torch = _to_numpy(sample_scales, "sample_scales", (1, 2))
    if a.ndim == 1:
        return _back(_normalised_log(a), was_torch)
    return _back(np.stack([_normalised_log(a[:, k]) for k in range(a.shape[1])], axis=1), was_torch)


def check_quantile(q) -> float:
    q = float(q)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile: expected a value in (0, 1], got {q}")
    return q


def inverted_cdf_quantile(values: np.ndarray, q: float) -> float:
    """Q(q) = inf{a : q <= F(a)} of the non-NaN values (numpy's 'inverted_cdf')."""
    v = values[~np.isnan(values)]
    if v.size == 0:
        return float("nan")
    return float(np.quantile(v, q, method="inverted_cdf"))


def keep_mask(auv_values, quantile: float = 0.95):
    """Global filter (eq. 7–8): keep case i iff AUV_i <= Q(quantile). Cases with NaN AUV (no scored class)
    are kept: there is no evidence against them. Returns a bool mask [N]."""
    a, was_torch = _to_numpy(auv_values, "auv", (1,))
    q = check_quantile(quantile)
    cut = inverted_cdf_quantile(a, q)
    keep = np.isnan(a) | (a <= cut)
    return _back(keep, was_torch)


def keep_mask_per_class(class_auv, quantile: float = 0.95, classes=None):
    """Per-class filter (eq. 9): keep case i iff for every selected class c present in i (non-NaN AUV),
    AUV_{i,c} <= Q_c(quantile). ``class_auv`` is [N, K]; ``classes`` defaults to the foreground 1..K-1."""
    a, was_torch = _to_numpy(class_auv, "class_auv", (2,))
    q = check_quantile(quantile)
    keep = np.ones(a.shape[0], dtype=bool)
    for c in _select(a.shape[1], classes):
        col = a[:, c]
        cut = inverted_cdf_quantile(col, q)
        keep &= np.isnan(col) | (col <= cut)
    return _back(keep, was_torch)


class AUVAccumulator:
    """Scores a data set too large for one call: feed per-class scales batch by batch, read the AUVs once
    all are in (min and max over the whole set, never per batch).

    >>> acc = AUVAccumulator(classes=None, reduction="mean")
    >>> acc.update(["case0", "case1"], S_batch)      # S_batch [2, K]
    >>> acc.sample_auv()                               # dict case -> AUV
    """

    def __init__(self, classes=None, reduction: str = "mean"):
        self.classes = classes
        self.reduction = reduction
        self._ids: list[str] = []
        self._rows: list[np.ndarray] = []
        self._seen: set[str] = set()

    def update(self, case_ids, S) -> None:
        a, _ = _to_numpy(S, "S", (2,))
        case_ids = [str(c) for c in case_ids]
        if len(case_ids) != a.shape[0]:
            raise ValueError(f"case_ids: {len(case_ids)} ids for {a.shape[0]} rows of S")
        if self._rows and a.shape[1] != self._rows[0].shape[0]:
            raise ValueError(f"S: expected {self._rows[0].shape[0]} classes like earlier batches, got {a.shape[1]}")
        dup = [c for c in case_ids if c in self._seen] + [c for c in case_ids if case_ids.count(c) > 1]
        if dup:
            raise ValueError(f"case_ids: {sorted(set(dup))} already added")
        self._ids += case_ids
        self._seen.update(case_ids)
        self._rows += list(a)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def case_ids(self) -> list[str]:
        return list(self._ids)

    def scales(self) -> np.ndarray:
        if not self._rows:
            raise ValueError("AUVAccumulator: no cases added")
        return np.stack(self._rows)

    def sample_scales(self) -> np.ndarray:
        return sample_scale(self.scales(), self.classes, self.reduction)

    def sample_auv(self) -> dict[str, float]:
        return dict(zip(self._ids, auv(self.sample_scales()).tolist()))

    def class_auv(self) -> np.ndarray:
        """[N, K] per-class AUV, rows in the order cases were added."""
        return auv(self.scales())
