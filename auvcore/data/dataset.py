"""Data set layouts (Medical Segmentation Decathlon, nnU-Net v2 raw, CSV) and case loading."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .io import read_image, resample, to_ras, voxel_spacing

MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class Case:
    """One training case: ``case_id``, the image file and its label map file (``None`` if the
    layout lists no label for it; a listed or expected label path is kept even when the file is
    missing, so :func:`load_case` can name it)."""

    case_id: str
    image: Path
    label: Path | None


@dataclass
class Dataset:
    """A discovered data set.

    ``cases``: sorted by ``case_id``. ``class_names``: label value → name, background 0 included
    (from ``dataset.json`` "labels"; ``{0: "background"}`` when the layout has none).
    ``layout``: ``"msd"``, ``"nnunet"`` or ``"csv"``. ``corruption``: the parsed
    ``corruption.json`` beside the data set (``{case_id: {"corrupted": bool, "kind": str | None,
    ...}}``), ``None`` if there is none. ``modality``: ``"CT"`` or ``"MR"`` when ``dataset.json``
    says so, else ``None``.
    """

    root: Path
    cases: list[Case]
    class_names: dict[int, str]
    layout: str
    corruption: dict | None = None
    modality: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes K including background (max label value + 1)."""
        return max(self.class_names) + 1 if self.class_names else 1

    def __len__(self) -> int:
        return len(self.cases)

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(f"case {case_id!r} not in the data set at {self.root}")


@dataclass
class Volume:
    """A loaded case on a common grid.

    ``image``: float32 ``[X, Y, Z]`` in RAS voxel order, raw intensities (HU for CT), resampled to
    ``spacing``. ``label``: int64 ``[X, Y, Z]`` on the same grid (nearest-neighbour resampled, so
    no class is invented). ``spacing``: mm per axis. ``affine``: voxel → RAS world (mm).
    ``label_counts``: voxels per label value (``bincount`` of ``label``, length max + 1; ``load_case`` counts
    them once, on the resampled label, for the label checks and the table), ``None`` if not counted.
    """

    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    case_id: str = ""
    modality: str = "CT"
    label_counts: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)


# --------------------------------------------------------------------------------------------
# discovery

_EXTS = (".nii.gz", ".nii", ".nrrd", ".nhdr")


def _strip_ext(name: str) -> str:
    low = name.lower()
    for e in _EXTS:
        if low.endswith(e):
            return name[: -len(e)]
    return name


def _is_image(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(_EXTS) and not p.name.startswith((".", "._"))


def discover(path: str | os.PathLike) -> Dataset:
    """Find the cases of a data set at ``path`` and detect its layout.

    * nnU-Net v2 raw: ``dataset.json`` with ``"file_ending"``/``"channel_names"``, images
      ``imagesTr/<case>_0000<ending>`` (channel 0 is used), labels ``labelsTr/<case><ending>``.
    * Medical Segmentation Decathlon: ``dataset.json`` with a ``"training"`` list of
      ``{"image", "label"}`` paths (or, without it, ``imagesTr/`` and ``labelsTr/`` with equal
      file names).
    * CSV: a ``.csv`` file (or a folder holding exactly one) with a header naming ``case``,
      ``image`` and ``label`` columns; relative paths are relative to the CSV's folder; an empty
      label cell means no label.

    A ``corruption.json`` beside the data set is parsed into ``Dataset.corruption``.
    Errors (``ValueError``): missing path, unknown layout, no cases, malformed ``dataset.json``.
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"data set path {root} does not exist")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise ValueError(f"data set path {root} is a file but not a .csv")
        ds = _discover_csv(root)
    else:
        dj = root / "dataset.json"
        csvs = sorted(p for p in root.glob("*.csv") if p.is_file())
        if dj.is_file():
            meta = _read_json(dj)
            if "file_ending" in meta or "channel_names" in meta:
                ds = _discover_nnunet(root, meta)
            else:
                ds = _discover_msd(root, meta)
        elif (root / "imagesTr").is_dir():
            ds = _discover_msd(root, {})
        elif len(csvs) == 1:
            ds = _discover_csv(csvs[0])
        else:
            raise ValueError(
                f"{root}: no data set layout found (expected dataset.json with imagesTr/ and "
                f"labelsTr/, imagesTr/ alone, or one .csv of case,image,label)"
            )
    if not ds.cases:
        raise ValueError(f"{root}: the {ds.layout} data set has no cases")
    cj = ds.root / "corruption.json"
    if cj.is_file():
        ds.corruption = _read_json(cj)
    return ds


def _read_json(p: Path) -> dict:
    try:
        with open(p, encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot parse JSON ({e})") from e
    if not isinstance(out, dict):
        raise ValueError(f"{p}: expected a JSON object at the top level")
    return out


def _modality(meta: dict) -> str | None:
    mods = meta.get("channel_names") or meta.get("modality") or {}
    if isinstance(mods, dict) and mods:
        first = str(mods.get("0", next(iter(mods.values())))).upper()
        if first == "CT":
            return "CT"
        if first in ("MR", "MRI", "T1", "T2", "FLAIR", "T1W", "T2W", "ADC", "DWI", "NONCT", "T1GD"):
            return "MR"
    return None


def _class_names(meta: dict, where: Path) -> dict[int, str]:
    labels = meta.get("labels")
    if labels is None:
        return {0: "background"}
    if not isinstance(labels, dict):
        raise ValueError(f"{where}: 'labels' must be an object, got {type(labels).__name__}")
    out: dict[int, str] = {}
    for k, v in labels.items():
        # MSD: {"0": "background"}; nnU-Net v2: {"background": 0}. Region-based nnU-Net labels
        # (lists of values) describe overlapping regions, not classes of a label map.
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out[int(v)] = str(k)
        elif isinstance(v, str) and str(k).lstrip("-").isdigit():
            out[int(k)] = v
        else:
            raise ValueError(f"{where}: cannot read label entry {k!r}: {v!r} (region labels are not supported)")
    out.setdefault(0, "background")
    return dict(sorted(out.items()))


def _discover_nnunet(root: Path, meta: dict) -> Dataset:
    ending = meta.get("file_ending", ".nii.gz")
    img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
    if not img_dir.is_dir():
        raise ValueError(f"{root}: nnU-Net raw layout without imagesTr/")
    suffix = "_0000" + ending
    cases = []
    for p in sorted(img_dir.iterdir()):
        if p.is_file() and p.name.endswith(suffix) and not p.name.startswith("."):
            cid = p.name[: -len(suffix)]
            lab = lab_dir / (cid + ending)
            # keep the expected path even if the file is missing: load_case then names it
            cases.append(Case(cid, p, lab))
    return Dataset(root, cases, _class_names(meta, root / "dataset.json"), "nnunet",
                   modality=_modality(meta), meta=meta)


def _discover_msd(root: Path, meta: dict) -> Dataset:
    cases = []
    training = meta.get("training")
    if training:
        for i, entry in enumerate(training):
            if not isinstance(entry, dict) or "image" not in entry:
                raise ValueError(f"{root / 'dataset.json'}: training entry {i} has no 'image'")
            img = (root / entry["image"]).resolve()
            lab = entry.get("label")
            lab = (root / lab).resolve() if lab else None
            cases.append(Case(_strip_ext(img.name), img, lab))
    else:
        img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
        if not img_dir.is_dir():
            raise ValueError(f"{root}: MSD layout without imagesTr/")
        for p in sorted(img_dir.iterdir()):
            if _is_image(p):
                lab = lab_dir / p.name
                cases.append(Case(_strip_ext(p.name), p, lab if lab.is_file() else None))
    cases.sort(key=lambda c: c.case_id)
    return Dataset(root, cases, _class_names(meta, root / "dataset.json"), "msd",
                   modality=_modality(meta), meta=meta)


def _discover_csv(path: Path) -> Dataset:
    base = path.parent
    cases = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise ValueError(f"{path}: cannot read CSV ({e})") from e
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: the CSV is empty")
    head = [c.strip().lower() for c in rows[0]]
    if {"case", "image"} <= set(head):
        ic, ii = head.index("case"), head.index("image")
        il = head.index("label") if "label" in head else None
        body = rows[1:]
    else:
        raise ValueError(f"{path}: the CSV needs a header row naming the columns case,image,label; got {rows[0]}")
    seen = set()
    for n, r in enumerate(body, start=2):
        if len(r) <= max(ic, ii):
            raise ValueError(f"{path}: line {n} has {len(r)} columns, expected at least {max(ic, ii) + 1}")
        cid = r[ic].strip()
        if cid in seen:
            raise ValueError(f"{path}: line {n}: duplicate case id {cid!r}")
        seen.add(cid)
        img = Path(r[ii].strip())
        img = img if img.is_absolute() else base / img
        lab = r[il].strip() if il is not None and il < len(r) else ""
        labp = None
        if lab:
            labp = Path(lab)
            labp = labp if labp.is_absolute() else base / labp
        cases.append(Case(cid, img, labp))
    meta, names = {}, {0: "background"}
    if (base / "dataset.json").is_file():
        meta = _read_json(base / "dataset.json")
        names = _class_names(meta, base / "dataset.json")
    cases.sort(key=lambda c: c.case_id)
    return Dataset(base, cases, names, "csv", modality=_modality(meta), meta=meta)


# --------------------------------------------------------------------------------------------
# loading


def load_case(
    case: Case,
    spacing: tuple[float, float, float] | None = (1.5, 1.5, 3.0),
    modality: str = "CT",
    require_label: bool = True,
    device=None,
) -> Volume:
    """Read a case, reorient it to RAS and resample image and label to ``spacing`` (mm).

    The image keeps its raw intensities (trilinear resampling); the label map is resampled by
    nearest neighbour so no class is invented. ``spacing=None`` keeps the native grid.
    Errors name the case: a missing or unreadable file, a label whose shape or affine differs
    from the image's, a label with negative or non-integer values, or a missing label when
    ``require_label`` (default) → ``ValueError`` (``FileNotFoundError`` for missing files).

    Resampling (:func:`auvcore.data.io.resample`) runs as torch ops on ``device`` (default the CPU, with torch's
    threads; a GPU when the scoring device is one); the label's voxels per value (``Volume.label_counts``) are
    counted there too, on the resampled label, by one ``bincount``. The volume comes back in host memory.
    """
    return resample_volume(read_case(case, modality, require_label), spacing, device)


def read_case(case: Case, modality: str = "CT", require_label: bool = True) -> Volume:
    """The first half of :func:`load_case`: read and check a case and reorient it to RAS, on its native grid
    (the label as read: int16 where its values allow, not yet counted). A loader process hands this to the
    scoring process, which resamples it on its GPU (:func:`resample_volume`)."""
    if not isinstance(case, Case):
        raise TypeError(f"case: expected an auvcore.data.Case, got {type(case).__name__}")
    if modality not in MODALITIES:
        raise ValueError(f"modality: expected one of {MODALITIES}, got {modality!r}")
    cid = case.case_id
    try:
        img, aff = read_image(case.image)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"case {cid!r}: image {e}") from e
    except ValueError as e:
        raise ValueError(f"case {cid!r}: image {e}") from e
    lab = None
    if case.label is None or not Path(case.label).exists():
        if require_label:
            what = f"no file {case.label}" if case.label is not None else "the data set lists none"
            raise FileNotFoundError(f"case {cid!r}: label map missing ({what})")
    else:
        try:
            lab, laff = read_image(case.label)
        except ValueError as e:
            raise ValueError(f"case {cid!r}: label {e}") from e
        if lab.shape != img.shape:
            raise ValueError(f"case {cid!r}: image shape {img.shape} and label shape {lab.shape} differ")
        tol = 1e-3 * max(1.0, float(np.abs(aff[:3, :3]).max()))
        if not np.allclose(aff, laff, atol=max(tol, 1e-3)):
            raise ValueError(
                f"case {cid!r}: image and label affines differ (the label is not on the image grid)\n"
                f"image:\n{np.round(aff, 4)}\nlabel:\n{np.round(laff, 4)}"
            )
        lab = _as_label(lab, cid)
    img = np.asarray(img)
    if not np.issubdtype(img.dtype, np.number):
        raise ValueError(f"case {cid!r}: image has non-numeric dtype {img.dtype}")
    img = img.astype(np.float32, copy=False)
    if not np.isfinite(img).all():
        raise ValueError(f"case {cid!r}: image contains NaN or Inf")
    img, aff_ras = to_ras(img, aff)
    if lab is not None:
        lab, _ = to_ras(lab, aff)
    return Volume(img, lab, voxel_spacing(aff_ras), aff_ras, cid, modality)


def resample_volume(vol: Volume, spacing: tuple[float, float, float] | None, device=None) -> Volume:
    """The second half of :func:`load_case`: ``vol`` (from :func:`read_case`) resampled to ``spacing`` on
    ``device`` (image trilinear, label nearest neighbour, then int64 and counted), back in host memory."""
    import torch

    img, new_aff = resample(vol.image, vol.affine, spacing, order=1, device=device)
    lab, counts = vol.label, None
    if lab is not None:
        lab = torch.from_numpy(np.ascontiguousarray(lab))
        lab, _ = resample(lab, vol.affine, spacing, order=0, device=device)
        lab = lab.long()
        counts = torch.bincount(lab.reshape(-1)).cpu().numpy()
        lab = np.ascontiguousarray(lab.cpu().numpy())
    return Volume(np.ascontiguousarray(img, dtype=np.float32), lab, voxel_spacing(new_aff), new_aff, vol.case_id,
                  vol.modality, counts)


def _as_label(lab: np.ndarray, cid: str) -> np.ndarray:
    if np.issubdtype(lab.dtype, np.floating):
        if not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab)):
            raise ValueError(f"case {cid!r}: label map has non-integer values (is it an image?)")
        lab = lab.astype(np.int64)
    elif not np.issubdtype(lab.dtype, np.integer) and lab.dtype != bool:
        raise ValueError(f"case {cid!r}: label map has dtype {lab.dtype}")
    lab = lab.astype(np.int64, copy=False)
    if lab.size and lab.min() < 0:
        raise ValueError(f"case {cid!r}: label map has negative values (min {lab.min()})")
    # int16 is enough for any realistic class count and keeps nearest resampling cheap.
    return lab.astype(np.int16 if lab.max(initial=0) < 32767 else np.int64)
