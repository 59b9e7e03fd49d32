"""The cohort builder: cases varied from a source volume, some with a recorded defect, written as a data set.

``build_demo(out_dir, source=..., n_cases=..., seed=...)`` loads the source (``sources``), makes every case
(``variation.make_case``, from the case's own random stream, so a case is the same whatever ``n_cases`` is),
gives ``round(corrupt_fraction · n_cases)`` of them a corrupted label (``corruptions``) and, when ``degrade``
names kinds, ``round(degrade_fraction · n_cases)`` others a degraded image (``degradations``; never the same
case as a label corruption, so each recorded case has one known defect).

Output, in nnU-Net v2 raw layout under ``out_dir``: ``dataset.json``, ``imagesTr/<case>_0000.nii.gz``
(int16: HU for CT, scaled intensities for MR; degraded where recorded), ``labelsTr/<case>.nii.gz`` (the labels
as delivered, corrupted where recorded), ``labelsTr_clean/<case>.nii.gz`` (the labels before corruption),
with ``degrade`` also ``imagesTr_clean/<case>_0000.nii.gz`` (the images before degradation), and
``corruption.json``: ``{case_id: {"corrupted": bool, "kind": str | None, "classes": [...], "params": {...},
"changed_voxels": int, "case_params": {...}}}`` — the ground truth for "does the score find the bad cases".
A degraded case's entry is ``{"corrupted": true, "kind": <degradation>, "degraded": true, "strength": ...,
"classes": [], "params": {...}, "changed_voxels": 0, "psnr_db": ...}`` (its label unchanged: 0 voxels).
Cohorts built without ``degrade`` are byte-identical to those of the builder before degradations existed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..io import umask_mode, write_image
from .corruptions import DEFAULT_KINDS, KINDS, STRENGTHS, applicable, corrupt
from .degradations import DEGRADATIONS, degrade as degrade_image
from .sources import SOURCES, SPECS
from .variation import make_case

BUILDER_VERSION = 1


def build_demo(out_dir, n_cases: int = 24, corrupt_fraction: float = 0.25, seed: int = 0,
               source: str = "chest", size_mm=None, kinds=DEFAULT_KINDS, strength: str = "default",
               degrade=(), degrade_fraction: float = 0.25, degrade_strength: str = "default") -> Path:
    """Build the demo data set (see the module doc) under ``out_dir`` and return its path.

    ``source``: one of ``SOURCES`` (default ``"chest"``). ``n_cases`` cases,
    ``round(corrupt_fraction · n_cases)`` of them with corrupted labels (chosen and corrupted from
    ``seed``; ``kinds``, a subset of ``KINDS``, default ``DEFAULT_KINDS``: those that do not apply to the
    source are skipped, see ``corruptions``; ``strength``, one of ``STRENGTHS``, scales the size of each
    corruption, ``"default"`` giving the cohorts of the original builder);
    ``degrade``: image degradation kinds (a subset of ``DEGRADATIONS``; default none), cycled over
    ``round(degrade_fraction · n_cases)`` other cases at ``degrade_strength`` (for a cohort whose labels are all
    clean, ``corrupt_fraction=0``);
    ``size_mm`` is the field of view of each case (default: the source's; the chest's 224×224×192 mm
    gives about 149×149×64 voxels at Merlin's 1.5×1.5×3 mm). Idempotent: if ``out_dir`` already holds a
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
    if not [k for k in kinds if k not in SPECS[source].skip_kinds]:
        raise ValueError(f"kinds: none of {kinds!r} applies to the {source} source "
                         f"(it skips {SPECS[source].skip_kinds})")
    if strength not in STRENGTHS:
        raise ValueError(f"strength: expected one of {STRENGTHS}, got {strength!r}")
    degrade = (degrade,) if isinstance(degrade, str) else tuple(degrade)
    if [k for k in degrade if k not in DEGRADATIONS]:
        raise ValueError(f"degrade: expected a subset of {DEGRADATIONS}, got {degrade!r}")
    if degrade:
        if not (isinstance(degrade_fraction, (int, float)) and 0.0 <= degrade_fraction <= 1.0):
            raise ValueError(f"degrade_fraction: expected a number in [0, 1], got {degrade_fraction!r}")
        if degrade_strength not in STRENGTHS:
            raise ValueError(f"degrade_strength: expected one of {STRENGTHS}, got {degrade_strength!r}")
        n_bad, n_deg = int(round(corrupt_fraction * n_cases)), int(round(degrade_fraction * n_cases))
        if n_bad + n_deg > n_cases:
            raise ValueError(f"degrade_fraction: {n_deg} degraded and {n_bad} label-corrupted cases do not fit in "
                             f"{n_cases} (a case gets one defect at most)")
    if size_mm is None:
        size_mm = SPECS[source].size_mm
    size_mm = tuple(float(s) for s in size_mm)
    if len(size_mm) != 3 or min(size_mm) <= 0:
        raise ValueError(f"size_mm: expected three positive numbers, got {size_mm!r}")
    out = Path(out_dir)
    params = {"version": BUILDER_VERSION, "source": source, "n_cases": int(n_cases),
              "corrupt_fraction": float(corrupt_fraction), "seed": int(seed),
              "size_mm": list(size_mm), "kinds": list(kinds), "strength": strength}
    if degrade:  # only then: the record of a cohort without degradations stays what it was
        params.update(degrade=list(dict.fromkeys(degrade)), degrade_fraction=float(degrade_fraction),
                      degrade_strength=degrade_strength)
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
    os.chmod(tmp, umask_mode(0o777))  # mkdtemp's 0700 would make the data set private once renamed
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
            params = json.load(f).get("auvcore_demo")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(params, dict):
        # demos built before `strength` existed were built at what is now "default" (same data): reuse them
        params.setdefault("strength", "default")
    return params


def _complete(out: Path, n: int) -> bool:
    if not (out / "corruption.json").is_file():
        return False
    ids = [f"demo_{i:03d}" for i in range(n)]
    return all((out / "imagesTr" / f"{c}_0000.nii.gz").is_file() and (out / "labelsTr" / f"{c}.nii.gz").is_file()
               for c in ids)


def _build_into(root: Path, params: dict) -> None:
    spec = SPECS[params["source"]]
    # {patient: (image, label, affine, names, modality, MR reference)}; one entry (None) for a one-volume source
    vols = dict(zip(spec.patients, spec.load(spec.patients))) if spec.patients else {None: spec.load()}
    vols = {p: (*v, float(np.percentile(v[0][v[0] > 0], 99)) if v[4] == "MR" else None) for p, v in vols.items()}
    names = next(iter(vols.values()))[3]
    K = max(names) + 1
    n = params["n_cases"]
    rng = np.random.default_rng(params["seed"])
    n_bad = int(round(params["corrupt_fraction"] * n))
    bad = set(int(i) for i in rng.choice(n, size=n_bad, replace=False))
    kinds = [k for k in params["kinds"] if k not in spec.skip_kinds]
    order = [kinds[j % len(kinds)] for j in range(n_bad)]
    rng.shuffle(order)
    kind_of = dict(zip(sorted(bad), order))
    degrade_of = _degraded_cases(params, bad)
    record = {}
    for i in range(n):
        cid = f"demo_{i:03d}"
        crng = np.random.default_rng([params["seed"], i])  # per-case stream: cases independent of n
        # several patients: they alternate, so every cohort of two cases or more has each of them, and a case is
        # the same whatever n_cases is
        patient = spec.patients[i % len(spec.patients)] if spec.patients else None
        img, lab, aff, _, modality, ref = vols[patient]
        im, lb, caff, cparams = make_case(crng, img, lab, aff, params["size_mm"], spec, modality, ref)
        if patient is not None:
            cparams = {"patient": patient, **cparams}
        entry = {"corrupted": False, "kind": None, "classes": [], "params": {}, "changed_voxels": 0}
        if degrade_of:
            write_image(root / "imagesTr_clean" / f"{cid}_0000.nii.gz", im, caff)
        if i in degrade_of:
            # a stream of its own (not crng): what a case's degradation draws does not hang on how many numbers
            # make_case took
            drng = np.random.default_rng([params["seed"], i, 1])
            st = params["degrade_strength"]
            im, rec = degrade_image(drng, im, np.abs(np.diag(caff)[:3]), degrade_of[i], st, modality,
                                    spec.slice_axis)
            entry = {"corrupted": True, "kind": degrade_of[i], "degraded": True, "strength": st, "classes": [],
                     "params": rec["params"], "changed_voxels": 0, "psnr_db": rec["psnr_db"]}
        write_image(root / "imagesTr" / f"{cid}_0000.nii.gz", im, caff)
        write_image(root / "labelsTr_clean" / f"{cid}.nii.gz", lb, caff)
        if i in kind_of:
            # the drawn kind, else the next one (in the cycle) that finds something to act on here
            j = kinds.index(kind_of[i])
            kind = next((k for k in kinds[j:] + kinds[:j] if applicable(k, lb, K, spec)), None)
            if kind is not None:
                lb2, rec = corrupt(crng, lb, kind, K, spec, params.get("strength", "default"))
                entry = {"corrupted": True, "kind": kind, **rec}
                lb = lb2
        entry["case_params"] = cparams
        write_image(root / "labelsTr" / f"{cid}.nii.gz", lb, caff)
        record[cid] = entry
    ds = {
        "name": f"auvcore-demo-{params['source']}",
        "description": spec.title + (" and recorded image degradation" if degrade_of else ""),
        "channel_names": {"0": spec.channel},
        "labels": {v: k for k, v in names.items()},
        "numTraining": n,
        "file_ending": ".nii.gz",
        "licence": spec.licence,
        "auvcore_demo": params,
    }
    if spec.patients:
        ds["patients"] = {p: [c for c, e in record.items() if e["case_params"]["patient"] == p] for p in spec.patients}
    skipped = [k for k in params["kinds"] if k in spec.skip_kinds]
    if skipped:
        ds["skipped_kinds"] = skipped
    with open(root / "corruption.json", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    with open(root / "dataset.json", "w", encoding="utf-8") as f:
        json.dump(ds, f, indent=1)


def _degraded_cases(params: dict, bad: set) -> dict:
    """``{case index: degradation kind}``: ``round(degrade_fraction · n)`` of the cases without a label
    corruption, the kinds cycled in their order and shuffled, from a stream of their own (so that asking for
    degradations changes neither which cases get a label corruption nor how)."""
    kinds = params.get("degrade") or []
    if not kinds:
        return {}
    n = params["n_cases"]
    n_deg = int(round(params["degrade_fraction"] * n))
    rng = np.random.default_rng([params["seed"], n, 2])
    pool = [i for i in range(n) if i not in bad]
    chosen = sorted(int(i) for i in rng.choice(pool, size=n_deg, replace=False))
    order = [kinds[j % len(kinds)] for j in range(n_deg)]
    rng.shuffle(order)
    return dict(zip(chosen, order))
