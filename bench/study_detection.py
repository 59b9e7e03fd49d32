"""Noise-detection study: how well does each score rank the corrupted cases of the demo cohorts first?

For every corruption rate, source and draw (``build_demo(source=..., seed=draw, corrupt_fraction=rate)``: 24
cases varied from one real volume, by default a quarter of them with a recorded label corruption of one of six
kinds; ``--kinds`` and ``--strength`` choose the kinds and their size; with ``--degrade`` the labels stay clean and
that share of the cases gets a degraded image instead, of the kinds named, at ``--strength``: what does each score
see of an image outlier), every scoring configuration runs as
``auvcore score`` would (``auvcore.app.scoring.score_dataset``; resumable, so an interrupted study continues),
and every score of its table is compared with the corruption record:

* the AUV of each configuration (encoder, layer, masked/decoded, raw/normalized input; the ``sum``
  reduction is recomputed from the per-class scales of the mean run, the same S);
* the baselines of the table (intensity variance and Mahalanobis, from the Merlin layer-2 run), the label
  agreement of a promptable encoder (1 − Dice of its decoded mask against the label; beyond the paper) and
  a random score (seeded).

Each rate is analysed on its own (a rate's cohorts are other cohorts: ``OUT/data/<source>-<draw>-f<rate>-<strength>``,
with the kinds appended when ``--kinds`` is given, ``-degrade-<kinds>`` with ``--degrade``; the default 0.25 / default
/ six kinds keeps the path of the
first studies, ``OUT/data/<source>-<draw>``, so their data and scores are reused). With few cases a low rate
leaves one or two corrupted cases per draw, an AUROC from one positive: take ``--cases 40`` or more for 5 %.
The builder cycles the kinds in their order, so a rate that corrupts fewer cases than there are kinds sees only
the first ones (4 of 40 cases: erode, dilate, shift, drop): compare rates on the per-kind table too.

Metrics: AUROC and average precision per draw, averaged over the draws of a source, with 95 % bootstrap
intervals (cases resampled within each draw, stratified by corrupted/clean; 2000 resamples). Per corruption
kind: the corrupted cases of that kind against the clean ones, with scores turned into within-draw
percentile ranks and pooled over all draws and sources. Writes ``OUT/NAME.json`` (under ``"by_rate"``, keyed by
the rate; a single-rate study also keeps ``"by_source"`` / ``"by_kind"`` at the top as before), ``OUT/NAME.md``
(the tables of bench/RESULTS.md, one section per rate) and ``OUT/NAME_cases.csv`` (every case's scores, with its
``fraction`` and ``strength``).

    python bench/study_detection.py --out runs/study                       # all sources, 3 draws
    python bench/study_detection.py --sources spine-ct --draws 1 --configs merlin-l2 litemedsam-decoded
    python bench/study_detection.py --cases 40 --fractions 0.05 0.1 0.2 --configs merlin-l2
    python bench/study_detection.py --cases 40 --fractions 0.2 --kinds boundary partial --strength mild
    python bench/study_detection.py --sources chest --draws 1 --configs merlin-l2 --degrade noise blur motion \
        ghosting lowres bias                                              # clean labels, degraded images
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import cpu_name  # noqa: E402

from auvcore.data.cohorts import SOURCES as BUILDER_SOURCES  # noqa: E402

# name -> score_dataset arguments (the Merlin layer-2 masked raw run is the README's default)
CONFIGS = {
    "merlin-l2": dict(encoder="merlin", layer="layer2", mode="masked", input="raw"),
    "merlin-l1": dict(encoder="merlin", layer="layer1", mode="masked", input="raw"),
    "merlin-l3": dict(encoder="merlin", layer="layer3", mode="masked", input="raw"),
    "merlin-l2-normalized": dict(encoder="merlin", layer="layer2", mode="masked", input="normalized"),
    "merlin-l2-decoded": dict(encoder="merlin", layer="layer2", mode="decoded", input="raw"),
    "litemedsam-decoded": dict(encoder="litemedsam", mode="decoded", input="raw"),
    "litemedsam-masked": dict(encoder="litemedsam", mode="masked", input="raw"),
}
# The default run: the sources that install with the `cohorts` extra (the tumour sources need the pyradiomics
# sdist, AUVCORE_PYRADIOMICS_SDIST; brain-aal Debian's mricron-data).
DEFAULT_SOURCES = ("spine-ct", "spine-mr", "brain-mni", "chest")
# every source of the builder, the default ones first (a source added there is a choice here too)
SOURCES = DEFAULT_SOURCES + tuple(s for s in BUILDER_SOURCES if s not in DEFAULT_SOURCES)


def auroc(score, pos):
    """AUROC with ties counted one half (the report's); NaN scores rank lowest (a case without a score is not
    flagged)."""
    from auvcore.app.report import roc_curve

    return roc_curve(np.where(np.isnan(score), -np.inf, score), pos)[2]


def average_precision(score, pos):
    s = np.where(np.isnan(score), -np.inf, score)
    if not pos.any():
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    hits = pos[order]
    prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(prec[hits].mean())


def percentile_rank(x):
    """Within-draw ranks in [0, 1] (NaN → 0: unflagged), so draws can be pooled."""
    s = np.where(np.isnan(x), -np.inf, x)
    r = np.argsort(np.argsort(s, kind="mergesort"), kind="mergesort")
    return r / max(len(s) - 1, 1)


def bootstrap(draws, metric, n=2000, seed=0):
    """Mean over draws of ``metric(score, pos)`` and its 95 % percentile interval, resampling cases within
    each draw stratified by label."""
    rng = np.random.default_rng(seed)
    point = float(np.nanmean([metric(s, p) for s, p in draws]))
    vals = np.empty(n)
    for b in range(n):
        per = []
        for s, p in draws:
            ip, ineg = np.nonzero(p)[0], np.nonzero(~p)[0]
            idx = np.r_[rng.choice(ip, len(ip)), rng.choice(ineg, len(ineg))]
            per.append(metric(s[idx], p[idx]))
        vals[b] = np.nanmean(per)
    lo, hi = np.nanpercentile(vals, [2.5, 97.5])
    return point, float(lo), float(hi)


def cohort_tag(source, draw, fraction, strength="default", kinds=None, degrade=None):
    """The folder name of one cohort under OUT/data and OUT/runs: the first studies' ``<source>-<draw>`` for
    the default rate, strength and kinds (so their data and scores are reused), else one per setting; a cohort of
    degraded images (``degrade``: its kinds; the labels clean) ends in ``-degrade-<kinds>``."""
    from auvcore.data.cohorts import DEFAULT_KINDS

    if degrade:
        return f"{source}-{draw}-f{fraction:g}-{strength}-degrade-" + "+".join(degrade)
    kinds = tuple(DEFAULT_KINDS if kinds is None else kinds)
    if fraction == 0.25 and strength == "default" and kinds == tuple(DEFAULT_KINDS):
        return f"{source}-{draw}"
    tag = f"{source}-{draw}-f{fraction:g}-{strength}"
    return tag if kinds == tuple(DEFAULT_KINDS) else tag + "-" + "+".join(kinds)


def run_study(out: Path, sources, draws, configs, cases, fractions, progress, strength="default", kinds=None,
              degrade=None):
    """Build the cohorts and score them; ``degrade``: image degradation kinds, then each ``fraction`` is the share of
    degraded images (labels clean) and ``strength`` theirs."""
    import pandas as pd

    from auvcore import scores as A
    from auvcore.data import build_demo
    from auvcore.data.cohorts import DEFAULT_KINDS
    from auvcore.app.scoring import score_dataset

    if isinstance(fractions, (int, float)):
        fractions = [fractions]
    kinds = list(DEFAULT_KINDS if kinds is None else kinds)
    out.mkdir(parents=True, exist_ok=True)
    rows = []  # one per (fraction, source, draw, case)
    timing = {}
    for fraction in fractions:
        for source in sources:
            for draw in range(draws):
                tag = cohort_tag(source, draw, fraction, strength, kinds, degrade)
                if degrade:
                    ds = build_demo(out / "data" / tag, n_cases=cases, corrupt_fraction=0.0, seed=draw, source=source,
                                    degrade=degrade, degrade_fraction=fraction, degrade_strength=strength)
                else:
                    ds = build_demo(out / "data" / tag, n_cases=cases, corrupt_fraction=fraction, seed=draw,
                                    source=source, kinds=kinds, strength=strength)
                tables = {}
                for name in configs:
                    run = out / "runs" / tag / name
                    t0 = time.perf_counter()
                    fresh = not (run / "scores.parquet").exists()
                    score_dataset(ds, run, progress=progress, **CONFIGS[name])
                    if fresh:
                        timing.setdefault((source, name), []).append((time.perf_counter() - t0) / cases)
                    tables[name] = pd.read_parquet(run / "scores.parquet").set_index("case")
                    print(f"{tag} {name}: done", flush=True)
                base = tables[configs[0]]
                for case in base.index:
                    r = {"fraction": fraction, "strength": strength, "source": source, "draw": draw, "case": case,
                         "corrupted": bool(base.loc[case, "corrupted"]), "kind": base.loc[case, "corruption_kind"]}
                    for name, t in tables.items():
                        r[f"auv:{name}"] = t.loc[case, "auv"]
                        if "agreement_score" in t:
                            r[f"agreement:{name}"] = t.loc[case, "agreement_score"]
                    if "merlin-l2" in tables:
                        t = tables["merlin-l2"]
                        r["variance"] = t.loc[case, "variance_score"]
                        r["mahalanobis:merlin-l2"] = t.loc[case, "mahalanobis_score"]
                    rows.append(r)
                # One class at a time (the paper's Table 5 strategies: raw or normalized input x all classes or one
                # class): each class's own AUV column of the same table.
                for name in ("merlin-l2", "merlin-l2-normalized"):
                    if name in tables:
                        t = tables[name]
                        for col in (c for c in t.columns if c.startswith("auv[")):
                            for r, a in zip(rows[-len(base):], t[col].to_numpy(dtype=np.float64)):
                                r[f"auv:{name}{col[3:]}"] = a
                if "merlin-l2" in tables:  # the sum reduction from the same per-class scales
                    t = tables["merlin-l2"]
                    S = t[[c for c in t.columns if c.startswith("S[")]].to_numpy(dtype=np.float64)[:, 1:]
                    auv_sum = A.auv(A.sample_scale(S, reduction="sum"))
                    for r, a in zip(rows[-len(base):], auv_sum):
                        r["auv:merlin-l2-sum"] = a
    df = pd.DataFrame(rows)
    rng = np.random.default_rng(12345)
    df["random"] = rng.random(len(df))
    return df, {f"{s}/{n}": float(np.median(v)) for (s, n), v in timing.items()}


def rate_key(fraction) -> str:
    return f"{float(fraction):g}"


def tables(df, n_boot):
    """The tables of every corruption rate in ``df`` (``{"by_rate": {rate: {"by_source", "by_kind"}}}``); a rate's
    cohorts are analysed on their own, as a study of that rate alone would."""
    if "fraction" not in df:
        return tables_one_rate(df, n_boot)
    by_rate = {rate_key(f): tables_one_rate(g, n_boot) for f, g in df.groupby("fraction", sort=True)}
    res = {"by_rate": by_rate}
    if len(by_rate) == 1:  # the layout of single-rate studies before rates existed
        res.update(next(iter(by_rate.values())))
    return res


def tables_one_rate(df, n_boot, extra_scores=()):
    """AUROC/AP per source and AUROC per kind of every score column: the prefixed ones, variance, random and
    ``extra_scores`` (other scripts' columns, e.g. study_oof's cleanlab scores), in the frame's column order."""
    scores = [c for c in df.columns if c in extra_scores or c.startswith(("auv:", "agreement:", "mahalanobis:"))
              or c in ("variance", "random")]
    res = {"by_source": {}, "by_kind": {}, "unscored": {}}
    for source, g in df.groupby("source", sort=False):
        draws = [(d, gd) for d, gd in g.groupby("draw")]
        for sc in scores:
            per = [(gd[sc].to_numpy(dtype=np.float64), gd["corrupted"].to_numpy(dtype=bool)) for _, gd in draws]
            if all(np.isnan(s).all() for s, _ in per):  # e.g. every class vanished at a deep layer's grid
                res["unscored"].setdefault(sc, []).append(source)
                continue
            res["by_source"].setdefault(sc, {})[source] = {
                "auroc": bootstrap(per, auroc, n_boot), "ap": bootstrap(per, average_precision, n_boot),
                "prevalence": float(np.mean([p.mean() for _, p in per])), "draws": len(per)}
    ranked = df.copy()
    for sc in scores:
        ranked[sc] = df.groupby(["source", "draw"])[sc].transform(lambda x: percentile_rank(x.to_numpy(dtype=float)))
    clean = ranked[~ranked["corrupted"]]
    for kind in sorted(k for k in df["kind"].fillna("").unique() if k):  # clean cases: "" or None/NaN
        pos = ranked[ranked["kind"] == kind]
        for sc in scores:
            if df.loc[df["kind"] == kind, sc].isna().all():
                continue
            s = np.r_[pos[sc].to_numpy(dtype=float), clean[sc].to_numpy(dtype=float)]
            y = np.r_[np.ones(len(pos), bool), np.zeros(len(clean), bool)]
            res["by_kind"].setdefault(sc, {})[kind] = {"auroc": auroc(s, y), "n": int(len(pos))}
    return res


def plot_auroc(by_source: dict, path: Path, title: str, skip=("[",)):
    """Grouped bars: AUROC of each score per source with its 95 % bootstrap interval (per-class scores, whose
    names hold ``[``, left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = [sc for sc in by_source if not any(t in sc for t in skip)]
    sources = list(dict.fromkeys(s for sc in scores for s in by_source[sc]))
    width = 0.8 / max(len(scores), 1)
    fig, ax = plt.subplots(figsize=(3.6 + 1.9 * len(sources), 4.2))
    # the title spans the figure (axes and legend), wrapped to its width: a one-source plot is narrow
    fig.suptitle("\n".join(textwrap.wrap(title, int(11 * fig.get_figwidth()))), fontsize=10)
    for i, sc in enumerate(scores):
        xs, ys, err = [], [], [[], []]
        for j, src in enumerate(sources):
            if src in by_source[sc]:
                p, lo, hi = by_source[sc][src]["auroc"]
                xs.append(j - 0.4 + (i + 0.5) * width)
                ys.append(p)
                err[0].append(p - lo)
                err[1].append(hi - p)
        # more than 10 scores: tab20, so that no two bars share a colour
        color = plt.cm.tab20(i % 20) if len(scores) > 10 else None
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=sc, color=color)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set(xticks=range(len(sources)), xticklabels=sources, ylim=(0, 1), ylabel="AUROC (95 % bootstrap interval)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res, meta):
    lines = [f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}; command: `{meta['command']}`.", ""]
    by_rate = res.get("by_rate") or {rate_key(meta.get("fractions", [0.25])[0]): res}
    if meta.get("degrade"):
        lines += [f"Image degradation (labels clean), strength {meta['strength']}; "
                  f"kinds: {', '.join(meta['degrade'])}; {meta['cases']} cases per cohort; \"corrupted\" below = the image is degraded.", ""]
    elif "strength" in meta:
        lines += [f"Corruption strength {meta['strength']}; kinds: {', '.join(meta['kinds'])}; "
                  f"{meta['cases']} cases per cohort.", ""]
    if len(by_rate) > 1:
        lines += _rate_summary(by_rate)
    for rate, r in by_rate.items():
        if len(by_rate) > 1 or "cases" in meta:
            n = f" ({round(float(rate) * meta['cases'])} of {meta['cases']} cases corrupted)" if "cases" in meta else ""
            lines += [f"### Corruption rate {rate}{n}", ""]
        lines += _rate_tables(r)
    if meta.get("seconds_per_case"):
        lines += ["Scoring time per case (median over draws, whole `score_dataset` / cases, this machine): "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in meta["seconds_per_case"].items()), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _rate_summary(by_rate):
    """AUROC of every score per source and rate in one table: how detection changes with the rate."""
    cols = [(rate, s) for rate, r in by_rate.items() for s in dict.fromkeys(x for v in r["by_source"].values() for x in v)]
    scores = list(dict.fromkeys(sc for r in by_rate.values() for sc in r["by_source"]))
    lines = ["AUROC by corruption rate (mean over draws; intervals in the sections below)", "",
             "| score | " + " | ".join(f"{s} @ {rate}" for rate, s in cols) + " |", "|---|" + "---|" * len(cols)]
    for sc in scores:
        cells = []
        for rate, s in cols:
            v = by_rate[rate]["by_source"].get(sc, {}).get(s)
            cells.append(f"{v['auroc'][0]:.2f}" if v else "–")
        lines.append(f"| {sc} | " + " | ".join(cells) + " |")
    return lines + [""]


def _rate_tables(res):
    lines = []
    sources = list(dict.fromkeys(s for v in res["by_source"].values() for s in v))
    lines.append("AUROC (95 % bootstrap interval), mean over draws; AP in the second table. Higher = the score ranks "
                 "corrupted cases first; 0.5 = chance.")
    lines.append("")
    for metric in ("auroc", "ap"):
        lines.append("| score | " + " | ".join(sources) + " |")
        lines.append("|---|" + "---|" * len(sources))
        for sc, per in res["by_source"].items():
            cells = []
            for s in sources:
                if s in per:
                    p, lo, hi = per[s][metric]
                    cells.append(f"{p:.2f} ({lo:.2f}–{hi:.2f})")
                else:
                    cells.append("–")
            lines.append(f"| {sc} | " + " | ".join(cells) + " |")
        if metric == "auroc":
            prev = {s: next(per[s]["prevalence"] for per in res["by_source"].values() if s in per) for s in sources}
            lines += ["", "Average precision (chance = the share of corrupted cases: "
                      + ", ".join(f"{s} {v:.2f}" for s, v in prev.items()) + ")", ""]
    kinds = list(dict.fromkeys(k for v in res["by_kind"].values() for k in v))
    lines += ["", "AUROC per corruption kind (within-draw ranks pooled over all draws and sources; n = corrupted cases "
              "of that kind)", "", "| score | " + " | ".join(
                  f"{k} (n={next(v[k]['n'] for v in res['by_kind'].values() if k in v)})" for k in kinds) + " |",
              "|---|" + "---|" * len(kinds)]
    for sc, per in res["by_kind"].items():
        lines.append(f"| {sc} | " + " | ".join(f"{per[k]['auroc']:.2f}" if k in per else "–" for k in kinds) + " |")
    if res.get("unscored"):
        lines += ["", "No value on any case, so not in the tables (every class under two voxels of the encoder's "
                  "feature grid): " + "; ".join(f"{sc} ({', '.join(v)})" for sc, v in res["unscored"].items())]
    return lines + [""]


def main(argv=None):
    from auvcore.data.cohorts import DEFAULT_KINDS, DEGRADATIONS, KINDS, STRENGTHS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/study"))
    ap.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES), choices=SOURCES)
    ap.add_argument("--draws", type=int, default=3, help="cohort draws (seeds 0..draws-1) per source")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--cases", type=int, default=24)
    rate = ap.add_mutually_exclusive_group()
    rate.add_argument("--fraction", type=float, help="share of corrupted cases (default 0.25)")
    rate.add_argument("--fractions", type=float, nargs="+", metavar="FRACTION",
                      help="several shares of corrupted cases, each its own cohorts and tables")
    ap.add_argument("--strength", default="default", choices=STRENGTHS, help="size of each corruption")
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--kinds", nargs="+", choices=KINDS, default=None,
                      help=f"corruption kinds cycled over the corrupted cases (default: {' '.join(DEFAULT_KINDS)})")
    kind.add_argument("--degrade", nargs="+", choices=DEGRADATIONS, default=None, metavar="KIND",
                      help=f"clean labels, degraded images: kinds of {', '.join(DEGRADATIONS)} cycled over the "
                           "--fraction(s) of the cases, at --strength")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--name", default="detection", help="stem of the output files in OUT")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    fractions = a.fractions or [0.25 if a.fraction is None else a.fraction]
    fractions = list(dict.fromkeys(fractions))
    for f in fractions:
        n_bad = round(f * a.cases)
        if not 0.0 < f < 1.0 or n_bad < 1 or n_bad >= a.cases:
            ap.error(f"--fraction(s): {f:g} of --cases {a.cases} corrupts {n_bad} cases; a detection AUROC needs at "
                     "least one corrupted and one clean case")
        if n_bad < 2:
            print(f"warning: --fraction {f:g} of --cases {a.cases} corrupts one case per cohort: each draw's AUROC "
                  "rests on a single case (take more --cases)", file=sys.stderr)
    kinds = list(DEFAULT_KINDS) if a.kinds is None else list(dict.fromkeys(a.kinds))
    degrade = list(dict.fromkeys(a.degrade)) if a.degrade else None
    df, timing = run_study(a.out, a.sources, a.draws, a.configs, a.cases, fractions, a.progress, a.strength, kinds,
                           degrade)
    df.to_csv(a.out / f"{a.name}_cases.csv", index=False)
    res = tables(df, a.bootstrap)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    meta = {"machine": cpu_name(), "commit": commit, "date": time.strftime("%Y-%m-%d"),
            "command": "python bench/study_detection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "fractions": fractions, "strength": a.strength, "kinds": kinds, "cases": a.cases,
            "seconds_per_case": timing, **({"degrade": degrade} if degrade else {})}
    (a.out / f"{a.name}.json").write_text(json.dumps({"meta": meta, **res}, indent=1))
    md = markdown(res, meta)
    (a.out / f"{a.name}.md").write_text(md)
    for rate, r in res.get("by_rate", {"": res}).items():
        plot_auroc(r["by_source"], a.out / f"{a.name}{'_' + rate if len(fractions) > 1 else ''}.png",
                   f"Noise detection, {float(rate or fractions[0]):.0%} of the cases "
                   + ("with degraded images (labels clean)" if degrade else "corrupted"))
    print(md)


if __name__ == "__main__":
    main()
