"""`auvcore qc RUN/`: the out-of-fold (OOF) label-error score of a scored run, resumable per fold.

The model and the formula are :mod:`auvcore.qc`; this is the job around them. It reads the data set of a run
that `auvcore score` finished (RUN/settings.json) and writes into the same run folder:

  qc/plan.json           the settings (folds, steps, size, seed), every case with its file fingerprint, the
                         model grid, the fold of every case and the cases that could not be loaded; written by
                         rank 0 before any fold is trained
  qc/fold-<f>.npz        one file per finished fold, written atomically: the label-quality scores of the cases
                         it held out (the unit of resumption: a killed run starts again at the folds without one)
  qc/fold-<f>.error.json a fold whose training failed, with its error (its cases get it in the table; the next
                         run retries the fold)

then rebuilds the table (``table.write_table``), which joins the OOF columns once every fold is done. The same
command run again skips the finished folds; other settings are refused (``--force`` starts the QC over); a data
set whose files changed since (another fingerprint) starts over by itself, since every fold trains on every
other case. Under ``torchrun`` the folds still to do are shared out over the ranks (rank r takes the r-th,
(r+N)-th, ... of them), each rank loading every case (a fold trains on all the others) and writing only its own
fold files; rank 0 writes the plan before the others start and the table after they are done.

One bad case never stops the run: a case that cannot be read (or whose label has undeclared values) is left out
of every fold and gets its reason in the table's ``oof_error`` column; a fold whose training fails gives its
error to its cases and the other folds go on.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from .. import qc as Q
from .run import EXPECTED_ERRORS, atomic_text, atomic_write, fingerprint, read_settings
from .table import (QC_DIR, QC_PLAN, QC_SETTINGS_KEYS, QC_VERSION, qc_fold_error_file, qc_fold_file, read_table,
                    write_table)


def _extent_mm(case) -> np.ndarray:
    """The field of view of a case's image in mm along R, A, S, from its header (NIfTI: nothing else is
    read) or, for NRRD, the file."""
    import nibabel.orientations as nio

    from ..data.io import image_format, read_image

    path = Path(case.image)
    if image_format(path) == "nifti" and path.is_file():
        import nibabel as nib

        try:
            img = nib.load(str(path))
            shape, aff = img.shape[:3], np.asarray(img.affine, dtype=np.float64)
        except Exception as e:  # noqa: BLE001 - an unreadable header is that case's error
            raise ValueError(f"case {case.case_id!r}: image {path}: cannot read its header ({e})") from e
    else:
        arr, aff = read_image(path)
        shape = arr.shape
    axes = nio.io_orientation(aff)[:, 0]  # the world axis (R, A, S) of each voxel axis
    out = np.zeros(3)
    for i, w in enumerate(axes):
        if not np.isnan(w):
            out[int(w)] = shape[i] * float(np.linalg.norm(aff[:3, i]))
    if out.min() <= 0:
        raise ValueError(f"case {case.case_id!r}: image {path}: cannot tell its field of view from the affine")
    return out


def _qc_settings(folds: int, steps: int, size: int, seed: int) -> dict:
    for name, v, lo in (("folds", folds, 2), ("steps", steps, 1), ("size", size, 8), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"--{name}: expected an integer of at least {lo}, got {v!r}")
    return {"version": QC_VERSION, "folds": int(folds), "steps": int(steps), "size": int(size), "seed": int(seed)}


def _read_plan(run: Path) -> dict | None:
    try:
        return json.loads((run / QC_DIR / QC_PLAN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def label_qc(run, folds: int = Q.FOLDS, steps: int = Q.STEPS, size: int = Q.SIZE, seed: int = Q.SEED,
             device: str = "cpu", force: bool = False, progress: bool = True, workers: int = 0,
             timing: dict | None = None) -> Path:
    """Train ``folds`` models (``steps`` steps each) on the run's data set, score every case by its
    out-of-fold prediction, and rebuild the run's table with the OOF columns; returns the table's path.

    ``size``: voxels of the model grid along the data set's longest side (the median field of view of its
    cases; every case's volume is resized to that grid). ``seed``: of the fold split and the training (fold f
    trains with ``seed * 1000 + f``). ``device`` as for `auvcore score` (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``; not part of the settings: a run may be resumed on another device). ``workers``: processes that
    read the cases. ``timing`` (a dict) receives this rank's seconds (``load_s``, ``train_s``, ``table_s``,
    ``total_s``) and ``folds`` (trained by this rank)."""
    from ..data import discover
    from .distributed import Ranks, loaded_cases, resolve_device, say

    timing = {} if timing is None else timing
    t_start = time.perf_counter()
    run = Path(run)
    ranks = Ranks().start()
    try:
        error = None
        try:  # every check before anything is written, on every rank
            qs = _qc_settings(folds, steps, size, seed)
            if isinstance(workers, bool) or int(workers) != workers or workers < 0:
                raise ValueError(f"--workers: expected 0 or more, got {workers!r}")
            settings = read_settings(run)
            ids = read_table(run)["case"].tolist()
            dev = resolve_device(device, ranks.local_rank, ranks.world)
            ds = discover(settings["dataset"])
            K = ds.num_classes
            if K < 2:
                raise ValueError(f"RUN: the data set {ds.root} declares no foreground class; nothing to check")
            cases = [ds.case(c) for c in ids]
            fps = {c.case_id: fingerprint(c, {}) for c in cases}
            old = _read_plan(run) if ranks.main else None
            if old is not None and not force:
                diff = [k for k in QC_SETTINGS_KEYS if old.get("settings", {}).get(k) != qs[k]]
                if diff:
                    what = ", ".join(f"{k}: {old['settings'].get(k)!r} -> {qs[k]!r}" for k in diff)
                    raise ValueError(f"RUN: {run / QC_DIR} holds a label QC with other settings ({what}); run it "
                                     "with those, or --force to start the label QC over")
        except (ValueError, FileNotFoundError, KeyError, NotADirectoryError, OSError) as e:
            error = e
        ranks.agree(error)

        # the grid: the median field of view of the cases on `size` voxels along its longest side
        t = time.perf_counter()
        errors, extents = {}, {}
        for c in cases:
            try:
                extents[c.case_id] = _extent_mm(c)
            except (*EXPECTED_ERRORS,) as e:
                errors[c.case_id] = f"{type(e).__name__}: {e}"
        if not extents:
            ranks.agree(ValueError("RUN: no case of the data set can be read (the table's oof_error column)"))
        grid = Q.grid_shape(np.median(np.stack(list(extents.values())), axis=0), size)
        # every case on the grid (every rank: a fold trains on all the other cases)
        X, Y, ok = [], [], []
        bar = _progress(len(cases), progress and ranks.main, "label QC: reading", "case")
        for case, vol, err, _ in loaded_cases([c for c in cases if c.case_id not in errors], None,
                                              ds.modality or "CT", ds, workers):
            try:
                if err is not None:
                    raise err
                x, y = Q.resize_case(vol.image, vol.label, grid, K)
            except Exception as e:  # noqa: BLE001 - recorded for the case, the others go on
                errors[case.case_id] = f"{type(e).__name__}: {e}"
            else:
                X.append(x)
                Y.append(y)
                ok.append(case.case_id)
            bar.update(1)
        bar.update(len(cases) - bar.n)
        bar.close()
        timing["load_s"] = time.perf_counter() - t

        error = None
        plan = None
        try:
            if len(ok) < 2 * folds:
                raise ValueError(f"--folds {folds}: label QC needs at least {2 * folds} cases that load (every fold "
                                 f"holds out at least 2 and trains on the rest); {len(ok)} of {len(ids)} did"
                                 + (f" ({len(errors)} could not be read)" if errors else "")
                                 + "; use fewer folds")
            if ranks.main:
                fold = Q.fold_split(len(ok), folds, seed)
                plan = {"settings": qs, "cases": fps, "grid": list(grid), "fold": dict(zip(ok, fold.tolist())),
                        "errors": errors}
        except ValueError as e:
            error = e
        ranks.agree(error)

        if ranks.main:  # the only writes before the folds: start over where the plan changed, then the plan
            qc = run / QC_DIR
            old = _read_plan(run)
            same = old is not None and not force and {k: old.get(k) for k in plan} == plan
            if not same and qc.exists():
                if old is not None and not force and old.get("cases") != fps:
                    say("auvcore: the data set changed since the last label QC: every fold is trained again")
                shutil.rmtree(qc)
                if "oof_score" in read_table(run):  # the table must not show the scores of a QC that is gone
                    write_table(run, ids, ds, csv=(run / "scores.csv").exists())
            for p in qc.glob(".*.tmp"):  # what a killed write left half-done
                p.unlink(missing_ok=True)
            atomic_text(qc / QC_PLAN, json.dumps(plan, indent=1))
            todo = [f for f in range(folds) if not qc_fold_file(run, f).exists()]
            say(f"label QC: {len(ok)} cases on a {'×'.join(map(str, grid))} grid, {folds} folds × {steps} steps"
                + (f" ({folds - len(todo)} done before)" if len(todo) < folds else "")
                + (f", {len(errors)} case(s) left out (unreadable)" if errors else ""))
        else:
            todo = None
        plan, todo = ranks.broadcast((plan, todo))
        if sorted(plan["fold"]) != sorted(ok):  # a case that loaded on rank 0 but not here (or the reverse)
            ranks.agree(ValueError(f"rank {ranks.rank}: the cases that load differ from rank 0's"))
        else:
            ranks.agree(None)
        ranks.barrier()

        mine = todo[ranks.rank::ranks.world]
        image, label = np.stack(X)[:, None], np.stack(Y)
        fold = np.array([plan["fold"][c] for c in ok])
        timing.update(rank=ranks.rank, world=ranks.world, device=str(dev), folds=0, train_s=0.0)
        if dev.type == "cuda":
            import torch

            torch.cuda.set_device(dev)
        bar = _progress(len(mine) * steps, progress and ranks.main,
                        f"label QC (rank 0 of {ranks.world})" if ranks.distributed else "label QC", "step")
        for f in mine:
            t = time.perf_counter()
            bar.set_description(f"label QC fold {f + 1}/{folds}" + (f" (rank 0 of {ranks.world})"
                                                                    if ranks.distributed else ""))
            _run_fold(run, f, image, label, fold, ok, K, steps, seed, dev, bar)
            timing["train_s"] += time.perf_counter() - t
            timing["folds"] += 1
        bar.close()
        ranks.barrier()  # every fold is done
        t = time.perf_counter()
        table = run / "scores.parquet"
        if ranks.main:
            table = write_table(run, ids, ds, csv=(run / "scores.csv").exists())
        ranks.barrier()
        timing["table_s"] = time.perf_counter() - t
        timing["total_s"] = time.perf_counter() - t_start
        return table
    finally:
        ranks.close()


def _run_fold(run: Path, f: int, image, label, fold, ok, K, steps, seed, dev, bar) -> None:
    """Train fold ``f``, score its held-out cases, write its file; a failure writes its error file instead."""
    from .distributed import say

    test = np.flatnonzero(fold == f)
    train = np.flatnonzero(fold != f)
    qc_fold_file(run, f).unlink(missing_ok=True)
    t = time.perf_counter()
    try:
        done = bar.n
        probs = Q.train_predict(image, label, train, test, K, steps, seed=seed * 1000 + f, device=dev,
                                on_step=lambda i: bar.update(1))
        if not np.isfinite(probs).all():
            raise ValueError("the model's output is not finite (training diverged)")
        y = label[test]
        result = {"case": np.array([ok[i] for i in test]), "quality": Q.softmin_quality(probs, y),
                  "class_quality": Q.class_quality(probs, y),
                  "dice": Q.dice_per_class(probs.argmax(1), y, K), "seconds": np.float64(time.perf_counter() - t)}
    except Exception as e:  # noqa: BLE001 - the fold's cases get the error; the other folds go on
        bar.update(done + steps - bar.n)
        expected = isinstance(e, EXPECTED_ERRORS)
        msg = f"fold {f + 1} failed: {type(e).__name__}: {e}"
        atomic_text(qc_fold_error_file(run, f), json.dumps({"error": msg, "bug": not expected}, indent=1))
        if not expected:
            import traceback

            with open(run / "run.log", "a", encoding="utf-8") as log:
                log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} label QC {msg}\n{traceback.format_exc()}")
        say(f"auvcore: label QC {msg}")
        return

    def w(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **result)

    atomic_write(qc_fold_file(run, f), w)
    qc_fold_error_file(run, f).unlink(missing_ok=True)
    if bar.disable:  # without a progress bar (logs, batch jobs), one line per fold
        say(f"label QC fold {f + 1}: {len(train)} cases trained, {len(test)} scored, {result['seconds']:.0f} s")


def _progress(total: int, enabled: bool, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, smoothing=0.1)
