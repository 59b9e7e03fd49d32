"""The host work of the main job per case, step by step, before and after issue 23's changes, in one process.

`auvcore score --timing` splits a run's wall time, but on a machine that other jobs load the split of two
runs minutes apart compares the load, not the code. This script times each host step of the scoring loop on
the same demo cases in one process, the old way and the new way in turn (the old ways are kept here as they
were at commit 72045eb: scipy's affine_transform per image and label, np.unique for the label check, np.bincount
of the label again in score_case, a second pass of the S op on the CPU for the spectra), and reports the
fastest of ``--repeats`` calls of each (the least disturbed one: what an idle machine gives), per torch thread
count. Merlin (random weights, layer2, masked) gives the features the S and "other" steps read.

    python bench/bench_host.py --cases 4 --repeats 7 --threads 1 2
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _util import cpu_name
from auvcore.testing import resample_reference

ROOT = Path(__file__).resolve().parents[1]


def best(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "auvcore_bench_scoring"))
    a = ap.parse_args()

    from auvcore import energy_spectrum, masked_semantic_scale
    from auvcore.app.check import case_errors
    from auvcore.baselines import intensity_variance
    from auvcore.data import build_demo, discover
    from auvcore.data.dataset import read_case, resample_volume
    from auvcore.data.io import read_image, to_ras
    from auvcore.encoders import MerlinEncoder, class_means, encode_case

    data = Path(a.work) / f"demo{max(a.cases, 8)}"
    if not (data / "dataset.json").exists():
        build_demo(data, n_cases=max(a.cases, 8))
    ds = discover(data)
    K = ds.num_classes
    enc = MerlinEncoder("layer2", weights="random")
    sp = enc.spacing
    rows = {}
    for case in ds.cases[: a.cases]:
        vol = resample_volume(read_case(case), sp)
        feats, lab = encode_case(enc, vol, num_classes=K)

        def read():
            img, aff = read_image(case.image)
            read_image(case.label)
            return img, aff

        def load_old():  # read, reorient, resample with scipy, the check's np.unique
            r = read_case(case)  # the same reading and checks as before 72045eb's resample
            img = resample_reference(r.image, r.affine, sp, 1)
            lab_ = resample_reference(r.label, r.affine, sp, 0).astype(np.int64)
            sorted(int(v) for v in np.unique(lab_) if int(v) not in ds.class_names)
            return img, lab_

        def load_new():
            v = resample_volume(read_case(case), sp)
            case_errors(case, v.label, ds, v.label_counts)

        def s_old():  # S, then the spectra again (the second pass)
            masked_semantic_scale(feats, lab, K)
            energy_spectrum(feats, labels=lab, num_classes=K)

        def s_new():
            masked_semantic_scale(feats, lab, K, spectrum=True)

        def other_old():
            torch.bincount(lab.reshape(-1), minlength=K)
            np.bincount(vol.label.reshape(-1), minlength=K)
            class_means(feats, lab, K)
            intensity_variance(vol.image, vol.label, K)

        def other_new():
            torch.bincount(lab.reshape(-1), minlength=K)
            class_means(feats, lab, K)
            intensity_variance(vol.image, vol.label, K)

        steps = {"read (nibabel)": (read, read), "load = read + resample + label check": (load_old, load_new),
                 "S + spectra": (s_old, s_new),
                 "other (counts, class means, variance)": (other_old, other_new)}
        for nt in a.threads:
            torch.set_num_threads(nt)
            for name, (fo, fn) in steps.items():
                if fo is None:
                    continue
                for _ in range(2):  # old and new interleaved, twice
                    rows.setdefault((nt, name), [[], []])
                    rows[nt, name][0].append(best(fo, a.repeats))
                    rows[nt, name][1].append(best(fn, a.repeats))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    print(f"\n{cpu_name()}; torch {torch.__version__}; {datetime.date.today()}; commit {commit}; {a.cases} demo cases; "
          f"fastest of {a.repeats} calls per step and case, mean over the cases; Merlin random layer2 masked\n")
    print("| torch threads | step | before ms/case | after ms/case | after / before |")
    print("|---|---|---|---|---|")
    for (nt, name), (o, n) in rows.items():
        mo, mn = 1e3 * np.mean(o), 1e3 * np.mean(n)
        print(f"| {nt} | {name} | {mo:.1f} | {mn:.1f} | {mn / mo:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
