"""Training study (the paper's Tables 1–2 in small): does filtering by the AUV, or training with DUO, help a
segmentation model trained on a noisy cohort?

For a source and draw, a small 3-D U-Net is trained on the 24-case demo cohort of ``bench/study_detection.py``
(``build_demo(OUT/data/<source>-<draw>, n_cases=24, corrupt_fraction=0.25, seed=draw)``: the labels as delivered,
a quarter of them corrupted) and evaluated on a **clean held-out cohort** of the same source
(``build_demo(OUT/data/<source>-test, n_cases=8, corrupt_fraction=0, seed=1000)``: other cases, labels untouched):
Dice of the hard prediction against the test labels per foreground class, on the model grid. Arms:

* ``all``: all 24 cases;
* ``auv<keep>``: the cases with the highest AUV dropped (the Merlin layer-2 table of study_detection,
  ``OUT/runs/<source>-<draw>/merlin-l2/scores.parquet``, made when missing), keeping ``--keep`` (default 90 % and
  95 %, rounded to whole cases: 24 → drop 2 and 1);
* ``random<keep>``: the same number of cases dropped at random (seeded by the training seed, so the seeds also
  average over which cases go);
* ``cleanlab<keep>``: the same number dropped by study_oof's ``cleanlab_score`` (1 − cleanlab's softmin label
  quality of 4-fold OOF predictions; read from ``--cleanlab-csv``, default ``OUT/oof_cases.csv``; skipped when the
  file or the cohort's rows are missing). Its OOF model is study_oof's MONAI UNet, not this study's network;
* ``oracle``: exactly the recorded corrupted cases dropped (an upper bound for any filter);
* ``dice_bce``: all cases, ``DUOLoss(alpha=0, tau=0, beta=0)`` = λ·BCE + Dice per foreground class on sigmoids
  (bench/train_duo.py checks that this equals its Dice+BCE): the control for DUO, whose loss is sigmoid-based,
  so that DUO's effect is not confused with the change from softmax Dice+CE to sigmoid Dice+BCE;
* ``duo``: all cases, ``DUOLoss.paper(to_onehot_y=True)`` (the paper's setting) with a ``NoiseHead`` on the decoder's last
  features, called as ``loss(logits, head(features), labels)``.

Every arm: the same network (``FeatUNet``: study_oof's MONAI ``UNet(channels=(8, 16, 32), strides=(2, 2),
num_res_units=1)`` with 8 output channels used as the decoder's last features, a leaky ReLU, and a 1×1×1
convolution to the K logits, so DUO's noise head can read the features), the same initialisation per training
seed (paired arms), Adam (lr ``--lr``), cosine schedule, ``--steps`` steps of batch 2 on whole volumes with
study_oof's random gain/offset, the same grid (study_oof's ``load_cohort``: the source's field of view on
``--size`` voxels along its longest side). Softmax arms (Dice+CE, MONAI ``DiceCELoss``) are decoded by argmax;
sigmoid arms (dice_bce, duo; background excluded from the loss, as DUO's default) by the foreground class of the
largest logit where its sigmoid exceeds 0.5, else background.

Per (arm, seed): the mean over test cases of the mean foreground Dice; the table gives mean ± std over seeds,
the per-class means, and the paired difference to ``all`` (same seed) as mean ± std. Results per (arm, seed) are
cached in ``OUT/training/<source>-<draw>/<settings>/`` (resumable).

    nice -n 19 python bench/study_training.py --out runs/study --sources spine-ct --seeds 0 1 2
    python bench/study_training.py --out /tmp/training-smoke --smoke     # first source, 1 seed, 10 steps, grid 24

Writes ``OUT/NAME.json`` and ``OUT/NAME.md`` (the table ready to paste).
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
from study_detection import CONFIGS, SOURCES  # noqa: E402
from study_oof import SCORE_CONFIG, dice_per_class, load_cohort  # noqa: E402

VERSION = 1
FEATURES = 8  # channels of the decoder's last feature map (the noise head's input)


# ------------------------------------------------------------------------------------------------------------
# network and training


def make_net(K: int, seed: int):
    """``FeatUNet`` (see the module doc), initialised from ``seed``; returns ``(logits, features)``."""
    import torch
    from monai.networks.nets import UNet
    from torch import nn

    class FeatUNet(nn.Module):
        def __init__(self):
            super().__init__()
            # study_oof's backbone; its last layer is a plain convolution, so the activation here makes the
            # features what a 1x1 head (segmentation or noise) reads in train_duo's TinyUNet3D
            self.backbone = UNet(spatial_dims=3, in_channels=1, out_channels=FEATURES, channels=(8, 16, 32),
                                 strides=(2, 2), num_res_units=1)
            self.head = nn.Conv3d(FEATURES, K, 1)
            self.features = FEATURES

        def forward(self, x):
            f = torch.nn.functional.leaky_relu(self.backbone(x), 0.01)
            return self.head(f), f

    torch.manual_seed(seed)
    return FeatUNet()


LOSSES = ("dice_ce", "dice_bce", "duo")


def train_eval(image, label, train, test_image, K: int, loss: str, steps: int, seed: int, batch: int = 2,
               lr: float = 3e-3) -> np.ndarray:
    """Train on cases ``train`` of ``image``/``label`` and return the hard prediction of every ``test_image``."""
    import torch
    from monai.losses import DiceCELoss

    from auvcore import DUOLoss, NoiseHead

    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if len(train) < 1:
        raise ValueError("train: no training case left")
    net = make_net(K, seed)
    params = list(net.parameters())
    head = None
    if loss == "dice_ce":
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    else:
        kw = {} if loss == "duo" else {"alpha": 0.0, "tau": 0.0, "beta": 0.0}
        loss_fn = DUOLoss.paper(to_onehot_y=True, **kw)  # the study ran with the paper's setting
        if loss == "duo":
            torch.manual_seed(seed + 1)  # NoiseHead starts at zero anyway; seeded for completeness
            head = NoiseHead(net.features, K)
            params += list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    rng = np.random.default_rng(seed)
    xs = torch.from_numpy(image[train])
    ys = torch.from_numpy(label[train][:, None].astype(np.int64))
    net.train()
    for _ in range(steps):
        idx = rng.choice(len(train), size=min(batch, len(train)), replace=False)
        # study_oof's gain/offset augmentation: the held-out cases must not be judged on their intensity scale
        x = xs[idx] * torch.from_numpy(rng.uniform(0.9, 1.1, (len(idx), 1, 1, 1, 1)).astype(np.float32)) \
            + torch.from_numpy(rng.uniform(-0.1, 0.1, (len(idx), 1, 1, 1, 1)).astype(np.float32))
        z, f = net(x)
        if loss == "dice_ce":
            value = loss_fn(z, ys[idx])
        elif loss == "duo":
            value = loss_fn(z, head(f), ys[idx])
        else:
            value = loss_fn(z, torch.zeros_like(z), ys[idx])  # τ = β = 0: the noise logits do not enter
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
    net.eval()
    preds = []
    with torch.no_grad():
        for i in range(len(test_image)):
            z = net(torch.from_numpy(test_image[[i]]))[0][0]
            if loss == "dice_ce":
                preds.append(z.argmax(0).numpy())
            else:
                # sigmoid per class, background not trained: a voxel is foreground where some class is > 0.5
                fg = z[1:]
                p = fg.argmax(0) + 1
                p[torch.sigmoid(fg.max(0).values) <= 0.5] = 0
                preds.append(p.numpy())
    return np.stack(preds)


# ------------------------------------------------------------------------------------------------------------
# arms


def n_drop(n: int, keep: float) -> int:
    """Cases dropped to keep the fraction ``keep`` of ``n``, rounded to whole cases (24 at 0.9 → 2, at 0.95 → 1)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep: expected a fraction in (0, 1], got {keep}")
    return n - int(round(keep * n))


def top_cases(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores (high = suspect); ties broken by case order, NaN never dropped."""
    s = np.where(np.isfinite(score), score, -np.inf)
    return np.sort(np.argsort(-s, kind="stable")[:k])


def random_cases(n: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng([seed, k, 20261123]).choice(n, size=k, replace=False))


def load_cleanlab(path: Path | None, source: str, draw: int, ids: list[str]):
    """study_oof's ``cleanlab_score`` per case of this cohort, or ``None`` with the reason why not."""
    import pandas as pd

    if path is None or not Path(path).is_file():
        return None, f"{path}: no such file"
    df = pd.read_csv(path)
    need = {"source", "draw", "case", "cleanlab_score"}
    if need - set(df.columns):
        return None, f"{path}: lacks the columns {sorted(need - set(df.columns))}"
    g = df[(df["source"] == source) & (df["draw"] == draw)].set_index("case")
    if g.index.duplicated().any() or set(ids) - set(g.index):
        return None, f"{path}: not exactly one row per case of {source}-{draw}"
    return g.loc[ids, "cleanlab_score"].to_numpy(dtype=float), str(path)


def arms(cohort: dict, auv: np.ndarray, cleanlab, keeps, seed: int) -> dict:
    """name -> (dropped indices, loss) for one training seed (the random drops depend on it)."""
    n = len(cohort["ids"])
    out = {"all": (np.array([], int), "dice_ce")}
    for keep in keeps:
        k = n_drop(n, keep)
        tag = f"{round(100 * keep):d}"
        out[f"auv{tag}"] = (top_cases(auv, k), "dice_ce")
        out[f"random{tag}"] = (random_cases(n, k, seed), "dice_ce")
        if cleanlab is not None:
            out[f"cleanlab{tag}"] = (top_cases(cleanlab, k), "dice_ce")
    out["oracle"] = (np.flatnonzero(cohort["corrupted"]), "dice_ce")
    out["dice_bce"] = (np.array([], int), "dice_bce")
    out["duo"] = (np.array([], int), "duo")
    return out


ARM_TEXT = {"all": "all cases (Dice+CE)", "oracle": "oracle: recorded corrupted cases dropped",
            "dice_bce": "all cases, Dice+BCE (DUO with α = τ = β = 0)", "duo": "all cases, DUO + NoiseHead"}


def arm_text(name: str) -> str:
    for prefix, what in (("auv", "top-AUV dropped"), ("random", "random drop"), ("cleanlab", "top-cleanlab dropped")):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return f"{what}, keep {name[len(prefix):]} %"
    return ARM_TEXT.get(name, name)


# ------------------------------------------------------------------------------------------------------------
# study


def scores_table(out: Path, root: Path, source: str, draw: int):
    import pandas as pd

    run = out / "runs" / f"{source}-{draw}" / SCORE_CONFIG
    if not (run / "scores.parquet").is_file():
        from auvcore.app.scoring import score_dataset

        score_dataset(root, run, progress=False, **CONFIGS[SCORE_CONFIG])
    return pd.read_parquet(run / "scores.parquet")


def run_source(out: Path, source: str, draw: int, seeds, steps: int, size: int, lr: float, keeps, cleanlab_csv,
               n_test: int, cached_only: bool = False, log=print) -> dict:
    from auvcore.data import build_demo

    # the cohort of study_detection/study_oof (same folder, same arguments): reused, not rebuilt
    root = Path(build_demo(out / "data" / f"{source}-{draw}", n_cases=24, corrupt_fraction=0.25, seed=draw,
                           source=source))
    test_root = Path(build_demo(out / "data" / f"{source}-test", n_cases=n_test, corrupt_fraction=0.0, seed=1000,
                                source=source))
    cohort, test = load_cohort(root, size), load_cohort(test_root, size)
    if tuple(test["shape"]) != tuple(cohort["shape"]) or test["K"] != cohort["K"]:
        raise ValueError(f"{source}: test grid {test['shape']}/K {test['K']} differs from the training cohort's "
                         f"{cohort['shape']}/K {cohort['K']}")
    if (test["label"] != test["clean"]).any():
        raise ValueError(f"{test_root}: the held-out cohort has corrupted labels")
    table = scores_table(out, root, source, draw).set_index("case")
    auv = table.loc[cohort["ids"], "auv"].to_numpy(dtype=float)
    cleanlab, cl_note = load_cleanlab(cleanlab_csv, source, draw, cohort["ids"])
    log(f"{source}-{draw}: grid {cohort['shape']}, K {cohort['K']}, {len(cohort['ids'])} training cases "
        f"({int(cohort['corrupted'].sum())} corrupted), {len(test['ids'])} clean test cases; cleanlab: "
        f"{cl_note if cleanlab is not None else 'skipped (' + cl_note + ')'}")
    K = cohort["K"]
    settings = {"version": VERSION, "steps": steps, "size": size, "lr": lr, "batch": 2,
                "shape": list(cohort["shape"]), "train_ids": cohort["ids"], "test_ids": test["ids"]}
    cache = out / "training" / f"{source}-{draw}" / f"steps{steps}-size{size}-lr{lr:g}-test{n_test}"
    cache.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in seeds:
        for name, (drop, loss) in arms(cohort, auv, cleanlab, keeps, seed).items():
            key = {**settings, "arm": name, "seed": seed, "loss": loss, "dropped": [cohort["ids"][i] for i in drop]}
            f = cache / f"{name}-seed{seed}.json"
            try:
                rec = json.loads(f.read_text())
                if rec["key"] != key:
                    rec = None
            except (OSError, ValueError, KeyError):
                rec = None
            if rec is None and cached_only:
                log(f"  {name:<12} seed {seed}: not in the cache, left out (--cached-only)")
                continue
            if rec is None:
                t0 = time.perf_counter()
                train = np.setdiff1d(np.arange(len(cohort["ids"])), drop)
                pred = train_eval(cohort["image"], cohort["label"], train, test["image"], K, loss, steps,
                                  seed=seed, lr=lr)
                d = dice_per_class(pred, test["label"], K)[:, 1:]
                rec = {"key": key, "dice": d.tolist(), "seconds": time.perf_counter() - t0,
                       "dropped_corrupted": int(cohort["corrupted"][drop].sum()), "n_train": int(len(train))}
                tmp = f.with_suffix(".tmp")
                tmp.write_text(json.dumps(rec))
                tmp.replace(f)
                log(f"  {name:<12} seed {seed}: {rec['n_train']} cases ({len(drop)} dropped, "
                    f"{rec['dropped_corrupted']} corrupted), mean fg Dice {np.nanmean(d):.4f} "
                    f"({rec['seconds']:.0f} s)")
            else:
                log(f"  {name:<12} seed {seed}: reused ({np.nanmean(np.array(rec['dice'], float)):.4f})")
            results.append({"arm": name, "seed": seed, "loss": loss, "dropped": key["dropped"],
                            "dropped_corrupted": rec["dropped_corrupted"], "n_train": rec["n_train"],
                            "dice": rec["dice"], "seconds": rec["seconds"]})
    return {"source": source, "draw": draw, "grid": list(cohort["shape"]),
            "classes": [cohort["names"].get(k, str(k)) for k in range(1, K)],
            "n_train_cohort": len(cohort["ids"]), "n_corrupted": int(cohort["corrupted"].sum()),
            "n_test": len(test["ids"]), "cleanlab": cl_note if cleanlab is not None else None,
            "auv_top": [cohort["ids"][i] for i in top_cases(auv, 6)],
            "corrupted_ids": [cohort["ids"][i] for i in np.flatnonzero(cohort["corrupted"])], "runs": results}


def summarise(res: dict) -> list[dict]:
    """One row per arm: mean ± std over seeds of the mean foreground Dice, per-class means, paired Δ to ``all``."""
    if not res["runs"]:
        return []
    by_arm: dict[str, list] = {}
    for r in res["runs"]:
        by_arm.setdefault(r["arm"], []).append(r)
    base = {r["seed"]: np.nanmean(np.array(r["dice"], float)) for r in by_arm.get("all", [])}
    rows = []
    for name, rs in by_arm.items():
        d = [np.array(r["dice"], float) for r in rs]  # [test case, fg class] per seed
        mean = np.array([np.nanmean(x) for x in d])
        per_class = np.nanmean(np.stack([np.nanmean(x, 0) for x in d]), 0)
        delta = np.array([m - base[r["seed"]] for m, r in zip(mean, rs) if r["seed"] in base])
        drops = sorted({len(r["dropped"]) for r in rs})
        dc = [r["dropped_corrupted"] for r in rs]
        rows.append({"arm": name, "text": arm_text(name), "seeds": [r["seed"] for r in rs],
                     "n_train": rs[0]["n_train"], "dropped": drops[0] if len(drops) == 1 else drops,
                     "dropped_ids": rs[0]["dropped"] if not name.startswith("random") else None,
                     "dropped_corrupted_mean": float(np.mean(dc)),
                     "dice_mean": float(mean.mean()), "dice_std": float(mean.std(ddof=1)) if len(mean) > 1 else None,
                     "dice_per_seed": mean.tolist(), "per_class": per_class.tolist(),
                     "delta_mean": float(delta.mean()) if len(delta) else None,
                     "delta_std": float(delta.std(ddof=1)) if len(delta) > 1 else None,
                     "seconds_median": float(np.median([r["seconds"] for r in rs]))})
    return rows


def markdown(results: list[dict], meta: dict) -> str:
    lines = ["# Training study: filtering by AUV and DUO against clean held-out cases", "",
             f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}; "
             f"`{meta['command']}`", "",
             f"Network: MONAI UNet (8, 16, 32) + 1×1×1 head on its 8-channel last features, the same for every arm; "
             f"Adam lr {meta['lr']:g}, cosine schedule, {meta['steps']} steps × batch 2, grid {meta['size']} voxels "
             f"on the longest side; training seeds {meta['seeds']} (same initialisation per seed in every arm). "
             "Dice: hard prediction against the clean held-out labels per foreground class, mean over the test "
             "cases; ± = std over seeds (ddof 1); Δ vs all = paired (same seed) difference to the all-cases arm; "
             "per seed: seed: mean fg Dice of that seed; s / run: median seconds of one "
             "training (shared machine: the times vary with its load)."]
    for res in results:
        rows = res["summary"]
        cls = res["classes"]
        lines += ["", f"## {res['source']} (draw {res['draw']}): train on {res['n_train_cohort']} cases "
                      f"({res['n_corrupted']} corrupted), test on {res['n_test']} clean cases, grid {res['grid']}", "",
                  "| arm | cases used (dropped; of them corrupted) | mean fg Dice | Δ vs all | "
                  + " | ".join(cls) + " | per seed | s / run |",
                  "|---|---|---|---|" + "---|" * len(cls) + "---|---|"]
        for r in rows:
            dc = r["dropped_corrupted_mean"]
            dc_s = f"{dc:.0f}" if float(dc).is_integer() else f"{dc:.1f} (mean)"
            dl = "–" if r["delta_mean"] is None or r["arm"] == "all" else (
                f"{r['delta_mean']:+.4f} ± {r['delta_std']:.4f}" if r["delta_std"] is not None
                else f"{r['delta_mean']:+.4f}")
            dice = f"{r['dice_mean']:.4f}" + (f" ± {r['dice_std']:.4f}" if r["dice_std"] is not None else "")
            lines.append(f"| {r['text']} | {r['n_train']} ({r['dropped']}; {dc_s}) | {dice} | {dl} | "
                         + " | ".join(f"{v:.4f}" for v in r["per_class"]) + " | "
                         + ", ".join(f"{sd}: {v:.3f}" for sd, v in zip(r["seeds"], r["dice_per_seed"]))
                         + f" | {r['seconds_median']:.0f} |")
        dropped = {r["arm"]: r["dropped_ids"] for r in rows if r["dropped_ids"]}
        lines += ["", f"Corrupted training cases: {', '.join(res['corrupted_ids'])}. Dropped: "
                  + "; ".join(f"{a}: {', '.join(v)}" for a, v in dropped.items() if a != "oracle")
                  + (f". cleanlab scores: `{res['cleanlab']}`." if res["cleanlab"] else
                     ". cleanlab arm skipped (no study_oof cases CSV for this cohort).")]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/study"))
    ap.add_argument("--sources", nargs="+", default=["spine-ct"], choices=SOURCES)
    ap.add_argument("--draw", type=int, default=0, help="the training cohort's draw (build_demo seed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    ap.add_argument("--steps", type=int, default=300, help="training steps (batch 2) per run")
    ap.add_argument("--size", type=int, default=48, help="model grid: voxels along the source's longest side")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.95],
                    help="fractions kept by the AUV, random and cleanlab arms")
    ap.add_argument("--test-cases", type=int, default=8, help="cases of the clean held-out cohort")
    ap.add_argument("--cleanlab-csv", type=Path, default=None,
                    help="study_oof's cases CSV (default OUT/oof_cases.csv); its cleanlab_score adds the "
                         "cleanlab arms")
    ap.add_argument("--cached-only", action="store_true",
                    help="train nothing: tabulate the (arm, seed) runs already in the cache (a study stopped early)")
    ap.add_argument("--name", default="training", help="stem of the output files in OUT")
    ap.add_argument("--smoke", action="store_true", help="quick run: first source, seed 0, 10 steps, grid 24")
    a = ap.parse_args(argv)
    if a.smoke:
        a.sources, a.seeds, a.steps, a.size = a.sources[:1], [0], 10, 24
    if a.steps < 1:
        raise SystemExit(f"--steps: expected at least 1, got {a.steps}")
    if a.lr <= 0:
        raise SystemExit(f"--lr: expected a positive number, got {a.lr}")
    if a.test_cases < 1:
        raise SystemExit(f"--test-cases: expected at least 1, got {a.test_cases}")
    if len(set(a.seeds)) != len(a.seeds):
        raise SystemExit(f"--seeds: repeated seeds in {a.seeds}")
    for k in a.keep:
        if not 0.0 < k < 1.0:
            raise SystemExit(f"--keep: expected fractions in (0, 1), got {k}")
    if a.cleanlab_csv is None:
        a.cleanlab_csv = a.out / "oof_cases.csv"
    import torch

    torch.set_num_threads(1)  # the machine is shared; one core per job
    t0 = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    meta = {"machine": cpu_name(), "commit": commit, "date": time.strftime("%Y-%m-%d"),
            "command": "python bench/study_training.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "steps": a.steps, "size": a.size, "lr": a.lr, "seeds": a.seeds, "keep": a.keep}
    results = []
    a.out.mkdir(parents=True, exist_ok=True)
    for source in a.sources:
        res = run_source(a.out, source, a.draw, a.seeds, a.steps, a.size, a.lr, a.keep, a.cleanlab_csv,
                         a.test_cases, cached_only=a.cached_only)
        res["summary"] = summarise(res)
        results.append(res)
        # written after every source, so a run stopped later keeps the finished sources' tables
        meta["wall_s"] = time.perf_counter() - t0
        (a.out / f"{a.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                                          default=float))
        md = markdown(results, meta)
        (a.out / f"{a.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
