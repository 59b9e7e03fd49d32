"""`auvcore report RUN/`: an HTML page with the plots that say what the AUV found.

Written to RUN/report/ (index.html + PNGs, replaced as a whole): the AUV histogram with the quantile cut,
cumulative energy curves of the most and least uncertain cases (the paper's Figure 2), per-class scale
distributions, a gallery of the most uncertain cases, and, when the data set has a corruption record,
how well AUV ranks the corrupted cases next to the baseline scorers (ROC, AUROC, precision at the cut).
"""
from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import scores as A
from .data.io import umask_mode
from .pipeline import _settings, case_spectrum, read_table

SCORERS = (("auv", "AUV (ours)"), ("variance_score", "intensity variance"), ("mahalanobis_score", "Mahalanobis"))


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


def write_report(run, quantile: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    settings = _settings(run)
    df = read_table(run)
    if quantile is None:
        try:
            quantile = json.loads((run / "filter" / "summary.json").read_text())["quantile"]
        except (OSError, ValueError, KeyError):
            quantile = 0.95
    q = A._check_quantile(quantile)
    auv = df["auv"].to_numpy(dtype=np.float64)
    cut = A.inverted_cdf_quantile(auv, q)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=run))
    os.chmod(tmp, umask_mode(0o777))
    figs: list[tuple[str, str]] = []

    def save(fig, name, caption):
        fig.tight_layout()
        fig.savefig(tmp / name, dpi=110)
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
    ax.axvline(cut, color="k", ls="--")
    ax.text(cut, ax.get_ylim()[1] * 0.92, f" Q({q:g}) = {cut:.3f}", va="top")
    ax.set_xlabel("AUV (1 = most uncertain)")
    ax.set_ylabel("cases")
    save(fig, "auv_hist.png", f"AUV of {ok.sum()} cases; cases right of the dashed line are dropped by the filter.")

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
            score = df[col].to_numpy(dtype=np.float64)
            fpr, tpr, auc = roc_curve(score, pos)
            metrics.append((label, auc, _precision_at(score, pos, q)))
            ax.plot(fpr, tpr, label=f"{label} (AUROC {auc:.3f})")
        ax.plot([0, 1], [0, 1], color="0.7", ls=":")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend(loc="lower right", fontsize=8)
        save(fig, "roc.png", "How well each score ranks the cases whose labels were corrupted (corruption record).")

    (tmp / "index.html").write_text(_html(settings, df, figs, metrics, q, cut), encoding="utf-8")
    (tmp / "metrics.json").write_text(json.dumps(
        {"quantile": q, "cut": cut, "cases": int(len(df)),
         "scorers": {m[0]: {"auroc": _num(m[1]), "precision_at_cut": _num(m[2])} for m in metrics}}, indent=2))
    out = run / "report"
    old = run / f".report-old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out / "index.html"


def _gallery(settings, df, rows, plt):
    from .data import discover, load_case

    try:
        ds = discover(settings["dataset"])
    except (OSError, ValueError):
        return None  # the data set moved away: the rest of the report still stands
    if not rows:
        return None
    n = len(rows)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 3.0))
    axes = np.atleast_1d(axes)
    for ax, i in zip(axes, rows):
        cid = df["case"].iloc[i]
        vol = load_case(ds.case(cid), spacing=None)
        z = _mid_slice(vol.label)
        img = np.clip(vol.image[:, :, z].T, -1000, 1000) if (settings.get("modality") or "CT") == "CT" else vol.image[:, :, z].T
        ax.imshow(img, cmap="gray", origin="lower")
        lab = np.ma.masked_equal(vol.label[:, :, z].T, 0)
        ax.imshow(lab, cmap="tab10", alpha=0.45, origin="lower", interpolation="nearest", vmin=0, vmax=10)
        tag = " (corrupted)" if "corrupted" in df and bool(df["corrupted"].iloc[i]) else ""
        ax.set_title(f"{cid}\nAUV {df['auv'].iloc[i]:.3f}{tag}", fontsize=8)
        ax.axis("off")
    return fig


def _html(settings, df, figs, metrics, q, cut) -> str:
    e = html.escape
    top = df.sort_values("auv", ascending=False).head(15)
    rows = "".join(
        f"<tr><td>{e(str(r.case))}</td><td>{r.auv:.4f}</td><td>{r.sample_scale:.4f}</td>"
        + (f"<td>{'yes: ' + e(str(r.corruption_kind)) if r.corrupted else 'no'}</td>" if "corrupted" in df else "")
        + "</tr>"
        for r in top.itertuples())
    metric_rows = "".join(f"<tr><td>{e(n)}</td><td>{a:.3f}</td><td>{'n/a (nothing dropped)' if np.isnan(p) else f'{p:.3f}'}</td></tr>"
                          for n, a, p in metrics)
    metric_table = (f"<h2>Against the corruption record</h2><table><tr><th>score</th><th>AUROC</th>"
                    f"<th>precision at the Q({q:g}) cut</th></tr>{metric_rows}</table>") if metrics else ""
    imgs = "".join(f'<figure><img src="{e(n)}" alt="{e(n)}"><figcaption>{e(c)}</figcaption></figure>' for n, c in figs)
    dropped = int((df["auv"] > cut).sum())
    failed = [(c, err) for c, err in zip(df["case"], df["error"]) if err] if "error" in df else []
    failed_html = (f"<h2>Cases that could not be scored ({len(failed)})</h2><p>They have no AUV and are kept by the "
                   "filter; <code>run.log</code> in the run folder has the details.</p><table><tr><th>case</th>"
                   "<th>error</th></tr>" + "".join(f"<tr><td>{e(str(c))}</td><td>{e(str(m))}</td></tr>" for c, m in failed)
                   + "</table>") if failed else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>auvcore report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
figure{{margin:1.5em 0}} img{{max-width:100%}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}} code{{background:#f3f3f3}}</style></head>
<body><h1>Aleatoric uncertainty of <code>{e(settings['dataset'])}</code></h1>
<p>{len(df)} cases scored with encoder <code>{e(str(settings['encoder']))}</code>
(layer <code>{e(str(settings['layer']))}</code>, weights <code>{e(str(settings.get('weights')))}</code>),
mode <code>{e(settings['mode'])}</code>, input <code>{e(settings['input'])}</code>.
Filter at quantile {q:g}: AUV cut {cut:.4f}, {dropped} case(s) dropped.</p>
{metric_table}
{imgs}
<h2>Most uncertain cases</h2>
<table><tr><th>case</th><th>AUV</th><th>sample scale</th>{'<th>corrupted</th>' if 'corrupted' in df else ''}</tr>{rows}</table>
{failed_html}
</body></html>
"""
