"""The main job: score a data set case by case (resumable), assemble the AUV table, filter it.

A run folder holds:
  settings.json          what was scored and how (a restart with other settings is refused)
  cases/<case>.npz       one file per finished case, written atomically: the unit of resumption
  cases/<case>.error.json  a case that could not be read, encoded or scored: its error (retried on restart)
  run.log                one line per failed case; the traceback too where the error is a bug
  scores.parquet (.csv)  the table, rebuilt from the case files, so an interrupted and resumed run ends
                         with the same table as an uninterrupted one
  filter/                kept.txt, dropped.txt, splits_final.json, summary.json (``filter_run``)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from . import scores as A
from .app.check import case_errors
from .data.io import umask_mode
from .scale import energy_spectrum

TABLE = "scores.parquet"
SETTINGS_KEYS = ("dataset", "encoder", "layer", "weights", "mode", "input", "reduction", "seed", "checkpoint", "config")

# ---- atomic files ------------------------------------------------------------------------------------

def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, umask_mode())
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_text(path: Path, text: str) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, w)


# ---- settings ----------------------------------------------------------------------------------------

def _settings(run: Path) -> dict:
    try:
        with open(run / "settings.json", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"RUN: {run} holds no scoring run (settings.json missing); run `auvcore score` first")
    except ValueError as e:
        raise ValueError(f"RUN: {run}/settings.json is unreadable: {e}")


def _check_same_settings(run: Path, new: dict) -> None:
    old = _settings(run)
    diff = [k for k in SETTINGS_KEYS if old.get(k) != new.get(k)]
    if diff:
        what = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ValueError(f"--out: {run} holds a run with other settings ({what}); use another --out folder, "
                         "or --force to start this one over")


RUN_ENTRIES = ("settings.json", "cases", TABLE, "scores.csv", "run.log", "filter", "report")


def _clear_run(run: Path) -> None:
    """Remove what a scoring run wrote into ``run`` (--force); refuse a folder that is not a run."""
    import shutil

    if not run.exists():
        return
    if not ((run / "settings.json").exists() or (run / "cases").is_dir()):
        if any(run.iterdir()):
            raise ValueError(f"--force: {run} is not an auvcore run folder; refusing to delete anything in it")
        return
    for name in RUN_ENTRIES:
        p = run / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _fingerprint(case, settings: dict) -> str:
    """What a case's result depends on: its image and label files (path, size, modification time) and the
    settings that change its numbers. A stored result with another fingerprint is stale and is rescored."""
    h = hashlib.sha256()
    for p in (case.image, case.label):
        try:
            st = os.stat(p)
            h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns};".encode())
        except (OSError, TypeError):
            h.update(f"{p}|missing;".encode())
    keys = (*SETTINGS_KEYS, "num_classes", "modality")
    h.update(json.dumps({k: settings.get(k) for k in keys}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _stored_fingerprint(run: Path, case_id: str) -> str | None:
    try:
        with np.load(_case_file(run, case_id)) as z:
            return str(z["fingerprint"]) if "fingerprint" in z.files else None
    except (OSError, ValueError, EOFError):  # missing or unreadable: not done
        return None


# ---- scoring one case --------------------------------------------------------------------------------

def score_case(encoder, volume, num_classes: int, mode: str = "masked", input: str = "raw") -> dict:
    """Per-class semantic scale S, voxel counts, energy spectra, class-mean embeddings (Mahalanobis
    baseline) and intensity variance (variance baseline) of one loaded case.

    Encoders that decode class maps themselves from box prompts (``decodes_with_prompts``: LiteMedSAM) give
    their own maps ``[1, K, X, Y, Z]`` in decoded mode, scored per axial slice (``Z [1, K, D=Z, X, Y]``,
    layout ``"D_HW"``), and their image embeddings in masked mode; any other encoder's decoded maps are
    prototype-similarity maps of its embeddings."""
    from .baselines import intensity_variance
    from .encoders import class_means, encode_case, prototype_maps
    from .scale import masked_semantic_scale, semantic_scale

    prompted = getattr(encoder, "decodes_with_prompts", False)
    agreement = np.full(num_classes, np.nan)
    if prompted:
        enc = encoder.with_output("decoded" if mode == "decoded" else "embedding")
        feats, lab = enc.encode(volume, input=input, num_classes=num_classes)
    else:
        feats, lab = encode_case(encoder, volume, input=input, num_classes=num_classes)
    counts = torch.bincount(lab.reshape(-1), minlength=num_classes).numpy()
    label_counts = np.bincount(np.asarray(volume.label).reshape(-1), minlength=num_classes)[:num_classes]
    if mode == "masked":
        S = masked_semantic_scale(feats, lab, num_classes)[0].double().numpy()
        spec = energy_spectrum(feats, labels=lab, num_classes=num_classes)[0].numpy()
    elif prompted:
        # decoded by the model itself: one row per axial slice; classes absent from the case -> NaN
        agreement = label_agreement(feats, lab, num_classes)
        maps = feats.permute(0, 1, 4, 2, 3)
        S = semantic_scale(maps, layout="D_HW")[0].double().numpy()
        spec = energy_spectrum(maps)[0].numpy()
        absent = counts < 2
        S[absent] = np.nan
        spec[absent] = np.nan
    else:
        # decoded: prototype-similarity maps; absent classes (NaN maps) are zeroed and reported as NaN
        maps = torch.nan_to_num(prototype_maps(feats, lab, num_classes), nan=0.0)
        S = semantic_scale(maps)[0].double().numpy()
        spec = energy_spectrum(maps)[0].numpy()
        absent = counts < 2
        S[absent] = np.nan
        spec[absent] = np.nan
    return {
        "S": S,
        "agreement": agreement,
        "counts": counts.astype(np.int64),
        "label_counts": label_counts.astype(np.int64),
        "spectrum": spec.astype(np.float32),
        "means": class_means(feats, lab, num_classes).numpy().astype(np.float32),
        "variance": intensity_variance(volume.image, volume.label, num_classes),
    }


def label_agreement(maps: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Per-class Dice between a promptable model's mask (decoded logits > 0) and the label, ``[K]`` float64;
    NaN for classes absent from the label. Beyond the paper: a label-QC score beside the AUV (a label that
    the model, prompted with the label's own boxes, does not reproduce is suspect)."""
    pred = maps[0] > 0  # [K, *grid]
    lab = labels[0]
    out = np.full(num_classes, np.nan)
    for c in range(1, num_classes):
        truth = lab == c
        n = int(truth.sum())
        if n:
            out[c] = 2.0 * int((pred[c] & truth).sum()) / (int(pred[c].sum()) + n)
    return out


def _case_file(run: Path, case_id: str) -> Path:
    return run / "cases" / f"{case_id}.npz"


def _save_case(run: Path, case_id: str, result: dict) -> None:
    def w(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **result)

    atomic_write(_case_file(run, case_id), w)


def _load_case(run: Path, case_id: str) -> dict:
    with np.load(_case_file(run, case_id)) as z:
        return {k: z[k] for k in z.files}


# ---- the scoring run ---------------------------------------------------------------------------------

def score_dataset(dataset, out, encoder: str = "merlin", layer: str | None = None, weights: str | None = None,
                  mode: str = "masked", input: str = "raw", reduction: str = "mean", seed: int | None = None,
                  csv: bool = False, limit: int | None = None, progress: bool = True, force: bool = False,
                  checkpoint: str | None = None, config: str | None = None) -> Path:
    """Score every case of ``dataset`` into the run folder ``out`` (resumable); returns the table path.

    A case is scored again when its stored result is missing, failed, or stale (its files or the settings
    changed since). Nothing is written before the arguments, the data set and the encoder are checked.
    ``force`` starts the run folder over. ``layer``, ``weights``, ``seed`` (merlin, random3d) and
    ``checkpoint``, ``config`` (sam2) go to the encoders that take them (:data:`ENCODER_OPTIONS`)."""
    from .data import discover, load_case
    from .encoders import encoder_options, get_encoder

    if mode not in ("masked", "decoded"):
        raise ValueError(f"--mode: expected 'masked' or 'decoded', got {mode!r}")
    if input not in ("raw", "normalized"):
        raise ValueError(f"--input: expected 'raw' or 'normalized', got {input!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"--reduction: expected 'mean' or 'sum', got {reduction!r}")
    ds = discover(dataset)
    cases = ds.cases[:limit] if limit else ds.cases
    run = Path(out)
    if checkpoint is not None:
        checkpoint = str(Path(checkpoint).resolve())
    kw = encoder_options(encoder, layer=layer, weights=weights, seed=seed, checkpoint=checkpoint, config=config)
    settings = {**{k: None for k in SETTINGS_KEYS}, "dataset": str(ds.root.resolve()), "encoder": encoder,
                **kw, "mode": mode, "input": input, "reduction": reduction, "num_classes": ds.num_classes,
                "class_names": {str(k): v for k, v in ds.class_names.items()}, "modality": ds.modality}
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out: {run} is a file, not a folder")
    if (run / "settings.json").exists() and not force:
        _check_same_settings(run, settings)
    elif run.exists() and any(run.iterdir()) and not force:
        raise ValueError(f"--out: {run} exists and is not an auvcore run folder; use an empty or new folder")
    fingerprints = {c.case_id: _fingerprint(c, settings) for c in cases}
    stale = force or not (run / "settings.json").exists()
    todo = [c for c in cases if stale or _stored_fingerprint(run, c.case_id) != fingerprints[c.case_id]]
    enc = None
    if todo:  # built before anything is written: a bad --layer or --weights leaves the folder as it was
        try:
            enc = get_encoder(encoder, **kw)
        except ImportError as e:  # an optional encoder's package is missing: say which extra brings it
            raise ValueError(f"--encoder {encoder}: {e}") from e
    if force:
        _clear_run(run)
    # Rewritten each time: class names may have changed with the data set (its cases are then stale too).
    atomic_text(run / "settings.json", json.dumps(settings, indent=2))

    if todo:
        bar = _progress(len(cases), len(cases) - len(todo), progress)
        for case in todo:
            _case_file(run, case.case_id).unlink(missing_ok=True)  # a stale result must not outlive a failure
            # One bad case never stops the run: its error is recorded and the next case goes on.
            try:
                vol = load_case(case, spacing=enc.spacing, modality=ds.modality or "CT")
                errors = case_errors(case, vol.label, ds)
                if errors:
                    raise ValueError("; ".join(errors))
                result = score_case(enc, vol, ds.num_classes, mode, input)
            except Exception as e:  # noqa: BLE001 - recorded per case, see _record_failure
                msg = _record_failure(run, case.case_id, e)
                bar.write(f"auvcore: case {case.case_id} failed: {msg}")
            else:
                _save_case(run, case.case_id, {**result, "fingerprint": np.array(fingerprints[case.case_id])})
                _error_file(run, case.case_id).unlink(missing_ok=True)
            bar.update(1)
        bar.close()
    return write_table(run, [c.case_id for c in cases], ds, csv=csv)


# Errors that bad input data raises (unreadable or inconsistent files, labels out of range, NaN in the
# image): one line in the log. Anything else is a bug and keeps its traceback there.
EXPECTED_ERRORS = (ValueError, OSError, EOFError, KeyError, ImportError, MemoryError)


def _error_file(run: Path, case_id: str) -> Path:
    return run / "cases" / f"{case_id}.error.json"


def _record_failure(run: Path, case_id: str, e: Exception) -> str:
    msg = f"{type(e).__name__}: {e}"
    expected = isinstance(e, EXPECTED_ERRORS)
    tb = "" if expected else traceback.format_exc()
    atomic_text(_error_file(run, case_id), json.dumps({"error": msg, "bug": not expected}, indent=1))
    with open(run / "run.log", "a", encoding="utf-8") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} case {case_id} failed: {msg}\n{tb}")
    return msg if expected else f"{msg} (a bug: traceback in {run / 'run.log'})"


def failed_cases(run) -> dict[str, str]:
    """The cases of the table whose scoring failed, with their error message."""
    df = read_table(Path(run))
    return {c: e for c, e in zip(df["case"], df["error"]) if e}


def unscored_notes(run) -> dict[str, str]:
    """The scored cases with no AUV or with classes that could not be scored, with the reason."""
    df = read_table(Path(run))
    return {c: r for c, r in zip(df["case"], df["reason"]) if r}


def _progress(total: int, done: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="case", desc="scoring", disable=not enabled, smoothing=0.1)


def _class_columns(class_names: dict) -> list[tuple[int, str]]:
    return [(int(k), v) for k, v in sorted(class_names.items(), key=lambda kv: int(kv[0]))]


def _rank01(x: np.ndarray) -> np.ndarray:
    """Per-column percentile ranks in [0, 1] of the non-NaN entries (baselines live on other scales per
    class; ranks make them comparable before averaging over classes)."""
    out = np.full_like(x, np.nan, dtype=np.float64)
    for k in range(x.shape[1]):
        ok = ~np.isnan(x[:, k])
        if ok.sum() >= 2:
            r = np.argsort(np.argsort(x[ok, k]))
            out[ok, k] = r / (ok.sum() - 1)
        elif ok.any():
            out[ok, k] = 0.5
    return out


def _row_mean(x: np.ndarray) -> np.ndarray:
    """Mean over the non-NaN entries of each row; NaN (without numpy's warning) for a row of NaN only."""
    n = (~np.isnan(x)).sum(axis=1)
    return np.where(n > 0, np.nansum(x, axis=1) / np.maximum(n, 1), np.nan)


def write_table(run: Path, case_ids: list[str], ds, csv: bool = False) -> Path:
    """Assemble the table from the case files: AUV normalised over the whole scored set."""
    import pandas as pd

    from .baselines import MahalanobisScorer

    settings = _settings(run)
    K = int(settings["num_classes"])
    errors = {}
    rows = []
    for c in case_ids:
        if _case_file(run, c).exists():
            rows.append(_load_case(run, c))
            continue
        try:
            errors[c] = json.loads(_error_file(run, c).read_text(encoding="utf-8"))["error"]
        except (OSError, ValueError, KeyError):
            errors[c] = "not scored"
        rows.append(_failed_row(K))
    S = np.stack([r["S"] for r in rows])
    fg = list(range(1, K)) if K > 1 else [0]
    sample_S = A.sample_scale(S, fg, settings["reduction"])
    auv_sample = A.auv(sample_S)
    auv_class = A.auv(S)
    var = np.stack([r["variance"] for r in rows])
    C = max((r["means"].shape[1] for r in rows if r["means"].size), default=0)
    means = np.stack([r["means"] if r["means"].size else np.full((K, C), np.nan) for r in rows]).astype(np.float64)
    maha = MahalanobisScorer().fit(means).fit_score(means) if len(rows) >= 2 and C else np.full_like(S, np.nan)
    names = dict(_class_columns(settings["class_names"]))
    table = {"case": case_ids, "error": [errors.get(c, "") for c in case_ids],
             "reason": [_why_nan(r, names, fg, c in errors) for c, r in zip(case_ids, rows)],
             "sample_scale": sample_S, "auv": auv_sample,
             "variance_score": _row_mean(_rank01(var[:, fg])) if len(rows) > 1 else np.nan,
             "mahalanobis_score": _row_mean(_rank01(np.asarray(maha)[:, fg])) if len(rows) > 1 else np.nan}
    # label agreement (promptable encoders in decoded mode; case files written before it have none)
    agree = np.stack([r.get("agreement", np.full(K, np.nan)) for r in rows]).astype(np.float64)
    has_agreement = bool(np.isfinite(agree).any())
    if has_agreement:
        table["agreement_score"] = 1.0 - _row_mean(agree[:, fg])  # 1 − mean Dice: high = the model disagrees
    if ds.corruption:
        table["corrupted"] = [bool(ds.corruption.get(c, {}).get("corrupted", False)) for c in case_ids]
        table["corruption_kind"] = [ds.corruption.get(c, {}).get("kind") or "" for c in case_ids]
    for k, name in _class_columns(settings["class_names"]):
        if k >= K:
            continue
        table[f"S[{name}]"] = S[:, k]
        table[f"voxels[{name}]"] = pd.array(np.stack([r["counts"] for r in rows])[:, k], dtype="Int64")
        table[f"auv[{name}]"] = auv_class[:, k]
        table[f"variance[{name}]"] = var[:, k]
        table[f"mahalanobis[{name}]"] = np.asarray(maha)[:, k]
        if has_agreement:
            table[f"agreement[{name}]"] = agree[:, k]
    df = pd.DataFrame(table)
    path = run / TABLE
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    if csv:
        atomic_write(run / "scores.csv", lambda tmp: df.to_csv(tmp, index=False))
    return path


def _why_nan(row: dict, names: dict, fg: list[int], failed: bool) -> str:
    """Why a scored case has no AUV, or which of its classes could not be scored: a class with fewer than 2
    voxels at the encoder's grid has no S (small structures vanish on coarse feature grids)."""
    if failed:
        return ""
    counts, label = row["counts"], row.get("label_counts")
    vanished = [f"{names.get(k, k)} ({int(label[k])} voxels -> {int(counts[k])} at the encoder's grid)"
                for k in fg if label is not None and label[k] > 0 and counts[k] < 2]
    if np.isnan(row["S"][fg]).all():
        if label is not None and not label[fg].any():
            return "no AUV: the label has no foreground class"
        return "no AUV: no foreground class has 2 voxels at the encoder's grid" + (
            f"; vanished: {', '.join(vanished)}" if vanished else "")
    return f"not scored: {', '.join(vanished)}" if vanished else ""


def _failed_row(K: int) -> dict:
    """The table's row of a case that was not scored: NaN everywhere, no voxel counts."""
    nan = np.full(K, np.nan)
    return {"S": nan, "counts": np.full(K, None, dtype=object), "variance": nan, "means": np.empty((K, 0))}


def read_table(run: Path):
    import pandas as pd

    path = Path(run) / TABLE
    if not path.exists():
        raise ValueError(f"RUN: {run} has no {TABLE}; run `auvcore score` to the end first")
    return pd.read_parquet(path)


def case_spectrum(run: Path, case_id: str) -> np.ndarray:
    return _load_case(Path(run), case_id)["spectrum"]


# ---- filtering ---------------------------------------------------------------------------------------

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


FILTER_SCORES = {"auv": ("auv", "auv[{}]"), "agreement": ("agreement_score", "agreement[{}]")}


def filter_run(run, quantile: float = 0.95, per_class: list[str] | None = None, score: str = "auv") -> Path:
    """Write kept.txt, dropped.txt, splits_final.json and summary.json under RUN/filter/.

    ``score``: ``"auv"`` (the paper's) or ``"agreement"`` (1 − the Dice between a promptable encoder's
    decoded mask and the label; runs scored with ``--encoder litemedsam|sam2 --mode decoded``). Per class,
    the agreement filter cuts 1 − that class's Dice."""
    run = Path(run)
    settings = _settings(run)
    q = A._check_quantile(quantile)
    if score not in FILTER_SCORES:
        raise ValueError(f"--score: expected one of {tuple(FILTER_SCORES)}, got {score!r}")
    df = read_table(run)
    column, class_column = FILTER_SCORES[score]
    if column not in df:
        raise ValueError(f"--score {score}: the run has no {column!r} column (label agreement needs a run scored "
                         "with a promptable encoder in decoded mode: --encoder litemedsam or sam2, --mode decoded)")
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
    summary = {"quantile": q, "score": score, **how, "cases": len(ids), "kept": len(kept), "dropped": len(dropped),
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
