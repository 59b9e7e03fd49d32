"""Small labelled CT and MR data sets with known label corruption, built offline from real volumes.

Sources (``SOURCES``; the volumes ship inside PyPI or Debian packages, licences in ``DATA_LICENSES.md``):

* ``"chest"`` (default): the chest CT and its 7-class segmentation (ribs, cervical/thoracic/
  lumbar vertebral column, right lung, left lung, tissue) of ``slicerio`` 1.4.0
  (``slicerio/data/CTChest4.nrrd``, ``Segmentation.seg.nrrd``; MIT). Extra ``data``.
* ``"spine-ct"``: the lumbar spine CT of ``tptbox`` 1.1.0 (``TPTBox/tests/sample_ct``; 1.5 mm
  isotropic) with its vertebra labels L2, L3, L4 (Apache-2.0). Extra ``cohorts``.
* ``"spine-mr"``: the cervical spine T2w MR of ``tptbox`` 1.1.0 (``TPTBox/tests/sample_mri``) with
  6 classes: vertebrae C5, C6, C7 (endplates merged into their vertebra), the discs C5/C6 and C6/C7,
  and the spinal canal with the cord in it (from the subregion mask). Sagittal slices. Extra ``cohorts``.
* ``"brain-mni"``: the skull-stripped MNI ICBM152 2009a T1 template of ``nilearn`` 0.14.1
  (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``) with 3
  classes from its tissue probability maps: CSF (brain mask minus GM and WM), grey matter, white
  matter, each voxel the most probable. Extra ``cohorts``.
* ``"lung-tumour"``: the two lung CTs of different patients with their tumour masks (classes background,
  tumour) in the source archive of ``pyradiomics`` 3.0.1 (``data/lung{1,2}_{image,label}.nrrd``; BSD-3-Clause;
  0.57 and 0.63 mm in-plane, 5 mm slices).
* ``"brain-tumour"``: the two brain MRs of different patients with their tumour masks in the same archive
  (``data/brain{1,2}_{image,label}.nrrd``; 0.78 mm in-plane, 6.5 mm slices; the MR sequence is not
  documented, so the channel is ``"MR"``).

  These two sources are read from the sdist that the user downloads once (``pip install`` keeps nothing
  importable of its ``data/`` folder, and auvcore never downloads at run time):
  ``pip download pyradiomics==3.0.1 --no-deps --no-binary :all: --no-build-isolation -d DIR`` and
  ``AUVCORE_PYRADIOMICS_SDIST=DIR/pyradiomics-3.0.1.tar.gz``. The NRRDs are read straight from the archive.
  Their cases alternate between the two patients (even cases the first, odd ones the second); each case's
  patient is recorded in ``corruption.json`` (``case_params["patient"]``) and ``dataset.json``
  (``"patients"``: the cases of each).
* ``"brain-aal"``: the Colin27 T1 with skull (``ch2.nii.gz``, 1 mm) and 8 regions of the AAL atlas drawn on
  that brain (``aal.nii.gz``, same grid): caudate, putamen, thalamus and hippocampus, left and right. Both come
  from Debian's ``mricron-data`` package, read from ``/usr/share/mricron/templates`` or the folder named by
  ``AUVCORE_MRICRON_TEMPLATES`` (``MRICRON_INSTALL`` says how to unpack the package without root). A
  ``"swap"`` there exchanges left and right of one structure, or caudate and putamen.

Each case is a realistic variation of the source volume (numbers for the chest; every source has its
own field of view, voxel sizes and slice axis, see ``_SPECS``):

* geometry: a random rigid+scale transform (rotation up to ±8° about the slice axis and ±3°
  about the others, scale 0.92–1.08, shift ±12 mm) composed with a smooth elastic displacement
  (up to ~4 mm), sampled on a field of view of ``size_mm`` around the anatomy;
* resolution: the case's own voxel size (in-plane 1.5–2.5 mm, slices 3–5 mm) and a slice-profile
  blur along Z;
* intensity: CT: a smooth multiplicative bias field (±8 % of the attenuation above air) and Gaussian
  noise (σ 5–25 HU); MR: a random gain, a stronger smooth bias field (±5–15 %) and Rician noise
  (σ 1–4 % of the source's 99th percentile), stored as int16 with that percentile at about 1000.

Label maps go through the same geometry (nearest neighbour). Then a recorded subset of
``round(corrupt_fraction · n_cases)`` cases gets its label corrupted, one kind per case, the chosen
``kinds`` (default ``DEFAULT_KINDS``, the first six) cycled in their order, so every kind occurs once at
least ``len(kinds)`` cases are corrupted (with fewer, only the first kinds of the list occur: 4 of 40
cases get erode, dilate, shift and drop). The kinds (``KINDS``; sizes at the default ``strength``):

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

Output, in nnU-Net v2 raw layout under ``out_dir``: ``dataset.json``, ``imagesTr/<case>_0000.nii.gz``
(int16: HU for CT, scaled intensities for MR), ``labelsTr/<case>.nii.gz`` (the labels as delivered,
corrupted where recorded),
``labelsTr_clean/<case>.nii.gz`` (the labels before corruption) and ``corruption.json``:
``{case_id: {"corrupted": bool, "kind": str | None, "classes": [...], "params": {...},
"changed_voxels": int}}`` — the ground truth for "does AUV find the noisy cases".
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import read_image, to_ras, umask_mode, voxel_spacing, write_image

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
BUILDER_VERSION = 1
SOURCES = ("chest", "spine-ct", "spine-mr", "brain-mni", "lung-tumour", "brain-tumour", "brain-aal")
# the tumour sources read pyradiomics 3.0.1's source archive, which the user downloads once: its data/ folder is
# in the sdist only (pip install keeps nothing importable of it), and auvcore never downloads at run time
PYRADIOMICS_ENV = "AUVCORE_PYRADIOMICS_SDIST"
PYRADIOMICS_DOWNLOAD = "pip download pyradiomics==3.0.1 --no-deps --no-binary :all: --no-build-isolation -d DIR"
_PYRADIOMICS_PREFIX = "pyradiomics-3.0.1/data/"
# the atlas source reads Debian's mricron-data package (Colin27 T1 and AAL on one grid), installed or unpacked
MRICRON_ENV = "AUVCORE_MRICRON_TEMPLATES"
MRICRON_DEFAULT = "/usr/share/mricron/templates"
MRICRON_INSTALL = ("apt-get install mricron-data, or without root: apt-get download mricron-data && "
                   "dpkg -x mricron-data_*.deb DIR and AUVCORE_MRICRON_TEMPLATES=DIR/usr/share/mricron/templates")
# the AAL regions of the brain-aal cohort, in class order: deep grey nuclei and the hippocampus, left and right
# (the cortical regions' borders are sulci an annotator cannot see on one T1; the pallidum and amygdala vanish
# at the encoders' feature grids)
_AAL_REGIONS = ("Caudate_L", "Caudate_R", "Putamen_L", "Putamen_R", "Thalamus_L", "Thalamus_R",
                "Hippocampus_L", "Hippocampus_R")


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


def _package_dir(module: str, extra: str, what: str) -> Path:
    """The installed folder of ``module`` without importing it (tptbox's import pulls in a lot)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the {what} cohort needs the {module} package (pip install 'auvcore[{extra}]')")
    return Path(list(spec.submodule_search_locations)[0])


def _need(*paths: Path) -> None:
    for q in paths:
        if not q.is_file():
            raise FileNotFoundError(f"{q} is missing (the cohort sources are pinned: pip install 'auvcore[cohorts]')")


def _source_spine_ct():
    """tptbox 1.1.0's lumbar spine CT (1.5 mm isotropic) with the vertebra labels L2, L3, L4."""
    base = _package_dir("TPTBox", "cohorts", "spine-ct") / "tests" / "sample_ct"
    img_p, lab_p = base / "sub-ct_label-22_ct.nii.gz", base / "sub-ct_seg-vert_label-22_msk.nii.gz"
    _need(img_p, lab_p)
    img, aff = read_image(img_p)
    vert, laff = read_image(lab_p)
    lab = np.zeros(vert.shape, np.uint8)
    for k, v in enumerate((21, 22, 23), start=1):  # tptbox numbering: 20 + n = Ln
        lab[vert == v] = k
    img, aff = to_ras(img.astype(np.float32), aff)
    lab, _ = to_ras(lab, laff)
    names = {0: "background", 1: "L2 vertebra", 2: "L3 vertebra", 3: "L4 vertebra"}
    return img, lab, aff, names, "CT"


def _source_spine_mr():
    """tptbox 1.1.0's cervical spine T2w MR: vertebrae C5-C7, two discs and the spinal canal."""
    base = _package_dir("TPTBox", "cohorts", "spine-mr") / "tests" / "sample_mri"
    img_p = base / "sub-mri_label-6_T2w.nii.gz"
    vert_p, sub_p = base / "sub-mri_seg-vert_label-6_msk.nii.gz", base / "sub-mri_seg-subreg_label-6_msk.nii.gz"
    _need(img_p, vert_p, sub_p)
    img, aff = read_image(img_p)
    vert, laff = read_image(vert_p)
    sub, _ = read_image(sub_p)
    lab = np.zeros(vert.shape, np.uint8)
    # tptbox numbering: n = Cn, 100 + n = the disc below Cn, 200 + n = the endplates of Cn;
    # subregions 60 = spinal cord, 61 = spinal canal, merged into one class (only where no vertebra or
    # disc is labelled): the cord alone is 2-3 mm wide, under two voxels of any encoder's feature grid
    for k, v in enumerate((5, 6, 7), start=1):
        lab[(vert == v) | (vert == 200 + v)] = k
    lab[vert == 105], lab[vert == 106] = 4, 5
    lab[(lab == 0) & ((sub == 60) | (sub == 61))] = 6
    img, aff = to_ras(img.astype(np.float32), aff)
    lab, _ = to_ras(lab, laff)
    names = {0: "background", 1: "C5 vertebra", 2: "C6 vertebra", 3: "C7 vertebra", 4: "C5/C6 disc",
             5: "C6/C7 disc", 6: "spinal canal"}
    return img, lab, aff, names, "MR"


def _source_brain_mni():
    """nilearn 0.14.1's skull-stripped MNI ICBM152 2009a T1 (1 mm) with CSF / GM / WM labels."""
    base = _package_dir("nilearn", "cohorts", "brain-mni") / "datasets" / "data"
    ps = [base / f"mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz" for t in ("t1", "gm", "wm")]
    _need(*ps)
    (img, aff), (gm, _), (wm, _) = (read_image(q) for q in ps)
    gm, wm = gm.astype(np.int16), wm.astype(np.int16)
    csf = np.clip(255 - gm - wm, 0, 255)
    lab = (np.argmax(np.stack([csf, gm, wm]), 0) + 1).astype(np.uint8)
    lab[img == 0] = 0  # outside the brain mask of the skull-stripped template
    img, aff2 = to_ras(img.astype(np.float32), aff)
    lab, _ = to_ras(lab, aff)
    names = {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}
    return img, lab, aff2, names, "MR"


def _pyradiomics_sdist(what: str) -> Path:
    """The pyradiomics 3.0.1 sdist named by ``AUVCORE_PYRADIOMICS_SDIST``; a clear error when it is not there."""
    how = (f"download it once with `{PYRADIOMICS_DOWNLOAD}` and set "
           f"{PYRADIOMICS_ENV}=DIR/pyradiomics-3.0.1.tar.gz")
    val = os.environ.get(PYRADIOMICS_ENV, "").strip()
    if not val:
        raise FileNotFoundError(f"the {what} cohort reads pyradiomics 3.0.1's source archive and "
                                f"{PYRADIOMICS_ENV} is not set: {how}")
    path = Path(val).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{PYRADIOMICS_ENV}={val}: no such file; {how}")
    return path


def _read_pyradiomics(patients, what: str) -> dict:
    """``{patient: (image, label, affine)}`` (file voxel order) read from the sdist's ``data/`` folder.

    The members are copied one by one into a temporary folder (fixed names, so nothing in the archive decides
    where a file lands) and read there; nothing is left behind.
    """
    import tarfile

    sdist = _pyradiomics_sdist(what)
    want = {f"{_PYRADIOMICS_PREFIX}{p}_{k}.nrrd": (p, k) for p in patients for k in ("image", "label")}
    got: dict = {}
    with tempfile.TemporaryDirectory(prefix="auvcore-pyradiomics-") as tmp:
        try:
            with tarfile.open(sdist, "r:gz") as tf:
                for ti in tf:  # one pass through the gzip stream, stopping once all members are read
                    if ti.name in want and ti.isfile():
                        q = Path(tmp) / f"{want[ti.name][0]}_{want[ti.name][1]}.nrrd"
                        with tf.extractfile(ti) as src, open(q, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        got[want[ti.name]] = read_image(q)
                        if len(got) == len(want):
                            break
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"{PYRADIOMICS_ENV}={sdist}: cannot read it as a .tar.gz ({type(e).__name__}: {e}); "
                             f"expected the archive from `{PYRADIOMICS_DOWNLOAD}`") from e
    missing = sorted(n for n, pk in want.items() if pk not in got)
    if missing:
        raise ValueError(f"{PYRADIOMICS_ENV}={sdist}: {', '.join(missing)} not in the archive; expected "
                         f"pyradiomics-3.0.1.tar.gz from `{PYRADIOMICS_DOWNLOAD}`")
    return {p: (got[p, "image"][0], got[p, "label"][0], got[p, "image"][1]) for p in patients}


def _tumour_patients(patients, what: str, names: dict, modality: str):
    """Each patient of a pyradiomics tumour source: ``(image, label, affine, names, modality)``, RAS.

    The masks hold 0 and 1 (checked: a value above 1 would be a class this source does not name).
    """
    out = []
    for p, (img, lab, aff) in _read_pyradiomics(patients, what).items():
        vals = np.unique(lab)
        if not set(vals.tolist()) <= {0, 1} or 1 not in vals:
            raise ValueError(f"{p}_label.nrrd: expected a 0/1 tumour mask, got values {vals.tolist()}")
        img, raff = to_ras(img.astype(np.float32), aff)
        lab, _ = to_ras(lab.astype(np.uint8), aff)
        if modality == "MR":
            img = np.clip(img, 0, None)
        out.append((img, lab, raff, dict(names), modality))
    return out


def _source_lung_tumour(patients=("lung1", "lung2")):
    """pyradiomics 3.0.1's two lung CTs (different patients; 0.57 / 0.63 mm in-plane, 5 mm slices), tumour masks."""
    return _tumour_patients(patients, "lung-tumour", {0: "background", 1: "tumour"}, "CT")


def _source_brain_tumour(patients=("brain1", "brain2")):
    """pyradiomics 3.0.1's two brain MRs (different patients; 0.78 mm in-plane, 6.5 mm slices), tumour masks."""
    return _tumour_patients(patients, "brain-tumour", {0: "background", 1: "tumour"}, "MR")


def mricron_templates() -> Path:
    """The folder the brain-aal source reads: ``AUVCORE_MRICRON_TEMPLATES``, else Debian's install location."""
    val = os.environ.get(MRICRON_ENV, "").strip()
    return Path(val).expanduser() if val else Path(MRICRON_DEFAULT)


def _source_brain_aal():
    """Debian mricron-data's Colin27 T1 (``ch2.nii.gz``, 1 mm) with 8 AAL regions from ``aal.nii.gz`` (same grid)."""
    base = mricron_templates()
    val = os.environ.get(MRICRON_ENV, "").strip()
    where = f"{MRICRON_ENV}={val}" if val else f"{MRICRON_DEFAULT} ({MRICRON_ENV} not set)"
    paths = [base / f for f in ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt")]
    missing = [q.name for q in paths if not q.is_file()]
    if missing:
        raise FileNotFoundError(f"the brain-aal cohort reads Debian's mricron-data templates; {where} lacks "
                                f"{', '.join(missing)}: {MRICRON_INSTALL}")
    # aal.nii.txt: "<value> <name> <code>" per region; the class map is built from the names, so a relabelled
    # atlas is refused instead of silently giving other structures
    index = {}
    for line in paths[2].read_text(encoding="utf-8", errors="replace").splitlines():
        f = line.split()
        if len(f) >= 2 and f[0].isdigit():
            index[f[1]] = int(f[0])
    absent = [r for r in _AAL_REGIONS if r not in index]
    if absent:
        raise ValueError(f"{paths[2]}: expected the AAL region list, it lacks {', '.join(absent)}")
    (img, aff), (aal, laff) = read_image(paths[0]), read_image(paths[1])
    if img.shape != aal.shape or not np.allclose(aff, laff, atol=1e-3):
        raise ValueError(f"{base}: ch2.nii.gz {img.shape} and aal.nii.gz {aal.shape} are not on one grid")
    lab = np.zeros(aal.shape, np.uint8)
    for k, r in enumerate(_AAL_REGIONS, start=1):
        lab[aal == index[r]] = k
    img, raff = to_ras(img.astype(np.float32), aff)
    lab, _ = to_ras(lab, aff)
    names = {0: "background", **{k: r.replace("_L", " left").replace("_R", " right").lower()
                                 for k, r in enumerate(_AAL_REGIONS, start=1)}}
    return img, lab, raff, names, "MR"


@dataclass(frozen=True)
class _Spec:
    """How the cases of one source vary (see the module doc) and how its labels may be corrupted."""

    load: object
    size_mm: tuple           # default field of view (x, y, z) in mm
    inplane: tuple           # voxel size range (mm) of the two in-plane axes
    slice: tuple             # voxel size range (mm) along the slice axis
    slice_axis: int          # 2 = axial slices, 0 = sagittal
    shift_mm: float          # ± shift of the field of view (1.5× along the slice axis)
    rot_deg: tuple           # ± rotation about x, y, z
    outside: str             # "constant" (air / background beyond the source) or "nearest" (a crop)
    swap_pairs: tuple        # neighbouring classes that a "swap" exchanges
    fill: tuple = ()         # classes that fill the body: "drop" takes another when it can
    skip_kinds: tuple = ()   # corruption kinds that make no sense for this source
    channel: str = "CT"      # dataset.json channel name ("CT" → CT handling, else MR)
    patients: tuple = ()     # a source of several patients: load(patients) gives one volume each, cases alternate
    title: str = ""
    licence: str = ""
    what: str = ""           # the volume in a few words, for progress lines ("real lumbar spine CT")


def _load_chest():
    return (*_source_chest(), "CT")


_SPECS = {
    "chest": _Spec(_load_chest, (224.0, 224.0, 192.0), (1.5, 2.5), (3.0, 5.0), 2, 12.0, (3, 3, 8), "constant",
                   ((5, 6), (2, 3), (3, 4)), fill=(7,), channel="CT",
                   title="Varied copies of the slicerio 1.4.0 sample chest CT with recorded label corruption",
                   licence="derived from slicerio 1.4.0 sample data (MIT, Copyright (c) 2021 Andras Lasso)",
                   what="real chest CT"),
    "spine-ct": _Spec(_source_spine_ct, (96.0, 96.0, 64.0), (1.0, 1.8), (1.5, 3.0), 2, 5.0, (3, 3, 6), "nearest",
                      ((1, 2), (2, 3)), channel="CT",
                      title="Varied copies of the tptbox 1.1.0 sample lumbar spine CT with recorded label corruption",
                      licence="derived from tptbox 1.1.0 test data (Apache-2.0, Robert Graf et al.)",
                      what="real lumbar spine CT"),
    "spine-mr": _Spec(_source_spine_mr, (64.0, 90.0, 72.0), (1.1, 1.7), (2.5, 4.0), 0, 4.0, (6, 3, 3), "nearest",
                      ((1, 2), (2, 3), (4, 5)), channel="T2",
                      title="Varied copies of the tptbox 1.1.0 sample cervical spine T2w MR with recorded label "
                            "corruption",
                      licence="derived from tptbox 1.1.0 test data (Apache-2.0, Robert Graf et al.)",
                      what="real cervical spine MR"),
    "brain-mni": _Spec(_source_brain_mni, (160.0, 192.0, 160.0), (1.0, 1.4), (1.5, 4.0), 2, 8.0, (4, 4, 8),
                       "constant", ((2, 3),), skip_kinds=("drop",), channel="T1",
                       title="Varied copies of the MNI ICBM152 2009a T1 template (from nilearn 0.14.1) with CSF/GM/WM "
                             "labels and recorded label corruption",
                       licence="derived from the MNI ICBM152 nonlinear symmetric 2009a template as shipped in nilearn "
                               "0.14.1 (Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, "
                               "Montreal Neurological Institute, McGill University; see DATA_LICENSES.md)",
                       what="the MNI152 brain MR"),
    "lung-tumour": _Spec(_source_lung_tumour, (96.0, 96.0, 80.0), (0.7, 1.0), (2.5, 5.0), 2, 8.0, (3, 3, 8),
                         "constant", (), skip_kinds=("swap",), channel="CT", patients=("lung1", "lung2"),
                         title="Varied copies of the two lung CTs with tumour masks of pyradiomics 3.0.1 (source "
                               "archive) with recorded label corruption",
                         licence="derived from pyradiomics 3.0.1 test data (BSD-3-Clause, Copyright 2017 Harvard "
                                 "Medical School)",
                         what="two real lung CTs with tumours"),
    "brain-tumour": _Spec(_source_brain_tumour, (96.0, 96.0, 80.0), (0.8, 1.2), (4.0, 6.5), 2, 8.0, (3, 3, 8),
                          "constant", (), skip_kinds=("swap",), channel="MR", patients=("brain1", "brain2"),
                          title="Varied copies of the two brain MRs with tumour masks of pyradiomics 3.0.1 (source "
                                "archive) with recorded label corruption",
                          licence="derived from pyradiomics 3.0.1 test data (BSD-3-Clause, Copyright 2017 Harvard "
                                  "Medical School)",
                          what="two real brain MRs with tumours"),
    # left/right exchanged (a laterality slip) or caudate/putamen confused (neighbours across the internal capsule)
    "brain-aal": _Spec(_source_brain_aal, (112.0, 128.0, 96.0), (1.0, 1.4), (1.5, 4.0), 2, 6.0, (4, 4, 8),
                       "constant", ((1, 2), (3, 4), (5, 6), (7, 8), (1, 3), (2, 4)), channel="T1",
                       title="Varied copies of the Colin27 T1 with 8 AAL regions (Debian mricron-data) with recorded "
                             "label corruption",
                       licence="derived from Debian mricron-data (Colin27 T1, Holmes et al. 1998; AAL, "
                               "Tzourio-Mazoyer et al. 2002; see DATA_LICENSES.md)",
                       what="the Colin27 brain MR with AAL regions"),
}


def describe(source: str) -> str:
    """The source volume in a few words ("real lumbar spine CT"), for progress lines."""
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {SOURCES}, got {source!r}")
    return _SPECS[source].what


def load_source(source: str, patient: str | None = None):
    """The source volume of ``source``: ``(image, label, affine, class_names, modality)``, RAS.

    ``patient``: for a source of several patients (``_SPECS[source].patients``), which one (default: the
    first); ``None`` for the others.
    """
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {SOURCES}, got {source!r}")
    spec = _SPECS[source]
    if not spec.patients:
        if patient is not None:
            raise ValueError(f"patient: the {source} source has one volume, got {patient!r}")
        return spec.load()
    patient = spec.patients[0] if patient is None else patient
    if patient not in spec.patients:
        raise ValueError(f"patient: expected one of {spec.patients} for the {source} source, got {patient!r}")
    return spec.load((patient,))[0]


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


def _make_case(rng, img, lab, aff, size_mm, spec: _Spec | None = None, modality: str = "CT",
               ref: float | None = None):
    """One varied (image, label, affine) from the source volume.

    ``spec``: the source's variation ranges (default: the chest's). ``modality``: "CT" (HU) or "MR"
    (``ref``: the source's 99th intensity percentile, which lands at about 1000 × the case's gain).
    """
    from scipy import ndimage

    spec = _SPECS["chest"] if spec is None else spec
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
        src_world[d] += _smooth_field(rng, tuple(shape), tuple(coarse), amp / 2).astype(np.float32)
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
        bias = np.exp(_smooth_field(rng, tuple(shape), (3, 3, 3), bias_amp))
        out_img = (out_img + 1000.0) * bias - 1000.0 + rng.normal(0, noise, out_img.shape)
        params.update(bias=round(float(bias_amp), 4), noise_hu=round(float(noise), 2),
                      slice_blur_vox=round(float(sigma_z), 3))
        out_img = np.clip(np.round(out_img), -1024, 3071)
    else:
        ref = float(np.percentile(img[img > 0], 99)) if ref is None else float(ref)
        gain, bias_amp, noise = rng.uniform(0.7, 1.4), rng.uniform(0.05, 0.15), rng.uniform(0.01, 0.04)
        bias = np.exp(_smooth_field(rng, tuple(shape), (3, 3, 3), bias_amp))
        sig = np.clip(out_img, 0, None) * (1000.0 * gain / ref) * bias
        sd = noise * 1000.0
        # magnitude images: Rician noise (two Gaussian channels), so the background is not zero
        out_img = np.hypot(sig + rng.normal(0, sd, sig.shape), rng.normal(0, sd, sig.shape))
        params.update(gain=round(float(gain), 4), bias=round(float(bias_amp), 4),
                      noise_rel=round(float(noise), 4), slice_blur_vox=round(float(sigma_z), 3))
        out_img = np.clip(np.round(out_img), 0, 32767)
    return out_img.astype(np.int16), out_lab.astype(np.uint8), out_aff, params


def _ball(r):
    z = np.arange(-r, r + 1)
    return (z[:, None, None] ** 2 + z[None, :, None] ** 2 + z[None, None, :] ** 2) <= r * r


def _applicable(kind, lab, K, spec: _Spec | None = None) -> bool:
    """Whether ``kind`` finds something to act on in ``lab`` for this source."""
    spec = _SPECS["chest"] if spec is None else spec
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


def _corrupt(rng, lab, kind, K, spec: _Spec | None = None, strength: str = "default"):
    """Corrupt ``lab`` (uint8) by ``kind``; returns (new label, record).

    ``spec`` (default: the chest's) names the classes a "swap" exchanges and those "drop" avoids, and the
    slice axis of a "partial". ``strength`` (one of ``STRENGTHS``) picks the size ranges of ``_STRENGTH``.
    """
    spec = _SPECS["chest"] if spec is None else spec
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


def build_demo(out_dir, n_cases: int = 24, corrupt_fraction: float = 0.25, seed: int = 0,
               source: str = "chest", size_mm=None, kinds=DEFAULT_KINDS, strength: str = "default") -> Path:
    """Build the demo data set (see the module doc) under ``out_dir`` and return its path.

    ``source``: one of ``SOURCES`` (default ``"chest"``). ``n_cases`` cases,
    ``round(corrupt_fraction · n_cases)`` of them with corrupted labels (chosen and corrupted from
    ``seed``; ``kinds``, a subset of ``KINDS``, default ``DEFAULT_KINDS``: those that do not apply to the
    source are skipped, see the module doc; ``strength``, one of ``STRENGTHS``, scales the size of each
    corruption, ``"default"`` giving the cohorts of the original builder);
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
    if not [k for k in kinds if k not in _SPECS[source].skip_kinds]:
        raise ValueError(f"kinds: none of {kinds!r} applies to the {source} source "
                         f"(it skips {_SPECS[source].skip_kinds})")
    if strength not in STRENGTHS:
        raise ValueError(f"strength: expected one of {STRENGTHS}, got {strength!r}")
    if size_mm is None:
        size_mm = _SPECS[source].size_mm
    size_mm = tuple(float(s) for s in size_mm)
    if len(size_mm) != 3 or min(size_mm) <= 0:
        raise ValueError(f"size_mm: expected three positive numbers, got {size_mm!r}")
    out = Path(out_dir)
    params = {"version": BUILDER_VERSION, "source": source, "n_cases": int(n_cases),
              "corrupt_fraction": float(corrupt_fraction), "seed": int(seed),
              "size_mm": list(size_mm), "kinds": list(kinds), "strength": strength}
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
    spec = _SPECS[params["source"]]
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
    record = {}
    for i in range(n):
        cid = f"demo_{i:03d}"
        crng = np.random.default_rng([params["seed"], i])  # per-case stream: cases independent of n
        # several patients: they alternate, so every cohort of two cases or more has each of them, and a case is
        # the same whatever n_cases is
        patient = spec.patients[i % len(spec.patients)] if spec.patients else None
        img, lab, aff, _, modality, ref = vols[patient]
        im, lb, caff, cparams = _make_case(crng, img, lab, aff, params["size_mm"], spec, modality, ref)
        if patient is not None:
            cparams = {"patient": patient, **cparams}
        write_image(root / "imagesTr" / f"{cid}_0000.nii.gz", im, caff)
        write_image(root / "labelsTr_clean" / f"{cid}.nii.gz", lb, caff)
        entry = {"corrupted": False, "kind": None, "classes": [], "params": {}, "changed_voxels": 0}
        if i in kind_of:
            # the drawn kind, else the next one (in the cycle) that finds something to act on here
            j = kinds.index(kind_of[i])
            kind = next((k for k in kinds[j:] + kinds[:j] if _applicable(k, lb, K, spec)), None)
            if kind is not None:
                lb2, rec = _corrupt(crng, lb, kind, K, spec, params.get("strength", "default"))
                entry = {"corrupted": True, "kind": kind, **rec}
                lb = lb2
        entry["case_params"] = cparams
        write_image(root / "labelsTr" / f"{cid}.nii.gz", lb, caff)
        record[cid] = entry
    ds = {
        "name": f"auvcore-demo-{params['source']}",
        "description": spec.title,
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
