"""How one case varies from its source volume: the realistic differences between the cases of a cohort.

Numbers for the chest; every source has its own field of view, voxel sizes and slice axis (``sources.SPECS``):

* geometry: a random rigid+scale transform (rotation up to ±8° about the slice axis and ±3°
  about the others, scale 0.92–1.08, shift ±12 mm) composed with a smooth elastic displacement
  (up to ~4 mm), sampled on a field of view of ``size_mm`` around the anatomy;
* resolution: the case's own voxel size (in-plane 1.5–2.5 mm, slices 3–5 mm) and a slice-profile
  blur along Z;
* intensity: CT: a smooth multiplicative bias field (±8 % of the attenuation above air) and Gaussian
  noise (σ 5–25 HU); MR: a random gain, a stronger smooth bias field (±5–15 %) and Rician noise
  (σ 1–4 % of the source's 99th percentile), stored as int16 with that percentile at about 1000.

Label maps go through the same geometry (nearest neighbour). This is the variation every case has; the
recorded defects (``corruptions``: the label; ``degradations``: the image) come on top of it.
"""
from __future__ import annotations

import numpy as np

from ..io import voxel_spacing
from .sources import SPECS, Spec


def smooth_field(rng, shape, coarse, amp):
    """A smooth random field on ``shape`` from Gaussian noise on a ``coarse`` grid (trilinear)."""
    from scipy import ndimage

    c = rng.standard_normal(coarse) * amp
    return ndimage.zoom(c, [s / k for s, k in zip(shape, coarse)], order=1, mode="nearest", grid_mode=False)


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def make_case(rng, img, lab, aff, size_mm, spec: Spec | None = None, modality: str = "CT",
               ref: float | None = None):
    """One varied (image, label, affine) from the source volume.

    ``spec``: the source's variation ranges (default: the chest's). ``modality``: "CT" (HU) or "MR"
    (``ref``: the source's 99th intensity percentile, which lands at about 1000 × the case's gain).
    """
    from scipy import ndimage

    spec = SPECS["chest"] if spec is None else spec
    ax = spec.slice_axis
    spacing = np.array([rng.uniform(*spec.inplane)] * 3)
    spacing[ax] = rng.uniform(*spec.slice)
    shape = np.maximum(8, np.round(np.asarray(size_mm) / spacing)).astype(int)
    fg = np.argwhere(lab > 0)
    center_vox = (fg.min(0) + fg.max(0)) / 2.0
    along = np.ones(3)
    along[ax] = 1.5
    center = aff[:3, :3] @ center_vox + aff[:3, 3] + rng.uniform(-spec.shift_mm, spec.shift_mm, 3) * along
    R = _rotation(*np.deg2rad([rng.uniform(-d, d) for d in spec.rot_deg]))
    A = R * rng.uniform(0.92, 1.08)
    # Output voxel -> world: an axis-aligned RAS grid centred on `center`.
    out_aff = np.eye(4)
    out_aff[:3, :3] = np.diag(spacing)
    out_aff[:3, 3] = center - spacing * (shape - 1) / 2.0
    # World point p of the case comes from source world point c + A (p - c) + elastic(p).
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), 0)
    world = np.tensordot(out_aff[:3, :3], grid, axes=1) + out_aff[:3, 3][:, None, None, None]
    del grid
    src_world = np.tensordot(A, world - center[:, None, None, None], axes=1) + center[:, None, None, None]
    del world
    amp = rng.uniform(1.5, 4.0)
    coarse = [4, 4, 4]
    coarse[ax] = 3
    for d in range(3):
        src_world[d] += smooth_field(rng, tuple(shape), tuple(coarse), amp / 2).astype(np.float32)
    inv = np.linalg.inv(aff)
    src_vox = np.tensordot(inv[:3, :3], src_world, axes=1) + inv[:3, 3][:, None, None, None]
    del src_world
    # Thicker slices than the source are mimicked by a slice-profile blur before sampling.
    src_sp = np.asarray(voxel_spacing(aff))
    # the source axis that lies closest to the case's slice axis (the sources are near axis-aligned)
    sax = int(np.argmax(np.abs(aff[:3, :3][ax])))
    sigma_z = max(0.0, (spacing[ax] / src_sp[sax] - 1.0) * 0.4)
    src_img = ndimage.gaussian_filter1d(img, sigma_z, axis=sax) if sigma_z > 0.05 else img
    bg = -1000.0 if modality == "CT" else 0.0
    out_img = ndimage.map_coordinates(src_img, src_vox, order=1, mode=spec.outside, cval=bg, prefilter=False)
    out_lab = ndimage.map_coordinates(lab, src_vox, order=0, mode=spec.outside, cval=0)
    del src_vox
    params = {"spacing": [round(float(s), 4) for s in spacing], "shape": [int(s) for s in shape],
              "scale": round(float(np.cbrt(np.linalg.det(A))), 4), "elastic_mm": round(float(amp), 3)}
    if modality == "CT":
        bias_amp, noise = rng.uniform(0.02, 0.08), rng.uniform(5, 25)
        bias = np.exp(smooth_field(rng, tuple(shape), (3, 3, 3), bias_amp))
        out_img = (out_img + 1000.0) * bias - 1000.0 + rng.normal(0, noise, out_img.shape)
        params.update(bias=round(float(bias_amp), 4), noise_hu=round(float(noise), 2),
                      slice_blur_vox=round(float(sigma_z), 3))
        out_img = np.clip(np.round(out_img), -1024, 3071)
    else:
        ref = float(np.percentile(img[img > 0], 99)) if ref is None else float(ref)
        gain, bias_amp, noise = rng.uniform(0.7, 1.4), rng.uniform(0.05, 0.15), rng.uniform(0.01, 0.04)
        bias = np.exp(smooth_field(rng, tuple(shape), (3, 3, 3), bias_amp))
        sig = np.clip(out_img, 0, None) * (1000.0 * gain / ref) * bias
        sd = noise * 1000.0
        # magnitude images: Rician noise (two Gaussian channels), so the background is not zero
        out_img = np.hypot(sig + rng.normal(0, sd, sig.shape), rng.normal(0, sd, sig.shape))
        params.update(gain=round(float(gain), 4), bias=round(float(bias_amp), 4),
                      noise_rel=round(float(noise), 4), slice_blur_vox=round(float(sigma_z), 3))
        out_img = np.clip(np.round(out_img), 0, 32767)
    return out_img.astype(np.int16), out_lab.astype(np.uint8), out_aff, params