"""The AUV table of a run (RUN/scores.parquet), assembled from its case files, and reading it back."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import scores as A
from .run import TABLE, atomic_write, case_file, error_file, fingerprint, load_result, read_settings

# The label QC's files in a run folder (written by app/qc.py, joined into the table here).
QC_DIR = "qc"
QC_PLAN = "plan.json"
QC_VERSION = 1
QC_SETTINGS_KEYS = ("version", "folds", "steps", "size", "seed")


def qc_fold_file(run: Path, fold: int) -> Path:
    return Path(run) / QC_DIR / f"fold-{fold}.npz"


def qc_fold_error_file(run: Path, fold: int) -> Path:
    return Path(run) / QC_DIR / f"fold-{fold}.error.json"


def _class_columns(class_names: dict) -> list[tuple[int, str]]:
    return [(int(k), v) for k, v in sorted(class_names.items(), key=lambda kv: int(kv[0]))]


def _rank01(x: np.ndarray) -> np.ndarray:
    """Per-column percentile ranks in [0, 1] of the non-NaN entries (baselines live on other scales per
    class; ranks make them comparable before averaging over classes)."""
    out = np.full_like(x, np.nan, dtype=np.float64)
    for k in range(x.shape[1]):
        ok = ~np.isnan(x[:, k])
        if ok.sum() >= 2:
            r = np.argsort(np.argsort(x[ok, k]))
            out[ok, k] = r / (ok.sum() - 1)
        elif ok.any():
            out[ok, k] = 0.5
    return out


def _row_mean(x: np.ndarray) -> np.ndarray:
    """Mean over the non-NaN entries of each row; NaN (without numpy's warning) for a row of NaN only."""
    n = (~np.isnan(x)).sum(axis=1)
    return np.where(n > 0, np.nansum(x, axis=1) / np.maximum(n, 1), np.nan)


def write_table(run: Path, case_ids: list[str], ds, csv: bool = False) -> Path:
    """Assemble the table from the case files: AUV normalised over the whole scored set."""
    import pandas as pd

    from ..baselines import MahalanobisScorer

    settings = read_settings(run)
    K = int(settings["num_classes"])
    errors = {}
    rows = []
    for c in case_ids:
        if case_file(run, c).exists():
            rows.append(load_result(run, c))
            continue
        try:
            errors[c] = json.loads(error_file(run, c).read_text(encoding="utf-8"))["error"]
        except (OSError, ValueError, KeyError):
            errors[c] = "not scored"
        rows.append(_failed_row(K))
    S = np.stack([r["S"] for r in rows])
    fg = list(range(1, K)) if K > 1 else [0]
    sample_S = A.sample_scale(S, fg, settings["reduction"])
    auv_sample = A.auv(sample_S)
    auv_class = A.auv(S)
    var = np.stack([r["variance"] for r in rows])
    C = max((r["means"].shape[1] for r in rows if r["means"].size), default=0)
    means = np.stack([r["means"] if r["means"].size else np.full((K, C), np.nan) for r in rows]).astype(np.float64)
    maha = MahalanobisScorer().fit_score(means) if len(rows) >= 2 and C else np.full_like(S, np.nan)
    names = dict(_class_columns(settings["class_names"]))
    table = {"case": case_ids, "error": [errors.get(c, "") for c in case_ids],
             "reason": [_why_nan(r, names, fg, c in errors) for c, r in zip(case_ids, rows)],
             "sample_scale": sample_S, "auv": auv_sample,
             "variance_score": _row_mean(_rank01(var[:, fg])) if len(rows) > 1 else np.nan,
             "mahalanobis_score": _row_mean(_rank01(np.asarray(maha)[:, fg])) if len(rows) > 1 else np.nan}
    # label agreement (promptable encoders in decoded mode; case files written before it have none)
    agree = np.stack([r.get("agreement", np.full(K, np.nan)) for r in rows]).astype(np.float64)
    has_agreement = bool(np.isfinite(agree).any())
    if has_agreement:
        table["agreement_score"] = 1.0 - _row_mean(agree[:, fg])  # 1 − mean Dice: high = the model disagrees
    if ds.corruption:
        table["corrupted"] = [bool(ds.corruption.get(c, {}).get("corrupted", False)) for c in case_ids]
        if any(ds.corruption.get(c, {}).get("degraded", False) for c in case_ids):  # a degraded-image cohort
            table["degraded"] = [bool(ds.corruption.get(c, {}).get("degraded", False)) for c in case_ids]
        table["corruption_kind"] = [ds.corruption.get(c, {}).get("kind") or "" for c in case_ids]
    for k, name in _class_columns(settings["class_names"]):
        if k >= K:
            continue
        table[f"S[{name}]"] = S[:, k]
        table[f"voxels[{name}]"] = pd.array(np.stack([r["counts"] for r in rows])[:, k], dtype="Int64")
        table[f"auv[{name}]"] = auv_class[:, k]
        table[f"variance[{name}]"] = var[:, k]
        table[f"mahalanobis[{name}]"] = np.asarray(maha)[:, k]
        if has_agreement:
            table[f"agreement[{name}]"] = agree[:, k]
    for k, v in _qc_columns(run, case_ids, ds, K, fg, names).items():
        table[k] = v
    df = pd.DataFrame(table)
    path = run / TABLE
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    if csv:
        atomic_write(run / "scores.csv", lambda tmp: df.to_csv(tmp, index=False))
    return path


def _qc_columns(run: Path, case_ids: list[str], ds, K: int, fg: list[int], names: dict) -> dict:
    """The label QC's columns (``auvcore qc``) once every fold is done and while its cases and their files
    are the table's: ``oof_score`` (1 − cleanlab's softmin label quality of the out-of-fold prediction; high =
    the label is suspect), ``oof_dice`` (mean foreground out-of-fold Dice against the label), ``oof_fold``,
    ``oof_error`` (why a case has no OOF score), and per class ``oof[NAME]`` (1 − that class's quality) and
    ``oof_dice[NAME]``. None of them while the QC is unfinished or stale (its data set changed since)."""
    import pandas as pd

    try:
        plan = json.loads((run / QC_DIR / QC_PLAN).read_text(encoding="utf-8"))
        if sorted(plan["cases"]) != sorted(case_ids):
            return {}
        if any(plan["cases"][c] != fingerprint(ds.case(c), {}) for c in case_ids):
            return {}
        folds = int(plan["settings"]["folds"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    row = {c: i for i, c in enumerate(case_ids)}
    n = len(case_ids)
    quality, cls, dice = np.full(n, np.nan), np.full((n, K), np.nan), np.full((n, K), np.nan)
    fold = pd.array([plan["fold"].get(c) for c in case_ids], dtype="Int64")
    err = [plan.get("errors", {}).get(c, "") for c in case_ids]
    for f in range(folds):
        try:
            with np.load(qc_fold_file(run, f)) as z:
                idx = [row[str(c)] for c in z["case"]]
                quality[idx], cls[idx], dice[idx] = z["quality"], z["class_quality"], z["dice"]
            continue
        except (OSError, ValueError, KeyError):
            pass
        try:
            msg = json.loads(qc_fold_error_file(run, f).read_text(encoding="utf-8"))["error"]
        except (OSError, ValueError, KeyError):
            return {}  # a fold not done yet: no columns until the QC is complete
        for c, g in plan["fold"].items():
            if g == f and c in row:
                err[row[c]] = msg
    out = {"oof_score": 1.0 - quality, "oof_dice": _row_mean(dice[:, fg]), "oof_fold": fold, "oof_error": err}
    for k, name in sorted(names.items()):
        if k < K:
            out[f"oof[{name}]"] = 1.0 - cls[:, k]
            out[f"oof_dice[{name}]"] = dice[:, k]
    return out


def _why_nan(row: dict, names: dict, fg: list[int], failed: bool) -> str:
    """Why a scored case has no AUV, or which of its classes could not be scored: a class with fewer than 2
    voxels at the encoder's grid has no S (small structures vanish on coarse feature grids)."""
    if failed:
        return ""
    counts, label = row["counts"], row.get("label_counts")
    vanished = [f"{names.get(k, k)} ({int(label[k])} voxels -> {int(counts[k])} at the encoder's grid)"
                for k in fg if label is not None and label[k] > 0 and counts[k] < 2]
    if np.isnan(row["S"][fg]).all():
        if label is not None and not label[fg].any():
            return "no AUV: the label has no foreground class"
        return "no AUV: no foreground class has 2 voxels at the encoder's grid" + (
            f"; vanished: {', '.join(vanished)}" if vanished else "")
    return f"not scored: {', '.join(vanished)}" if vanished else ""


def _failed_row(K: int) -> dict:
    """The table's row of a case that was not scored: NaN everywhere, no voxel counts."""
    nan = np.full(K, np.nan)
    return {"S": nan, "counts": np.full(K, None, dtype=object), "variance": nan, "means": np.empty((K, 0))}


def read_table(run: Path):
    import pandas as pd

    path = Path(run) / TABLE
    if not path.exists():
        raise ValueError(f"RUN: {run} has no {TABLE}; run `auvcore score` to the end first")
    return pd.read_parquet(path)


def case_spectrum(run: Path, case_id: str) -> np.ndarray:
    return load_result(Path(run), case_id)["spectrum"]


def failed_cases(run) -> dict[str, str]:
    """The cases of the table whose scoring failed, with their error message."""
    df = read_table(Path(run))
    return {c: e for c, e in zip(df["case"], df["error"]) if e}


def unscored_notes(run) -> dict[str, str]:
    """The scored cases with no AUV or with classes that could not be scored, with the reason."""
    df = read_table(Path(run))
    return {c: r for c, r in zip(df["case"], df["reason"]) if r}
