"""`auvcore check DATASET`: every problem of a data set, listed at once with its case and file, before any
encoder runs (in the spirit of nnU-Net's ``verify_dataset_integrity``).

Errors (the case cannot be scored; ``score`` records it as failed and goes on): an unreadable or missing
image or label, image and label on different grids, label values that are not integers, negative, or not
classes of dataset.json, NaN or Inf in the image. Warnings (the case scores, with fewer classes): a label
with no foreground class, a class that vanishes (fewer than 2 voxels) at the chosen encoder's feature grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Problem:
    case: str
    file: str
    what: str
    error: bool  # False: a warning


def case_errors(case, label, ds, counts=None) -> list[str]:
    """The errors of one loaded case that ``load_case`` does not raise itself (it checks readability, grids,
    integer and non-negative labels, NaN/Inf images) but that would make its scale wrong; each names the file.

    The label values present are read off ``counts`` (voxels per value: ``Volume.label_counts``, counted by
    ``load_case`` on the resampled label), else counted here by one ``torch.bincount`` of ``label`` (numpy or
    torch, on its device): a count per value instead of ``np.unique``'s sort of every voxel."""
    import torch

    out = []
    if counts is None:
        counts = torch.bincount(torch.as_tensor(label).reshape(-1).long()).cpu().numpy()
    bad = [int(v) for v in np.flatnonzero(np.asarray(counts)) if int(v) not in ds.class_names]
    if bad and not ds.meta:
        out.append(f"label {case.label}: values {bad}, but the data set has no dataset.json to name its classes "
                   f"(put one beside the {ds.layout.upper()} with \"labels\": {{\"background\": 0, ...}})")
    elif bad:
        declared = ", ".join(f"{k}={v}" for k, v in sorted(ds.class_names.items()))
        out.append(f"label {case.label}: values {bad} are not among the classes of dataset.json ({declared})")
    return out


def encoder_grid(encoder: str, layer: str | None) -> tuple[tuple[float, float, float] | None, tuple | None]:
    """The voxel spacing an encoder reads and the stride of its feature grid, without building it."""
    from ..encoders import encoder_options

    if encoder in ("sam2", "litemedsam"):  # decoded maps on the native input grid
        return None, None
    layer = encoder_options(encoder, layer=layer)["layer"]
    if encoder == "merlin":
        from ..encoders import merlin

        if layer not in merlin.STRIDES:
            raise ValueError(f"--layer: expected one of {tuple(merlin.STRIDES)}, got {layer!r}")
        return merlin.SPACING, merlin.STRIDES[layer]
    from ..encoders import random3d

    if layer not in random3d.LAYERS:
        raise ValueError(f"--layer: expected one of {random3d.LAYERS}, got {layer!r}")
    s = 2 ** (random3d.LAYERS.index(layer) + 1)
    return random3d.Random3DEncoder.spacing, (s, s, s)


def check_dataset(dataset, encoder: str = "merlin", layer: str | None = None, limit: int | None = None,
                  progress: bool = False) -> tuple[list, list[Problem]]:
    """The cases of ``dataset`` and every problem found in them (errors and warnings)."""
    from tqdm import tqdm

    from ..data import discover, load_case
    from ..encoders import labels_to_grid

    ds = discover(dataset)
    cases = ds.cases[:limit] if limit else ds.cases
    spacing, stride = encoder_grid(encoder, layer)
    names = ds.class_names
    problems: list[Problem] = []
    for case in tqdm(cases, unit="case", desc="checking", disable=not progress):
        cid = case.case_id
        try:
            vol = load_case(case, spacing=spacing, modality=ds.modality or "CT")
        except (ValueError, OSError, EOFError) as e:
            problems.append(Problem(cid, str(case.label if "label" in str(e) else case.image), str(e), True))
            continue
        errors = case_errors(case, vol.label, ds, vol.label_counts)
        problems += [Problem(cid, str(case.label if m.startswith("label") else case.image), m, True) for m in errors]
        if errors:
            continue
        counts = np.bincount(vol.label.reshape(-1), minlength=ds.num_classes) if vol.label_counts is None \
            else vol.label_counts
        if not counts[1:].any():
            problems.append(Problem(cid, str(case.label), "the label has no foreground class: no AUV", False))
            continue
        if stride is None:
            continue
        grid = tuple(-(-n // s) for n, s in zip(vol.label.shape, stride))
        on_grid = np.bincount(labels_to_grid(vol.label, grid, ds.num_classes, stride=stride).reshape(-1),
                              minlength=ds.num_classes)
        for k in range(1, min(len(counts), len(on_grid))):
            if counts[k] > 0 and on_grid[k] < 2:
                problems.append(Problem(cid, str(case.label),
                                        f"class {names.get(k, k)!r} vanishes at the {encoder} feature grid "
                                        f"({int(counts[k])} voxels -> {int(on_grid[k])}): it gets no scale", False))
    return cases, problems


def format_problems(cases, problems: list[Problem]) -> str:
    errors = [p for p in problems if p.error]
    warnings = [p for p in problems if not p.error]
    lines = [f"{len(cases)} case(s) checked: {len({p.case for p in errors})} with errors, "
             f"{len({p.case for p in warnings})} with warnings"]
    for title, group in (("errors (these cases cannot be scored)", errors), ("warnings", warnings)):
        if group:
            lines.append(f"{title}:")
            lines += [f"  {p.case}: {p.what}" + ("" if p.file in p.what else f" [{p.file}]") for p in group]
    return "\n".join(lines)
