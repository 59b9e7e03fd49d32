"""The real volumes the cohorts are varied from, and how each source's cases vary and may be corrupted.

Sources (``SOURCES``; the volumes ship inside PyPI or Debian packages, licences in ``../DATA_LICENSES.md``):

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

Each source's ``Spec`` (in ``SPECS``) holds its loader, the ranges its cases vary over (field of view, voxel
sizes, slice axis, shift, rotation; used by ``variation.make_case``) and its anatomy as the label corruptions
need it (the classes a ``"swap"`` exchanges, the body-filling classes ``"drop"`` avoids, the kinds that make
no sense for it).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import read_image, to_ras

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
class Spec:
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


SPECS = {
    "chest": Spec(_load_chest, (224.0, 224.0, 192.0), (1.5, 2.5), (3.0, 5.0), 2, 12.0, (3, 3, 8), "constant",
                   ((5, 6), (2, 3), (3, 4)), fill=(7,), channel="CT",
                   title="Varied copies of the slicerio 1.4.0 sample chest CT with recorded label corruption",
                   licence="derived from slicerio 1.4.0 sample data (MIT, Copyright (c) 2021 Andras Lasso)",
                   what="real chest CT"),
    "spine-ct": Spec(_source_spine_ct, (96.0, 96.0, 64.0), (1.0, 1.8), (1.5, 3.0), 2, 5.0, (3, 3, 6), "nearest",
                      ((1, 2), (2, 3)), channel="CT",
                      title="Varied copies of the tptbox 1.1.0 sample lumbar spine CT with recorded label corruption",
                      licence="derived from tptbox 1.1.0 test data (Apache-2.0, Robert Graf et al.)",
                      what="real lumbar spine CT"),
    "spine-mr": Spec(_source_spine_mr, (64.0, 90.0, 72.0), (1.1, 1.7), (2.5, 4.0), 0, 4.0, (6, 3, 3), "nearest",
                      ((1, 2), (2, 3), (4, 5)), channel="T2",
                      title="Varied copies of the tptbox 1.1.0 sample cervical spine T2w MR with recorded label "
                            "corruption",
                      licence="derived from tptbox 1.1.0 test data (Apache-2.0, Robert Graf et al.)",
                      what="real cervical spine MR"),
    "brain-mni": Spec(_source_brain_mni, (160.0, 192.0, 160.0), (1.0, 1.4), (1.5, 4.0), 2, 8.0, (4, 4, 8),
                       "constant", ((2, 3),), skip_kinds=("drop",), channel="T1",
                       title="Varied copies of the MNI ICBM152 2009a T1 template (from nilearn 0.14.1) with CSF/GM/WM "
                             "labels and recorded label corruption",
                       licence="derived from the MNI ICBM152 nonlinear symmetric 2009a template as shipped in nilearn "
                               "0.14.1 (Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, "
                               "Montreal Neurological Institute, McGill University; see DATA_LICENSES.md)",
                       what="the MNI152 brain MR"),
    "lung-tumour": Spec(_source_lung_tumour, (96.0, 96.0, 80.0), (0.7, 1.0), (2.5, 5.0), 2, 8.0, (3, 3, 8),
                         "constant", (), skip_kinds=("swap",), channel="CT", patients=("lung1", "lung2"),
                         title="Varied copies of the two lung CTs with tumour masks of pyradiomics 3.0.1 (source "
                               "archive) with recorded label corruption",
                         licence="derived from pyradiomics 3.0.1 test data (BSD-3-Clause, Copyright 2017 Harvard "
                                 "Medical School)",
                         what="two real lung CTs with tumours"),
    "brain-tumour": Spec(_source_brain_tumour, (96.0, 96.0, 80.0), (0.8, 1.2), (4.0, 6.5), 2, 8.0, (3, 3, 8),
                          "constant", (), skip_kinds=("swap",), channel="MR", patients=("brain1", "brain2"),
                          title="Varied copies of the two brain MRs with tumour masks of pyradiomics 3.0.1 (source "
                                "archive) with recorded label corruption",
                          licence="derived from pyradiomics 3.0.1 test data (BSD-3-Clause, Copyright 2017 Harvard "
                                  "Medical School)",
                          what="two real brain MRs with tumours"),
    # left/right exchanged (a laterality slip) or caudate/putamen confused (neighbours across the internal capsule)
    "brain-aal": Spec(_source_brain_aal, (112.0, 128.0, 96.0), (1.0, 1.4), (1.5, 4.0), 2, 6.0, (4, 4, 8),
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
    return SPECS[source].what


def load_source(source: str, patient: str | None = None):
    """The source volume of ``source``: ``(image, label, affine, class_names, modality)``, RAS.

    ``patient``: for a source of several patients (``SPECS[source].patients``), which one (default: the
    first); ``None`` for the others.
    """
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {SOURCES}, got {source!r}")
    spec = SPECS[source]
    if not spec.patients:
        if patient is not None:
            raise ValueError(f"patient: the {source} source has one volume, got {patient!r}")
        return spec.load()
    patient = spec.patients[0] if patient is None else patient
    if patient not in spec.patients:
        raise ValueError(f"patient: expected one of {spec.patients} for the {source} source, got {patient!r}")
    return spec.load((patient,))[0]
