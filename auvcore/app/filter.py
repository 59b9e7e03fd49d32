"""`auvcore filter RUN/`: drop the most uncertain cases at a quantile; kept/dropped lists and nnU-Net splits."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .. import scores as A
from .run import atomic_text, read_settings
from .table import read_table


def nnunet_splits(case_ids: list[str], dropped: set[str], folds: int = 5, seed: int = 12345) -> list[dict]:
    """nnU-Net-style 5-fold split over all cases (seeded shuffle); the dropped cases are left out of every
    training fold and stay in validation, where they are still evaluated."""
    ids = sorted(case_ids)
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(ids))
    parts = np.array_split(order, min(folds, len(ids)))
    out = []
    for val_idx in parts:
        val = sorted(ids[i] for i in val_idx)
        train = sorted(c for c in ids if c not in set(val) and c not in dropped)
        out.append({"train": train, "val": val})
    return out


# score -> (case column, per-class column); high = drop first. "mahalanobis" is the old name of "outlier".
FILTER_SCORES = {"oof": ("oof_score", "oof[{}]"), "auv": ("auv", "auv[{}]"),
                 "outlier": ("mahalanobis_score", "mahalanobis[{}]"),
                 "mahalanobis": ("mahalanobis_score", "mahalanobis[{}]"),
                 "agreement": ("agreement_score", "agreement[{}]")}

# The name of each score in the summary and the report.
SCORE_NAMES = {"oof": "out-of-fold label-error score", "auv": "AUV", "outlier": "image outlier score (Mahalanobis)",
               "mahalanobis": "image outlier score (Mahalanobis)", "agreement": "label agreement"}


def default_score(df) -> str:
    """The score a filter or report uses when none is named: the out-of-fold label-error score when the table
    has it (`auvcore qc`), else the AUV. The evidence (bench/RESULTS.md): on the demo cohorts the default AUV ranks
    the corrupted labels at AUROC 0.47-0.58, no better than chance, while the OOF score ranks them at 0.82-0.97."""
    return "oof" if "oof_score" in df and np.isfinite(df["oof_score"].to_numpy(dtype=np.float64)).any() else "auv"


def filter_run(run, quantile: float = 0.95, per_class: list[str] | None = None, score: str | None = None) -> Path:
    """Write kept.txt, dropped.txt, splits_final.json and summary.json under RUN/filter/.

    ``score``: ``"oof"`` (the out-of-fold label-error score of `auvcore qc`: it finds corrupted labels,
    bench/RESULTS.md), ``"auv"`` (the paper's), ``"outlier"`` (the image/feature outlier score, the Mahalanobis
    distance of each class's mean embedding to the data set's, ranked; ``"mahalanobis"`` is its old name) or
    ``"agreement"`` (1 − the Dice between a promptable encoder's decoded mask and the label; runs scored with
    ``--encoder litemedsam|sam2 --mode decoded``). ``None`` (default): :func:`default_score`. Per class, the OOF
    filter cuts that class's OOF score, the agreement filter 1 − that class's Dice, the outlier filter that
    class's distance."""
    run = Path(run)
    settings = read_settings(run)
    q = A.check_quantile(quantile)
    df = read_table(run)
    default = score is None
    if default:
        score = default_score(df)
    if score not in FILTER_SCORES:
        raise ValueError(f"--score: expected one of {tuple(FILTER_SCORES)}, got {score!r}")
    column, class_column = FILTER_SCORES[score]
    if column not in df:
        how = ("run `auvcore qc RUN` first (the out-of-fold label-error score)" if score == "oof" else
               "label agreement needs a run scored with a promptable encoder in decoded mode: --encoder litemedsam "
               "or sam2, --mode decoded")
        raise ValueError(f"--score {score}: the run has no {column!r} column ({how})")
    names = {v: int(k) for k, v in settings["class_names"].items()}
    if per_class:
        unknown = [n for n in per_class if n not in names]
        if unknown:
            raise ValueError(f"--per-class: unknown class {unknown} (classes: {', '.join(names)})")
        cols = np.stack([df[class_column.format(n)].to_numpy(dtype=np.float64) for n in per_class], axis=1)
        if score == "agreement":
            cols = 1.0 - cols
        keep = A.keep_mask_per_class(cols, q, classes=list(range(len(per_class))))
        how = {"per_class": per_class}
    else:
        keep = A.keep_mask(df[column].to_numpy(dtype=np.float64), q)
        how = {"global": True}
    ids = df["case"].tolist()
    kept = [c for c, k in zip(ids, keep) if k]
    dropped = [c for c, k in zip(ids, keep) if not k]
    out = run / "filter"
    summary = {"quantile": q, "score": score, "score_name": SCORE_NAMES[score], "default_score": default, **how,
               "cases": len(ids), "kept": len(kept), "dropped": len(dropped),
               "cut": A.inverted_cdf_quantile(df[column].to_numpy(dtype=np.float64), q) if not per_class else None}
    if "corrupted" in df:
        bad = set(df.loc[df["corrupted"], "case"])
        summary["corrupted_dropped"] = len(bad & set(dropped))
        summary["precision_at_cut"] = (len(bad & set(dropped)) / len(dropped)) if dropped else None
    atomic_text(out / "kept.txt", "".join(f"{c}\n" for c in kept))
    atomic_text(out / "dropped.txt", "".join(f"{c}\n" for c in dropped))
    atomic_text(out / "splits_final.json", json.dumps(nnunet_splits(ids, set(dropped)), indent=1))
    atomic_text(out / "summary.json", json.dumps({**summary, "written": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    return out
