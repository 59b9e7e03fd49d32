"""Intensity windowing, foreground crop/pad and the annotation-normalized image x̂ (docs/method.md §2)."""
from __future__ import annotations

import numpy as np

# Common CT windows (centre, width) in Hounsfield units.
CT_WINDOWS = {
    "merlin": (0.0, 2000.0),  # -1000..1000, the Merlin/Astra pre-training window
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "abdomen": (60.0, 360.0),
}


def window_ct(image: np.ndarray, lo: float = -1000.0, hi: float = 1000.0) -> np.ndarray:
    """Clip HU to ``[lo, hi]`` and map linearly to ``[0, 1]`` (float32)."""
    if not hi > lo:
        raise ValueError(f"window: expected lo < hi, got lo={lo}, hi={hi}")
    out = (np.asarray(image, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def window_named(image: np.ndarray, name: str) -> np.ndarray:
    """``window_ct`` with one of :data:`CT_WINDOWS` (``"merlin"``, ``"soft_tissue"``, ...)."""
    if name not in CT_WINDOWS:
        raise ValueError(f"window: unknown name {name!r} (have {sorted(CT_WINDOWS)})")
    c, w = CT_WINDOWS[name]
    return window_ct(image, c - w / 2, c + w / 2)


def scale_percentile(image: np.ndarray, lower: float = 0.5, upper: float = 99.5, mask=None) -> np.ndarray:
    """MR intensity scaling: map the ``lower``/``upper`` percentiles (of ``mask`` voxels if given,
    else of all non-zero voxels) to 0/1 and clip to ``[0, 1]`` (float32)."""
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"percentiles: expected 0 <= lower < upper <= 100, got {lower}, {upper}")
    x = np.asarray(image, dtype=np.float32)
    vals = x[mask] if mask is not None else x[x != 0]
    if vals.size == 0:
        vals = x.ravel()
    lo, hi = np.percentile(vals, [lower, upper])
    if hi <= lo:
        return np.zeros_like(x)
    out = (x - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def normalized_image(image: np.ndarray, label: np.ndarray, clip: float = 5.0) -> np.ndarray:
    """The annotation-normalized image x̂ of docs/method.md §2.

    Intensities are z-scored with the mean and standard deviation of the voxels inside the union of
    the annotated foreground (``label > 0``) and clipped to ``[-clip, clip]`` (default ±5).
    Returned as float32 with the shape of ``image``.

    Choices the spec leaves open: a label with no foreground voxel falls back to the statistics of
    the whole image (so an unannotated case still gets a finite x̂); a constant foreground
    (std 0) uses std = 1.
    """
    image = np.asarray(image)
    label = np.asarray(label)
    if image.shape != label.shape:
        raise ValueError(f"image and label: shapes differ, {image.shape} vs {label.shape}")
    x = image.astype(np.float32, copy=False)
    fg = label > 0
    vals = x[fg] if fg.any() else x.ravel()
    mu = float(vals.mean(dtype=np.float64))
    sd = float(vals.std(dtype=np.float64))
    if not np.isfinite(sd) or sd <= 0:
        sd = 1.0
    out = (x - np.float32(mu)) / np.float32(sd)
    return np.clip(out, -clip, clip, out=out).astype(np.float32, copy=False)


def foreground_bbox(label: np.ndarray, margin: int | tuple[int, int, int] = 0) -> tuple[slice, slice, slice] | None:
    """Slices of the bounding box of ``label > 0`` grown by ``margin`` voxels (clamped to the
    array); ``None`` when there is no foreground."""
    fg = np.asarray(label) > 0
    if not fg.any():
        return None
    m = np.broadcast_to(np.asarray(margin, dtype=int), (3,))
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(fg.any(axis=other))
        out.append(slice(max(0, idx[0] - m[ax]), min(fg.shape[ax], idx[-1] + 1 + m[ax])))
    return tuple(out)


def crop_or_pad(
    array: np.ndarray, shape: tuple[int, int, int], center=None, pad_value: float = 0.0
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Cut or pad ``array`` to exactly ``shape`` around ``center`` (voxel coordinates; default the
    array centre). Returns ``(out, start)`` where ``start[i]`` is the index in ``array`` of
    ``out[0, 0, 0]`` along axis i (negative where padded), so the same window can be applied to
    the label map or mapped back."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape: expected three positive ints, got {shape!r}")
    if center is None:
        center = [s / 2 for s in array.shape]
    start = tuple(int(round(c - s / 2)) for c, s in zip(center, shape))
    # Keep the window inside the array where the array is big enough (no needless padding).
    start = tuple(
        min(max(st, 0), n - s) if n >= s else -((s - n) // 2) for st, s, n in zip(start, shape, array.shape)
    )
    out = np.full(shape, pad_value, dtype=array.dtype)
    src, dst = [], []
    for st, s, n in zip(start, shape, array.shape):
        a0, a1 = max(st, 0), min(st + s, n)
        src.append(slice(a0, a1))
        dst.append(slice(a0 - st, a1 - st))
    out[tuple(dst)] = array[tuple(src)]
    return out, start


def foreground_center(label: np.ndarray) -> tuple[float, float, float] | None:
    """Centre of the foreground bounding box in voxel coordinates, ``None`` without foreground."""
    bb = foreground_bbox(label)
    if bb is None:
        return None
    return tuple((s.start + s.stop) / 2 for s in bb)
