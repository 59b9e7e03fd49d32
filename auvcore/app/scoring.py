"""The main job: score a data set case by case into a run folder (resumable), then assemble its table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..scale import energy_spectrum
from .check import case_errors
from .run import (SETTINGS_KEYS, atomic_text, case_file, check_same_settings, clear_run, error_file, fingerprint,
                  record_failure, save_result, stored_fingerprint)
from .table import write_table


def score_case(encoder, volume, num_classes: int, mode: str = "masked", input: str = "raw") -> dict:
    """Per-class semantic scale S, voxel counts, energy spectra, class-mean embeddings (Mahalanobis
    baseline) and intensity variance (variance baseline) of one loaded case.

    Encoders that decode class maps themselves from box prompts (``decodes_with_prompts``: LiteMedSAM) give
    their own maps ``[1, K, X, Y, Z]`` in decoded mode, scored per axial slice (``Z [1, K, D=Z, X, Y]``,
    layout ``"D_HW"``), and their image embeddings in masked mode; any other encoder's decoded maps are
    prototype-similarity maps of its embeddings."""
    from ..baselines import intensity_variance
    from ..encoders import class_means, encode_case, prototype_maps
    from ..scale import masked_semantic_scale, semantic_scale

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


def score_dataset(dataset, out, encoder: str = "merlin", layer: str | None = None, weights: str | None = None,
                  mode: str = "masked", input: str = "raw", reduction: str = "mean", seed: int | None = None,
                  csv: bool = False, limit: int | None = None, progress: bool = True, force: bool = False,
                  checkpoint: str | None = None, config: str | None = None) -> Path:
    """Score every case of ``dataset`` into the run folder ``out`` (resumable); returns the table path.

    A case is scored again when its stored result is missing, failed, or stale (its files or the settings
    changed since). Nothing is written before the arguments, the data set and the encoder are checked.
    ``force`` starts the run folder over. ``layer``, ``weights``, ``seed`` (merlin, random3d) and
    ``checkpoint``, ``config`` (sam2) go to the encoders that take them (:data:`ENCODER_OPTIONS`)."""
    from ..data import discover, load_case
    from ..encoders import encoder_options, get_encoder

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
        check_same_settings(run, settings)
    elif run.exists() and any(run.iterdir()) and not force:
        raise ValueError(f"--out: {run} exists and is not an auvcore run folder; use an empty or new folder")
    fingerprints = {c.case_id: fingerprint(c, settings) for c in cases}
    stale = force or not (run / "settings.json").exists()
    todo = [c for c in cases if stale or stored_fingerprint(run, c.case_id) != fingerprints[c.case_id]]
    enc = None
    if todo:  # built before anything is written: a bad --layer or --weights leaves the folder as it was
        try:
            enc = get_encoder(encoder, **kw)
        except ImportError as e:  # an optional encoder's package is missing: say which extra brings it
            raise ValueError(f"--encoder {encoder}: {e}") from e
    if force:
        clear_run(run)
    # Rewritten each time: class names may have changed with the data set (its cases are then stale too).
    atomic_text(run / "settings.json", json.dumps(settings, indent=2))

    if todo:
        bar = _progress(len(cases), len(cases) - len(todo), progress)
        for case in todo:
            case_file(run, case.case_id).unlink(missing_ok=True)  # a stale result must not outlive a failure
            # One bad case never stops the run: its error is recorded and the next case goes on.
            try:
                vol = load_case(case, spacing=enc.spacing, modality=ds.modality or "CT")
                errors = case_errors(case, vol.label, ds)
                if errors:
                    raise ValueError("; ".join(errors))
                result = score_case(enc, vol, ds.num_classes, mode, input)
            except Exception as e:  # noqa: BLE001 - recorded per case, see record_failure
                msg = record_failure(run, case.case_id, e)
                bar.write(f"auvcore: case {case.case_id} failed: {msg}")
            else:
                save_result(run, case.case_id, {**result, "fingerprint": np.array(fingerprints[case.case_id])})
                error_file(run, case.case_id).unlink(missing_ok=True)
            bar.update(1)
        bar.close()
    return write_table(run, [c.case_id for c in cases], ds, csv=csv)


def _progress(total: int, done: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="case", desc="scoring", disable=not enabled, smoothing=0.1)
