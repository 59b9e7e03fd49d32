"""Noise-detection study: how well does each score rank the corrupted cases of the demo cohorts first?

For every source and draw (``build_demo(source=..., seed=draw)``: 24 cases varied from one real volume, a
quarter of them with a recorded label corruption of one of six kinds), every scoring configuration runs as
``auvcore score`` would (``auvcore.app.scoring.score_dataset``; resumable, so an interrupted study continues),
and every score of its table is compared with the corruption record:

* the AUV of each configuration (encoder, layer, masked/decoded, raw/normalized input; the ``sum``
  reduction is recomputed from the per-class scales of the mean run, the same S);
* the baselines of the table (intensity variance and Mahalanobis, from the Merlin layer-2 run), the label
  agreement of a promptable encoder (1 − Dice of its decoded mask against the label; beyond the paper) and
  a random score (seeded).

Metrics: AUROC and average precision per draw, averaged over the draws of a source, with 95 % bootstrap
intervals (cases resampled within each draw, stratified by corrupted/clean; 2000 resamples). Per corruption
kind: the corrupted cases of that kind against the clean ones, with scores turned into within-draw
percentile ranks and pooled over all draws and sources. Writes ``OUT/NAME.json``, ``OUT/NAME.md`` (the tables
of bench/RESULTS.md) and ``OUT/NAME_cases.csv`` (every case's scores).

    python bench/study_detection.py --out runs/study                       # all sources, 3 draws
    python bench/study_detection.py --sources spine-ct --draws 1 --configs merlin-l2 litemedsam-decoded
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
SOURCES = ("spine-ct", "spine-mr", "brain-mni", "chest")


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


def run_study(out: Path, sources, draws, configs, cases, fraction, progress):
    import pandas as pd

    from auvcore import scores as A
    from auvcore.data import build_demo
    from auvcore.app.scoring import score_dataset

    out.mkdir(parents=True, exist_ok=True)
    rows = []  # one per (source, draw, case)
    timing = {}
    for source in sources:
        for draw in range(draws):
            ds = build_demo(out / "data" / f"{source}-{draw}", n_cases=cases, corrupt_fraction=fraction, seed=draw,
                            source=source)
            tables = {}
            for name in configs:
                run = out / "runs" / f"{source}-{draw}" / name
                t0 = time.perf_counter()
                fresh = not (run / "scores.parquet").exists()
                score_dataset(ds, run, progress=progress, **CONFIGS[name])
                if fresh:
                    timing.setdefault((source, name), []).append((time.perf_counter() - t0) / cases)
                tables[name] = pd.read_parquet(run / "scores.parquet").set_index("case")
                print(f"{source} draw {draw} {name}: done", flush=True)
            base = tables[configs[0]]
            for case in base.index:
                r = {"source": source, "draw": draw, "case": case, "corrupted": bool(base.loc[case, "corrupted"]),
                     "kind": base.loc[case, "corruption_kind"]}
                for name, t in tables.items():
                    r[f"auv:{name}"] = t.loc[case, "auv"]
                    if "agreement_score" in t:
                        r[f"agreement:{name}"] = t.loc[case, "agreement_score"]
                if "merlin-l2" in tables:
                    t = tables["merlin-l2"]
                    r["variance"] = t.loc[case, "variance_score"]
                    r["mahalanobis:merlin-l2"] = t.loc[case, "mahalanobis_score"]
                rows.append(r)
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


def tables(df, n_boot):
    scores = [c for c in df.columns if c.startswith(("auv:", "agreement:", "mahalanobis:")) or c in ("variance", "random")]
    res = {"by_source": {}, "by_kind": {}}
    for source, g in df.groupby("source", sort=False):
        draws = [(d, gd) for d, gd in g.groupby("draw")]
        for sc in scores:
            per = [(gd[sc].to_numpy(dtype=np.float64), gd["corrupted"].to_numpy(dtype=bool)) for _, gd in draws]
            if all(np.isnan(s).all() for s, _ in per):
                continue
            res["by_source"].setdefault(sc, {})[source] = {
                "auroc": bootstrap(per, auroc, n_boot), "ap": bootstrap(per, average_precision, n_boot),
                "prevalence": float(np.mean([p.mean() for _, p in per])), "draws": len(per)}
    ranked = df.copy()
    for sc in scores:
        ranked[sc] = df.groupby(["source", "draw"])[sc].transform(lambda x: percentile_rank(x.to_numpy(dtype=float)))
    clean = ranked[~ranked["corrupted"]]
    for kind in sorted(k for k in df["kind"].unique() if k):
        pos = ranked[ranked["kind"] == kind]
        for sc in scores:
            if df.loc[df["kind"] == kind, sc].isna().all():
                continue
            s = np.r_[pos[sc].to_numpy(dtype=float), clean[sc].to_numpy(dtype=float)]
            y = np.r_[np.ones(len(pos), bool), np.zeros(len(clean), bool)]
            res["by_kind"].setdefault(sc, {})[kind] = {"auroc": auroc(s, y), "n": int(len(pos))}
    return res


def markdown(res, meta):
    lines = [f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}; command: `{meta['command']}`.", ""]
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
    if meta.get("seconds_per_case"):
        lines += ["", "Scoring time per case (median over draws, whole `score_dataset` / cases, this machine): "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in meta["seconds_per_case"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/study"))
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    ap.add_argument("--draws", type=int, default=3, help="cohort draws (seeds 0..draws-1) per source")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--fraction", type=float, default=0.25, help="share of corrupted cases")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--name", default="detection", help="stem of the output files in OUT")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    df, timing = run_study(a.out, a.sources, a.draws, a.configs, a.cases, a.fraction, a.progress)
    df.to_csv(a.out / f"{a.name}_cases.csv", index=False)
    res = tables(df, a.bootstrap)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    meta = {"machine": cpu_name(), "commit": commit, "date": time.strftime("%Y-%m-%d"),
            "command": "python bench/study_detection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds_per_case": timing}
    (a.out / f"{a.name}.json").write_text(json.dumps({"meta": meta, **res}, indent=1))
    md = markdown(res, meta)
    (a.out / f"{a.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
