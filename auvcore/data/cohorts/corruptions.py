"""Label corruptions: what an annotator gets wrong, applied to one case's label map and recorded.

The builder gives a recorded subset of ``round(corrupt_fraction · n_cases)`` cases a corrupted label, one
kind per case, the chosen ``kinds`` (default ``DEFAULT_KINDS``, the first six) cycled in their order, so every
kind occurs once at least ``len(kinds)`` cases are corrupted (with fewer, only the first kinds of the list
occur: 4 of 40 cases get erode, dilate, shift and drop). The kinds (``KINDS``; sizes at the default
``strength``):

* ``"erode"`` / ``"dilate"``: the boundary moved by 2–3 voxels for one or two classes;
* ``"shift"``: one class mask moved 4–7 voxels (half that along z, across the slices of the axial sources; for
  ``spine-mr``, sliced sagittally, z is in-plane and the move across its slices is the full 4–7 voxels, kept so
  that the cohorts recorded in ``bench/RESULTS.md`` stay reproducible);
* ``"drop"``: one structure (the largest connected component of a class) removed;
* ``"spurious"``: a false blob of a class added (radii 5–9 voxels, 0.6× across slices);
* ``"swap"``: two neighbouring classes exchanged (left/right lung or adjacent vertebral sections;
  adjacent vertebrae or discs; grey/white matter);
* ``"boundary"``: annotator jitter: within an in-plane band of 1–2 voxels of every foreground class's
  boundary (contours are drawn slice by slice) the boundary moves out in some patches and in at others
  (a smooth random field decides where, so the changes come in patches a few voxels wide, not as
  salt-and-pepper); voxels given up take the label of the nearest voxel outside the class in the slice
  (the neighbour or background);
* ``"partial"``: an annotation stopped early: one class, or all of them (even odds), erased on a
  contiguous block of 30–50 % of the slices it spans, at one end of its extent. Slices are those of
  the source's slice axis (axial, but sagittal for ``spine-mr``), the ones an annotator pages through.

``strength`` (``STRENGTHS``: ``"mild"``, ``"default"``, ``"strong"``) scales the size of each change
(``_STRENGTH`` has the numbers): erode/dilate radius (1 / 2–3 / 4–5 voxels), shift distance (2–3 / 4–7 /
8–11), spurious blob radii (3–5 / 5–9 / 8–12), boundary band (1 / 1–2 / 2–3 voxels) and the share of
slices a ``"partial"`` erases (15–30 / 30–50 / 50–70 %). ``"drop"`` and ``"swap"`` are the same at every
strength (a structure is missing or not; two labels are exchanged or not). ``"default"`` draws exactly
what the builder drew before ``strength`` existed, so cohorts built then are unchanged.
``"boundary"`` and ``"partial"`` are not in ``DEFAULT_KINDS`` for the same reason: adding them to the
cycle would change which case gets which kind.

Kinds that do not apply to a source are skipped for it (recorded in ``dataset.json`` under
``"skipped_kinds"``): ``"drop"`` for ``brain-mni`` (every class is one body-filling structure),
``"swap"`` for a source with a single foreground class (``lung-tumour``, ``brain-tumour``; there ``"drop"``
removes the tumour's largest connected part, for a one-piece tumour the whole mask: a missed lesion, and a
case with no tumour has no AUV). A case in which the drawn kind finds nothing to act on gets the next
applicable kind (the record names the kind applied).


``corrupt`` changes the label only; the image of a corrupted case is the one it had before.
"""
from __future__ import annotations

import numpy as np

from .sources import SPECS, Spec

KINDS = ("erode", "dilate", "shift", "drop", "spurious", "swap", "boundary", "partial")
# what build_demo cycles through by default: the six kinds of the first cohorts, so that the default
# cohorts (and the results recorded on them) stay what they were
DEFAULT_KINDS = KINDS[:6]
STRENGTHS = ("mild", "default", "strong")
# per strength: the ranges the corruptions draw their sizes from ([lo, hi) for integers). "default" holds
# the numbers of the original builder, drawn with the same calls, so its cohorts are byte-identical.
_STRENGTH = {
    "mild": dict(radius=(1, 2), shift=(2, 4), blob=(3.0, 5.0), band=(1, 2), partial=(0.15, 0.30)),
    "default": dict(radius=(2, 4), shift=(4, 8), blob=(5.0, 9.0), band=(1, 3), partial=(0.30, 0.50)),
    "strong": dict(radius=(4, 6), shift=(8, 12), blob=(8.0, 12.0), band=(2, 4), partial=(0.50, 0.70)),
}


def _ball(r):
    z = np.arange(-r, r + 1)
    return (z[:, None, None] ** 2 + z[None, :, None] ** 2 + z[None, None, :] ** 2) <= r * r


def applicable(kind, lab, K, spec: Spec | None = None) -> bool:
    """Whether ``kind`` finds something to act on in ``lab`` for this source."""
    spec = SPECS["chest"] if spec is None else spec
    if kind in spec.skip_kinds:
        return False
    present = np.flatnonzero(np.bincount(lab.ravel(), minlength=K)[1:]) + 1
    if kind == "swap":
        return len(present) >= 2
    if kind == "partial":
        # erasing part of a class needs a class on two slices or more (on one slice it would be a "drop")
        return any(_slice_span(lab == c, spec.slice_axis)[1] >= 2 for c in present)
    if kind == "boundary":
        # a boundary inside the field of view: some voxel differs from the others
        return len(present) >= 1 and lab.min() != lab.max()
    return len(present) >= 1


def _slice_span(m, axis):
    """(first slice, number of slices) that mask ``m`` spans along ``axis``; (0, 0) when empty."""
    on = np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != axis)))
    return (int(on[0]), int(on[-1] - on[0] + 1)) if len(on) else (0, 0)


def corrupt(rng, lab, kind, K, spec: Spec | None = None, strength: str = "default"):
    """Corrupt ``lab`` (uint8) by ``kind``; returns (new label, record).

    ``spec`` (default: the chest's) names the classes a "swap" exchanges and those "drop" avoids, and the
    slice axis of a "partial". ``strength`` (one of ``STRENGTHS``) picks the size ranges of ``_STRENGTH``.
    """
    spec = SPECS["chest"] if spec is None else spec
    if strength not in _STRENGTH:
        raise ValueError(f"strength: expected one of {STRENGTHS}, got {strength!r}")
    P = _STRENGTH[strength]
    from scipy import ndimage

    out = lab.copy()
    counts = np.bincount(lab.ravel(), minlength=K)
    present = [c for c in range(1, K) if counts[c] > 0]
    big = [c for c in present if counts[c] >= 200] or present
    rec: dict = {"classes": [], "params": {}}
    if kind in ("erode", "dilate"):
        n = 1 if len(big) < 2 else int(rng.integers(1, 3))
        cls = sorted(int(c) for c in rng.choice(big, size=n, replace=False))
        r = int(rng.integers(*P["radius"]))
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
        off = rng.integers(*P["shift"], 3) * rng.choice([-1, 1], 3)
        # slices are thicker (z for the axial sources; spine-mr's x is not halved: see the module doc)
        off[2] = int(np.sign(off[2]) * max(1, abs(off[2]) // 2))
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
        cands = [c for c in present if c not in spec.fill] or present
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
        radii = rng.uniform(*P["blob"], 3) * np.array([1, 1, 0.6])
        idx = np.ogrid[tuple(slice(0, s) for s in lab.shape)]
        ell = sum(((ix - ci) / ri) ** 2 for ix, ci, ri in zip(idx, ctr, radii)) <= 1.0
        out[ell & (lab != c)] = c
        rec.update(classes=[c], params={"center_vox": [int(v) for v in ctr],
                                        "radii_vox": [round(float(v), 2) for v in radii]})
    elif kind == "swap":
        if len(present) < 2:
            raise ValueError("swap: needs two foreground classes in the label map")
        pairs = [p for p in spec.swap_pairs if p[0] in present and p[1] in present] or [tuple(present[:2])]
        a, b = (int(v) for v in pairs[int(rng.integers(len(pairs)))])
        out[lab == a], out[lab == b] = b, a
        rec.update(classes=[a, b])
    elif kind == "boundary":
        w = int(rng.integers(*P["band"]))
        ax = spec.slice_axis
        # contours are drawn slice by slice: the band is an in-plane disk (a thick slice is not jittered
        # across its 3-5 mm), and the jitter is smooth along the contour but less so from slice to slice
        ball, keep = _ball(w), [slice(None)] * 3
        keep[ax] = slice(w, w + 1)
        disk = np.zeros_like(ball)
        disk[tuple(keep)] = ball[tuple(keep)]
        sigma, sampling = [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]
        sigma[ax], sampling[ax] = 1.0, 1e3  # sampling: the nearest voxel outside is looked for in-plane
        for c in present:
            m = lab == c
            # one smooth field per class: > 0 the boundary moves out there, < 0 it moves in; smoothing makes
            # the jitter come in patches like a hand-drawn contour's, not salt-and-pepper
            field = ndimage.gaussian_filter(rng.standard_normal(lab.shape).astype(np.float32), sigma) > 0
            # border_value=1: the edge of the field of view (a crop) is not a boundary of the class
            inner = m & ~ndimage.binary_erosion(m, disk, border_value=1)
            outer = ndimage.binary_dilation(m, disk) & ~m
            give = inner & ~field
            if give.any():
                # a voxel given up takes the label of the nearest voxel outside the class: the neighbour
                # the annotator's contour ran into (another class or background)
                _, near = ndimage.distance_transform_edt(m, sampling=sampling, return_indices=True)
                out[give] = lab[tuple(ix[give] for ix in near)]
            out[outer & field] = c
        rec.update(classes=[int(c) for c in present], params={"band_vox": w})
    elif kind == "partial":
        ax = spec.slice_axis
        cands = [c for c in present if _slice_span(lab == c, ax)[1] >= 2]
        if not cands:
            raise ValueError("partial: needs a class that spans two slices or more")
        if rng.random() < 0.5:
            scope, m = "all", lab > 0
        else:
            c = int(rng.choice(cands))
            scope, m = "class", lab == c
        first, span = _slice_span(m, ax)
        frac = float(rng.uniform(*P["partial"]))
        n = int(min(span - 1, max(1, round(frac * span))))  # never the whole extent: that would be a "drop"
        # the annotator stopped early, paging in either direction: the block is at one end of the extent
        lo = first if rng.random() < 0.5 else first + span - n
        block = [slice(None)] * lab.ndim
        block[ax] = slice(lo, lo + n)
        block = tuple(block)
        out[block][m[block]] = 0
        erased = [int(v) for v in np.unique(lab[block][m[block]])]
        rec.update(classes=erased, params={"scope": scope, "axis": int(ax), "slices": [int(lo), int(lo + n)],
                                           "fraction": round(frac, 3)})
    else:
        raise ValueError(f"kind: unknown corruption {kind!r} (have {KINDS})")
    rec["changed_voxels"] = int((out != lab).sum())
    return out, rec