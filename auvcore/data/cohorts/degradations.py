"""Image degradations: what goes wrong with an acquisition, applied to one case's image and recorded.

A cohort built with ``degrade`` keeps its labels clean (unless label corruption is asked for as well) and
gives a recorded subset of ``round(degrade_fraction · n_cases)`` cases a degraded image, one kind per case,
the chosen kinds cycled in their order like the label corruptions'. The kinds (``DEGRADATIONS``; sizes at the
``"default"`` strength, mild / strong in ``_STRENGTH``):

* ``"noise"``: added noise, Gaussian for CT and Rician for MR (the magnitude of two noisy channels, so the
  background is not zero), σ 5–8 % of the image's scale (1000 HU for CT, i.e. 50–80 HU; the 99th intensity
  percentile for MR); every case already has its own milder noise (``variation``);
* ``"blur"``: a Gaussian blur of σ 1.5–2.5 mm along every axis (voxels: σ / spacing);
* ``"motion"``: the subject moved during the acquisition: the k-space lines along one in-plane
  (phase-encoding) axis come, in segments, from the image rigidly moved (one or two moves, each a rotation
  about the slice axis of half to all of m and an in-plane shift of up to m mm per axis, m 4–6: degrees and mm),
  so the image shows ghosts and smearing along that axis (after TorchIO's ``RandomMotion``);
* ``"ghosting"``: every n-th k-space line along one in-plane axis (n 2–4; the centre line kept) scaled by
  1 − a, a 0.4–0.6: faint copies of the anatomy shifted by 1/n of the field of view (after TorchIO's
  ``RandomGhosting``);
* ``"lowres"``: a coarser in-plane matrix: downsampled by a factor 2.5–3.5 in both in-plane axes (with
  scikit-image's anti-aliasing σ = (factor − 1) / 2 voxels) and linearly interpolated back to the case's grid;
* ``"bias"``: a smooth multiplicative field, the exponential of a random polynomial of degree 3 over the field
  of view (after TorchIO's ``RandomBiasField``), its largest excursion ×/÷ e^0.25–e^0.4 (CT: applied to the
  attenuation above air). Every case already has a milder one (``variation``).

The image is the case's stored int16 one (HU for CT, scaled intensities for MR); the degraded image is
rounded and clipped to the same range. CT images are taken with an offset of 1024 HU (air at about 0) for the
operations that act multiplicatively or in k-space. ``motion`` and ``ghosting`` are MR acquisition artefacts;
on CT they stand for any gross acquisition artefact of the same look.

``strength`` (``STRENGTHS``) scales each kind's size only: with the same seed the same random shape (noise
realisation, bias polynomial, k-space segments, directions of the moves) is drawn at every strength, so a
stronger degradation is the same one, larger (the PSNR against the clean image orders mild > default >
strong). Why our own: TorchIO is not a dependency, MONAI's transforms are not installed with every extra
that builds cohorts, and neither records its random draws in a form the cohort's ``corruption.json`` keeps;
these take the builder's per-case random stream, so a cohort is the same for the same seed everywhere.
"""
from __future__ import annotations

import numpy as np

from .corruptions import STRENGTHS

DEGRADATIONS = ("noise", "blur", "motion", "ghosting", "lowres", "bias")
# per strength: the ranges each kind draws its size from (uniform on [lo, hi)): noise σ as a share of the
# image's scale, blur σ in mm, motion rotation in degrees and shift in mm (same number), ghosting's k-space
# attenuation a, lowres' downsampling factor, bias' largest log-gain
_STRENGTH = {
    "mild": dict(noise=(0.02, 0.04), blur=(0.75, 1.25), motion=(2.0, 3.0), ghosting=(0.15, 0.30),
                 lowres=(1.5, 2.0), bias=(0.10, 0.20)),
    "default": dict(noise=(0.05, 0.08), blur=(1.5, 2.5), motion=(4.0, 6.0), ghosting=(0.40, 0.60),
                    lowres=(2.5, 3.5), bias=(0.25, 0.40)),
    "strong": dict(noise=(0.10, 0.15), blur=(3.0, 4.0), motion=(8.0, 12.0), ghosting=(0.70, 0.90),
                   lowres=(4.0, 5.0), bias=(0.50, 0.70)),
}
_RANGE = {"CT": (-1024, 3071), "MR": (0, 32767)}  # what the builder stores (int16)
_CT_OFFSET = 1024.0


def degrade(rng, img, spacing, kind: str, strength: str = "default", modality: str = "CT", slice_axis: int = 2):
    """Degrade the int16 image ``img`` (voxel sizes ``spacing`` in mm) by ``kind``; returns (new image, record).

    ``modality``: ``"CT"`` (HU) or ``"MR"``. ``slice_axis``: the axis across the slices (the other two are
    in-plane; the k-space artefacts run along one of them). The record: ``{"params": {...}, "psnr_db": float}``,
    the PSNR of the result against ``img`` over its value range.
    """
    from scipy import ndimage

    if kind not in DEGRADATIONS:
        raise ValueError(f"kind: unknown degradation {kind!r} (have {DEGRADATIONS})")
    if strength not in _STRENGTH:
        raise ValueError(f"strength: expected one of {STRENGTHS}, got {strength!r}")
    if modality not in _RANGE:
        raise ValueError(f"modality: expected 'CT' or 'MR', got {modality!r}")
    img = np.asarray(img)
    if img.ndim != 3:
        raise ValueError(f"img: expected a 3-D volume, got shape {img.shape}")
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not (spacing > 0).all():
        raise ValueError(f"spacing: expected three positive voxel sizes, got {spacing.tolist()}")
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis: expected 0, 1 or 2, got {slice_axis!r}")
    lo_hi = _STRENGTH[strength][kind]
    inplane = [a for a in range(3) if a != slice_axis]
    off = _CT_OFFSET if modality == "CT" else 0.0
    x = img.astype(np.float64) + off
    # the image's scale: 1000 HU of attenuation for CT, the 99th intensity percentile for MR
    scale = 1000.0 if modality == "CT" else max(float(np.percentile(x, 99)), 1.0)
    if kind == "noise":
        rel = float(rng.uniform(*lo_hi))
        sd = rel * scale
        n1 = rng.standard_normal(x.shape)
        if modality == "CT":
            y = x + sd * n1
        else:  # magnitude images: Rician (two Gaussian channels)
            y = np.hypot(x + sd * n1, sd * rng.standard_normal(x.shape))
        params = {"sigma": round(sd, 2), "sigma_rel": round(rel, 4), "model": "gaussian" if modality == "CT"
                  else "rician"}
    elif kind == "blur":
        s_mm = float(rng.uniform(*lo_hi))
        y = ndimage.gaussian_filter(x, s_mm / spacing, mode="nearest")
        params = {"sigma_mm": round(s_mm, 3), "sigma_vox": [round(float(v), 3) for v in s_mm / spacing]}
    elif kind == "motion":
        mag = float(rng.uniform(*lo_hi))
        axis = int(rng.choice(inplane))
        n_moves = int(rng.integers(1, 3))
        # the lines of k-space along `axis`, in acquisition order (lowest frequency in the middle), split where
        # the subject moved; the move after the first segment is the one the later lines see
        starts = np.sort(rng.uniform(0.15, 0.85, n_moves))
        moves = []
        for _ in range(n_moves):
            # shape of the move (direction and share of the magnitude), the same at every strength
            rot = rng.uniform(0.5, 1.0) * rng.choice([-1.0, 1.0])
            shift = rng.uniform(-1.0, 1.0, 2)
            moves.append((rot * mag, shift * mag))
        y = _motion(x, spacing, axis, slice_axis, starts, moves)
        params = {"axis": axis, "magnitude": round(mag, 3),
                  "moves": [{"from": round(float(s), 3), "rotation_deg": round(float(r), 3),
                             "shift_mm": [round(float(v), 3) for v in t]} for s, (r, t) in zip(starts, moves)]}
    elif kind == "ghosting":
        a = float(rng.uniform(*lo_hi))
        axis = int(rng.choice(inplane))
        n = int(rng.integers(2, 5))
        k = np.fft.fft(x, axis=axis)
        line = np.arange(x.shape[axis])
        mod = np.where((line % n == 0) & (line != 0), 1.0 - a, 1.0)  # the centre (DC) line keeps the contrast
        shape = [1, 1, 1]
        shape[axis] = -1
        y = np.abs(np.fft.ifft(k * mod.reshape(shape), axis=axis))
        params = {"axis": axis, "ghosts": n, "intensity": round(a, 4)}
    elif kind == "lowres":
        f = float(rng.uniform(*lo_hi))
        y = x
        low = []
        for ax in inplane:
            m = max(2, int(round(x.shape[ax] / f)))
            low.append(m)
            y = ndimage.gaussian_filter1d(y, (f - 1.0) / 2.0, axis=ax, mode="nearest")  # anti-aliasing
            y = _resample_axis(_resample_axis(y, ax, m), ax, x.shape[ax])
        params = {"factor": round(f, 3), "axes": inplane, "low_shape": low}
    else:  # bias
        amp = float(rng.uniform(*lo_hi))
        coef = rng.uniform(-1.0, 1.0, len(_POLY3))
        grid = np.meshgrid(*[np.linspace(-1.0, 1.0, s) for s in x.shape], indexing="ij", sparse=True)
        field = sum(c * grid[0] ** i * grid[1] ** j * grid[2] ** k for c, (i, j, k) in zip(coef, _POLY3))
        field = field - field.mean()
        field *= amp / max(float(np.abs(field).max()), 1e-12)
        y = x * np.exp(field)
        params = {"order": 3, "max_log_gain": round(amp, 4)}
    out = np.clip(np.round(y - off), *_RANGE[modality]).astype(np.int16)
    return out, {"params": params, "psnr_db": psnr(out, img, modality)}


# the monomials x^i y^j z^k of degree 1..3 (the constant is a gain, which `bias` leaves out)
_POLY3 = tuple((i, j, k) for i in range(4) for j in range(4) for k in range(4) if 0 < i + j + k <= 3)


def psnr(img, ref, modality: str = "CT") -> float:
    """PSNR (dB) of ``img`` against ``ref`` over the stored value range of the modality's reference (max − min)."""
    ref = np.asarray(ref, dtype=np.float64)
    mse = float(np.mean((np.asarray(img, dtype=np.float64) - ref) ** 2))
    peak = float(ref.max() - ref.min()) or 1.0
    return float("inf") if mse == 0 else round(10.0 * np.log10(peak * peak / mse), 3)


def _resample_axis(x, axis: int, m: int):
    """``x`` linearly interpolated along ``axis`` onto ``m`` points spanning the same extent (ends kept)."""
    n = x.shape[axis]
    p = np.linspace(0.0, n - 1.0, m)
    i0 = np.minimum(np.floor(p).astype(int), n - 2) if n > 1 else np.zeros(m, int)
    w = p - i0
    a = np.take(x, i0, axis=axis)
    b = np.take(x, np.minimum(i0 + 1, n - 1), axis=axis)
    shape = [1] * x.ndim
    shape[axis] = m
    w = w.reshape(shape)
    return a * (1.0 - w) + b * w


def _motion(x, spacing, axis: int, slice_axis: int, starts, moves):
    """k-space along ``axis`` assembled from ``x`` and its rigidly moved copies (one per entry of ``moves``,
    used from the share ``starts[i]`` of the lines on), back to a magnitude image."""
    from scipy import ndimage

    n = x.shape[axis]
    k = np.fft.fftshift(np.fft.fft(x, axis=axis), axes=axis)  # lines in acquisition order
    centre = (np.asarray(x.shape) - 1) / 2.0
    a, b = [d for d in range(3) if d != slice_axis]
    for s, (rot_deg, shift_mm) in zip(starts, moves):
        t = np.deg2rad(rot_deg)
        # a rotation about the slice axis in millimetres, expressed in voxels of this grid
        R = np.eye(3)
        c, si = np.cos(t), np.sin(t)
        R[a, a], R[a, b], R[b, a], R[b, b] = c, -si * spacing[b] / spacing[a], si * spacing[a] / spacing[b], c
        shift = np.zeros(3)
        shift[a], shift[b] = shift_mm[0] / spacing[a], shift_mm[1] / spacing[b]
        # output voxel o samples input R o + offset: the image turned about the centre and moved by `shift`
        moved = ndimage.affine_transform(x, R, offset=centre - R @ centre - shift, order=1, mode="nearest")
        km = np.fft.fftshift(np.fft.fft(moved, axis=axis), axes=axis)
        sel = [slice(None)] * 3
        sel[axis] = slice(int(round(s * n)), n)
        k[tuple(sel)] = km[tuple(sel)]
    return np.abs(np.fft.ifft(np.fft.ifftshift(k, axes=axis), axis=axis))
