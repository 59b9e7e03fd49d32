"""The main job: score a data set case by case into a run folder (resumable), then assemble its table."""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .run import (SETTINGS_KEYS, TABLE, atomic_text, case_file, check_same_settings, clear_run, error_file, fingerprint,
                  record_failure, save_result, stored_fingerprint, sweep_partial)
from .table import write_table


def score_case(encoder, volume, num_classes: int, mode: str = "masked", input: str = "raw",
               timing: dict | None = None) -> dict:
    """Per-class semantic scale S, voxel counts, energy spectra, class-mean embeddings (Mahalanobis
    baseline) and intensity variance (variance baseline) of one loaded case.

    Encoders that decode class maps themselves from box prompts (``decodes_with_prompts``: LiteMedSAM) give
    their own maps ``[1, K, X, Y, Z]`` in decoded mode, scored per axial slice (``Z [1, K, D=Z, X, Y]``,
    layout ``"D_HW"``), and their image embeddings in masked mode; any other encoder's decoded maps are
    prototype-similarity maps of its embeddings.

    S and the energy spectra come from one pass of the S op on the encoder's device (``encoder.device``: the
    CUDA kernels for a GPU encoder), in float32; the class means and baselines on the CPU. ``timing`` (a dict)
    accumulates the seconds spent in the encoder (``encode_s``: preprocessing, forward, labels onto the grid),
    in S (``S_s``: S and the spectra) and in the rest (``other_s``). :func:`score_dataset` runs the same three
    steps with S taken for several cases at once on a GPU (:func:`_scales`)."""
    timing = {} if timing is None else timing
    state = _encode(encoder, volume, num_classes, mode, input, timing)
    (scale,) = _scales([state], num_classes, timing)
    if isinstance(scale, Exception):
        raise scale
    return _finish(state, scale, volume, num_classes, timing)


def _encode(encoder, volume, num_classes, mode, input, timing) -> dict:
    """The encoder's features and labels on its device (score_case's first step)."""
    from ..encoders import encode_case

    device = torch.device(getattr(encoder, "device", None) or "cpu")
    prompted = getattr(encoder, "decodes_with_prompts", False)
    t0 = time.perf_counter()
    with _forward_precision(encoder):
        if prompted:
            enc = encoder.with_output("decoded" if mode == "decoded" else "embedding")
            feats, lab = enc.encode(volume, input=input, num_classes=num_classes)
        else:
            feats, lab = encode_case(encoder, volume, input=input, num_classes=num_classes)
    # S reads the features where the encoder left them (no round trip through the host for a GPU encoder);
    # the class means and baselines then take one copy to the host.
    feats, lab = feats.float().to(device), lab.to(device)
    timing["encode_s"] = timing.get("encode_s", 0.0) + time.perf_counter() - t0
    return {"feats": feats, "lab": lab, "mode": mode, "prompted": prompted}


def _scales(states, num_classes, timing) -> list:
    """(S [K], energies [K, C]) as numpy per encoded case, or the error that case alone raises. Masked
    embeddings on a GPU go through the CUDA kernels together (every case's Grams, one eigen launch:
    ``_cuda.masked_scale_cases``); anything else, or a group whose launch failed, case by case."""
    from ..scale import masked_semantic_scale, semantic_scale

    t = time.perf_counter()
    out = [None] * len(states)
    together = [i for i, st in enumerate(states) if st["mode"] == "masked" and _on_gpu(st["feats"])]
    if len(together) > 1:
        from .. import _cuda

        try:
            res = _cuda.masked_scale_cases([(states[i]["feats"], states[i]["lab"]) for i in together], num_classes)
        except Exception:  # noqa: BLE001 - the group as a whole failed: each case on its own below, its own error
            res = [None] * len(together)
        for i, r in zip(together, res):
            out[i] = r
    for i, st in enumerate(states):
        if out[i] is not None:
            continue
        try:
            feats, lab = st["feats"], st["lab"]
            if st["mode"] == "masked":
                out[i] = masked_semantic_scale(feats, lab, num_classes, spectrum=True)
            elif st["prompted"]:
                # decoded by the model itself: one row per axial slice
                out[i] = semantic_scale(feats.permute(0, 1, 4, 2, 3), layout="D_HW", spectrum=True)
            else:
                from ..encoders import prototype_maps

                # decoded: prototype-similarity maps; absent classes (NaN maps) are zeroed and reported as NaN
                maps = torch.nan_to_num(prototype_maps(feats, lab, num_classes), nan=0.0)
                out[i] = semantic_scale(maps, spectrum=True)
        except Exception as e:  # noqa: BLE001 - the case's own error, recorded by the caller
            out[i] = e
    out = [r if isinstance(r, Exception) else (r[0][0].double().cpu().numpy(), r[1][0].cpu().numpy()) for r in out]
    timing["S_s"] = timing.get("S_s", 0.0) + time.perf_counter() - t
    return out


def _on_gpu(t: torch.Tensor) -> bool:  # where _scales groups cases (a seam for the emulated test of the GPU path)
    return t.is_cuda


def _finish(state, scale, volume, num_classes, timing) -> dict:
    """score_case's last step: the case's result from its S and spectra, the class means and baselines."""
    from ..baselines import intensity_variance
    from ..encoders import class_means

    t = time.perf_counter()
    S, spec = scale
    mode = state["mode"]
    feats, lab = state["feats"].cpu(), state["lab"].cpu()
    agreement = np.full(num_classes, np.nan)
    counts = torch.bincount(lab.reshape(-1), minlength=num_classes).numpy()
    # the label's voxels per value, counted when it was resampled (load_case); else counted here
    label_counts = volume.label_counts if getattr(volume, "label_counts", None) is not None \
        else np.bincount(np.asarray(volume.label).reshape(-1))
    label_counts = np.pad(label_counts, (0, max(0, num_classes - len(label_counts))))[:num_classes]
    if mode != "masked":
        if state["prompted"]:
            agreement = label_agreement(feats, lab, num_classes)
        absent = counts < 2  # classes absent from the case -> NaN
        S[absent] = np.nan
        spec[absent] = np.nan
    out = {
        "S": S,
        "agreement": agreement,
        "counts": counts.astype(np.int64),
        "label_counts": label_counts.astype(np.int64),
        "spectrum": spec.astype(np.float32),
        "means": class_means(feats, lab, num_classes).numpy().astype(np.float32),
        "variance": intensity_variance(volume.image, volume.label, num_classes),
    }
    timing["other_s"] = timing.get("other_s", 0.0) + time.perf_counter() - t
    return out


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
                  checkpoint: str | None = None, config: str | None = None, device: str = "cpu",
                  dtype: str = "float32", workers: int | str = 0, timing: dict | None = None) -> Path:
    """Score every case of ``dataset`` into the run folder ``out`` (resumable); returns the table path.

    A case is scored again when its stored result is missing, failed, or stale (its files or the settings
    changed since). Nothing is written before the arguments, the data set and the encoder are checked.
    ``force`` starts the run folder over. ``layer``, ``weights``, ``seed`` (merlin, random3d) and
    ``checkpoint``, ``config`` (sam2) go to the encoders that take them (:data:`ENCODER_OPTIONS`).

    How the run is computed: ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) holds the encoder and S,
    ``dtype`` (``float32``, ``bfloat16``) is the encoder's forward precision (S is taken in float32),
    ``workers`` processes read the cases ahead of the encoder (0: this process; ``"auto"``: the number that
    :func:`~auvcore.app.distributed.auto_workers` picks for the device). Device and workers are not
    part of the run's settings or the cases' fingerprints: a run may be resumed on another device (see
    ``app/distributed.py``). A ``dtype`` other than float32 is (it changes S): a run is not resumed in
    another precision. Under ``torchrun`` (``WORLD_SIZE > 1``) the cases to score are shared out over
    the ranks (rank r takes the r-th, (r+N)-th, ... of them); rank 0 alone writes settings.json (before the
    others start) and the table (after they are all done); every rank returns the table's path.

    ``timing`` (a dict) receives this rank's seconds: ``setup_s`` (data set, encoder), ``load_s`` (reading and
    resampling, summed over the loader processes), ``load_wait_s`` (the scoring loop waiting for a loaded case),
    ``encode_s``, ``S_s``, ``other_s`` (:func:`score_case`), ``write_s`` (case files), ``table_s``, ``total_s``,
    with ``cases`` (scored by this rank), ``rank``, ``world``, ``device``, ``workers``."""
    from ..data import discover
    from ..encoders import encoder_options, get_encoder
    from .distributed import Ranks, auto_workers, resolve_device, resolve_dtype

    timing = {} if timing is None else timing
    t_start = time.perf_counter()
    ranks = Ranks().start()
    try:
        error = None
        try:  # every check before anything is written, on every rank; then the ranks agree to go on
            if mode not in ("masked", "decoded"):
                raise ValueError(f"--mode: expected 'masked' or 'decoded', got {mode!r}")
            if input not in ("raw", "normalized"):
                raise ValueError(f"--input: expected 'raw' or 'normalized', got {input!r}")
            if reduction not in ("mean", "sum"):
                raise ValueError(f"--reduction: expected 'mean' or 'sum', got {reduction!r}")
            if workers != "auto" and (isinstance(workers, (bool, str)) or int(workers) != workers or workers < 0):
                raise ValueError(f"--workers: expected 0 or more, or 'auto', got {workers!r}")
            dev = resolve_device(device, ranks.local_rank, ranks.world)
            if workers == "auto":
                workers = auto_workers(dev, ranks_per_node=ranks.local_world)
            torch_dtype = resolve_dtype(dtype)
            ds = discover(dataset)
            cases = ds.cases[:limit] if limit else ds.cases
            run = Path(out)
            if checkpoint is not None:
                checkpoint = str(Path(checkpoint).resolve())
            kw = encoder_options(encoder, layer=layer, weights=weights, seed=seed, checkpoint=checkpoint,
                                 config=config)
            settings = {**{k: None for k in SETTINGS_KEYS}, "dataset": str(ds.root.resolve()), "encoder": encoder,
                        **kw, "mode": mode, "input": input, "reduction": reduction, "num_classes": ds.num_classes,
                        "class_names": {str(k): v for k, v in ds.class_names.items()}, "modality": ds.modality,
                        "dtype": None if dtype == "float32" else dtype}  # see fingerprint
            if run.exists() and not run.is_dir():
                raise ValueError(f"--out: {run} is a file, not a folder")
            if (run / "settings.json").exists() and not force:
                check_same_settings(run, settings)
            elif run.exists() and any(run.iterdir()) and not force:
                raise ValueError(f"--out: {run} exists and is not an auvcore run folder; use an empty or new folder")
            fingerprints = {c.case_id: fingerprint(c, settings) for c in cases}
            todo = None
            if ranks.main:  # what is left to do, as rank 0 sees it before anything is written
                stale = force or not (run / "settings.json").exists()
                todo = [c.case_id for c in cases
                        if stale or stored_fingerprint(run, c.case_id) != fingerprints[c.case_id]]
        except (ValueError, FileNotFoundError, KeyError, NotADirectoryError, OSError) as e:
            error = e
        ranks.agree(error)
        todo = ranks.broadcast(todo)
        by_id = {c.case_id: c for c in cases}
        mine = [by_id[c] for c in todo[ranks.rank::ranks.world]]
        enc = None
        if dev.type == "cuda":  # kernels and libraries that use the current device find this rank's GPU
            torch.cuda.set_device(dev)
        if mine:  # built before anything is written: a bad --layer or --weights leaves the folder as it was
            try:
                enc = _build_encoder(get_encoder, encoder, kw, dev, torch_dtype)
            except ImportError as e:  # an optional encoder's package is missing: say which extra brings it
                error = ValueError(f"--encoder {encoder}: {e}")
                error.__cause__ = e
            except (ValueError, FileNotFoundError, KeyError, NotADirectoryError, OSError) as e:
                error = e
        ranks.agree(error)
        if ranks.main:
            if force:
                clear_run(run)
            sweep_partial(run)
            # Rewritten each time: class names may have changed with the data set (its cases are then stale too).
            atomic_text(run / "settings.json", json.dumps(settings, indent=2))
        ranks.barrier()  # the others start once settings.json is there
        timing.update(setup_s=time.perf_counter() - t_start, rank=ranks.rank, world=ranks.world, device=str(dev),
                      dtype=dtype, workers=int(workers), cases=0)
        for k in ("load_s", "load_wait_s", "encode_s", "S_s", "other_s", "write_s"):
            timing.setdefault(k, 0.0)

        if mine:
            _score_cases(run, mine, enc, ds, mode, input, fingerprints, int(workers), timing,
                         _progress(len(mine) if ranks.distributed else len(cases),
                                   0 if ranks.distributed else len(cases) - len(todo),
                                   progress and ranks.main,
                                   f"scoring (rank 0 of {ranks.world})" if ranks.distributed else "scoring"))
        ranks.barrier()  # every rank is done with its cases
        t = time.perf_counter()
        table = run / TABLE
        if ranks.main:
            table = write_table(run, [c.case_id for c in cases], ds, csv=csv)
        ranks.barrier()  # the others return once the table is there
        timing["table_s"] = time.perf_counter() - t
        timing["total_s"] = time.perf_counter() - t_start
        return table
    finally:
        ranks.close()


def _build_encoder(get_encoder, name: str, kw: dict, device, dtype):
    """The encoder on ``device``; ``dtype`` goes to encoders that take one (merlin, random3d: weights and
    activations in it), the others get a ``forward_dtype`` for :func:`_forward_precision`."""
    takes_dtype = name in ("merlin", "random3d")
    extra = {"dtype": dtype} if takes_dtype else {}
    enc = get_encoder(name, **kw, device=device, **extra)
    enc.forward_dtype = None if takes_dtype or dtype == torch.float32 else dtype
    return enc


def _forward_precision(enc):
    """Autocast of the encoder's forward to its ``forward_dtype`` where its weights are not cast (sam2,
    litemedsam); nothing else (S, spectra, means) runs under it."""
    dt = getattr(enc, "forward_dtype", None)
    if dt is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(enc.device).type, dtype=dt)


# Cases whose S is taken together in masked mode, per device type of the encoder: on a GPU one case's Grams (one
# eigen block each) leave most of it idle, so the Grams of this many cases go into one eigen launch (_scales);
# their results are written once the group is done (a crash loses at most one group, rescored on resume). On
# the CPU the op already runs on every core: one case at a time. A group's Grams (K C x C float64 per case) stay
# within GROUP_BYTES: fewer cases for many classes or wide features.
SCALE_BATCH = {"cuda": 16, "cpu": 1}
GROUP_BYTES = 1 << 30


def _group_size(device: torch.device, mode: str, num_classes: int, channels: int) -> int:
    if mode != "masked":
        return 1
    return max(1, min(SCALE_BATCH.get(device.type, 1), GROUP_BYTES // (num_classes * channels * channels * 8)))


def _score_cases(run, cases, enc, ds, mode, input, fingerprints, workers, timing, bar):
    from .distributed import loaded_cases

    device = torch.device(getattr(enc, "device", None) or "cpu")
    group = []  # (case, volume, encoded state) waiting for their S

    def finish_group():
        scales = _scales([st for _, _, st in group], ds.num_classes, timing)
        for (case, vol, st), scale in zip(group, scales):
            try:
                if isinstance(scale, Exception):
                    raise scale
                result = _finish(st, scale, vol, ds.num_classes, timing)
            except Exception as e:  # noqa: BLE001 - recorded per case, see record_failure
                fail(case, e)
            else:
                t = time.perf_counter()
                save_result(run, case.case_id, {**result, "fingerprint": np.array(fingerprints[case.case_id])})
                error_file(run, case.case_id).unlink(missing_ok=True)
                timing["write_s"] += time.perf_counter() - t
                timing["cases"] += 1
            bar.update(1)
        group.clear()

    def fail(case, e):
        msg = record_failure(run, case.case_id, e)
        bar.write(f"auvcore: case {case.case_id} failed: {msg}")

    t = time.perf_counter()
    for case, vol, err, load_s in loaded_cases(cases, enc.spacing, ds.modality or "CT", ds, workers,
                                               device=getattr(enc, "device", None)):
        timing["load_wait_s"] += time.perf_counter() - t
        timing["load_s"] += load_s
        case_file(run, case.case_id).unlink(missing_ok=True)  # a stale result must not outlive a failure
        # One bad case never stops the run: its error is recorded and the next case goes on.
        try:
            if err is not None:
                raise err
            group.append((case, vol, _encode(enc, vol, ds.num_classes, mode, input, timing)))
        except Exception as e:  # noqa: BLE001 - recorded per case, see record_failure
            fail(case, e)
            bar.update(1)
        del vol, err
        if group and len(group) >= _group_size(device, mode, ds.num_classes, int(group[-1][2]["feats"].shape[1])):
            finish_group()
        t = time.perf_counter()
    if group:
        finish_group()
    bar.close()


def _progress(total: int, done: int, enabled: bool, desc: str = "scoring"):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="case", desc=desc, disable=not enabled, smoothing=0.1)
