"""A small labelled CT data set with known label corruption, built offline from real volumes.

Source (default ``"chest"``): the chest CT and its 7-class segmentation (ribs, cervical/thoracic/
lumbar vertebral column, right lung, left lung, tissue) shipped inside the PyPI package
``slicerio`` 1.4.0 (``slicerio/data/CTChest4.nrrd``, ``Segmentation.seg.nrrd``; MIT licence, see
``DATA_LICENSES.md``). Each case is a realistic variation of it:

* geometry: a random rigid+scale transform (rotation up to ±8° about the slice axis and ±3°
  about the others, scale 0.92–1.08, shift ±12 mm) composed with a smooth elastic displacement
  (up to ~4 mm), sampled on a field of view of ``size_mm`` around the anatomy;
* resolution: the case's own voxel size (in-plane 1.5–2.5 mm, slices 3–5 mm) and a slice-profile
  blur along Z;
* intensity: a smooth multiplicative bias field (±8 % of the attenuation above air) and Gaussian
  noise (σ 5–25 HU).

Label maps go through the same geometry (nearest neighbour). Then a recorded subset of
``round(corrupt_fraction · n_cases)`` cases gets its label corrupted, one kind per case, the kinds
cycled so every kind occurs: ``"erode"`` / ``"dilate"`` (boundary moved by 2–3 voxels for one or two
classes), ``"shift"`` (one class mask moved 4–7 voxels), ``"drop"`` (one structure removed),
``"spurious"`` (a false blob of a class added), ``"swap"`` (two neighbouring classes exchanged:
left/right lung or adjacent vertebral sections).

Output, in nnU-Net v2 raw layout under ``out_dir``: ``dataset.json``, ``imagesTr/<case>_0000.nii.gz``
(int16 HU), ``labelsTr/<case>.nii.gz`` (the labels as delivered, corrupted where recorded),
``labelsTr_clean/<case>.nii.gz`` (the labels before corruption) and ``corruption.json``:
``{case_id: {"corrupted": bool, "kind": str | None, "classes": [...], "params": {...},
"changed_voxels": int}}`` — the ground truth for "does AUV find the noisy cases".
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .io import read_image, to_ras, voxel_spacing, write_image

KINDS = ("erode", "dilate", "shift", "drop", "spurious", "swap")
BUILDER_VERSION = 1
SOURCES = ("chest",)


def _source_chest():
    import importlib.resources as ir

    try:
        base = ir.files("slicerio") / "data"
    except ModuleNotFoundError as e:
        raise ImportError("the chest demo needs slicerio==1.4.0 (pip install 'auvcore[data]')") from e
    img_p, lab_p = base / "CTChest4.nrrd", base / "Segmentation.seg.nrrd"
    if not (img_p.is_file() and lab_p.is_file()):
        raise FileNotFoundError(f"slicerio's sample chest CT is missing under {base} (need slicerio 1.4.0)")
    img, aff = read_image(img_p)
    lab, laff = read_image(lab_p)
    img, aff = to_ras(img.astype(np.float32), aff)
    lab, _ = to_ras(lab.astype(np.uint8), laff)
    names = {0: "background", 1: "ribs", 2: "cervical vertebral column", 3: "thoracic vertebral column",
             4: "lumbar vertebral column", 5: "right lung", 6: "left lung", 7: "tissue"}
    return img, lab, aff, names


def _smooth_field(rng, shape, coarse, amp):
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


def _make_case(rng, img, lab, aff, size_mm):
    """One varied (image, label, affine) from the source volume."""
    from scipy import ndimage

    spacing = np.array([rng.uniform(1.5, 2.5)] * 2 + [rng.uniform(3.0, 5.0)])
    shape = np.maximum(8, np.round(np.asarray(size_mm) / spacing)).astype(int)
    fg = np.argwhere(lab > 0)
    center_vox = (fg.min(0) + fg.max(0)) / 2.0
    center = aff[:3, :3] @ center_vox + aff[:3, 3] + rng.uniform(-12, 12, 3) * np.array([1, 1, 1.5])
    R = _rotation(*np.deg2rad([rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-8, 8)]))
    A = R * rng.uniform(0.92, 1.08)
    # Output voxel -> world: an axis-aligned RAS grid centred on `center`.
    out_aff = np.eye(4)
    out_aff[:3, :3] = np.diag(spacing)
    out_aff[:3, 3] = center - spacing * (shape - 1) / 2.0
    # World point p of the case comes from source world point c + A (p - c) + elastic(p).
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), 0)
    world = np.tensordot(out_aff[:3, :3], grid, axes=1) + out_aff[:3, 3][:, None, None, None]
    src_world = np.tensordot(A, world - center[:, None, None, None], axes=1) + center[:, None, None, None]
    amp = rng.uniform(1.5, 4.0)
    for d in range(3):
        src_world[d] += _smooth_field(rng, tuple(shape), (4, 4, 3), amp / 2).astype(np.float32)
    inv = np.linalg.inv(aff)
    src_vox = np.tensordot(inv[:3, :3], src_world, axes=1) + inv[:3, 3][:, None, None, None]
    # Thicker slices than the source are mimicked by a slice-profile blur before sampling.
    src_sp = np.asarray(voxel_spacing(aff))
    sigma_z = max(0.0, (spacing[2] / src_sp[2] - 1.0) * 0.4)
    src_img = ndimage.gaussian_filter1d(img, sigma_z, axis=2) if sigma_z > 0.05 else img
    out_img = ndimage.map_coordinates(src_img, src_vox, order=1, mode="constant", cval=-1000.0, prefilter=False)
    out_lab = ndimage.map_coordinates(lab, src_vox, order=0, mode="constant", cval=0)
    bias_amp, noise = rng.uniform(0.02, 0.08), rng.uniform(5, 25)
    bias = np.exp(_smooth_field(rng, tuple(shape), (3, 3, 3), bias_amp))
    out_img = (out_img + 1000.0) * bias - 1000.0 + rng.normal(0, noise, out_img.shape)
    params = {"spacing": [round(float(s), 4) for s in spacing], "shape": [int(s) for s in shape],
              "scale": round(float(np.cbrt(np.linalg.det(A))), 4), "elastic_mm": round(float(amp), 3),
              "bias": round(float(bias_amp), 4), "noise_hu": round(float(noise), 2),
              "slice_blur_vox": round(float(sigma_z), 3)}
    return np.clip(np.round(out_img), -1024, 3071).astype(np.int16), out_lab.astype(np.uint8), out_aff, params


def _ball(r):
    z = np.arange(-r, r + 1)
    return (z[:, None, None] ** 2 + z[None, :, None] ** 2 + z[None, None, :] ** 2) <= r * r


def _corrupt(rng, lab, kind, K):
    """Corrupt ``lab`` (uint8) by ``kind``; returns (new label, record)."""
    from scipy import ndimage

    out = lab.copy()
    counts = np.bincount(lab.ravel(), minlength=K)
    present = [c for c in range(1, K) if counts[c] > 0]
    big = [c for c in present if counts[c] >= 200] or present
    rec: dict = {"classes": [], "params": {}}
    if kind in ("erode", "dilate"):
        n = 1 if len(big) < 2 else int(rng.integers(1, 3))
        cls = sorted(int(c) for c in rng.choice(big, size=n, replace=False))
        r = int(rng.integers(2, 4))
        for c in cls:
            m = lab == c
            if kind == "erode":
                out[m & ~ndimage.binary_erosion(m, _ball(r))] = 0
            else:
                # over-segmentation spills into whatever neighbours the structure (tissue, air, bone)
                out[ndimage.binary_dilation(m, _ball(r)) & ~m] = c
        rec.update(classes=cls, params={"radius_vox": r})
    elif kind == "shift":
        c = int(rng.choice(big))
        off = rng.integers(4, 8, 3) * rng.choice([-1, 1], 3)
        off[2] = int(np.sign(off[2]) * max(1, abs(off[2]) // 2))  # slices are thicker
        m = lab == c
        moved = np.zeros_like(m)
        src = tuple(slice(max(0, -o), m.shape[i] - max(0, o)) for i, o in enumerate(off))
        dst = tuple(slice(max(0, o), m.shape[i] - max(0, -o)) for i, o in enumerate(off))
        moved[dst] = m[src]
        out[m] = 0
        out[moved & ((out == 0) | (out == c))] = c
        rec.update(classes=[c], params={"offset_vox": [int(o) for o in off]})
    elif kind == "drop":
        # drop the largest connected structure of a class that is not the body-filling tissue
        cands = [c for c in present if c != 7] or present
        c = int(rng.choice(cands))
        comp, n = ndimage.label(lab == c)
        sizes = np.bincount(comp.ravel())[1:]
        k = int(np.argmax(sizes)) + 1
        out[comp == k] = 0
        rec.update(classes=[c], params={"component_voxels": int(sizes[k - 1]), "components": int(n)})
    elif kind == "spurious":
        c = int(rng.choice(present))
        body = np.argwhere(lab > 0)
        ctr = body[rng.integers(len(body))]
        radii = rng.uniform(5, 9, 3) * np.array([1, 1, 0.6])
        idx = np.ogrid[tuple(slice(0, s) for s in lab.shape)]
        ell = sum(((ix - ci) / ri) ** 2 for ix, ci, ri in zip(idx, ctr, radii)) <= 1.0
        out[ell & (lab != c)] = c
        rec.update(classes=[c], params={"center_vox": [int(v) for v in ctr],
                                        "radii_vox": [round(float(v), 2) for v in radii]})
    elif kind == "swap":
        pairs = [(5, 6), (2, 3), (3, 4)]
        pairs = [p for p in pairs if p[0] in present and p[1] in present] or [tuple(present[:2])]
        a, b = (int(v) for v in pairs[int(rng.integers(len(pairs)))])
        out[lab == a], out[lab == b] = b, a
        rec.update(classes=[a, b])
    else:
        raise ValueError(f"kind: unknown corruption {kind!r} (have {KINDS})")
    rec["changed_voxels"] = int((out != lab).sum())
    return out, rec


def build_demo(out_dir, n_cases: int = 24, corrupt_fraction: float = 0.25, seed: int = 0,
               source: str = "chest", size_mm=(224.0, 224.0, 192.0), kinds=KINDS) -> Path:
    """Build the demo data set (see the module doc) under ``out_dir`` and return its path.

    ``n_cases`` cases, ``round(corrupt_fraction · n_cases)`` of them with corrupted labels (chosen
    and corrupted from ``seed``); ``size_mm`` is the field of view of each case (the default gives
    about 149×149×64 voxels at Merlin's 1.5×1.5×3 mm). Idempotent: if ``out_dir`` already holds a
    complete demo built with the same arguments it is returned untouched; otherwise it is built in
    a temporary folder beside it and moved into place, so no half-written data set is left.
    ``out_dir`` must be absent, empty, or a demo built by this function.
    """
    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)) or n_cases < 1:
        raise ValueError(f"n_cases: expected a positive int, got {n_cases!r}")
    if not (isinstance(corrupt_fraction, (int, float)) and 0.0 <= corrupt_fraction <= 1.0):
        raise ValueError(f"corrupt_fraction: expected a number in [0, 1], got {corrupt_fraction!r}")
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {SOURCES}, got {source!r}")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise ValueError(f"kinds: expected a non-empty subset of {KINDS}, got {kinds!r}")
    size_mm = tuple(float(s) for s in size_mm)
    if len(size_mm) != 3 or min(size_mm) <= 0:
        raise ValueError(f"size_mm: expected three positive numbers, got {size_mm!r}")
    out = Path(out_dir)
    params = {"version": BUILDER_VERSION, "source": source, "n_cases": int(n_cases),
              "corrupt_fraction": float(corrupt_fraction), "seed": int(seed),
              "size_mm": list(size_mm), "kinds": list(kinds)}
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"out_dir: {out} exists and is not a folder")
        prev = _demo_params(out)
        if prev == params and _complete(out, n_cases):
            return out
        if prev is None and any(out.iterdir()):
            raise ValueError(f"out_dir: {out} is not empty and is not an auvcore demo; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        _build_into(tmp, params)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _demo_params(out: Path):
    try:
        with open(out / "dataset.json", encoding="utf-8") as f:
            return json.load(f).get("auvcore_demo")
    except (OSError, ValueError, AttributeError):
        return None


def _complete(out: Path, n: int) -> bool:
    if not (out / "corruption.json").is_file():
        return False
    ids = [f"demo_{i:03d}" for i in range(n)]
    return all((out / "imagesTr" / f"{c}_0000.nii.gz").is_file() and (out / "labelsTr" / f"{c}.nii.gz").is_file()
               for c in ids)


def _build_into(root: Path, params: dict) -> None:
    img, lab, aff, names = _source_chest()
    K = max(names) + 1
    n = params["n_cases"]
    rng = np.random.default_rng(params["seed"])
    n_bad = int(round(params["corrupt_fraction"] * n))
    bad = set(int(i) for i in rng.choice(n, size=n_bad, replace=False))
    kinds = list(params["kinds"])
    order = [kinds[j % len(kinds)] for j in range(n_bad)]
    rng.shuffle(order)
    kind_of = dict(zip(sorted(bad), order))
    record = {}
    for i in range(n):
        cid = f"demo_{i:03d}"
        crng = np.random.default_rng([params["seed"], i])  # per-case stream: cases independent of n
        im, lb, caff, cparams = _make_case(crng, img, lab, aff, params["size_mm"])
        write_image(root / "imagesTr" / f"{cid}_0000.nii.gz", im, caff)
        write_image(root / "labelsTr_clean" / f"{cid}.nii.gz", lb, caff)
        entry = {"corrupted": False, "kind": None, "classes": [], "params": {}, "changed_voxels": 0}
        if i in kind_of:
            lb2, rec = _corrupt(crng, lb, kind_of[i], K)
            entry = {"corrupted": True, "kind": kind_of[i], **rec}
            lb = lb2
        entry["case_params"] = cparams
        write_image(root / "labelsTr" / f"{cid}.nii.gz", lb, caff)
        record[cid] = entry
    ds = {
        "name": "auvcore-demo-chest",
        "description": "Varied copies of the slicerio 1.4.0 sample chest CT with recorded label corruption",
        "channel_names": {"0": "CT"},
        "labels": {v: k for k, v in names.items()},
        "numTraining": n,
        "file_ending": ".nii.gz",
        "licence": "derived from slicerio 1.4.0 sample data (MIT, Copyright (c) 2021 Andras Lasso)",
        "auvcore_demo": params,
    }
    with open(root / "corruption.json", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    with open(root / "dataset.json", "w", encoding="utf-8") as f:
        json.dump(ds, f, indent=1)
