"""Cleanlab-style baseline and the correlation study (the paper's Table 4) on the demo cohorts.

For every source and draw (the cohorts of ``bench/study_detection.py``: same folders, same seeds, so they are
reused), a small 3-D U-Net is trained with k-fold cross-validation on the cohort's labels as delivered
(corrupted where recorded) and predicts the held-out fold: out-of-fold (OOF) softmax probabilities for every
case. From them:

* **label-quality scores** per case, all oriented high = suspect (the AUV's direction):

  - ``cleanlab_score`` = 1 − cleanlab's segmentation label-quality score (``cleanlab.segmentation.rank.
    get_label_quality_scores``, its default ``method="softmin"``, temperature 0.1): the per-voxel
    self-confidence (OOF probability of the given label) pooled by a softmin, which is dominated by the voxels
    whose label the model contradicts. This is the headline baseline because it is cleanlab's own image-level
    score, which the "cleanlab-style" comparison asks for. It is the library's ``auvcore.qc.softmin_quality``
    (the score of ``auvcore qc``; the same two lines as cleanlab 2.9's ``softmin``), so that cleanlab is not a
    dependency; when cleanlab is importable the values are checked against it once per cohort.
  - ``monai_lqs``: MONAI's ``monai.metrics.label_quality_score`` (mean |OOF probability − one-hot label| over
    voxels and classes, background included; NaN when MONAI is not installed). A mean instead of a softmin: a
    corruption that touches few voxels moves it little.
  - ``oof_dice_score`` = 1 − mean over the label's foreground classes of the OOF Dice against the given label:
    the segmentation-native version (a class the label has and the model misses, or a label moved off the
    anatomy, costs Dice in proportion to the structure's size, not the volume's).

* the **noise-detection table** of these scores in study_detection's format (AUROC/AP per source, mean over draws,
  95 % bootstrap intervals; AUROC per corruption kind on within-draw ranks), next to the AUV, variance and
  Mahalanobis scores of the Merlin layer-2 run (``score_dataset(encoder="merlin", layer="layer2", mode="masked",
  input="raw")``, run here when missing) and, with ``--cases-csv``, every score column of study_detection's
  cases CSV;
* the **correlation study** (Table 4): per (case, foreground class), Pearson and Spearman (scipy.stats, with
  p-values) between the class's semantic perception scale S (``S[class]`` of the Merlin layer-2 table) and the
  OOF Dice of the model on that class against (a) the given label and (b) the clean label (``labelsTr_clean``,
  which build_demo writes for every case: the label before corruption); the per-class baselines (intensity
  variance ``variance[class]``, Mahalanobis distance ``mahalanobis[class]``) the same way; per case the AUV,
  variance, Mahalanobis and cleanlab scores against the mean foreground Dice. Pooled over the draws of a source
  (S of one source comes from one encoder on one anatomy, so its values are comparable across draws).

Model, grid and training: the library's (``auvcore.qc``, the model of ``auvcore qc``; one place for them):
``SmallUNet`` (8, 16, 32 channels, the shape of MONAI's ``UNet(spatial_dims=3, channels=(8, 16, 32), strides=(2,
2), num_res_units=1)``, which this study used up to OOF_VERSION 1), Dice + cross-entropy, Adam (lr 3e-3),
``--steps`` steps of batch 2 on whole volumes resampled to one grid per source (the field of view of the source,
``size_mm``, on ``--size`` voxels along its longest side, each side a multiple of 4: images trilinear, labels by
trilinear interpolation of the one-hot map then argmax, so thin structures survive the down-sampling better than
with nearest neighbour). Intensities: clipped to the case's 0.5–99.5 percentiles, then z-scored (CT and MR
alike). Dice is measured on that grid. Folds: here stratified by the corruption flag (the corrupted cases spread
over the folds; ``auvcore qc`` has no such record and splits at random), seeded by ``--seed`` and the draw;
training seeded by (seed, draw, fold). OOF probabilities are saved per cohort (``OUT/oof/<source>-<draw>/<settings>/oof.npz``) and
reused when the settings match (resumable).

Writes ``OUT/NAME.json``, ``OUT/NAME.md`` (tables ready to paste), ``OUT/NAME_cases.csv`` (one row per case) and
``OUT/NAME_classes.csv`` (one row per case and foreground class).

    python bench/study_oof.py --out runs/study --sources spine-ct spine-mr brain-mni --draws 2
    python bench/study_oof.py --out runs/study --cases-csv runs/study/detection_cases.csv
    python bench/study_oof.py --out /tmp/oof-smoke --smoke          # one source, 1 draw, 2 folds, 20 steps
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import cpu_name  # noqa: E402
from study_detection import CONFIGS, SOURCES, markdown, plot_auroc, tables_one_rate  # noqa: E402

import auvcore.qc as Q  # noqa: E402
from auvcore.qc import dice_per_class, grid_shape, resize_case, resize_label, softmin_quality  # noqa: E402,F401

OOF_VERSION = 2  # 2: the library's SmallUNet and training (auvcore.qc) instead of MONAI's UNet
SCORE_CONFIG = "merlin-l2"  # the run whose S, AUV and baselines the study uses (the README's default)


# ------------------------------------------------------------------------------------------------------------
# data


def load_cohort(root: Path, size: int) -> dict:
    """Images, given labels and clean labels of a demo cohort on its model grid, with the corruption record."""
    from auvcore.data import discover
    from auvcore.data.io import read_image, to_ras

    ds = discover(root)
    meta = json.loads((Path(root) / "dataset.json").read_text(encoding="utf-8"))
    size_mm = (meta.get("auvcore_demo") or {}).get("size_mm")
    if size_mm is None:
        raise ValueError(f"{root}: not an auvcore demo cohort (dataset.json has no auvcore_demo.size_mm)")
    shape = grid_shape(size_mm, size)
    K = ds.num_classes
    ids, X, Y, C = [], [], [], []
    for case in ds.cases:
        img, aff = read_image(case.image)
        lab, _ = read_image(case.label)
        clean_p = Path(root) / "labelsTr_clean" / Path(case.label).name
        if not clean_p.is_file():
            raise FileNotFoundError(f"{clean_p}: the cohort has no clean label for {case.case_id} (rebuild it)")
        clean, _ = read_image(clean_p)
        img, _ = to_ras(img.astype(np.float32), aff)
        lab, _ = to_ras(lab.astype(np.int64), aff)
        clean, _ = to_ras(clean.astype(np.int64), aff)
        x, y = resize_case(img, lab, shape, K)
        c = resize_label(clean, shape, K)
        ids.append(case.case_id)
        X.append(x)
        Y.append(y)
        C.append(c)
    corr = ds.corruption or {}
    return {"ids": ids, "image": np.stack(X)[:, None], "label": np.stack(Y), "clean": np.stack(C), "K": K,
            "names": ds.class_names, "shape": shape,
            "corrupted": np.array([bool(corr.get(c, {}).get("corrupted", False)) for c in ids]),
            "kind": [corr.get(c, {}).get("kind") or "" for c in ids]}


# ------------------------------------------------------------------------------------------------------------
# cross-validated model


def fold_split(corrupted: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per case: corrupted and clean cases each shuffled and dealt round-robin, so every fold holds
    its share of both (a fold without corrupted cases would train on none of the noise it is scored on)."""
    return Q.fold_split(len(corrupted), folds, seed, strata=np.asarray(corrupted, dtype=bool))


def oof_probabilities(cohort: dict, folds: int, steps: int, seed: int, log=print) -> tuple[np.ndarray, np.ndarray,
                                                                                           list[float]]:
    """OOF softmax ``[N, K, *grid]`` (float32), the fold of every case and the seconds per fold."""
    fold = fold_split(cohort["corrupted"], folds, seed)
    probs = np.zeros((len(fold), cohort["K"], *cohort["shape"]), dtype=np.float32)
    secs = []
    for f in range(folds):
        t0 = time.perf_counter()
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        probs[test] = Q.train_predict(cohort["image"], cohort["label"], train, test, cohort["K"], steps,
                                      seed=seed * 1000 + f)
        secs.append(time.perf_counter() - t0)
        log(f"  fold {f + 1}/{folds}: {len(train)} train, {len(test)} held out, {secs[-1]:.0f} s")
    return probs, fold, secs


# ------------------------------------------------------------------------------------------------------------
# scores


def cleanlab_check(probs: np.ndarray, label: np.ndarray, ours: np.ndarray) -> str:
    """Compare ``softmin_quality`` with cleanlab's own function when cleanlab is importable (bench-only, never a
    dependency); voxels flattened to one row per case, which is how cleanlab pools an image's pixels anyway."""
    try:
        from cleanlab.segmentation.rank import get_label_quality_scores
    except ImportError:
        return "cleanlab not installed: not checked"
    n, K = probs.shape[:2]
    theirs, _ = get_label_quality_scores(label.reshape(n, 1, -1).astype(np.int64), probs.reshape(n, K, 1, -1),
                                         method="softmin", verbose=False)
    diff = float(np.max(np.abs(theirs - ours)))
    if diff > 1e-6:
        raise AssertionError(f"softmin_quality differs from cleanlab's by {diff:.2e}")
    return f"cleanlab {__import__('cleanlab').__version__}: max |difference| {diff:.1e}"


def monai_quality(probs: np.ndarray, label: np.ndarray) -> np.ndarray:
    """MONAI's ``label_quality_score`` (mean |p − one-hot| over voxels and classes) per case; NaN without MONAI
    (an optional comparison, ``pip install "auvcore[monai]"``)."""
    import torch
    import torch.nn.functional as F

    try:
        from monai.metrics import label_quality_score
    except ImportError:
        return np.full(len(probs), np.nan)
    out = np.empty(len(probs))
    for i in range(len(probs)):
        p = torch.from_numpy(probs[[i]])
        y = F.one_hot(torch.from_numpy(label[[i]].astype(np.int64)), p.shape[1]).permute(0, 4, 1, 2, 3).float()
        out[i] = float(label_quality_score(p, y, include_background=True, scalar_reduction="mean")[0])
    return out


def cohort_frames(cohort: dict, probs: np.ndarray, fold: np.ndarray, table, source: str, draw: int):
    """One row per case (scores, mean Dice) and one per (case, foreground class) (S, baselines, Dice)."""
    import pandas as pd

    K, names = cohort["K"], cohort["names"]
    pred = probs.argmax(1)
    d_given = dice_per_class(pred, cohort["label"], K)
    d_clean = dice_per_class(pred, cohort["clean"], K)
    fg = list(range(1, K))
    q_soft = softmin_quality(probs, cohort["label"])
    q_monai = monai_quality(probs, cohort["label"])
    t = table.set_index("case").loc[cohort["ids"]]
    cases = pd.DataFrame({
        "source": source, "draw": draw, "case": cohort["ids"], "fold": fold, "corrupted": cohort["corrupted"],
        "kind": cohort["kind"],
        "cleanlab_score": 1.0 - q_soft, "monai_lqs": q_monai,
        "oof_dice_score": 1.0 - np.nanmean(d_given[:, fg], 1),
        "dice_given": np.nanmean(d_given[:, fg], 1), "dice_clean": np.nanmean(d_clean[:, fg], 1),
        f"auv:{SCORE_CONFIG}": t["auv"].to_numpy(), "variance": t["variance_score"].to_numpy(),
        f"mahalanobis:{SCORE_CONFIG}": t["mahalanobis_score"].to_numpy(),
    })
    rows = []
    for i, cid in enumerate(cohort["ids"]):
        for k in fg:
            n = names.get(k, str(k))
            rows.append({"source": source, "draw": draw, "case": cid, "class": n,
                         "corrupted": bool(cohort["corrupted"][i]), "kind": cohort["kind"][i],
                         "S": t[f"S[{n}]"].iloc[i], "variance": t[f"variance[{n}]"].iloc[i],
                         "mahalanobis": t[f"mahalanobis[{n}]"].iloc[i],
                         "dice_given": d_given[i, k], "dice_clean": d_clean[i, k],
                         "voxels_given": int((cohort["label"][i] == k).sum()),
                         "voxels_clean": int((cohort["clean"][i] == k).sum())})
    return cases, pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------------
# study


def run_cohorts(out: Path, sources, draws, folds, steps, size, seed, cases_n=24, fraction=0.25, log=print):
    import pandas as pd

    from auvcore.app.scoring import score_dataset
    from auvcore.data import build_demo

    all_cases, all_classes, timing = [], [], {}
    for source in sources:
        for draw in range(draws):
            # the cohort of study_detection (same folder, same arguments): built once, reused by both studies
            root = build_demo(out / "data" / f"{source}-{draw}", n_cases=cases_n, corrupt_fraction=fraction,
                              seed=draw, source=source)
            run = out / "runs" / f"{source}-{draw}" / SCORE_CONFIG
            score_dataset(root, run, progress=False, **CONFIGS[SCORE_CONFIG])
            table = pd.read_parquet(run / "scores.parquet")
            cohort = load_cohort(Path(root), size)
            settings = {"version": OOF_VERSION, "folds": folds, "steps": steps, "size": size, "seed": seed,
                        "shape": list(cohort["shape"]), "ids": cohort["ids"]}
            # one folder per setting, so a smoke run beside the study does not replace the study's predictions
            cache = out / "oof" / f"{source}-{draw}" / f"folds{folds}-steps{steps}-size{size}-seed{seed}"
            saved = _load_oof(cache, settings)
            if saved is None:
                log(f"{source} draw {draw}: training {folds} folds, {steps} steps, grid {cohort['shape']}")
                # the seed of the cohort's split and training: --seed and the draw, so draws differ
                probs, fold, secs = oof_probabilities(cohort, folds, steps, seed * 100 + draw, log=log)
                _save_oof(cache, settings, probs, fold, secs)
            else:
                probs, fold, secs = saved
                log(f"{source} draw {draw}: OOF probabilities reused from {cache}")
            timing.setdefault(source, []).extend(secs)
            note = cleanlab_check(probs, cohort["label"], softmin_quality(probs, cohort["label"]))
            c, k = cohort_frames(cohort, probs, fold, table, source, draw)
            all_cases.append(c)
            all_classes.append(k)
            log(f"{source} draw {draw}: OOF Dice given {np.nanmean(c['dice_given']):.3f}, clean "
                f"{np.nanmean(c['dice_clean']):.3f}; {note}")
    return pd.concat(all_cases, ignore_index=True), pd.concat(all_classes, ignore_index=True), timing, note


def _load_oof(cache: Path, settings: dict):
    try:
        if json.loads((cache / "settings.json").read_text()) != settings:
            return None
        z = np.load(cache / "oof.npz")
        return z["probs"].astype(np.float32), z["fold"], [float(s) for s in z["secs"]]
    except (OSError, ValueError, KeyError):
        return None


def _save_oof(cache: Path, settings: dict, probs, fold, secs):
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / "oof.tmp.npz"
    np.savez_compressed(tmp, probs=probs.astype(np.float16), fold=fold, secs=np.asarray(secs))
    tmp.replace(cache / "oof.npz")
    (cache / "settings.json").write_text(json.dumps(settings))  # written last: marks the cache complete


def join_cases_csv(cases, path: Path | None):
    """Add every score column of study_detection's cases CSV (matched on source, draw, case) that is not here."""
    import pandas as pd

    if path is None:
        return cases
    if not Path(path).is_file():
        raise ValueError(f"--cases-csv: {path} does not exist")
    det = pd.read_csv(path)
    # study_detection at several rates or strengths lists other cohorts too; these cohorts are its default ones
    if "fraction" in det:
        det = det[np.isclose(det["fraction"].astype(float), 0.25)]
    if "strength" in det:
        det = det[det["strength"].fillna("default") == "default"]
    missing = {"source", "draw", "case"} - set(det.columns)
    if missing:
        raise ValueError(f"--cases-csv: {path} lacks the columns {sorted(missing)}")
    if det.duplicated(["source", "draw", "case"]).any():
        raise ValueError(f"--cases-csv: {path} has several rows per (source, draw, case) (cohorts of several "
                         "kind settings?); pass a CSV of the default cohorts")
    extra = [c for c in det.columns if c.startswith(("auv:", "agreement:", "mahalanobis:")) or c == "random"]
    extra = [c for c in extra if c not in cases.columns]
    return cases.merge(det[["source", "draw", "case", *extra]], on=["source", "draw", "case"], how="left")


DETECTION_SCORES = ("cleanlab_score", "oof_dice_score", "monai_lqs")


def detection_tables(df, n_boot):
    """study_detection's tables, with this script's score columns among the scores."""
    return tables_one_rate(df, n_boot, extra_scores=DETECTION_SCORES)


def _corr(x, y) -> dict:
    from scipy import stats

    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": int(len(x)), "pearson": np.nan, "pearson_p": np.nan, "spearman": np.nan, "spearman_p": np.nan}
    r, p = stats.pearsonr(x, y)
    rho, q = stats.spearmanr(x, y)
    return {"n": int(len(x)), "pearson": float(r), "pearson_p": float(p), "spearman": float(rho),
            "spearman_p": float(q)}


CLASS_SCORES = {"S (AUV's scale)": "S", "intensity variance": "variance", "Mahalanobis": "mahalanobis"}
CASE_SCORES = {"AUV": f"auv:{SCORE_CONFIG}", "variance score": "variance",
               "Mahalanobis score": f"mahalanobis:{SCORE_CONFIG}", "cleanlab_score": "cleanlab_score"}


def correlations(cases, classes) -> dict:
    """Pearson / Spearman of every per-class score with the class's OOF Dice and of every per-case score with
    the mean Dice, against the given and the clean label, per source (draws pooled) and over all sources.

    ``per_class`` pools the (case, class) pairs as they are, as the paper's Table 4 does, so part of it is the
    difference between classes (a class that is hard to segment may also have a high S). ``per_class_within``
    takes that part out: score and Dice centred on the mean of their (source, draw, class) first, so only how
    the cases of one class differ is correlated."""
    res = {"per_class": {}, "per_class_within": {}, "per_case": {}}
    centred = classes.copy()
    cols = [*CLASS_SCORES.values(), "dice_given", "dice_clean"]
    centred[cols] = classes.groupby(["source", "draw", "class"])[cols].transform(lambda x: x - x.mean())
    multi = classes["source"].nunique() > 1
    for level, frame, scores in (("per_class", classes, CLASS_SCORES), ("per_class_within", centred, CLASS_SCORES),
                                 ("per_case", cases, CASE_SCORES)):
        groups = [(s, g) for s, g in frame.groupby("source", sort=False)] + ([("all", frame)] if multi else [])
        for source, g in groups:
            for name, col in scores.items():
                for ref in ("given", "clean"):
                    res[level].setdefault(name, {}).setdefault(ref, {})[source] = _corr(
                        g[col].to_numpy(dtype=float), g[f"dice_{ref}"].to_numpy(dtype=float))
    return res


def _fmt_p(p):
    return "–" if not np.isfinite(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def correlation_markdown(res) -> str:
    titles = {
        "per_class": "Per (case, foreground class): the class's score against the model's OOF Dice on that class, "
                     "pairs pooled as they are (the paper's Table 4)",
        "per_class_within": "The same, score and Dice centred on their (source, draw, class) mean first: how the "
                            "cases of one class differ, without the differences between classes",
        "per_case": "Per case: the case's score against the mean foreground OOF Dice",
    }
    lines = []
    for level, title in titles.items():
        lines += ["", f"{title}. Draws pooled per source" + (", `all` pools every source" if any(
            "all" in v for per in res[level].values() for v in per.values()) else "")
                  + "; n = pairs with both values; p two-sided (scipy.stats).", "",
                  "| score | source | n | Pearson (given) | p | Spearman (given) | p | Pearson (clean) | p "
                  "| Spearman (clean) | p |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, per_ref in res[level].items():
            for src in per_ref["given"]:
                g, c = per_ref["given"][src], per_ref["clean"][src]
                lines.append(f"| {name} | {src} | {g['n']} | {g['pearson']:.3f} | {_fmt_p(g['pearson_p'])} | "
                             f"{g['spearman']:.3f} | {_fmt_p(g['spearman_p'])} | {c['pearson']:.3f} | "
                             f"{_fmt_p(c['pearson_p'])} | {c['spearman']:.3f} | {_fmt_p(c['spearman_p'])} |")
    lines += ["", "Dice against the given label: the label as delivered (corrupted where recorded); against the "
                  "clean label: `labelsTr_clean`, the label before corruption. Negative = a higher score goes with a "
                  "lower Dice. Expected signs: S is the perception scale (high = the encoder separates the class "
                  "well; the AUV is 1 − its normalised log), so the paper's Table 4 direction is positive for S; the "
                  "case scores (AUV, variance, Mahalanobis, cleanlab; high = suspect) and the Mahalanobis distance "
                  "should be negative."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/study"))
    ap.add_argument("--sources", nargs="+", default=["spine-ct", "spine-mr", "brain-mni"], choices=SOURCES)
    ap.add_argument("--draws", type=int, default=2, help="cohort draws (seeds 0..draws-1) per source")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200, help="training steps (batch 2) per fold")
    ap.add_argument("--size", type=int, default=48, help="model grid: voxels along the source's longest side")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fold split and the training")
    ap.add_argument("--cases-csv", type=Path, default=None,
                    help="study_detection's cases CSV: its score columns join the detection table")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--name", default="oof", help="stem of the output files in OUT")
    ap.add_argument("--smoke", action="store_true", help="quick run: first source, 1 draw, 2 folds, 20 steps, "
                                                         "grid 24, 200 bootstrap resamples")
    a = ap.parse_args(argv)
    if a.smoke:
        a.sources, a.draws, a.folds, a.steps, a.size, a.bootstrap = a.sources[:1], 1, 2, 20, 24, 200
    if a.draws < 1:
        raise SystemExit(f"--draws: expected at least 1, got {a.draws}")
    if a.steps < 1:
        raise SystemExit(f"--steps: expected at least 1, got {a.steps}")
    import torch

    torch.set_num_threads(1)  # the machine is shared; one core per job
    t0 = time.perf_counter()
    cases, classes, timing, note = run_cohorts(a.out, a.sources, a.draws, a.folds, a.steps, a.size, a.seed)
    cases = join_cases_csv(cases, a.cases_csv)
    a.out.mkdir(parents=True, exist_ok=True)
    cases.to_csv(a.out / f"{a.name}_cases.csv", index=False)
    classes.to_csv(a.out / f"{a.name}_classes.csv", index=False)
    det = detection_tables(cases, a.bootstrap)
    cor = correlations(cases, classes)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    meta = {"machine": cpu_name(), "commit": commit, "date": time.strftime("%Y-%m-%d"),
            "command": "python bench/study_oof.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "folds": a.folds, "steps": a.steps, "size": a.size, "seed": a.seed,
            "seconds_per_fold": {s: float(np.median(v)) for s, v in timing.items() if v},
            "oof_dice": {s: {"given": float(g["dice_given"].mean()), "clean": float(g["dice_clean"].mean())}
                         for s, g in cases.groupby("source", sort=False)},
            "cleanlab_check": note, "wall_s": time.perf_counter() - t0}
    (a.out / f"{a.name}.json").write_text(json.dumps({"meta": meta, "detection": det, "correlation": cor},
                                                     indent=1, default=float))
    md = markdown(det, meta)
    md += ("\nModel: auvcore.qc.SmallUNet (8, 16, 32), Dice+CE, Adam, "
           f"{a.steps} steps × batch 2 per fold, {a.folds}-fold CV, grid {a.size} voxels on the longest side; "
           "mean foreground OOF Dice (given / clean label): "
           + ", ".join(f"{s} {v['given']:.3f} / {v['clean']:.3f}" for s, v in meta["oof_dice"].items())
           + "; training time per fold (median): "
           + ", ".join(f"{s} {v:.0f} s" for s, v in meta["seconds_per_fold"].items()) + ".\n")
    md += correlation_markdown(cor)
    (a.out / f"{a.name}.md").write_text(md)
    plot_auroc(det["by_source"], a.out / f"{a.name}.png",
               f"Noise detection: cleanlab-style scores next to the AUV ({a.draws} draw(s) per cohort)")
    print(md)


if __name__ == "__main__":
    main()
