"""`auvcore report RUN/`: an HTML page that says which cases are suspect, by which score, and what the AUV found.

Written to RUN/report/ (index.html + PNGs, replaced as a whole): the filter's decision; one panel per QC score,
each with its cases ranked and its own cut at the quantile: the out-of-fold label-error score (`auvcore qc`,
the score that finds corrupted labels) and the image/feature outlier score (Mahalanobis); then the paper's AUV:
its histogram with the cut, cumulative energy curves of the most and least uncertain cases (the paper's Figure
2), per-class scale distributions, a gallery of the most uncertain cases; and, when the data set has a
corruption record, how well each score ranks the corrupted cases (ROC, AUROC, precision at the cut).
"""
from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import scores as A
from ..data.io import umask_mode
from .filter import FILTER_SCORES, SCORE_NAMES, default_score
from .run import REPORT_TMP, read_settings
from .table import case_spectrum, read_table

SCORERS = (("oof_score", "out-of-fold label-error score"), ("auv", "AUV (ours)"),
           ("variance_score", "intensity variance"), ("mahalanobis_score", "Mahalanobis"),
           ("agreement_score", "label agreement (1 − Dice; beyond the paper)"))

# The QC panels: (score, heading, what it finds, per-class column prefix, how to get it when it is missing).
PANELS = (
    ("oof", "Label QC: the out-of-fold label-error score",
     "A small 3-D U-Net trained with k-fold cross-validation on the data set's own labels predicts each case it "
     "did not train on; the score is 1 − cleanlab's softmin label quality of that prediction (1 = the model "
     "contradicts the label). It finds corrupted labels: AUROC 0.82–0.97 on the demo cohorts, where the AUV gets "
     "0.47–0.58 (bench/RESULTS.md).", "oof",
     "Not computed for this run: <code>auvcore qc RUN</code> adds it (k-fold training, minutes on a CPU)."),
    ("outlier", "Image outliers: the Mahalanobis score",
     "How atypical a case's class-mean embeddings are next to the data set's (Mahalanobis distance, ranked per "
     "class, averaged): an image/feature outlier score. It flags cases that look unlike the others (degraded "
     "or unusual images), not wrong labels as such (AUROC 0.53–0.80 on the corrupted labels of the demo "
     "cohorts).", "mahalanobis", ""),
)


def roc_curve(score: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False- and true-positive rates over all thresholds, and the AUROC (ties count one half)."""
    ok = ~np.isnan(score)
    s, y = score[ok], positive[ok].astype(bool)
    P, N = y.sum(), (~y).sum()
    if P == 0 or N == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tpr = np.r_[0.0, np.cumsum(y)[distinct] / P]
    fpr = np.r_[0.0, np.cumsum(~y)[distinct] / N]
    ranks = _average_ranks(score[ok])
    auc = (ranks[positive[ok].astype(bool)].sum() - P * (P + 1) / 2) / (P * N)
    return fpr, tpr, float(auc)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _precision_at(score: np.ndarray, positive: np.ndarray, quantile: float) -> float:
    """Share of corrupted cases among those a filter at ``quantile`` on this score would drop."""
    keep = A.keep_mask(score, quantile)
    dropped = ~keep & ~np.isnan(score)
    return float(positive[dropped].mean()) if dropped.any() else float("nan")


def _num(x: float):
    """NaN is not JSON: write null."""
    return None if x is None or np.isnan(x) else float(x)


def _mid_slice(label: np.ndarray) -> int:
    zs = np.nonzero((label > 0).any(axis=(0, 1)))[0]
    return int(zs[len(zs) // 2]) if len(zs) else label.shape[2] // 2


def _filter_summary(run: Path) -> dict:
    try:
        return json.loads((run / "filter" / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _decision(run: Path, df, q: float) -> tuple[np.ndarray, str]:
    """Which cases are dropped, and a sentence saying whose decision that is. The filter's own lists when
    it ran at this quantile over exactly the table's cases (global or per-class alike); otherwise the
    global cut at ``q``, said to be such."""
    summary = _filter_summary(run)
    ids = df["case"].tolist()
    try:
        kept = (run / "filter" / "kept.txt").read_text().split()
        dropped = (run / "filter" / "dropped.txt").read_text().split()
    except OSError:
        kept = dropped = None
    if summary and kept is not None and summary.get("quantile") == q and sorted(kept + dropped) == sorted(ids):
        score = summary.get("score", "auv")
        by = SCORE_NAMES.get(score, score)
        how = (f"per-class filter on {', '.join(summary['per_class'])} by {by}" if summary.get("per_class")
               else f"global filter, {by} cut {summary.get('cut'):.4f}")
        return np.isin(ids, dropped), score, (f"The filter's decision (<code>auvcore filter</code>: "
                                              f"{html.escape(how)}, quantile {q:g})")
    why = ("no filter has been run" if not summary else
           "the filter ran at another quantile or before the table changed; run <code>auvcore filter</code> again")
    score = default_score(df)
    x = df[FILTER_SCORES[score][0]].to_numpy(dtype=np.float64)
    return ~A.keep_mask(x, q) & ~np.isnan(x), score, (
        f"The global cut at quantile {q:g} ({html.escape(SCORE_NAMES[score])} &gt; "
        f"{A.inverted_cdf_quantile(x, q):.4f}, the default score); {why}")


def write_report(run, quantile: float | None = None) -> Path:
    run = Path(run)
    settings = read_settings(run)
    df = read_table(run)
    if quantile is None:
        quantile = _filter_summary(run).get("quantile", 0.95)
    q = A.check_quantile(quantile)
    auv = df["auv"].to_numpy(dtype=np.float64)
    cut = A.inverted_cdf_quantile(auv, q)
    dropped, by, decision = _decision(run, df, q)
    tmp = Path(tempfile.mkdtemp(prefix=REPORT_TMP, dir=run))
    try:  # an error or Ctrl-C half-way leaves no half-drawn folder behind
        os.chmod(tmp, umask_mode(0o777))
        _draw(run, tmp, settings, df, q, auv, cut, dropped, by, decision)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out = run / "report"
    old = run / f"{REPORT_TMP}old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out / "index.html"


def _draw(run: Path, tmp: Path, settings, df, q, auv, cut, dropped, by, decision) -> None:
    """The figures, index.html and metrics.json into ``tmp``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figs: list[tuple[str, str]] = []

    def save(fig, name, caption):
        if not fig.legends:  # a figure legend is placed against the laid-out axes already
            fig.tight_layout()
        fig.savefig(tmp / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        figs.append((name, caption))

    # 1. AUV histogram with the cut
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ok = ~np.isnan(auv)
    if "corrupted" in df:
        bad = df["corrupted"].to_numpy(dtype=bool)
        ax.hist([auv[ok & ~bad], auv[ok & bad]], bins=20, range=(0, 1), stacked=True,
                label=["clean", "corrupted (record)"], color=["#4c72b0", "#dd8452"])
        ax.legend()
    else:
        ax.hist(auv[ok], bins=20, range=(0, 1), color="#4c72b0")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if np.isfinite(cut):
        ax.axvline(cut, color="k", ls="--")
        right = cut > 0.6  # keep the label inside the axes
        label = f"Q({q:g}) = {cut:.3f} " if right else f" Q({q:g}) = {cut:.3f}"
        ax.text(cut, ax.get_ylim()[1] * 0.95, label, va="top", ha="right" if right else "left")
    ax.set_xlabel("AUV (1 = most uncertain)")
    ax.set_ylabel("cases")
    save(fig, "auv_hist.png", f"AUV of {ok.sum()} cases; the dashed line is the global cut at quantile {q:g}.")

    # 2. cumulative energy (paper Fig. 2)
    order = np.argsort(np.where(ok, auv, -1))
    most = [i for i in order[::-1][:3] if ok[i]]
    least = [i for i in order if ok[i]][:3]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for idx, color, tag in ((most, "#c44e52", "most uncertain"), (least, "#55a868", "least uncertain")):
        for j, i in enumerate(idx):
            spec = case_spectrum(run, df["case"].iloc[i]).astype(np.float64)[1:]  # foreground classes
            spec = spec[~np.isnan(spec).all(axis=1)]
            if not len(spec):
                continue
            curve = np.nanmean(np.cumsum(spec, axis=1), axis=0)
            ax.plot(np.arange(1, len(curve) + 1), curve, color=color, alpha=0.85,
                    label=f"{tag}" if j == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("number of components j")
    ax.set_ylabel("cumulative energy Σ p")
    ax.legend()
    save(fig, "energy.png", "Cumulative energy of the feature spectrum: uncertain cases concentrate their energy "
                            "in fewer components (the paper's Figure 2).")

    # 3. per-class scale distributions
    names = [v for _, v in sorted(settings["class_names"].items(), key=lambda kv: int(kv[0]))][1:]
    cols = [f"S[{n}]" for n in names if f"S[{n}]" in df]
    if cols:
        fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(cols)), 3.6))
        data = [df[c].dropna().to_numpy() for c in cols]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(cols) + 1), [c[2:-1] for c in cols], rotation=30, ha="right")
        ax.set_ylabel("semantic scale S")
        save(fig, "class_scales.png", "Semantic scale per class across cases.")

    # 4. gallery of the most uncertain cases
    gallery = _gallery(settings, df, [i for i in order[::-1] if ok[i]][:6], plt)
    if gallery is not None:
        save(gallery, "gallery.png", "The most uncertain cases: an axial slice through the labels, labels overlaid.")

    # 5. against the corruption record
    metrics = []
    if "corrupted" in df and df["corrupted"].any() and (~df["corrupted"]).any():
        pos = df["corrupted"].to_numpy(dtype=bool)
        fig, ax = plt.subplots(figsize=(4.8, 4.4))
        for col, label in SCORERS:
            if col not in df:  # label agreement: promptable encoders in decoded mode only
                continue
            score = df[col].to_numpy(dtype=np.float64)
            fpr, tpr, auc = roc_curve(score, pos)
            metrics.append((label, auc, _precision_at(score, pos, q)))
            ax.plot(fpr, tpr, label=f"{label} (AUROC {auc:.3f})")
        ax.plot([0, 1], [0, 1], color="0.7", ls=":")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend(loc="lower right", fontsize=8)
        # a degraded-image cohort records its degraded images as its defects (their labels are clean)
        defect = ("whose images were degraded" if "degraded" in df and df.loc[pos, "degraded"].all()
                  else "with a recorded defect (a corrupted label or a degraded image)" if "degraded" in df
                  and df["degraded"].any() else "whose labels were corrupted")
        save(fig, "roc.png", f"How well each score ranks the cases {defect} (corruption record).")

    links = [n for n in ("scores.parquet", "scores.csv", "filter/kept.txt", "filter/dropped.txt",
                         "filter/splits_final.json", "run.log") if (run / n).exists()]
    panels = [_panel(df, q, *p) for p in PANELS]
    (tmp / "index.html").write_text(_html(settings, df, figs, metrics, q, dropped, by, decision, links,
                                          "".join(h for h, _ in panels)), encoding="utf-8")
    (tmp / "metrics.json").write_text(json.dumps(
        {"quantile": q, "cut": cut, "cases": int(len(df)), "decision_score": by,
         "cuts": {p[0]: _num(c) for p, (_, c) in zip(PANELS, panels) if c is not None},
         "scorers": {m[0]: {"auroc": _num(m[1]), "precision_at_cut": _num(m[2])} for m in metrics}}, indent=2))


def _panel(df, q: float, score: str, title: str, what: str, prefix: str, missing: str,
           top: int = 15) -> tuple[str, float | None]:
    """One QC score's panel: what it finds, its own global cut at ``q``, and its cases ranked (the ``top``
    first and every case above the cut), with the class that weighs most in each. Returns (html, cut)."""
    e = html.escape
    column = FILTER_SCORES[score][0]
    head = f'<h2 id="panel-{score}">{e(title)}</h2><p>{e(what)}</p>'
    if column not in df:
        return head + f"<p>{missing}</p>", None
    x = df[column].to_numpy(dtype=np.float64)
    ok = np.isfinite(x)
    if not ok.any():
        return head + "<p>No case has this score.</p>", None
    cut = A.inverted_cdf_quantile(x, q)
    above = ok & (x > cut)
    fg = [c for c in df.columns if c.startswith(f"{prefix}[") and c != f"{prefix}[background]"]
    per = df[fg].to_numpy(dtype=np.float64) if fg else np.empty((len(df), 0))
    if score != "oof" and per.size:  # raw distances differ in scale per class: compare their ranks
        per = np.stack([_rank01(per[:, k]) for k in range(per.shape[1])], axis=1)
    order = [i for i in np.argsort(-np.where(ok, x, -np.inf), kind="stable") if ok[i]]
    shown = order[:max(top, int(above.sum()))]
    has_rec = "corrupted" in df
    dice = "oof_dice" in df and score == "oof"
    rows = []
    for rank, i in enumerate(shown, 1):
        worst = ""
        if per.shape[1] and np.isfinite(per[i]).any():
            worst = fg[int(np.nanargmax(per[i]))][len(prefix) + 1:-1]
        mark = ' data-above="1"' if above[i] else ""
        rows.append(
            f'<tr{mark}><td>{rank}</td><td>{e(str(df["case"].iloc[i]))}</td>'
            f'<td>{x[i]:.4f}</td><td><span class="bar" style="width:{max(0.0, min(1.0, x[i])) * 120:.0f}px">'
            f'</span></td><td>{e(worst)}</td>'
            + (f'<td>{_fmt(df["oof_dice"].iloc[i])}</td>' if dice else "")
            + ((f"<td>{e(df['corruption_kind'].iloc[i]) if df['corrupted'].iloc[i] else 'no'}</td>") if has_rec
               else "") + "</tr>")
        if above[i] and (rank == len(shown) or not above[shown[rank]]):
            rows.append(f'<tr class="cut-row"><td colspan="8">cut: Q({q:g}) = {cut:.4f}; the {int(above.sum())} '
                        f"case(s) above are dropped by <code>auvcore filter RUN --score {score}</code></td></tr>")
    errs = ""
    if score == "oof" and "oof_error" in df:
        bad = [(c, m) for c, m in zip(df["case"], df["oof_error"]) if m]
        if bad:
            errs = "<p>Not scored by the label QC: " + "; ".join(f"{e(str(c))}: {e(str(m))}" for c, m in bad) + "</p>"
    table = ('<table class="ranked"><tr><th>rank</th><th>case</th><th>score</th><th></th><th>class weighing most</th>'
             + ("<th>OOF Dice</th>" if dice else "") + ("<th>corrupted (record)</th>" if has_rec else "") + "</tr>"
             + "".join(rows) + "</table>")
    more = f"<p>The {len(shown)} highest of {int(ok.sum())} cases; every case is in the table at the end.</p>"
    return (head + f"<p>Its own cut at quantile {q:g}: {cut:.4f} ({int(above.sum())} case(s) above).</p>" + table
            + (more if len(shown) < ok.sum() else "") + errs), cut


def _fmt(x) -> str:
    return "" if x is None or not np.isfinite(float(x)) else f"{float(x):.3f}"


def _rank01(x: np.ndarray) -> np.ndarray:
    """Percentile ranks in [0, 1] of the finite entries (NaN elsewhere)."""
    out = np.full(len(x), np.nan)
    ok = np.isfinite(x)
    if ok.sum() >= 2:
        out[ok] = np.argsort(np.argsort(x[ok])) / (ok.sum() - 1)
    elif ok.any():
        out[ok] = 0.5
    return out


def _gallery(settings, df, rows, plt):
    from ..data import discover, load_case

    try:
        ds = discover(settings["dataset"])
    except (OSError, ValueError):
        return None  # the data set moved away: the rest of the report still stands
    if not rows:
        return None
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names = {int(k): v for k, v in settings["class_names"].items() if int(k) > 0}
    K = max(names, default=1) + 1
    cmap = ListedColormap([_COLOURS[k % len(_COLOURS)] for k in range(K)])
    n = len(rows)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.2 * cols, 4.6 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, rows):
        cid = df["case"].iloc[i]
        vol = load_case(ds.case(cid), spacing=None)
        z = _mid_slice(vol.label)
        # Radiological convention, the patient's right on the viewer's left: arrays are RAS (x grows towards
        # the patient's right), so x is flipped; anterior is up.
        img = vol.image[::-1, :, z].T
        if (settings.get("modality") or "CT") == "CT":
            img = np.clip(img, -1000, 1000)
        ax.imshow(img, cmap="gray", origin="lower")
        lab = np.ma.masked_equal(vol.label[::-1, :, z].T, 0)
        ax.imshow(lab, cmap=cmap, alpha=0.5, origin="lower", interpolation="nearest", vmin=-0.5, vmax=K - 0.5)
        ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="w", fontsize=11, va="center")
        ax.text(0.98, 0.5, "L", transform=ax.transAxes, color="w", fontsize=11, va="center", ha="right")
        tag = f" · corrupted: {df['corruption_kind'].iloc[i]}" if "corrupted" in df and bool(df["corrupted"].iloc[i]) else ""
        ax.set_title(f"{cid}  AUV {df['auv'].iloc[i]:.3f}{tag}\naxial slice {z}", fontsize=11)
    fig.tight_layout()
    # Below the panels, outside the axes (savefig's tight bounding box takes it in).
    fig.legend(handles=[Patch(color=_COLOURS[k % len(_COLOURS)], label=v) for k, v in sorted(names.items())],
               loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(names)), fontsize=11, frameon=False)
    return fig


# Distinct, saturated class colours (none grey or near-white, which vanish on CT), index = class value.
_COLOURS = ("#000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
            "#bcf60c", "#008080", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075")


def _html(settings, df, figs, metrics, q, dropped, by, decision, links, panels="") -> str:
    e = html.escape

    def num(x):
        return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"

    s_cols = [c for c in df.columns if c.startswith("S[")]
    # the other QC scores beside the AUV, when the table has them
    extra = [(c, h) for c, h in (("oof_score", "OOF label-error score"), ("mahalanobis_score", "outlier score"))
             if c in df]
    by_col = FILTER_SCORES.get(by, ("auv",))[0]
    by_col = by_col if by_col in df else "auv"
    order = np.argsort(-np.nan_to_num(df[by_col].to_numpy(dtype=np.float64), nan=-1.0), kind="stable")
    has_err = "error" in df
    rows = []
    for i in order:
        r = df.iloc[i]
        status = ("not scored" if has_err and r["error"] else "no AUV" if np.isnan(r["auv"])
                  else "dropped" if dropped[i] else "kept")
        note = (r["error"] if has_err and r["error"] else r.get("reason", "")) or ""
        rows.append(
            f'<tr class="{status.replace(" ", "-")}"><td>{e(str(r["case"]))}</td><td>{status}</td>'
            + "".join(f"<td>{num(r[c])}</td>" for c, _ in extra) + f'<td>{num(r["auv"])}</td>'
            f'<td>{num(r["sample_scale"])}</td>' + "".join(f"<td>{num(r[c])}</td>" for c in s_cols)
            + (f"<td>{e(r['corruption_kind']) if r['corrupted'] else 'no'}</td>" if "corrupted" in df else "")
            + f"<td>{e(str(note))}</td></tr>")
    case_table = (
        "<table id=\"cases\"><tr><th>case</th><th>filter</th>" + "".join(f"<th>{e(h)}</th>" for _, h in extra)
        + "<th>AUV</th><th>sample scale</th>"
        + "".join(f"<th>S {e(c[2:-1])}</th>" for c in s_cols)
        + ("<th>corrupted (record)</th>" if "corrupted" in df else "") + "<th>note</th></tr>" + "".join(rows) + "</table>")
    metric_rows = "".join(f"<tr><td>{e(n)}</td><td>{a:.3f}</td><td>{'n/a (nothing dropped)' if np.isnan(p) else f'{p:.3f}'}</td></tr>"
                          for n, a, p in metrics)
    metric_table = (f"<h2>Against the corruption record</h2><table><tr><th>score</th><th>AUROC</th>"
                    f"<th>precision at the Q({q:g}) cut</th></tr>{metric_rows}</table>") if metrics else ""
    imgs = "".join(f'<figure><img src="{e(n)}" alt="{e(n)}"><figcaption>{e(c)}</figcaption></figure>' for n, c in figs)
    link_html = " · ".join(f'<a href="../{e(n)}">{e(n)}</a>' for n in links)
    n_failed = int((df["error"] != "").sum()) if has_err else 0
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>auvcore report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
figure{{margin:1.5em 0}} img{{max-width:100%}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}} code{{background:#f3f3f3}}
tr.dropped td{{background:#fde2d4}} tr.not-scored td,tr.no-AUV td{{color:#777}}
tr[data-above] td{{background:#fde2d4}} tr.cut-row td{{border-top:2px dashed #444;font-size:90%}}
.bar{{display:inline-block;height:0.8em;background:#c44e52}}</style></head>
<body><h1>Data-set QC of <code>{e(settings['dataset'])}</code></h1>
<p>{len(df)} cases ({n_failed} could not be scored) with encoder <code>{e(str(settings['encoder']))}</code>
(layer <code>{e(str(settings['layer']))}</code>, weights <code>{e(str(settings.get('weights')))}</code>),
mode <code>{e(settings['mode'])}</code>, input <code>{e(settings['input'])}</code>.</p>
<p id="decision">{decision}: <b>{int(dropped.sum())} case(s) dropped</b>, {len(df) - int(dropped.sum())} kept
(cases that could not be scored or have no AUV are kept).</p>
<p>Files: {link_html}</p>
{panels}
{metric_table}
<h2 id="panel-auv">The paper's AUV (aleatoric uncertainty)</h2>
<p>How concentrated the encoder's features of each class are (the semantic perception scale S, normalised over the
set; 1 = most uncertain). Read it as the paper's measure of feature diversity, not as a label-error detector: on
the demo cohorts it ranks the corrupted labels at AUROC 0.47–0.58, no better than chance (bench/RESULTS.md);
<code>auvcore filter RUN --score auv</code> filters by it.</p>
{imgs}
<h2>Every case, most suspect first by the {e(SCORE_NAMES.get(by, by))}</h2>
{case_table}
</body></html>
"""
