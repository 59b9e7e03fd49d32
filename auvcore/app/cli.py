"""The `auvcore` command: score a data set, filter it, report on it (see `auvcore --help`)."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

EPILOG = """examples:
  auvcore demo                                   build the demo data set, score, filter, report
  auvcore check DATA/                            every problem of the data set, before scoring
  auvcore score DATA/ --encoder merlin --layer layer2 --mode masked --out runs/r1
  auvcore qc runs/r1                             the out-of-fold label-error score (k-fold training)
  auvcore filter runs/r1 --quantile 0.95         kept/dropped lists + nnU-Net splits_final.json
  auvcore filter runs/r1 --per-class liver       per-class filter (docs/method.md §2)
  auvcore report runs/r1                         runs/r1/report/index.html
"""


def _quantile(s: str) -> float:
    try:
        q = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}")
    if not 0.0 < q <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s}")
    return q


def _degradations(known):
    """argparse type: one or more comma-separated image degradation kinds of ``known``."""
    def parse(s: str) -> list:
        kinds = [k.strip() for k in s.split(",") if k.strip()]
        bad = [k for k in kinds if k not in known]
        if not kinds or bad:
            raise argparse.ArgumentTypeError(f"expected kinds of {', '.join(known)}, got {s!r}")
        return kinds
    return parse


def _workers(s: str) -> int | str:
    if s == "auto":
        return s
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes >= 0 or 'auto', got {s!r}")
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of processes >= 0, got {n}")
    return n


def _encoders() -> tuple:
    from ..encoders import ENCODERS

    return ENCODERS


def _add_score_args(p, dataset: bool = True):
    if dataset:
        p.add_argument("dataset", help="data set folder (MSD or nnU-Net raw layout) or a CSV of case,image,label")
        p.add_argument("--out", required=True, help="run folder (created; an interrupted run resumes from it)")
    p.add_argument("--encoder", default="merlin", choices=_encoders(),
                   help="feature encoder (default: merlin, the embedded Merlin/Astra 3-D CT encoder)")
    p.add_argument("--layer", help="merlin, random3d: layer whose features are scored (default: layer2)")
    p.add_argument("--weights", help="merlin: astra (default), random, or a file")
    p.add_argument("--checkpoint", help="sam2: local checkpoint file (required; nothing is downloaded)")
    p.add_argument("--config", help="sam2: the sam2 config name (default: configs/sam2.1/sam2.1_hiera_t.yaml)")
    p.add_argument("--mode", default="masked", choices=["masked", "decoded"],
                   help="masked: within-class embedding covariance; decoded: prototype-similarity maps")
    p.add_argument("--input", default="raw", choices=["raw", "normalized"],
                   help="feed the raw image or the annotation-normalized image x̂")
    p.add_argument("--reduction", default="mean", choices=["mean", "sum"], help="class scales -> sample scale")
    p.add_argument("--seed", type=int, help="merlin (random weights), random3d: weight seed (default 0)")
    p.add_argument("--force", action="store_true",
                   help="start the run folder over (delete its results) instead of resuming it")
    p.add_argument("--device", default="cpu", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the encoder and S run (default cpu; auto: a GPU when one is usable; under torchrun, "
                        "cuda and auto mean cuda:LOCAL_RANK). Not part of the run's settings: a run may be resumed "
                        "on another device")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the encoder's forward precision (default float32; S is always taken in float32)")
    p.add_argument("--workers", type=_workers, default=0, metavar="N|auto",
                   help="read cases in N worker processes ahead of the encoder (default 0: in the main process); "
                        "auto: 0 on a CPU below 8 cores (1 from 8), on a GPU min(4, cores per rank - 1), at least 1")
    p.add_argument("--timing", metavar="FILE", help=argparse.SUPPRESS)  # bench: the time split as JSON
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("auvcore")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="auvcore", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Aleatoric uncertainty (AUV) of a medical segmentation data set from foundation-model "
                    "features: find and filter the noisiest training cases.")
    ap.add_argument("--version", action="version", version=f"auvcore {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("score", help="score every case (resumable) and write the AUV table",
                       description="Score every case: per-(case, class) semantic scale, voxel counts, per-class "
                                   "and sample AUV (normalised over the whole set), baseline scores. Writes "
                                   "RUN/scores.parquet. Killed runs resume when the same command is run again.")
    _add_score_args(p)
    p.add_argument("--csv", action="store_true", help="also write RUN/scores.csv")
    p.add_argument("--limit", type=int, default=None, help="score only the first N cases")

    p.add_argument("--check", action="store_true",
                   help="run `auvcore check` first and refuse to start if it finds an error (default: score every "
                        "case and record the bad ones as failed)")

    p = sub.add_parser("check", help="list every problem of a data set before scoring it",
                       description="Read every case as `score` would and list all problems at once: unreadable files, "
                                   "image/label grids that differ, label values not declared in dataset.json, NaN/Inf "
                                   "in images (errors); empty labels and classes that vanish at the encoder's feature "
                                   "grid (warnings). Exit 0 without errors, 3 with.")
    p.add_argument("dataset", help="data set folder (MSD or nnU-Net raw layout) or a CSV of case,image,label")
    p.add_argument("--encoder", default="merlin", choices=_encoders(),
                   help="whose feature grid the vanishing-class warnings are for (default merlin)")
    p.add_argument("--layer", help="merlin, random3d: the layer (default layer2)")
    p.add_argument("--limit", type=int, default=None, help="check only the first N cases")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("qc", help="the out-of-fold label-error score of a scored run (k-fold training, resumable)",
                       description="Label QC: train a small 3-D U-Net with k-fold cross-validation on the data set's "
                                   "own labels and score every case by cleanlab's softmin label quality of its "
                                   "out-of-fold prediction (the score that finds corrupted labels, bench/RESULTS.md). "
                                   "Reads the data set of RUN (a run of `auvcore score`) and adds the oof_* columns "
                                   "to RUN/scores.parquet; `auvcore filter` and `report` then use it by default. "
                                   "Killed runs resume at the next fold; under torchrun the folds are shared out "
                                   "over the ranks.")
    p.add_argument("run", help="run folder written by `auvcore score` (its data set is the one QC'd)")
    p.add_argument("--folds", type=int, default=4, help="cross-validation folds (default 4)")
    p.add_argument("--steps", type=int, default=200, help="training steps of batch 2 per fold (default 200)")
    p.add_argument("--size", type=int, default=48,
                   help="model grid: voxels along the data set's longest side (default 48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold split and the training (default 0)")
    p.add_argument("--device", default="cpu", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the models train (default cpu; not part of the settings)")
    p.add_argument("--force", action="store_true", help="start the label QC over (the scoring run is kept)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("filter", help="drop the most suspect cases; write kept/dropped lists and nnU-Net splits",
                       description="Keep case i iff score_i <= Q(quantile) (inverted-CDF quantile of the run's "
                                   "scores), or, with --per-class, iff every named class present in i passes its own "
                                   "cut. The score: the out-of-fold label-error score when `auvcore qc` has run, "
                                   "else the AUV (README 'Data-set QC' says why); --score names another.")
    p.add_argument("run", help="run folder written by `auvcore score`")
    p.add_argument("--quantile", type=_quantile, default=0.95, help="quantile p in (0, 1] (default 0.95)")
    p.add_argument("--per-class", nargs="+", metavar="NAME", help="class names for the per-class filter")
    p.add_argument("--score", choices=("oof", "auv", "outlier", "mahalanobis", "agreement"), default=None,
                   help="oof: the out-of-fold label-error score of `auvcore qc` (finds corrupted labels: AUROC "
                        "0.82-0.97 on the demo cohorts; the default when the table has it); auv: the paper's AUV "
                        "(0.47-0.58 there; the default otherwise); outlier (old name mahalanobis): the image/feature "
                        "outlier score; agreement: 1 - Dice between the promptable encoder's mask and the label "
                        "(runs scored with --encoder litemedsam|sam2 --mode decoded; beyond the paper)")

    p = sub.add_parser("report", help="write RUN/report/index.html with the plots")
    p.add_argument("run", help="run folder written by `auvcore score`")
    p.add_argument("--quantile", type=_quantile, default=None, help="cut to draw (default: the last filter's, else 0.95)")

    p = sub.add_parser("demo", help="the main job: build the demo data set, score it with Merlin, label QC, filter, "
                                    "report")
    p.add_argument("--out", default="runs/demo", help="folder for the demo data and run (default runs/demo)")
    p.add_argument("--cases", type=int, default=24, help="number of demo cases (default 24)")
    from ..data.cohorts import DEFAULT_KINDS, DEGRADATIONS, KINDS, SOURCES, STRENGTHS

    p.add_argument("--source", default="chest", choices=SOURCES,
                   help="real volume the cases are varied from: chest CT (default), spine CT or MR, brain MR, lung "
                        "or brain tumours, brain atlas (README 'Cohorts' says which package each needs)")
    p.add_argument("--fraction", type=_quantile, default=0.25,
                   help="share of cases whose labels are corrupted, or with --degrade whose images are degraded "
                        "(default 0.25)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=None, metavar="KIND",
                   help=f"label corruption kinds cycled over the corrupted cases, of {', '.join(KINDS)} "
                        f"(default: {' '.join(DEFAULT_KINDS)})")
    p.add_argument("--degrade", nargs="+", type=_degradations(DEGRADATIONS), metavar="KIND",
                   help=f"degrade images instead of corrupting labels (the labels stay clean): kinds cycled over "
                        f"the degraded cases, of {', '.join(DEGRADATIONS)} (space- or comma-separated)")
    p.add_argument("--strength", choices=STRENGTHS, default="default",
                   help="size of each corruption (or degradation)")
    p.add_argument("--quantile", type=_quantile, default=0.95)
    p.add_argument("--no-qc", action="store_true",
                   help="skip the label QC step (`auvcore qc`, 4 folds; it also skips itself below 8 cases)")
    _add_score_args(p, dataset=False)

    p = sub.add_parser("bench", help="run the benchmarks in bench/ (source checkout)")
    p.add_argument("--dir", default="bench", help="benchmark folder (default ./bench)")
    p.add_argument("--quick", action="store_true", help="small sizes")
    return ap


def _score(args, dataset, out):
    import json

    from .scoring import score_dataset

    timing = {}
    table = score_dataset(dataset, out, encoder=args.encoder, layer=args.layer, weights=args.weights, mode=args.mode,
                          input=args.input, reduction=args.reduction, seed=args.seed, csv=getattr(args, "csv", False),
                          limit=getattr(args, "limit", None), progress=not args.no_progress, force=args.force,
                          checkpoint=args.checkpoint, config=args.config, device=args.device, dtype=args.dtype,
                          workers=args.workers, timing=timing)
    if args.timing:  # one file per rank under torchrun: FILE.rank<r>.json
        path = Path(args.timing)
        if timing.get("world", 1) > 1:
            path = path.with_name(f"{path.stem}.rank{timing['rank']}{path.suffix or '.json'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(timing, indent=1))
    return table


def _env(name: str) -> int:
    import os

    try:
        return int(os.environ.get(name) or 0)
    except ValueError:
        return 0


def _rank() -> int:
    """This process's rank under torchrun (0 without)."""
    return _env("RANK")


def _world() -> int:
    """The number of ranks under torchrun (1 without)."""
    return max(1, _env("WORLD_SIZE"))


# Exit codes: 0 all cases scored, 2 bad invocation (nothing scored), 3 some cases failed (the table holds the
# others; the failed ones have their error in its `error` column and in RUN/run.log), 4 no case has an AUV
# (nothing useful was scored), 130 interrupted.
EXIT_CASES_FAILED = 3
EXIT_NO_AUV = 4


def _failures(run) -> int:
    """Print the failed and the unscorable cases of a run (if any) and return the exit code they call for."""
    from .table import failed_cases, read_table, unscored_notes

    failed, notes = failed_cases(run), unscored_notes(run)
    if notes:
        print(f"auvcore: {len(notes)} case(s) have no AUV or classes without a scale (the table's `reason` "
              "column):", file=sys.stderr)
        for c, why in notes.items():
            print(f"  {c}: {why}", file=sys.stderr)
    if failed:
        print(f"auvcore: {len(failed)} case(s) could not be scored (details in {Path(run) / 'run.log'}; "
              "run the same command again to retry them):", file=sys.stderr)
        for c, err in failed.items():
            print(f"  {c}: {err}", file=sys.stderr)
    if read_table(Path(run))["auv"].isna().all():
        print("auvcore: no case has an AUV: nothing useful was scored", file=sys.stderr)
        return EXIT_NO_AUV
    return EXIT_CASES_FAILED if failed else 0


def _qc_summary(run, quiet: bool = False) -> int:
    """Print the label QC's most suspect cases and the cases it could not score; the exit code they call for."""
    from .table import read_table

    df = read_table(Path(run))
    if "oof_score" not in df:
        print("auvcore: the label QC is not complete (run the same command again)", file=sys.stderr)
        return EXIT_CASES_FAILED
    failed = {c: e for c, e in zip(df["case"], df["oof_error"]) if e}
    if not quiet:
        top = df[df["oof_error"] == ""].sort_values("oof_score", ascending=False).head(5)
        print("most suspect labels (oof_score, 1 = the model contradicts the label): "
              + ", ".join(f"{c} {s:.3f}" for c, s in zip(top["case"], top["oof_score"])))
    if failed:
        print(f"auvcore: the label QC could not score {len(failed)} case(s) (the table's oof_error column):",
              file=sys.stderr)
        for c, e in failed.items():
            print(f"  {c}: {e}", file=sys.stderr)
    return EXIT_CASES_FAILED if failed else 0


def _check(args) -> int:
    from .check import check_dataset, format_problems

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: expected a positive number, got {args.limit}")
    cases, problems = check_dataset(args.dataset, args.encoder, args.layer, args.limit, not args.no_progress)
    print(format_problems(cases, problems), file=sys.stderr if any(p.error for p in problems) else sys.stdout)
    return EXIT_CASES_FAILED if any(p.error for p in problems) else 0


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "score":
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit: expected a positive number, got {args.limit}")
        if args.check and _check(args) != 0:
            print("auvcore: not scoring: mend the errors above or drop --check to score the other cases",
                  file=sys.stderr)
            return EXIT_CASES_FAILED
        table = _score(args, args.dataset, args.out)
        if _rank() != 0:  # under torchrun rank 0 speaks for the run
            return 0
        print(f"scores: {table}")
        return _failures(args.out)
    elif args.command == "check":
        return _check(args)
    elif args.command == "qc":
        from .qc import label_qc

        table = label_qc(args.run, folds=args.folds, steps=args.steps, size=args.size, seed=args.seed,
                         device=args.device, force=args.force, progress=not args.no_progress)
        if _rank() != 0:
            return 0
        print(f"scores: {table}")
        return _qc_summary(args.run)
    elif args.command == "filter":
        from .filter import filter_run

        out = filter_run(args.run, args.quantile, args.per_class, args.score)
        print((out / "summary.json").read_text())
        print(f"kept/dropped lists and splits_final.json in {out}")
    elif args.command == "report":
        from .report import write_report

        print(f"report: {write_report(args.run, args.quantile)}")
    elif args.command == "demo":
        from ..data.cohorts import build_demo, describe

        if _world() > 1:
            raise ValueError("demo runs in one process; under torchrun use `auvcore score` on a data set")
        from .filter import filter_run
        from .report import write_report

        t0 = time.time()
        out = Path(args.out)
        what = (f", {args.fraction:g} of them with degraded images ({', '.join(k for ks in args.degrade for k in ks)}; "
                f"labels clean)" if args.degrade else "")
        print(f"[1/5] building {args.cases} demo cases from {describe(args.source)}{what} in {out / 'data'}",
              flush=True)
        try:
            if args.degrade:  # clean labels, degraded images: --fraction and --strength are the degradation's
                if args.kinds:
                    raise ValueError("--kinds: label corruptions and --degrade are separate cohorts; give one")
                kinds = list(dict.fromkeys(k for ks in args.degrade for k in ks))
                data = build_demo(out / "data", n_cases=args.cases, source=args.source, corrupt_fraction=0.0,
                                  degrade=kinds, degrade_fraction=args.fraction, degrade_strength=args.strength)
            else:
                data = build_demo(out / "data", n_cases=args.cases, source=args.source,
                                  corrupt_fraction=args.fraction, strength=args.strength,
                                  **({"kinds": args.kinds} if args.kinds else {}))
        except ImportError as e:  # the source's package is not installed: say which extra brings it
            raise ValueError(str(e)) from e
        from ..encoders import encoder_options

        layer = encoder_options(args.encoder, layer=args.layer).get("layer", "-")
        print(f"[2/5] scoring with {args.encoder} ({layer}, {args.mode}, {args.input})", flush=True)
        _score(args, data, out / "run")
        from ..qc import FOLDS

        qc_rc = 0
        if args.no_qc:
            print("[3/5] label QC: skipped (--no-qc)", flush=True)
        elif args.cases < 2 * FOLDS:
            print(f"[3/5] label QC: skipped ({FOLDS}-fold training needs at least {2 * FOLDS} cases; run "
                  f"`auvcore qc {out / 'run'} --folds 2` for a smaller set)", flush=True)
        else:
            from .qc import label_qc

            print(f"[3/5] label QC: the out-of-fold label-error score ({FOLDS}-fold training)", flush=True)
            label_qc(out / "run", device=args.device, progress=not args.no_progress)
            qc_rc = _qc_summary(out / "run", quiet=True)
        print("[4/5] filtering", flush=True)
        filter_run(out / "run", args.quantile)
        print("[5/5] report", flush=True)
        page = write_report(out / "run", args.quantile)
        print(f"done in {time.time() - t0:.0f} s. report: {page.resolve()}")
        return _failures(out / "run") or qc_rc
    elif args.command == "bench":
        d = Path(args.dir)
        scripts = sorted(d.glob("bench_*.py")) if d.is_dir() else []
        if not scripts:
            raise ValueError(f"--dir: no bench_*.py scripts in {d} (run from a source checkout)")
        for s in scripts:
            if s.name == "bench_cuda.py":
                import torch

                if not torch.cuda.is_available():
                    print(f"== {s}: skipped (no CUDA GPU)", flush=True)
                    continue
            print(f"== {s}", flush=True)
            rc = subprocess.call([sys.executable, str(s)] + (["--quick"] if args.quick else []))
            if rc:
                return rc
    return 0


def main(argv=None) -> int:
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("\nauvcore: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, NotADirectoryError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"auvcore: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
