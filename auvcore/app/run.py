"""The run folder: atomic writes, the run's settings, the case files and their fingerprints, failure records.

A run folder holds:
  settings.json          what was scored and how (a restart with other settings is refused)
  cases/<case>.npz       one file per finished case, written atomically: the unit of resumption
  cases/<case>.error.json  a case that could not be read, encoded or scored: its error (retried on restart)
  run.log                one line per failed case; the traceback too where the error is a bug
  scores.parquet (.csv)  the table, rebuilt from the case files, so an interrupted and resumed run ends
                         with the same table as an uninterrupted one (``table.py``)
  filter/                kept.txt, dropped.txt, splits_final.json, summary.json (``filter.py``)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from ..data.io import umask_mode

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

def read_settings(run: Path) -> dict:
    """The run's settings.json; a ValueError that names RUN when it is missing or unreadable."""
    try:
        with open(run / "settings.json", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"RUN: {run} holds no scoring run (settings.json missing); run `auvcore score` first")
    except ValueError as e:
        raise ValueError(f"RUN: {run}/settings.json is unreadable: {e}")


def check_same_settings(run: Path, new: dict) -> None:
    old = read_settings(run)
    diff = [k for k in (*SETTINGS_KEYS, "dtype") if old.get(k) != new.get(k)]
    if diff:
        what = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ValueError(f"--out: {run} holds a run with other settings ({what}); use another --out folder, "
                         "or --force to start this one over")


RUN_ENTRIES = ("settings.json", "cases", TABLE, "scores.csv", "run.log", "filter", "report")


# the report is drawn into RUN/<REPORT_TMP><random> and swapped in; the old one waits in RUN/<REPORT_TMP>old-<pid>
REPORT_TMP = ".report-"


def sweep_partial(run: Path) -> None:
    """Remove what a killed process left half-written: ``atomic_write``'s temporaries and the report's
    temporary folders. Called by rank 0 before any rank writes, so no live write is swept."""
    for folder in (run, run / "cases", run / "filter"):  # glob of a missing folder is empty
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)
    for p in run.glob(REPORT_TMP + "*"):
        shutil.rmtree(p, ignore_errors=True)


def clear_run(run: Path) -> None:
    """Remove what a scoring run wrote into ``run`` (--force); refuse a folder that is not a run."""
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


def fingerprint(case, settings: dict) -> str:
    """What a case's result depends on: its image and label files (path, size, modification time) and the
    settings that change its numbers. A stored result with another fingerprint is stale and is rescored."""
    h = hashlib.sha256()
    for p in (case.image, case.label):
        try:
            st = os.stat(p)
            h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns};".encode())
        except (OSError, TypeError):
            h.update(f"{p}|missing;".encode())
    # the encoder's forward precision changes S (bfloat16: by 1-2 %); float32, the default, is left out of the
    # hash so that runs scored before --dtype existed stay valid
    keys = (*SETTINGS_KEYS, "num_classes", "modality") + (("dtype",) if settings.get("dtype") else ())
    h.update(json.dumps({k: settings.get(k) for k in keys}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def stored_fingerprint(run: Path, case_id: str) -> str | None:
    try:
        with np.load(case_file(run, case_id)) as z:
            return str(z["fingerprint"]) if "fingerprint" in z.files else None
    except (OSError, ValueError, EOFError):  # missing or unreadable: not done
        return None


# ---- case files --------------------------------------------------------------------------------------

def case_file(run: Path, case_id: str) -> Path:
    return run / "cases" / f"{case_id}.npz"


def save_result(run: Path, case_id: str, result: dict) -> None:
    def w(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **result)

    atomic_write(case_file(run, case_id), w)


def load_result(run: Path, case_id: str) -> dict:
    with np.load(case_file(run, case_id)) as z:
        return {k: z[k] for k in z.files}


# ---- failed cases ------------------------------------------------------------------------------------

# Errors that bad input data raises (unreadable or inconsistent files, labels out of range, NaN in the
# image): one line in the log. Anything else is a bug and keeps its traceback there.
EXPECTED_ERRORS = (ValueError, OSError, EOFError, KeyError, ImportError, MemoryError)


def error_file(run: Path, case_id: str) -> Path:
    return run / "cases" / f"{case_id}.error.json"


def record_failure(run: Path, case_id: str, e: Exception) -> str:
    """Write the case's error file and its run.log line; return the message to show."""
    msg = f"{type(e).__name__}: {e}"
    expected = isinstance(e, EXPECTED_ERRORS)
    # an error raised in a loader process carries its traceback as text (app/distributed.py)
    tb = "" if expected else getattr(e, "auvcore_traceback", None) or traceback.format_exc()
    atomic_text(error_file(run, case_id), json.dumps({"error": msg, "bug": not expected}, indent=1))
    with open(run / "run.log", "a", encoding="utf-8") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} case {case_id} failed: {msg}\n{tb}")
    return msg if expected else f"{msg} (a bug: traceback in {run / 'run.log'})"
