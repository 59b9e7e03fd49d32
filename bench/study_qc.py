"""What each score of the main job finds, read from the run folders a user gets (issue 21, items 1–3).

Each argument is a run folder of ``auvcore demo`` (``OUT/run``: its table has the AUV, the out-of-fold
label-error score, the Mahalanobis image-outlier score, the intensity variance and the corruption record).
For each run, every score is set against the record: the corrupted labels, or, for a cohort built with
``--degrade``, the degraded images (its labels clean). ``--agreement RUN=OTHER`` joins the label agreement
(``agreement_score``: 1 − the Dice of a promptable encoder's decoded mask against the label) of a second run
of ``auvcore score --encoder litemedsam --mode decoded`` on the same data.

Writes, per run: AUROC with a 95 % bootstrap interval (cases resampled stratified by record, 2000 times) and
the average precision; per kind, the AUROC of that kind's cases against the clean ones; and the per-case
Table 4 of the paper, Pearson r and Spearman ρ (with p) of the sample scale S against the out-of-fold Dice of
the case (the mean foreground Dice of the QC model's held-out prediction against the given label), over all
cases and over the clean ones.

    python bench/study_qc.py RUN [RUN ...] [--agreement RUN=OTHER_RUN] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_detection import auroc, average_precision, bootstrap  # noqa: E402

SCORES = [("oof_score", "out-of-fold label-error score (`oof_score`)"),
          ("agreement_score", "label agreement, LiteMedSAM (`agreement_score`)"),
          ("mahalanobis_score", "Mahalanobis image-outlier score (`mahalanobis_score`)"),
          ("auv", "AUV (the paper's, `auv`)"),
          ("variance_score", "intensity variance (`variance_score`)")]


def load(run: Path, agreement: Path | None):
    import pandas as pd

    t = pd.read_parquet(run / "scores.parquet")
    if agreement is not None:
        a = pd.read_parquet(agreement / "scores.parquet")[["case", "agreement_score"]]
        t = t.drop(columns=[c for c in ("agreement_score",) if c in t]).merge(a, on="case", how="left")
    target = "degraded" if "degraded" in t else "corrupted"
    if target not in t:
        raise SystemExit(f"{run}: the table has no corruption record (build the data with auvcore demo)")
    return t, target


def correlation(x, y) -> str:
    from scipy import stats

    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 4:
        return "n < 4"
    r, pr = stats.pearsonr(x[ok], y[ok])
    rho, ps = stats.spearmanr(x[ok], y[ok])
    return f"{r:+.2f} ({pr:.1g}) / {rho:+.2f} ({ps:.1g}), n = {ok.sum()}"


def study(run: Path, agreement: Path | None, n_boot: int) -> str:
    t, target = load(run, agreement)
    pos = t[target].to_numpy(bool)
    kinds = sorted(k for k in t["corruption_kind"].unique() if k)
    what = "degraded images (labels clean)" if target == "degraded" else "corrupted labels"
    lines = [f"#### `{run}`: {len(t)} cases, {pos.sum()} with {what}", "",
             f"| score | AUROC (95 % interval) | AP (chance {pos.mean():.2f}) | " + " | ".join(kinds) + " |", "|---|---|---|" + "---|" * len(kinds)]
    for col, name in SCORES:
        if col not in t or not np.isfinite(t[col].to_numpy(float)).any():
            continue
        s = t[col].to_numpy(float)
        a, lo, hi = bootstrap([(s, pos)], auroc, n=n_boot)
        ap = average_precision(s, pos)
        per = []
        for k in kinds:
            sel = (t["corruption_kind"].to_numpy() == k) | ~pos
            per.append(f"{auroc(s[sel], pos[sel]):.2f}")
        lines.append(f"| {name} | {a:.3f} ({lo:.2f}–{hi:.2f}) | {ap:.2f} | " + " | ".join(per) + " |")
    counts = ", ".join(f"{k} {int(((t['corruption_kind'] == k) & pos).sum())}" for k in kinds)
    lines += ["", f"Cases per kind: {counts}."]
    if "oof_dice" in t:
        S, dice = t["sample_scale"].to_numpy(float), t["oof_dice"].to_numpy(float)
        lines += ["", "Table 4 per case, S against the out-of-fold Dice, Pearson r (p) / Spearman ρ (p): "
                  f"all cases {correlation(S, dice)}; clean cases {correlation(S[~pos], dice[~pos])}."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders of auvcore demo (OUT/run)")
    ap.add_argument("--agreement", action="append", default=[], metavar="RUN=OTHER",
                    help="take agreement_score for RUN from the table of OTHER (same cases)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    a = ap.parse_args(argv)
    joins = dict(s.split("=", 1) for s in a.agreement)
    text = "\n\n".join(study(r, Path(joins[str(r)]) if str(r) in joins else None, a.bootstrap) for r in a.runs)
    print(text)
    if a.out:
        a.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
