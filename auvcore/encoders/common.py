"""Encoder-independent pieces: labels onto a feature grid, ``encode_case``, prototype maps."""
from __future__ import annotations

import warnings

import numpy as np
import torch


HU_WINDOW = (-1000.0, 1000.0)  # Merlin's CT window
XHAT_RANGE = (-5.0, 5.0)  # the annotation-normalized image x̂ is clipped to this


def ct_input(volume_hu, normalized: bool = False) -> torch.Tensor:
    """``[X, Y, Z]`` volume → ``[1, 1, X, Y, Z]`` float32 input in 0..1: HU −1000..1000 (Merlin's window),
    or, with ``normalized=True``, the annotation-normalized x̂ (−5..5), each mapped linearly to 0..1."""
    v = np.asarray(volume_hu, dtype=np.float32)
    if v.ndim != 3:
        raise ValueError(f"volume_hu: expected a 3-D [X, Y, Z] array, got shape {v.shape}")
    lo, hi = XHAT_RANGE if normalized else HU_WINDOW
    x = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]


def labels_to_grid(label, grid_shape, num_classes: int | None = None, mode: str = "majority",
                   stride=None) -> np.ndarray:
    """Bring an integer label map ``[X, Y, Z]`` onto a coarser (or equal) grid ``grid_shape``.

    Voxel ``i`` along an axis of length ``n`` falls in grid cell ``i // stride`` when the
    encoder's ``stride`` is given and ``g == ceil(n / stride)`` (strided convolutions), else in
    ``floor(i * g / n)``. ``mode="majority"``: each cell gets
    the most frequent label of its voxels (ties → the smaller label); ``"nearest"``: the label of
    the voxel nearest the cell centre. Either way only labels that occur in ``label`` appear.
    """
    lab = np.asarray(label)
    if lab.ndim != 3:
        raise ValueError(f"label: expected [X, Y, Z], got shape {lab.shape}")
    g = tuple(int(s) for s in grid_shape)
    if len(g) != 3 or any(s < 1 or s > n for s, n in zip(g, lab.shape)):
        raise ValueError(f"grid_shape: expected 3 sizes in 1..{lab.shape}, got {grid_shape!r}")
    if mode == "nearest":
        st = (None,) * 3 if stride is None else tuple(stride)
        idx = [
            np.minimum(np.arange(s) * t + t // 2, n - 1) if t and s == -(-n // t)
            else np.minimum(((np.arange(s) + 0.5) * n / s).astype(int), n - 1)
            for s, n, t in zip(g, lab.shape, st)
        ]
        return lab[np.ix_(*idx)].astype(np.int64)
    if mode != "majority":
        raise ValueError(f"mode: expected 'majority' or 'nearest', got {mode!r}")
    lab = lab.astype(np.int64, copy=False)
    if lab.min(initial=0) < 0:
        raise ValueError("label: negative values")
    K = int(num_classes) if num_classes is not None else int(lab.max(initial=0)) + 1
    if lab.max(initial=0) >= K:
        raise ValueError(f"label: value {lab.max()} >= num_classes {K}")
    st = (None,) * 3 if stride is None else tuple(stride)
    cells = [
        np.arange(n) // t if t and s == -(-n // t) else (np.arange(n) * s) // n
        for s, n, t in zip(g, lab.shape, st)
    ]
    flat = (cells[0][:, None, None] * g[1] + cells[1][None, :, None]) * g[2] + cells[2][None, None, :]
    counts = np.bincount((flat * K + lab).ravel(), minlength=int(np.prod(g)) * K).reshape(-1, K)
    return counts.argmax(axis=1).reshape(g)


def _grid_for(shape, stride):
    return tuple(-(-n // s) for n, s in zip(shape, stride))


def tiled_forward(encoder, x: torch.Tensor, tile, halo=None) -> torch.Tensor:
    """Run ``encoder`` on ``x [1, 1, X, Y, Z]`` tile by tile and stitch the feature maps.

    Each tile's core (``tile − 2·halo`` voxels per axis, a multiple of ``encoder.stride``) is
    taken from a forward pass over the core plus ``halo`` voxels of context on each side, so the
    result equals the whole-volume forward wherever the encoder's receptive field fits in the
    halo. ``halo`` defaults to a quarter of the tile (rounded to the stride).
    """
    stride = tuple(getattr(encoder, "stride", None) or ())
    if len(stride) != 3:
        raise ValueError("encoder: tiling needs an encoder with a known 3-D stride")
    n = tuple(x.shape[2:])
    tile = tuple(max(s, (int(t) // s) * s) for t, s in zip(tile, stride))
    if halo is None:
        halo = tuple((t // 4 // s) * s for t, s in zip(tile, stride))
    halo = tuple(int(h) for h in np.broadcast_to(halo, (3,)))
    core = tuple(t - 2 * h for t, h in zip(tile, halo))
    if any(c < s or h % s for c, h, s in zip(core, halo, stride)):
        raise ValueError(f"halo: {halo} must be multiples of the stride {stride} leaving a core in each tile of {tile}")
    grid = tuple(-(-a // s) for a, s in zip(n, stride))
    out = None
    starts = [range(0, a, c) for a, c in zip(n, core)]
    for s0 in starts[0]:
        for s1 in starts[1]:
            for s2 in starts[2]:
                st = (s0, s1, s2)
                w0 = tuple(max(0, a - h) for a, h in zip(st, halo))
                w1 = tuple(min(m, a + c + h) for a, c, h, m in zip(st, core, halo, n))
                f = encoder(x[:, :, w0[0]:w1[0], w0[1]:w1[1], w0[2]:w1[2]])
                if out is None:
                    out = torch.empty((f.shape[0], f.shape[1]) + grid, dtype=f.dtype, device=f.device)
                g0 = tuple(a // s for a, s in zip(st, stride))
                g1 = tuple(min(g, -(-min(m, a + c) // s)) for g, a, c, m, s in zip(grid, st, core, n, stride))
                off = tuple((a - w) // s for a, w, s in zip(st, w0, stride))
                out[:, :, g0[0]:g1[0], g0[1]:g1[1], g0[2]:g1[2]] = f[
                    :, :, off[0]:off[0] + g1[0] - g0[0], off[1]:off[1] + g1[1] - g0[1], off[2]:off[2] + g1[2] - g0[2]]
    return out


def encode_case(encoder, volume, input: str = "raw", label_mode: str = "majority",
                num_classes: int | None = None, large: str = "crop"):
    """Encode one loaded case and bring its labels onto the feature grid.

    Parameters
    ----------
    encoder : an auvcore encoder (``preprocess`` + ``__call__``; e.g. :class:`MerlinEncoder`).
    volume : :class:`auvcore.data.Volume` at the encoder's spacing (``load_case(case,
        spacing=encoder.spacing)``).
    input : ``"raw"`` feeds the windowed raw image; ``"normalized"`` the annotation-normalized
        image x̂ (docs/method.md §2). For an MR volume (``volume.modality == "MR"``) "raw" means percentile
        scaling (0.5–99.5 % of the non-zero voxels → 0..1), handed to the encoder as pseudo-HU
        −1000..1000 so the CT window of :meth:`preprocess` maps it back to 0..1.
    label_mode : ``"majority"`` (default) or ``"nearest"``, see :func:`labels_to_grid`.

    large : what to do with volumes larger than ``encoder.max_shape``: ``"crop"`` (default) crops
        image and label around the foreground to that size; ``"tile"`` encodes the whole volume
        in overlapping tiles of that size (:func:`tiled_forward`).
 Returns ``(features [1, C, *grid] float32, labels [1, *grid] int64)``, both on the encoder's
    device (a GPU encoder's features stay on the GPU for the CUDA scale).
    """
    from ..data.preprocess import crop_or_pad, foreground_center, normalized_image, scale_percentile

    if input not in ("raw", "normalized"):
        raise ValueError(f"input: expected 'raw' or 'normalized', got {input!r}")
    image, label = volume.image, volume.label
    if label is None:
        raise ValueError(f"case {getattr(volume, 'case_id', '')!r}: encode_case needs a label map")
    if image.shape != label.shape:
        raise ValueError(f"case {volume.case_id!r}: image {image.shape} and label {label.shape} differ")
    want = getattr(encoder, "spacing", None)
    have = getattr(volume, "spacing", None)
    if want is not None and have is not None and not np.allclose(want, have, rtol=0.01):
        warnings.warn(f"case {volume.case_id!r}: spacing {tuple(have)} mm differs from the encoder's {tuple(want)} mm; "
                      f"load it with load_case(case, spacing={tuple(want)})", stacklevel=2)
    if large not in ("crop", "tile"):
        raise ValueError(f"large: expected 'crop' or 'tile', got {large!r}")
    max_shape = getattr(encoder, "max_shape", None)
    too_big = max_shape is not None and any(n > m for n, m in zip(image.shape, max_shape))
    if too_big and large == "crop":
        shape = tuple(min(n, m) for n, m in zip(image.shape, max_shape))
        center = foreground_center(label)
        image, _ = crop_or_pad(image, shape, center)
        label, _ = crop_or_pad(label, shape, center)
    if input == "normalized":
        x = encoder.preprocess(normalized_image(image, label), normalized=True)
    elif getattr(volume, "modality", "CT") == "MR":
        x = encoder.preprocess(scale_percentile(image) * 2000.0 - 1000.0)
    else:
        x = encoder.preprocess(image)
    # Encoders that decode with prompts (SAM2) take the label map as their box source.
    if getattr(encoder, "needs_label", False):
        feats = encoder(x, label)
    elif too_big and large == "tile":
        feats = tiled_forward(encoder, x, max_shape)
    else:
        feats = encoder(x)
    if isinstance(feats, dict):
        raise ValueError("encoder: returned several feature maps; pick one layer for encode_case")
    feats = feats.float()
    grid = tuple(feats.shape[2:])
    lab = labels_to_grid(label, grid, num_classes, label_mode, stride=getattr(encoder, "stride", None))
    return feats, torch.from_numpy(lab)[None].to(feats.device)


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean embedding of each class: ``[1, C, *g]``, ``[1, *g]`` → ``[K, C]`` (NaN rows for
    classes with no voxel), on the features' device."""
    f, lab = _check_fl(features, labels, num_classes)
    C = f.shape[0]
    # voxels as contiguous float64 rows, cast and transposed in one copy (4x faster on the CPU than index_add_
    # reading the transposed view); index_add_ then sums each class's rows in voxel order, as it always did
    rows = f.reshape(C, -1).T.to(torch.float64, memory_format=torch.contiguous_format)
    l = lab.reshape(-1)
    sums = torch.zeros(num_classes, C, dtype=torch.float64, device=rows.device).index_add_(0, l, rows)
    cnt = torch.bincount(l, minlength=num_classes).double()[:, None]
    out = sums / cnt
    out[cnt[:, 0] == 0] = float("nan")
    return out.float()


def _check_fl(features, labels, num_classes):
    if not isinstance(features, torch.Tensor) or features.dim() < 3 or features.shape[0] != 1:
        raise ValueError(f"features: expected a tensor [1, C, *grid], got {getattr(features, 'shape', type(features))}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (1,) + tuple(features.shape[2:]):
        raise ValueError(
            f"labels: expected [1, *grid] = {(1,) + tuple(features.shape[2:])}, got {getattr(labels, 'shape', type(labels))}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    lab = labels[0].long()
    if lab.numel() and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"labels: values must lie in 0..{num_classes - 1}, got {lab.min().item()}..{lab.max().item()}")
    return features[0], lab


def prototype_maps(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class-wise decoded maps from any embedding encoder by prototype similarity.

    For each class c present in ``labels``, its prototype is the mean embedding of the case's
    voxels labelled c; the map is the cosine similarity of every voxel's embedding with it.
    ``[1, C, *grid]``, ``[1, *grid]`` → ``[1, K, *grid]`` float32 in [−1, 1]. Classes absent from
    the case get all-NaN maps: their semantic scale is undefined (skip them, as docs/method.md §1 does for
    absent classes in masked mode).
    """
    f, lab = _check_fl(features, labels, num_classes)
    C = f.shape[0]
    protos = class_means(features, labels, num_classes)  # [K, C]
    flat = f.reshape(C, -1).float()
    fn = flat / flat.norm(dim=0, keepdim=True).clamp_min(1e-12)
    pn = protos / protos.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = pn.nan_to_num(0.0) @ fn  # [K, N]
    sims[torch.isnan(protos[:, 0])] = float("nan")
    return sims.reshape((1, num_classes) + tuple(f.shape[1:]))
